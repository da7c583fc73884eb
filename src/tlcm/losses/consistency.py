"""Consistency-distillation losses: LCM, MLCD (TLCM stage 1) and inter-segment consistency (TLCM stage 2).

Every loss is a callable that *receives* the networks (EDM style), so nothing here imports model code or reads files:

* ``student(z, t) -> model_output``: the trainable network, conditioning already bound by the caller;
* ``target(z, t) -> model_output``: ``f_{theta^-}``, an EMA copy or the student itself (called under ``no_grad``);
* ``teacher(z, t) -> (cond_output, uncond_output | None)``: the frozen teacher, conditional and unconditional
  outputs for classifier-free guidance (``None`` for the second when no guidance is applied).

``t`` is a ``(B,)`` long tensor of discrete times, ``-1`` (:data:`tlcm.math.CLEAN`) meaning the clean end.
All randomness (times, noise, guidance) is drawn by the caller and passed in, so a loss is a deterministic function
of its inputs and tests can recompute it independently. See ``shared/docs/METHOD.md`` and ``docs/distill.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tlcm.math import (
    CLEAN,
    alpha_sigma,
    alphas_cumprod_from_config,
    boundary_scalings,
    cfg_combine,
    ddim_step,
    model_output_to_x0_eps,
)

Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GuidedNet = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]
PerSampleDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (a, b) -> (B,), e.g. latent LPIPS


@dataclass(frozen=True)
class NoiseSchedule:
    """The teacher's discrete noise schedule and what its network predicts."""

    alphas_cumprod: torch.Tensor  # (T,) float64
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config) -> NoiseSchedule:
        return cls(alphas_cumprod_from_config(config), config.get("prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` shaped ``(B, 1, ..., 1)`` to broadcast against ``like``, in its dtype and device."""
        a, s = alpha_sigma(self.alphas_cumprod.to(like.device), t.to(like.device))
        shape = (-1,) + (1,) * (like.ndim - 1)
        return a.reshape(shape).to(like.dtype), s.reshape(shape).to(like.dtype)

    def x0_eps(self, output: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` from a raw network output at ``(z, t)``."""
        a, s = self.alpha_sigma(t, z)
        return model_output_to_x0_eps(output.to(z.dtype), z, a, s, self.prediction_type)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise


# ----------------------------------------------------------------------------------------------------------------
# distances
# ----------------------------------------------------------------------------------------------------------------


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` over all elements (diffusers' LCM scripts, per element)."""
    return (((a.float() - b.float()) ** 2 + c**2).sqrt() - c).mean()


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return ((a.float() - b.float()) ** 2).mean()


def distance(
    a: torch.Tensor, b: torch.Tensor, kind: str | PerSampleDistance = "huber", huber_c: float = 1e-3
) -> torch.Tensor:
    """The scalar distance every consistency loss uses: ``"huber"``, ``"l2"`` (means over all elements), or a callable
    ``kind(a, b) -> (B,)`` of per-sample distances (e.g. :class:`tlcm.losses.perceptual.LatentLPIPS`), averaged."""
    if callable(kind):
        d = kind(a, b)
        if d.ndim != 1 or d.shape[0] != a.shape[0]:
            raise ValueError(
                f"a distance callable must return one value per sample ({a.shape[0]},), got {tuple(d.shape)}"
            )
        return d.float().mean()
    if kind == "huber":
        return pseudo_huber(a, b, huber_c)
    if kind == "l2":
        return l2(a, b)
    raise ValueError(f"unknown loss type {kind!r}; expected 'huber', 'l2' or a per-sample distance callable")


# ----------------------------------------------------------------------------------------------------------------
# small pure building blocks
# ----------------------------------------------------------------------------------------------------------------


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of the LCM guidance ``w`` (scaled by 1000), fed to the UNet's ``timestep_cond``.

    The same embedding as diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding``, which embeds
    ``guidance_scale - 1``: that is LCM's ``w``, the convention we train with.
    """
    assert w.ndim == 1
    w = w.float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)


def _bcast(x: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | float | None:
    if isinstance(x, torch.Tensor) and x.ndim == 1:
        return x.reshape((-1,) + (1,) * (like.ndim - 1)).to(like)
    return x


@torch.no_grad()
def teacher_ddim_cfg(
    teacher: GuidedNet,
    z: torch.Tensor,
    t: torch.Tensor,
    s: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """One teacher DDIM step ``t -> s`` with classifier-free guidance applied to both ``x0`` and ``eps``.

    LCM form ``(1 + w) cond - w uncond`` (``w = 0`` or ``None``: the conditional prediction alone).
    """
    cond, uncond = teacher(z, t)
    x0, eps = schedule.x0_eps(cond, z, t)
    if uncond is not None and w is not None:
        ux0, ueps = schedule.x0_eps(uncond, z, t)
        wb = _bcast(w, z)
        x0, eps = cfg_combine(x0, ux0, wb), cfg_combine(eps, ueps, wb)
    a_s, s_s = schedule.alpha_sigma(s, z)
    return ddim_step(x0, eps, a_s, s_s)


def substep_times(t_from: torch.Tensor, t_to: torch.Tensor, num_substeps: int) -> list[torch.Tensor]:
    """``num_substeps + 1`` per-sample times from ``t_from`` down to ``t_to`` (both kept), evenly spaced, rounded."""
    assert num_substeps >= 1
    tf, tt = t_from.double(), t_to.double()
    out = [t_from.long()]
    for i in range(1, num_substeps):
        out.append(torch.round(tf + (tt - tf) * i / num_substeps).long())
    out.append(t_to.long())
    return out


@torch.no_grad()
def teacher_ddim_cfg_substeps(
    teacher: GuidedNet,
    z: torch.Tensor,
    t_from: torch.Tensor,
    t_to: torch.Tensor,
    num_substeps: int,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
) -> torch.Tensor:
    """``num_substeps`` teacher DDIM+CFG steps from ``t_from`` to ``t_to`` (stage 2's "3 sub-steps per segment")."""
    times = substep_times(t_from, t_to, num_substeps)
    for t, s in zip(times[:-1], times[1:]):
        z = teacher_ddim_cfg(teacher, z, t, s, w, schedule)
    return z


def consistency_fn(
    net: Net,
    z: torch.Tensor,
    t: torch.Tensor,
    schedule: NoiseSchedule,
    boundary: str = "lcm",
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """``f(z_t, t)``: the clean estimate with the boundary condition at ``t = 0`` / the clean end.

    ``boundary="lcm"``: ``c_skip(t) z_t + c_out(t) x0_hat`` (LCM); ``"none"``: ``x0_hat`` (TLCM's choice).
    At ``t == CLEAN`` the result is ``z`` itself in both cases.
    """
    t_net = t.clamp(min=0)
    x0, _ = schedule.x0_eps(net(z, t_net), z, t_net)
    if boundary == "lcm":
        c_skip, c_out = boundary_scalings(t_net, sigma_data, timestep_scaling)
        f = _bcast(c_skip.to(z.dtype), z) * z + _bcast(c_out.to(z.dtype), z) * x0
    elif boundary == "none":
        f = x0
    else:
        raise ValueError(f"unknown boundary condition {boundary!r}; expected 'lcm' or 'none'")
    clean = _bcast((t < 0).to(z.dtype), z)
    return clean * z + (1 - clean) * f


def segment_fn(net: Net, z: torch.Tensor, t: torch.Tensor, edge: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """MLCD's ``F(z_t, t) = DDIM(z_t, t -> e_m; x0_hat, eps_hat)``: the identity when ``t == e_m``."""
    at_edge = _bcast((t == edge).to(z.dtype), z)
    t_net = t.clamp(min=0)
    x0, eps = schedule.x0_eps(net(z, t_net), z, t_net)
    a_e, s_e = schedule.alpha_sigma(edge, z)
    return at_edge * z + (1 - at_edge) * ddim_step(x0, eps, a_e, s_e)


def lower_edges(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The lower edge ``e_m`` of the segment ``(e_m, e_{m+1}]`` that holds each ``t``."""
    edges = edges.to(t.device)
    m = torch.searchsorted(edges, t, right=False) - 1
    assert bool((m >= 0).all()) and bool((t <= edges[-1]).all()), "times outside the segments"
    return edges[m]


# ----------------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LossOutput:
    """A scalar loss plus the tensors it compared (for tests, logging and extra-loss hooks)."""

    loss: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor
    extras: dict = field(default_factory=dict)


def lcm_loss(
    student: Net,
    target_net: Net,
    teacher: GuidedNet,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t_start: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    skip: int = 20,
    boundary: str = "lcm",
    loss_type: str | PerSampleDistance = "huber",
    huber_c: float = 1e-3,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> LossOutput:
    """LCM / LCM-LoRA: ``d(f_theta(z_{t_{n+k}}), f_{theta^-}(DDIM_cfg(z_{t_{n+k}} -> t_n)))``.

    ``t_start`` are skipping-grid times ``t_{n+k}``; ``t_n = max(t_{n+k} - skip, 0)`` exactly as diffusers' scripts
    (whose lowest pair lands on ``t = 0``, where ``c_skip = 1``, ``c_out = 0``).
    """
    # 1. noise the (synthetic) clean latents to t_{n+k}
    z = schedule.add_noise(x0, noise, t_start)
    return lcm_loss_at(student, target_net, teacher, z, t_start, w, schedule, skip, boundary, loss_type, huber_c,
                       sigma_data, timestep_scaling)


def lcm_loss_at(
    student: Net,
    target_net: Net,
    teacher: GuidedNet,
    z: torch.Tensor,
    t_start: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    skip: int = 20,
    boundary: str = "lcm",
    loss_type: str | PerSampleDistance = "huber",
    huber_c: float = 1e-3,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> LossOutput:
    """:func:`lcm_loss` from a given state ``z`` at ``t_start`` (a teacher-path or stored trajectory state)."""
    t_prev = (t_start - skip).clamp(min=0)
    # 2. student prediction with the boundary condition
    pred = consistency_fn(student, z, t_start, schedule, boundary, sigma_data, timestep_scaling)
    # 3. teacher DDIM step with CFG to t_n, 4. target f_{theta^-} there (no gradient)
    with torch.no_grad():
        z_prev = teacher_ddim_cfg(teacher, z, t_start, t_prev, w, schedule)
        target = consistency_fn(target_net, z_prev, t_prev, schedule, boundary, sigma_data, timestep_scaling)
    # 5. distance
    loss = distance(pred, target, loss_type, huber_c)
    return LossOutput(loss, pred, target, {"z": z, "t": t_start, "z_prev": z_prev, "t_prev": t_prev})


def mlcd_loss(
    student: Net,
    target_net: Net,
    teacher: GuidedNet,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t_start: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    edges: torch.Tensor,
    skip: int = 20,
    loss_type: str | PerSampleDistance = "l2",
    huber_c: float = 1e-3,
) -> LossOutput:
    """TLCM stage 1 (MLCD): both sides moved by DDIM to the segment's lower edge ``e_m``, with ``t_n >= e_m``.

    ``t_start`` lies in ``(e_m, e_{m+1}]``; ``t_n = max(t_start - skip, e_m)``, so a teacher step never crosses an
    edge. With one segment (``edges = [-1, T-1]``) this is LCM with the boundary at the clean end and no
    ``c_skip/c_out``: ``F`` at ``t_n = -1`` is the teacher's own clean estimate.
    """
    # 1. noise to t_{n+k}
    z = schedule.add_noise(x0, noise, t_start)
    return mlcd_loss_at(student, target_net, teacher, z, t_start, w, schedule, edges, skip, loss_type, huber_c)


def mlcd_loss_at(
    student: Net,
    target_net: Net,
    teacher: GuidedNet,
    z: torch.Tensor,
    t_start: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    edges: torch.Tensor,
    skip: int = 20,
    loss_type: str | PerSampleDistance = "l2",
    huber_c: float = 1e-3,
) -> LossOutput:
    """:func:`mlcd_loss` from a given state ``z`` at ``t_start`` (a teacher-path or stored trajectory state)."""
    edge = lower_edges(t_start, edges)
    t_prev = torch.maximum(t_start - skip, edge)
    # 2. student: DDIM jump of its own (x0, eps) to the lower edge
    pred = segment_fn(student, z, t_start, edge, schedule)
    # 3. teacher DDIM+CFG step to t_n, 4. target network's jump from there to the same edge
    with torch.no_grad():
        z_prev = teacher_ddim_cfg(teacher, z, t_start, t_prev, w, schedule)
        target = segment_fn(target_net, z_prev, t_prev, edge, schedule)
    loss = distance(pred, target, loss_type, huber_c)
    return LossOutput(loss, pred, target, {"z": z, "t": t_start, "z_prev": z_prev, "t_prev": t_prev, "edge": edge})


def tlcm_loss(
    student: Net,
    target_net: Net,
    teacher: GuidedNet,
    x0_source: torch.Tensor,
    noise: torch.Tensor,
    t_hi: torch.Tensor,
    t_lo: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    num_substeps: int = 3,
    boundary: str = "none",
    loss_type: str | PerSampleDistance = "l2",
    huber_c: float = 1e-3,
) -> LossOutput:
    """TLCM stage 2: inter-segment (global) consistency of the clean prediction.

    ``x0_source`` are clean latents that were *not* real data: the student's own multistep samples (the paper) or
    teacher-synthesised latents. They are re-noised to ``t_hi``; the teacher walks ``num_substeps`` DDIM+CFG steps
    across the span to ``t_lo``; the loss is ``d(f_theta(z_hi, t_hi), f_{theta^-}(z_lo, t_lo))`` with ``f`` the clean
    estimate (``boundary="none"``: plain ``x0_hat`` as in the paper). ``t_lo = -1`` makes the target ``z_lo`` itself.
    """
    # 1. re-noise the data-free clean latents to the upper time
    z_hi = schedule.add_noise(x0_source, noise, t_hi)
    # 2. student clean estimate there
    pred = consistency_fn(student, z_hi, t_hi, schedule, boundary)
    # 3. teacher sub-steps across the span, 4. target network's clean estimate at the lower time
    with torch.no_grad():
        z_lo = teacher_ddim_cfg_substeps(teacher, z_hi, t_hi, t_lo, num_substeps, w, schedule)
        target = consistency_fn(target_net, z_lo, t_lo, schedule, boundary)
    loss = distance(pred, target, loss_type, huber_c)
    return LossOutput(loss, pred, target, {"z": z_hi, "t": t_hi, "z_prev": z_lo, "t_prev": t_lo})


# ----------------------------------------------------------------------------------------------------------------
# states on the teacher's own path (TLCM's "multistep denoising strategy")
# ----------------------------------------------------------------------------------------------------------------


def teacher_path_times(t_target: torch.Tensor, edges: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample times of the teacher's walk from the top edge ``e_M`` to ``t_target``: ``e_M``, then every edge
    strictly between, then ``t_target`` (a sample already at its time repeats it).

    A target in the segment ``(e_m, e_{m+1}]`` takes ``M - m`` steps (fewer when it sits on ``e_{m+1}``): one for the
    top segment and ``M`` for the lowest, as the TLCM paper describes. The list has ``M + 1`` entries for every sample;
    equal consecutive entries mean "no step".
    """
    edges = edges.to(t_target.device)
    uppers = [int(e) for e in edges.flip(0)[:-1]]  # e_M, ..., e_1
    times = [torch.full_like(t_target, uppers[0])]
    for e in uppers[1:]:
        times.append(torch.maximum(torch.full_like(t_target, e), t_target))
    times.append(t_target.clone())
    return times


@torch.no_grad()
def teacher_path_states(
    teacher: GuidedNet,
    noise: torch.Tensor,
    t_target: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
    edges: torch.Tensor,
) -> torch.Tensor:
    """``z_{t_target}`` from the teacher's own DDIM+CFG walk: start at unit ``noise`` at the top time (as sampling
    does), step edge to edge, then to each sample's ``t_target`` (:func:`teacher_path_times`).

    All samples take their steps in one batched teacher call per edge; a sample that has arrived keeps its state.
    """
    times = teacher_path_times(t_target, edges)
    z = noise
    for t, s in zip(times[:-1], times[1:]):
        moving = t != s
        if not bool(moving.any()):
            continue
        stepped = teacher_ddim_cfg(teacher, z, t, s, w, schedule)
        z = torch.where(_bcast(moving, z).bool(), stepped, z)
    return z


# ----------------------------------------------------------------------------------------------------------------
# few-step sampling with a consistency student (stage-2 sources, validation, benchmarks)
# ----------------------------------------------------------------------------------------------------------------


def backward_simulation(
    net: Net,
    noise: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    mode: str = "lcm",
    boundary: str = "lcm",
    renoise_noise: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The student's few-step output with a graph on its **last** step only (DMD2's backward simulation).

    The walk is :func:`multistep_sample`'s; every step but the last runs without gradient, so the returned clean
    latent depends differentiably on the network through its final evaluation, at the lowest time of the walk: the
    input that the DMD, GAN and reward terms train is exactly what the student sees when it samples in that many
    steps.
    """
    times = [int(t) for t in timesteps]
    z = noise
    if len(times) > 1:
        z = multistep_sample(net, noise, times[:-1], schedule, mode, boundary, renoise_noise,
                             stop_at=times[-1])
    tt = torch.full((z.shape[0],), times[-1], dtype=torch.long, device=z.device)
    if mode == "segments":
        x0, _ = schedule.x0_eps(net(z, tt), z, tt)
        return x0
    return consistency_fn(net, z, tt, schedule, boundary)


@torch.no_grad()
def multistep_sample(
    net: Net,
    noise: torch.Tensor,
    timesteps: list[int],
    schedule: NoiseSchedule,
    mode: str = "lcm",
    boundary: str = "lcm",
    renoise_noise: list[torch.Tensor] | None = None,
    stop_at: int = CLEAN,
) -> torch.Tensor:
    """Walk a consistency student down ``timesteps`` (descending, first = start) from unit ``noise``; return clean.

    ``mode="lcm"``: at each time ``x0 = f(z_t, t)``, then ``z_{t'} = alpha_{t'} x0 + sigma_{t'} n`` with fresh ``n``
    (``renoise_noise[i]`` when given, for reproducibility). ``mode="segments"``: deterministic DDIM jumps with the
    student's ``(x0, eps)`` from each time to the next, ending clean (MLCD's edge-to-edge walk).
    ``stop_at``: the time after the last of ``timesteps`` (default the clean end); another time returns the state
    there instead (the input of a further step, see :func:`backward_simulation`).
    """
    if mode not in ("lcm", "segments"):
        raise ValueError(f"unknown sampling mode {mode!r}; expected 'lcm' or 'segments'")
    z = noise  # SD latents start as unit Gaussian noise at the top time, as diffusers' pipelines do
    times = [int(t) for t in timesteps]
    for i, t in enumerate(times):
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        last = i + 1 == len(times)
        ts = torch.full_like(tt, times[i + 1] if not last else stop_at)
        if mode == "segments":
            x0, eps = schedule.x0_eps(net(z, tt), z, tt)
            a_s, s_s = schedule.alpha_sigma(ts, z)
            z = ddim_step(x0, eps, a_s, s_s)
            continue
        x0 = consistency_fn(net, z, tt, schedule, boundary)
        if last and stop_at == CLEAN:
            return x0
        n = renoise_noise[i] if renoise_noise is not None else torch.randn_like(z)
        a_s, s_s = schedule.alpha_sigma(ts, z)
        z = ddim_step(x0, n, a_s, s_s)
    return z


__all__ = [
    "GuidedNet",
    "LossOutput",
    "Net",
    "NoiseSchedule",
    "PerSampleDistance",
    "backward_simulation",
    "consistency_fn",
    "distance",
    "guidance_scale_embedding",
    "l2",
    "lcm_loss",
    "lcm_loss_at",
    "lower_edges",
    "mlcd_loss",
    "mlcd_loss_at",
    "multistep_sample",
    "pseudo_huber",
    "segment_fn",
    "substep_times",
    "teacher_ddim_cfg",
    "teacher_ddim_cfg_substeps",
    "teacher_path_states",
    "teacher_path_times",
    "tlcm_loss",
]
