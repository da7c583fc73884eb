"""Frechet distance between Gaussians fitted to two feature sets: the formula behind FID and toy-FID."""

from __future__ import annotations

import numpy as np
import torch
from scipy import linalg


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and (unbiased) covariance ``(D, D)`` of an ``(N, D)`` feature matrix, in float64 (also D = 1)."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, D) feature matrix, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})``; offsets the diagonals when the product is singular.

    Clamped at 0: the exact value is never negative, only round-off makes it so for equal statistics.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(cov1 @ cov2)  # no `disp`: deprecated in SciPy 1.16, removed in 1.18
    if not np.isfinite(covmean).all():
        offset = np.eye(cov1.shape[0]) * eps
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)
    return max(0.0, float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean)))


def frechet_distance_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between the Gaussians of two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
