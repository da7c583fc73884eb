"""Noise schedules: betas and ``abar`` from a diffusers scheduler config, and ``(alpha_t, sigma_t)`` look-ups."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

CLEAN = -1
"""The time index of the clean sample: ``abar = 1``, ``alpha = 1``, ``sigma = 0``."""


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """Betas (float64) for a diffusers-style config: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``.

    Reads ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` and ``trained_betas`` with
    diffusers' defaults, so a ``pipe.scheduler.config`` can be passed as it is.
    """
    n = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float64)
    start = float(config.get("beta_start", 0.0001))
    end = float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if kind == "linear":
        return torch.linspace(start, end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {kind!r}; expected linear, scaled_linear or squaredcos_cap_v2")


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` in float64; zero-terminal-SNR rescaling when the config asks for it."""
    abar = torch.cumprod(1.0 - betas_from_config(config), dim=0)
    if config.get("rescale_betas_zero_snr", False):
        abar = _rescale_zero_terminal_snr(abar)
    return abar


def _rescale_zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so the last step has zero SNR and the first is unchanged.
    a = abar.sqrt()
    a0, aT = a[0].clone(), a[-1].clone()
    a = (a - aT) * a0 / (a0 - aT)
    out = a**2
    out[-1] = 2**-24  # diffusers keeps a tiny positive value so that x0 = z / alpha stays finite
    return out


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` for integer times ``t`` (any shape); ``t == CLEAN`` gives ``(1, 0)``."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    abar = torch.where(t < 0, torch.ones((), dtype=alphas_cumprod.dtype, device=alphas_cumprod.device),
                       alphas_cumprod[t.clamp(min=0)])
    return abar.sqrt(), (1.0 - abar).sqrt()
