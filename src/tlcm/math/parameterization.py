"""Conversions between what a network predicts (``epsilon``, ``v_prediction``, ``sample``) and ``(x0, eps)``."""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def model_output_to_x0_eps(
    model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x0_hat, eps_hat)`` from a network output at ``z_t = sample`` with ``(alpha_t, sigma_t)``.

    ``alpha``/``sigma`` broadcast against ``sample`` (pass them shaped ``(B, 1, 1, 1)`` for per-sample times).
    """
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sigma * eps) / alpha
    elif prediction_type == "v_prediction":
        x0 = alpha * sample - sigma * model_output
        eps = sigma * sample + alpha * model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - alpha * x0) / sigma
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return x0, eps


def x0_eps_to_model_output(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Inverse of :func:`model_output_to_x0_eps`: what a network of ``prediction_type`` should output."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
