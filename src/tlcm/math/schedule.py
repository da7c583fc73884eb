"""Noise schedules: betas and ``abar`` from a diffusers scheduler config, and ``(alpha_t, sigma_t)`` look-ups."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

CLEAN = -1
"""The time index of the clean sample: ``abar = 1``, ``alpha = 1``, ``sigma = 0``."""


def betas_from_config(config: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Betas for a diffusers-style config: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, zero-SNR rescaling.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas`` and
    ``rescale_betas_zero_snr`` with diffusers' defaults, so a ``pipe.scheduler.config`` can be passed as it is.
    Computed in ``dtype`` with diffusers' order of operations, so ``dtype=torch.float32`` reproduces a diffusers
    scheduler's ``betas`` bit for bit (float64, the default, is the accurate value).
    """
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=dtype)
    elif kind == "linear":
        betas = torch.linspace(start, end, n, dtype=dtype)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=dtype) ** 2
    elif kind == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=dtype)
    else:
        raise ValueError(f"unknown beta_schedule {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2")
    if config.get("rescale_betas_zero_snr", False):
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_config(config: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)``; with zero-terminal-SNR rescaling ``abar_{T-1} = 0`` exactly.

    ``dtype=torch.float32`` equals ``DDIMScheduler``/``LCMScheduler``/``DDPMScheduler.alphas_cumprod`` bit for bit.
    """
    return torch.cumprod(1.0 - betas_from_config(config, dtype), dim=0)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1, in diffusers' order of operations: shift and scale sqrt(abar) so the last step has
    # zero SNR and the first is unchanged, then return the betas of that abar. DDIM/DDPM/LCM/TCD keep abar[-1] = 0
    # (only Euler-type schedulers replace it by 2**-24), so zero-SNR needs v- or sample-prediction, as in diffusers.
    a = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * (a0 / (a0 - aT))
    abar = a**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` for integer times ``t`` (any shape); ``t == CLEAN`` gives ``(1, 0)``.

    Results have ``alphas_cumprod``'s dtype and device (``t`` is moved there), like a diffusers scheduler's look-up.
    """
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    abar = torch.where(t < 0, torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device),
                       alphas_cumprod[t.clamp(min=0)])
    return abar.sqrt(), (1.0 - abar).sqrt()
