"""The LCM boundary condition ``f(z_t, t) = c_skip(t) z_t + c_out(t) x0_hat`` (Song et al., discrete form)."""

from __future__ import annotations

import torch


def boundary_scalings(
    t: torch.Tensor | int,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at integer time ``t``: ``c_skip -> 1``, ``c_out -> 0`` as ``s t -> 0``.

    ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)``, as in diffusers' LCMScheduler.
    Times below 0 (:data:`~tlcm.math.schedule.CLEAN`) are the clean end, where ``f`` is the identity
    (``c_skip = 1``, ``c_out = 0``), not the formula at a negative time. ``dtype=torch.float32`` reproduces
    LCMScheduler's float32 arithmetic on tensor timesteps.
    """
    st = torch.as_tensor(t).to(dtype).clamp(min=0) * timestep_scaling
    denom = st**2 + sigma_data**2
    return sigma_data**2 / denom, st / denom.sqrt()


def consistency_output(
    sample: torch.Tensor, x0_hat: torch.Tensor, c_skip: torch.Tensor, c_out: torch.Tensor
) -> torch.Tensor:
    """``c_skip * z_t + c_out * x0_hat``; the scalings broadcast against the latents."""
    return c_skip * sample + c_out * x0_hat
