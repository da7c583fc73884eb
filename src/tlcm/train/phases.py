"""What each phase of a training step computes: the student's loss, the fake score's, the discriminator's.

A step (see :func:`tlcm.train.loop.distill`) walks the recipe's phases (:func:`tlcm.train.recipes.recipe_phases`);
each phase trains one part and calls one method of :class:`StepLosses` per micro-batch:

* ``student``: ``consistency_weight * consistency`` (the recipe's LCM / MLCD / stage-2 loss, from forward-noised,
  teacher-path or stored states) ``+ dmd_weight * DMD + gan_weight * GAN_G + regression_weight * regression +
  reward_weight * reward + extras``;
* ``fake``: the fake score's denoising loss on the student's (detached) samples ``[+ gan_disc_weight * GAN_D]`` when
  the discriminator is built on the fake score (DMD2);
* ``discriminator``: ``gan_disc_weight * GAN_D`` on the frozen teacher's features (heads only).

The formulas are in :mod:`tlcm.losses` (consistency, dmd, adversarial, reward); this module only binds
networks and conditioning to them and draws their random inputs. Each draw comes from a generator seeded by
``(seed, step, stream, micro-batch, rank)`` (:func:`step_generator`), so a resumed run draws exactly what the
uninterrupted one did, whichever phases ran before. Decisions that must agree across processes (how many steps the
student's sample takes) use ``rank = 0``.

The student's few-step sample is shared: the student phase draws it with a graph on its last step
(:func:`tlcm.losses.backward_simulation`) and caches it detached; the fake and discriminator phases of the same step
reuse it, or draw the identical sample (same generator, same weights: the student has not stepped yet) when the
student phase did not run this step (two time-scale rule).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tlcm.errors import TLCMError
from tlcm.losses import (
    ExtraLossContext,
    LossOutput,
    NoiseSchedule,
    backward_simulation,
    extra_losses_total,
    guidance_scale_embedding,
    lcm_loss,
    lcm_loss_at,
    mlcd_loss,
    mlcd_loss_at,
    multistep_sample,
    teacher_path_states,
    tlcm_loss,
)
from tlcm.losses.adversarial import discriminator_loss, generator_loss
from tlcm.losses.dmd import distribution_matching_loss, fake_score_loss
from tlcm.losses.regression import regression_loss
from tlcm.losses.reward import decode_for_reward, mismatched_prompts, reward_loss
from tlcm.math import segment_edges
from tlcm.train.config import DistillConfig
from tlcm.train.recipes import edges_of, sample_training_times, sampling_plan, stage2_source_plan

# random streams of a step (stream 0 keeps the consistency recipes' original seeds)
CONSISTENCY, SAMPLE, DMD, GAN_G, FAKE, GAN_D, REWARD, REAL, DECIDE, MISMATCH = range(10)


def step_generator(seed: int, step: int, micro: int, rank: int, stream: int = CONSISTENCY) -> torch.Generator:
    """The generator of one random stream of one micro-batch of one step on one process."""
    base = ((seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + rank
    if stream:
        base = (base * 65_537 + stream * 2_147_483_647) % (2**63 - 1)
    return torch.Generator().manual_seed(base)


def unet_fn(unet, cond, timestep_cond=None):
    kwargs = cond.unet_kwargs()

    def fn(z, t):
        return unet(z, t, timestep_cond=timestep_cond, **kwargs, return_dict=False)[0]

    return fn


def guided_fn(unet, cond, uncond, guided: bool):
    """``teacher(z, t) -> (cond_out, uncond_out)``, both halves in one batched forward."""
    from tlcm.models import Conditioning

    if not guided:
        c = unet_fn(unet, cond)
        return lambda z, t: (c(z, t), None)
    both = unet_fn(unet, Conditioning.cat([cond, uncond]))

    def fn(z, t):
        out = both(torch.cat([z, z]), torch.cat([t, t]))
        return out.chunk(2)

    return fn


@dataclass
class MicroBatch:
    """One micro-batch of one step, and what its phases share (conditioning, the student's samples)."""

    batch: dict
    step: int
    micro: int
    real_batch: dict | None = None  # from gan_real_data, when the GAN's "real" latents come from another folder
    cache: dict[str, Any] = field(default_factory=dict)


class StepLosses:
    """The phase losses of one run: networks, conditioning and configuration bound once, micro-batches passed in."""

    def __init__(self, cfg: DistillConfig, networks, student_module, schedule: NoiseSchedule, encoder, device,
                 weight_dtype, rank: int, extra_state: dict[str, dict], vae=None, reward=None,
                 reward_margin: float | None = None, prompt_pool: Sequence[str] = (), distance_kind: Any = None,
                 zero_empty_negatives: bool = False):
        self.cfg, self.networks, self.student_module = cfg, networks, student_module
        # SDXL's force_zeros_for_empty_prompt, as the synthesizer applied it (tlcm.models.zeros_for_empty_negatives)
        self.zero_empty_negatives = zero_empty_negatives
        self.schedule, self.encoder, self.device, self.weight_dtype, self.rank = (schedule, encoder, device,
                                                                                 weight_dtype, rank)
        self.extra_state = extra_state
        self.vae, self.reward, self.reward_margin, self.prompt_pool = vae, reward, reward_margin, list(prompt_pool)
        self.distance_kind = distance_kind if distance_kind is not None else cfg.loss_type
        self.raw_student = networks.student
        self.edges = torch.from_numpy(edges_of(cfg))
        n_path = cfg.teacher_path_segments or cfg.num_segments
        self.path_edges = torch.from_numpy(segment_edges(n_path, 1000, cfg.num_ddim_timesteps))
        self.embed_dim = (getattr(networks.student.config, "time_cond_proj_dim", None)
                          if cfg.guidance_embedding else None)
        self.recorder = None  # a tlcm.train.profile.NetworkRecorder while a step is profiled (profile_steps)

    def _net(self, label: str, fn, role: str = "student"):
        """``fn``, recorded for the step-cost profile when one is on (:mod:`tlcm.train.profile`)."""
        return fn if self.recorder is None else self.recorder.wrap(label, fn, role)

    # --- shared inputs ----------------------------------------------------------------------------------------------

    def gen(self, mb: MicroBatch, stream: int) -> torch.Generator:
        return step_generator(self.cfg.seed, mb.step, mb.micro, self.rank, stream)

    def conditioning(self, mb: MicroBatch):
        if "cond" not in mb.cache:
            mb.cache["cond"] = self._encode(mb.batch)
        return mb.cache["cond"]

    def _encode(self, batch: dict):
        from tlcm.models import zero_conditioning

        enc, device, dtype = self.encoder, self.device, self.weight_dtype
        if "prompt_embeds" in batch:
            cond = enc.from_embeds(batch["prompt_embeds"].to(device), batch.get("pooled_prompt_embeds"))
        else:
            cond = enc(batch["prompt"])
        if self.cfg.uncond == "zeros" or (self.zero_empty_negatives and not any(batch["negative_prompt"])):
            # diffusers' LCM scripts ("zeros"), and SDXL's force_zeros_for_empty_prompt as the synthesizer applies it
            uncond = zero_conditioning(cond)
        else:
            uncond = enc(batch["negative_prompt"])
        return cond.to(device, dtype), uncond.to(device, dtype)

    # --- the networks as callables over (z, t) --------------------------------------------------------------------

    def student_fn(self, cond, t_cond=None):
        return self._net("student", unet_fn(self.student_module, cond, t_cond))

    def target_fn(self, cond, t_cond=None, label: str = "target"):
        nets = self.networks
        return self._net(label, unet_fn(nets.target_unet if nets.target_unet is not None else self.raw_student, cond,
                                        t_cond))

    def teacher_fn(self, cond, uncond, guided: bool):
        def fn(z, t):
            with torch.no_grad(), self.networks.use("teacher") as unet:
                return self._net("teacher", guided_fn(unet, cond, uncond, guided), "teacher")(z, t)

        return fn

    def fake_fn(self, cond):
        def fn(z, t):
            with self.networks.use("fake") as unet:
                return self._net("fake", unet_fn(unet, cond), "fake")(z, t)

        return fn

    def discriminate(self, z, t, cond) -> list[torch.Tensor]:
        """Head logits on the backbone's features of ``z`` at ``t``; differentiable w.r.t. ``z`` (and whatever part
        is trainable: the heads, or the fake adapter with ``gan_backbone=fake``)."""
        from tlcm.train.discriminator import unet_features

        role = "fake" if self.cfg.gan_backbone == "fake" else "teacher"
        heads = self.networks.heads
        with self.networks.use(role) as unet:
            def fn(z, t):
                return heads(unet_features(unet, z, t, cond.unet_kwargs(), heads.blocks))

            return self._net("discriminator", fn, role)(z, t)

    # --- the student's own samples ----------------------------------------------------------------------------------

    def _walk(self, mb: MicroBatch, cond, steps: int, gen: torch.Generator, grad: bool) -> torch.Tensor:
        shape = mb.batch["latents"].shape
        plan = sampling_plan(self.cfg, steps)
        noise = torch.randn(shape, generator=gen).to(self.device)
        renoise = [torch.randn(shape, generator=gen).to(self.device) for _ in plan.timesteps]
        if grad:
            net = self.student_fn(cond)
        else:
            net = self._net("student", unet_fn(self.raw_student, cond))
        with contextlib.nullcontext() if grad else torch.no_grad():
            return backward_simulation(net, noise, plan.timesteps, self.schedule, plan.mode, plan.boundary, renoise)

    def choose_steps(self, mb: MicroBatch, counts: list[int], stream: int) -> int:
        """One of ``counts`` for this micro-batch, identical on every process (a branch every rank must agree on)."""
        gen = step_generator(self.cfg.seed, mb.step, mb.micro, 0, DECIDE * 100 + stream)
        return counts[int(torch.randint(len(counts), (1,), generator=gen))]

    def student_sample(self, mb: MicroBatch, grad: bool) -> torch.Tensor:
        """The shared few-step student output (see the module docstring); with ``grad``, a graph on its last step."""
        if not grad and "sample" in mb.cache:
            return mb.cache["sample"]
        cond, _ = self.conditioning(mb)
        x = self._walk(mb, cond, self.choose_steps(mb, self.cfg.student_sample_steps, SAMPLE),
                       self.gen(mb, SAMPLE), grad)
        mb.cache["sample"] = x.detach()
        return x

    def real_sample(self, mb: MicroBatch):
        """The GAN's "real" latents and their conditioning: the student's ``gan_real_steps`` output (the paper), or
        data latents (the training shards, or ``gan_real_data``)."""
        if "real" in mb.cache:
            return mb.cache["real"]
        if self.cfg.gan_real == "student":
            cond, _ = self.conditioning(mb)
            x = self._walk(mb, cond, self.cfg.gan_real_steps, self.gen(mb, REAL), grad=False)
        elif mb.real_batch is not None:
            x, cond = mb.real_batch["latents"].to(self.device), self._encode(mb.real_batch)[0]
        else:
            x, cond = mb.batch["latents"].to(self.device), self.conditioning(mb)[0]
        mb.cache["real"] = (x, cond)
        return x, cond

    # --- terms --------------------------------------------------------------------------------------------------

    def consistency(self, mb: MicroBatch) -> LossOutput:
        """The recipe's consistency loss on this micro-batch (exactly the draws of the original lcm/mlcd/tlcm loop)."""
        cfg, device, schedule = self.cfg, self.device, self.schedule
        gen = self.gen(mb, CONSISTENCY)
        x0 = mb.batch["latents"].to(device)
        bsz = x0.shape[0]
        cond, uncond = self.conditioning(mb)
        # times, noise and guidance for this micro-batch
        times = sample_training_times(cfg, bsz, gen)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(bsz, generator=gen)).to(device)
        guided = cfg.w_max > 0
        # CFG-preserving students: prompt dropout (tlcm.train.conditioning; draws nothing when 0, so other runs are
        # unchanged). Every network of the step sees the dropped rows: student, target, the teacher's conditional half.
        if cfg.prompt_dropout > 0:
            from tlcm.train.conditioning import drop_prompts

            cond, _ = drop_prompts(cond, uncond, cfg.prompt_dropout, gen)
        t_cond = guidance_scale_embedding(w, self.embed_dim).to(device, self.weight_dtype) if self.embed_dim else None
        student, target = self.student_fn(cond, t_cond), self.target_fn(cond, t_cond)
        teacher = self.teacher_fn(cond, uncond, guided)
        kind = self.distance_kind
        if cfg.recipe == "tlcm":
            if cfg.stage2_source == "student":
                plan = stage2_source_plan(cfg)
                start = torch.randn(x0.shape, generator=gen).to(device)
                x0 = multistep_sample(self.target_fn(cond, t_cond, "stage-2 sampling"), start, plan.timesteps,
                                      schedule, plan.mode, plan.boundary)
            return tlcm_loss(student, target, teacher, x0, noise, times["t_hi"].to(device), times["t_lo"].to(device),
                             w, schedule, cfg.stage2_substeps, "none", kind, cfg.huber_c)
        t = times["t_start"].to(device)
        if cfg.state_source == "forward_noise":
            if cfg.recipe == "lcm":
                return lcm_loss(student, target, teacher, x0, noise, t, w, schedule, cfg.skip,
                                cfg.boundary_condition, kind, cfg.huber_c, cfg.sigma_data, cfg.timestep_scaling)
            return mlcd_loss(student, target, teacher, x0, noise, t, w, schedule, self.edges.to(device), cfg.skip,
                             kind, cfg.huber_c)
        if cfg.state_source == "teacher_path":  # the teacher walks from pure noise down to t (no data latents used)
            z = teacher_path_states(teacher, noise, t, w, schedule, self.path_edges.to(device))
        else:  # a stored trajectory point: a random one of the record's K, at its own time
            traj, ts = mb.batch.get("trajectory"), mb.batch.get("trajectory_timesteps")
            if traj is None or ts is None:
                raise TLCMError("state_source=trajectory, but the batch holds no trajectory points",
                                "train on shards written by `tlcm synthesize --trajectory K1,K2,...`")
            k = torch.randint(traj.shape[1], (bsz,), generator=gen)
            z, t = traj[torch.arange(bsz), k].to(device), ts[torch.arange(bsz), k].to(device).long()
        if cfg.recipe == "lcm":
            return lcm_loss_at(student, target, teacher, z, t, w, schedule, cfg.skip, cfg.boundary_condition, kind,
                               cfg.huber_c, cfg.sigma_data, cfg.timestep_scaling)
        return mlcd_loss_at(student, target, teacher, z, t, w, schedule, self.edges.to(device), cfg.skip, kind,
                            cfg.huber_c)

    def dmd(self, mb: MicroBatch, x: torch.Tensor) -> LossOutput:
        cfg = self.cfg
        gen = self.gen(mb, DMD)
        bsz = x.shape[0]
        t = torch.randint(cfg.dmd_t_min, cfg.dmd_t_max + 1, (bsz,), generator=gen).to(self.device)
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        if cfg.dmd_guidance_scale > 0:
            w = torch.full((bsz,), cfg.dmd_guidance_scale - 1.0)
        else:
            w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(bsz, generator=gen)
        w = w.to(self.device)
        cond, uncond = self.conditioning(mb)
        real = self.teacher_fn(cond, uncond, guided=bool((w != 0).any()))
        return distribution_matching_loss(x, real, self.fake_fn(cond), noise, t, w, self.schedule)

    def regression(self, mb: MicroBatch) -> LossOutput:
        """DMD's regression (:mod:`tlcm.losses.regression`): each record's initial noise, drawn again from its seed
        exactly as `tlcm synthesize` drew it, through the student's one step, against the record's latent."""
        from tlcm.data.synthesize import initial_noise

        if "seed" not in mb.batch:
            raise TLCMError("regression_weight > 0, but the training records carry no seed: the initial noise "
                            "their latents were solved from is unknown",
                            "train the regression on shards from `tlcm synthesize` (or set regression_weight=0)")
        x0 = mb.batch["latents"].to(self.device)
        noise = initial_noise(mb.batch["seed"], tuple(x0.shape[1:])).to(self.device, x0.dtype)
        cond, _ = self.conditioning(mb)
        t_cond = None
        if self.embed_dim:  # the student is told the guidance the pairs were solved at (LCM form w = g - 1)
            if "guidance_scale" not in mb.batch:
                raise TLCMError("regression_weight > 0 with a guidance embedding, but the training records do not say "
                                "which guidance their latents were solved at",
                                "train on shards from `tlcm synthesize` (each record stores its guidance_scale)")
            w = (torch.as_tensor(mb.batch["guidance_scale"], dtype=torch.float32) - 1.0).clamp(min=0.0)
            t_cond = guidance_scale_embedding(w, self.embed_dim).to(self.device, self.weight_dtype)
        plan = sampling_plan(self.cfg, 1)
        return regression_loss(self.student_fn(cond, t_cond), noise, x0, plan.timesteps[0], self.schedule,
                               plan.mode, plan.boundary, self.distance_kind, self.cfg.huber_c)

    def _renoise(self, x: torch.Tensor, gen: torch.Generator):
        cfg = self.cfg
        t = torch.randint(cfg.gan_t_min, cfg.gan_t_max + 1, (x.shape[0],), generator=gen).to(self.device)
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        return self.schedule.add_noise(x, noise, t), t

    def gan_generator(self, mb: MicroBatch, x: torch.Tensor) -> torch.Tensor:
        z, t = self._renoise(x, self.gen(mb, GAN_G))
        return generator_loss(self.discriminate(z, t, self.conditioning(mb)[0]), self.cfg.gan_loss)

    def gan_discriminator(self, mb: MicroBatch) -> torch.Tensor:
        """Real vs the student's few-step output, both re-noised, through the backbone in one batched forward."""
        from tlcm.models import Conditioning

        gen = self.gen(mb, GAN_D)
        fake_x = self.student_sample(mb, grad=False)
        real_x, real_cond = self.real_sample(mb)
        z_real, t_real = self._renoise(real_x.detach(), gen)
        z_fake, t_fake = self._renoise(fake_x, gen)
        logits = self.discriminate(torch.cat([z_real, z_fake]), torch.cat([t_real, t_fake]),
                                   Conditioning.cat([real_cond, self.conditioning(mb)[0]]))
        n = z_real.shape[0]
        return discriminator_loss([g[:n] for g in logits], [g[n:] for g in logits], self.cfg.gan_loss)

    def reward_term(self, mb: MicroBatch) -> torch.Tensor:
        """The reward loss (:func:`tlcm.losses.reward.reward_loss`) on the decoded ``reward_sample_steps`` output
        (gradient through its last, lowest-noise step). The hinge form adds each image's reward under a mismatched
        prompt when the reward reads the prompt (``reward.conditional``; an aesthetic score does not)."""
        cfg = self.cfg
        cond, _ = self.conditioning(mb)
        steps = self.choose_steps(mb, cfg.reward_sample_steps, REWARD)
        x = self._walk(mb, cond, steps, self.gen(mb, REWARD), grad=True)
        images = self._net("vae decode", lambda x: decode_for_reward(self.vae, x))(x)  # straight-through clamp
        prompts = list(mb.batch["prompt"])
        r = self._net("reward", lambda im: self.reward(im, prompts))(images)
        r_mismatch = None
        if cfg.reward_kind == "hinge" and getattr(self.reward, "conditional", True):
            other = self.mismatched(mb, prompts)
            r_mismatch = self._net("reward", lambda im: self.reward(im, other))(images)
        return reward_loss(r, r_mismatch, cfg.reward_kind, self.reward_margin, cfg.reward_mismatch_margin)

    def mismatched(self, mb: MicroBatch, prompts: list[str]) -> list[str]:
        """Another prompt for each image (:func:`tlcm.losses.reward.mismatched_prompts`), drawn from this step's
        own stream: a resumed run pairs exactly as the uninterrupted one did."""
        try:
            return mismatched_prompts(prompts, self.gen(mb, MISMATCH), pool=self.prompt_pool)
        except TLCMError as err:
            raise TLCMError(f"step {mb.step + 1}: {err.problem}",
                            "raise batch_size, list more distinct validation_prompts (the pool of other prompts), "
                            "or set reward_kind=plain") from err

    # --- the phases -----------------------------------------------------------------------------------------------

    def student(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        logs: dict[str, float] = {}
        main = None
        if cfg.consistency_weight > 0:
            main = self.consistency(mb)
            total = total + cfg.consistency_weight * main.loss
            logs["loss/consistency"] = float(main.loss.detach())
        if cfg.dmd_weight > 0 or cfg.gan_weight > 0:
            x = self.student_sample(mb, grad=True)
            if cfg.dmd_weight > 0:
                out = self.dmd(mb, x)
                total = total + cfg.dmd_weight * out.loss
                logs["loss/dmd"] = float(out.loss.detach())
                logs["dmd/grad_abs"] = float(out.extras["grad"].abs().mean())
            if cfg.gan_weight > 0:
                g = self.gan_generator(mb, x)
                total = total + cfg.gan_weight * g
                logs["loss/gan_g"] = float(g.detach())
        if cfg.regression_weight > 0:
            reg = self.regression(mb)
            total = total + cfg.regression_weight * reg.loss
            logs["loss/regression"] = float(reg.loss.detach())
        if cfg.reward_weight > 0:
            r = self.reward_term(mb)
            total = total + cfg.reward_weight * r
            logs["loss/reward"] = float(r.detach())
        if cfg.extra_losses:
            cond, uncond = self.conditioning(mb)
            ctx = ExtraLossContext(self.student_fn(cond), self.teacher_fn(cond, uncond, cfg.w_max > 0),
                                   self.schedule, mb.batch, main, mb.step)
            extra, extra_parts = extra_losses_total(cfg.extra_losses, ctx, self.extra_state)
            total = total + extra
            logs.update({f"loss/{k}": v for k, v in extra_parts.items()})
        logs["loss"] = float(total.detach())
        return total, logs

    def fake(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        gen = self.gen(mb, FAKE)
        x = self.student_sample(mb, grad=False)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), generator=gen).to(self.device)
        noise = torch.randn(x.shape, generator=gen).to(self.device)
        out = fake_score_loss(self.fake_fn(self.conditioning(mb)[0]), x, noise, t, self.schedule)
        total, logs = out.loss, {"loss/fake": float(out.loss.detach())}
        if cfg.gan_weight > 0 and cfg.gan_backbone == "fake":
            d = self.gan_discriminator(mb)
            total = total + cfg.gan_disc_weight * d
            logs["loss/gan_d"] = float(d.detach())
        return total, logs

    def discriminator(self, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.gan_discriminator(mb)
        return self.cfg.gan_disc_weight * d, {"loss/gan_d": float(d.detach())}


__all__ = ["MicroBatch", "StepLosses", "guided_fn", "step_generator", "unet_fn"]
