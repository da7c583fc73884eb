"""Distribution matching (DMD / DMD2): push the student's samples along the difference of two score estimates.

For a student output ``x`` (its few-step clean latent, with gradient), a time ``t`` and noise ``n``:

* ``z_t = alpha_t x + sigma_t n`` (no gradient);
* the **real** score: the frozen teacher with classifier-free guidance, as a clean estimate ``x0_real(z_t, t)``;
* the **fake** score: a trainable copy (our second LoRA adapter) that learns, by plain denoising, the distribution
  of the student's own samples, as ``x0_fake(z_t, t)`` without guidance;
* ``grad = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|`` (per sample; DMD2's normalisation), NaNs set to 0;
* the student's loss ``0.5 * mean((x - stopgrad(x - grad))^2)``, whose gradient w.r.t. ``x`` is ``grad / x.numel()``:
  the KL gradient of DMD, scaled so that its size does not depend on how far the sample is from the teacher.

The fake score's own loss (:func:`fake_score_loss`) is DMD2's: noise the *detached* student sample to a uniform
``t``, and regress the fake network's epsilon on the noise. Both are plain functions of callables, as in
:mod:`tlcm.losses.consistency`: ``real(z, t) -> (cond, uncond | None)`` (a guided teacher) and ``fake(z, t) ->
output``; all randomness comes in as arguments.
"""

from __future__ import annotations

import torch

from tlcm.losses.consistency import GuidedNet, LossOutput, Net, NoiseSchedule, _bcast
from tlcm.math import cfg_combine


def _at_least_fp32(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 -> fp32; float64 (tests) stays


def guided_x0(teacher: GuidedNet, z: torch.Tensor, t: torch.Tensor, w: torch.Tensor | float | None,
              schedule: NoiseSchedule) -> torch.Tensor:
    """The teacher's clean estimate with CFG in the LCM form ``(1 + w) cond - w uncond`` (``w`` None/0: cond only)."""
    cond, uncond = teacher(z, t)
    x0, _ = schedule.x0_eps(cond, z, t)
    if uncond is not None and w is not None:
        ux0, _ = schedule.x0_eps(uncond, z, t)
        x0 = cfg_combine(x0, ux0, _bcast(w, z))
    return x0


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """``(x0_fake - x0_real) / mean_{C,H,W}|x - x0_real|`` per sample; non-finite entries become 0 (DMD2)."""
    dims = tuple(range(1, x.ndim))
    scale = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / scale, nan=0.0, posinf=0.0, neginf=0.0)


def distribution_matching_loss(
    x: torch.Tensor,
    real: GuidedNet,
    fake: Net,
    noise: torch.Tensor,
    t: torch.Tensor,
    w: torch.Tensor | float | None,
    schedule: NoiseSchedule,
) -> LossOutput:
    """DMD2's generator loss on the student output ``x`` (see the module docstring); gradient flows into ``x`` only."""
    dtype = _at_least_fp32(x)
    with torch.no_grad():
        xd = x.detach().to(dtype)
        z = schedule.add_noise(xd, noise.to(dtype), t)
        x0_real = guided_x0(real, z, t, w, schedule).to(dtype)
        x0_fake = schedule.x0_eps(fake(z, t), z, t)[0].to(dtype)
        grad = dmd_gradient(xd, x0_real, x0_fake)
        target = xd - grad
    loss = 0.5 * ((x.to(dtype) - target) ** 2).mean()
    return LossOutput(loss, x, target, {"z": z, "t": t, "x0_real": x0_real, "x0_fake": x0_fake, "grad": grad})


def fake_score_loss(fake: Net, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    schedule: NoiseSchedule) -> LossOutput:
    """The fake score's denoising loss on a detached student sample: ``mean((eps_fake(z_t, t) - n)^2)`` (DMD2)."""
    dtype = _at_least_fp32(x)
    z = schedule.add_noise(x.detach().to(dtype), noise.to(dtype), t)
    _, eps = schedule.x0_eps(fake(z, t), z, t)
    loss = ((eps.to(dtype) - noise.to(dtype)) ** 2).mean()
    return LossOutput(loss, eps, noise, {"z": z, "t": t})


__all__ = ["distribution_matching_loss", "dmd_gradient", "fake_score_loss", "guided_x0"]
