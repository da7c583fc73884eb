"""One-step solvers and guidance: DDIM jumps, forward re-noising, classifier-free guidance."""

from __future__ import annotations

import torch


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) to time ``s``: ``z_s = alpha_s x0 + sigma_s eps``."""
    return alpha_s * x0 + sigma_s * eps


def renoise(
    z_s: torch.Tensor,
    alpha_s: torch.Tensor,
    sigma_s: torch.Tensor,
    alpha_t: torch.Tensor,
    sigma_t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Sample ``q(z_t | z_s)`` for ``t >= s``.

    ``z_t = r z_s + sqrt(sigma_t^2 - r^2 sigma_s^2) n`` with ``r = alpha_t / alpha_s``.

    With ``s`` clean (``alpha_s = 1, sigma_s = 0``) this is the usual forward process ``alpha_t x0 + sigma_t n``.
    """
    ratio = alpha_t / alpha_s
    var = (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0)
    return ratio * z_s + var.sqrt() * noise


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance in the LCM form ``(1 + w) cond - w uncond`` (``w = 0``: no guidance)."""
    return cond + w * (cond - uncond)


def guidance_lcm_to_imagen(w: float) -> float:
    """LCM's ``w`` to diffusers' ``guidance_scale`` ``g`` (``uncond + g (cond - uncond)``): ``g = w + 1``."""
    return w + 1.0


def guidance_imagen_to_lcm(g: float) -> float:
    """diffusers' ``guidance_scale`` ``g`` to LCM's ``w``: ``w = g - 1``."""
    return g - 1.0


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of an x0 estimate: per sample, ``s = clamp(quantile(|x0|, ratio), 1, max_value)``,
    then ``clamp(x0, -s, s) / s`` (as diffusers' schedulers' ``thresholding=True``; meant for pixel, not latent, space).
    """
    dtype = x0.dtype
    b = x0.shape[0]
    flat = x0.float().reshape(b, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)
