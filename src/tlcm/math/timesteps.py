"""Which discrete times are used: the skipping-step grid, segment edges, and inference schedules."""

from __future__ import annotations

import numpy as np

from tlcm.math.schedule import CLEAN


def skipping_step_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> np.ndarray:
    """Ascending DDIM grid ``k*(1..N) - 1`` with ``k = T // N`` (19, 39, ..., 999 for T=1000, N=50).

    The grid of diffusers' consistency-distillation scripts; a training pair is ``(t_{n+1}, t_n)`` on it.
    """
    if num_ddim_timesteps < 1 or num_ddim_timesteps > num_train_timesteps:
        raise ValueError(f"num_ddim_timesteps must be in 1..{num_train_timesteps}, got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return np.arange(1, num_ddim_timesteps + 1, dtype=np.int64) * k - 1


def lcm_inference_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    original_inference_steps: int = 50,
    strength: float = 1.0,
) -> np.ndarray:
    """Descending times for ``num_inference_steps``, chosen exactly as diffusers' ``LCMScheduler.set_timesteps``.

    Take the top ``strength`` fraction of the skipping-step grid, reverse it, and pick ``floor`` of evenly spaced
    indices (4 steps on the 50-step grid: 999, 759, 499, 259). The indices come from ``np.linspace`` in floating point,
    as in diffusers (so e.g. 22 steps at strength 0.6 take index 14 where exact arithmetic gives 15): kept for parity.
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"original_inference_steps must be in 1..{num_train_timesteps} (num_train_timesteps), "
            f"got {original_inference_steps}"
        )
    k = num_train_timesteps // original_inference_steps
    origin = np.arange(1, int(original_inference_steps * strength) + 1, dtype=np.int64) * k - 1
    if num_inference_steps > len(origin):
        raise ValueError(
            f"num_inference_steps={num_inference_steps} exceeds the {len(origin)} grid times available "
            f"(original_inference_steps={original_inference_steps}, strength={strength})"
        )
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[idx]


def segment_edges(num_segments: int, num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> np.ndarray:
    """Ascending edges ``e_0 = CLEAN < e_1 < ... < e_M = T-1`` on the skipping-step grid, equally spaced (our choice).

    ``e_m`` is grid point number ``floor(m N / M)`` (1-based), so 4 segments on the 50-step grid give
    ``[-1, 239, 499, 739, 999]`` and 1 segment gives ``[-1, 999]`` (plain LCM's boundary at the clean end).
    """
    grid = skipping_step_grid(num_train_timesteps, num_ddim_timesteps)
    if not 1 <= num_segments <= len(grid):
        raise ValueError(
            f"num_segments must be between 1 and the {len(grid)} points of the skipping-step grid, got {num_segments}"
        )
    inner = [int(grid[(m * len(grid)) // num_segments - 1]) for m in range(1, num_segments + 1)]
    return np.array([CLEAN, *inner], dtype=np.int64)


def segment_index(t: np.ndarray | int, edges: np.ndarray) -> np.ndarray:
    """Index ``m`` of the segment ``(e_m, e_{m+1}]`` holding each ``t`` (so its lower edge is ``edges[m]``)."""
    t = np.asarray(t)
    m = np.searchsorted(edges, t, side="left") - 1
    if np.any(m < 0) or np.any(t > edges[-1]):
        raise ValueError(f"times {t} fall outside the segments ({edges[0]}, {edges[-1]}]")
    return m


def segment_inference_timesteps(num_inference_steps: int, edges: np.ndarray) -> np.ndarray:
    """Descending start times for walking an M-segment model in N steps (the rule our scheduler documents).

    * ``N == M``: start at every upper edge ``e_M, ..., e_1``; each step lands exactly on the next lower edge.
    * ``N != M``: pick N of the M upper edges, evenly spaced from the top (indices ``floor(j M / N)``, j = 0..N-1,
      in exact integer arithmetic), so every step still starts on an edge the model was trained to leave from.
      ``N > M`` is refused: a segment model has no trained starting points in between.
    """
    upper = edges[1:][::-1]  # e_M, ..., e_1
    m = len(upper)
    if not 1 <= num_inference_steps <= m:
        raise ValueError(f"a {m}-segment model walks 1..{m} steps; got num_inference_steps={num_inference_steps}")
    idx = (np.arange(num_inference_steps, dtype=np.int64) * m) // num_inference_steps
    return upper[idx].copy()


# The official TLCM inference script walks a subset of trunc(linspace(T-1, 0, 9)) (the boundaries of 8 equal segments):
# N steps use the first N indices of this priority list, sorted (4 steps: 999, 749, 499, 124 for T = 1000).
_TLCM_LINSPACE_PRIORITY = (0, 4, 7, 2, 6, 5, 3, 1)


def linspace_inference_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """Descending times of the official TLCM inference script (OPPO-Mente-Lab/TLCM ``inference.py``).

    For N <= 8 it takes N of the 8 upper points of ``trunc(linspace(T-1, 0, 9))``, by the script's table
    (1: 999; 2: 999, 499; 3: 999, 499, 124; 4: 999, 749, 499, 124; ...; 8: 999, 874, ..., 124). For N > 8
    (not in the script) it takes the N upper points of ``trunc(linspace(T-1, 0, N+1))``, which agrees at N = 8.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}")
    if num_inference_steps > len(_TLCM_LINSPACE_PRIORITY):
        return np.linspace(num_train_timesteps - 1, 0, num_inference_steps + 1).astype(np.int64)[:-1]
    base = np.linspace(num_train_timesteps - 1, 0, len(_TLCM_LINSPACE_PRIORITY) + 1).astype(np.int64)
    return base[sorted(_TLCM_LINSPACE_PRIORITY[:num_inference_steps])].copy()


def tcd_intermediate_timestep(t_prev: int, gamma: float) -> int:
    """TCD's intermediate time ``s = floor((1 - gamma) t_prev)`` (Zheng et al. 2024), with LCM at ``gamma = 1``.

    ``gamma = 0``: ``s = t_prev`` (deterministic DDIM); ``gamma = 1``: ``s`` is :data:`CLEAN`, so the step is LCM's
    "predict x0, re-noise to t_prev" exactly (diffusers' TCDScheduler uses ``s = 0`` there, one DDPM step short of
    clean). ``t_prev == CLEAN`` (the last step) stays ``CLEAN``.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if t_prev < 0 or gamma == 1.0:
        return CLEAN
    return int(np.floor((1.0 - gamma) * t_prev))
