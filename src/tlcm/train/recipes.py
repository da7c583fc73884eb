"""What each recipe trains on (times) and how its student samples (timesteps, mode, boundary): config -> plain values.

The formulas live in :mod:`tlcm.losses.consistency` and :mod:`tlcm.math`; this module only chooses among them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tlcm.math import CLEAN, lcm_inference_timesteps, segment_edges, segment_inference_timesteps, skipping_step_grid
from tlcm.scheduler import linspace_inference_timesteps
from tlcm.train.config import DistillConfig


@dataclass(frozen=True)
class SamplingPlan:
    timesteps: list[int]
    mode: str  # lcm | segments (see tlcm.losses.multistep_sample)
    boundary: str  # lcm | none


def edges_of(cfg: DistillConfig) -> np.ndarray:
    n = 1 if cfg.recipe == "lcm" else cfg.num_segments
    return segment_edges(n, 1000, cfg.num_ddim_timesteps)


def sampling_plan(cfg: DistillConfig, num_steps: int) -> SamplingPlan:
    """How a student of this recipe samples in ``num_steps`` evaluations (what the exported scheduler config says)."""
    if cfg.recipe == "mlcd":
        edges = edges_of(cfg)
        if num_steps <= cfg.num_segments:
            times = segment_inference_timesteps(num_steps, edges)
        else:  # more steps than segments: DDIM jumps on the LCM grid with the student's (x0, eps)
            times = lcm_inference_timesteps(num_steps, 1000, cfg.num_ddim_timesteps)
        return SamplingPlan([int(t) for t in times], "segments", "none")
    if cfg.timestep_grid == "linspace":
        times = linspace_inference_timesteps(num_steps, 1000)
    else:
        times = lcm_inference_timesteps(num_steps, 1000, cfg.num_ddim_timesteps)
    boundary = cfg.boundary_condition if cfg.recipe == "lcm" else "none"
    return SamplingPlan([int(t) for t in times], "lcm", boundary)


def sample_training_times(cfg: DistillConfig, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random times for one micro-batch: ``t_start`` (lcm/mlcd) or ``(t_hi, t_lo)`` (tlcm stage 2)."""
    grid = torch.from_numpy(skipping_step_grid(1000, cfg.num_ddim_timesteps))
    if cfg.recipe in ("lcm", "mlcd"):
        idx = torch.randint(0, len(grid), (batch,), generator=generator)
        return {"t_start": grid[idx]}
    edges = torch.from_numpy(edges_of(cfg))
    if cfg.stage2_times == "edges":
        m = torch.randint(1, len(edges), (batch,), generator=generator)
        return {"t_hi": edges[m], "t_lo": edges[m - 1]}
    span = 1000 // cfg.num_segments
    idx = torch.randint(0, len(grid), (batch,), generator=generator)
    t_hi = grid[idx]
    return {"t_hi": t_hi, "t_lo": torch.clamp(t_hi - span, min=CLEAN)}


def stage2_source_plan(cfg: DistillConfig) -> SamplingPlan:
    """How stage 2 draws the student's own samples: an M-step edge-to-edge walk (what a stage-1 model is good at)."""
    edges = edges_of(cfg)
    n = min(cfg.stage2_sample_steps, cfg.num_segments)
    return SamplingPlan([int(t) for t in segment_inference_timesteps(n, edges)], "segments", "none")


def scheduler_settings(cfg: DistillConfig) -> dict:
    """The TLCMScheduler settings the student was trained for (written to ``scheduler/scheduler_config.json``)."""
    if cfg.recipe == "mlcd":
        return {"mode": "segments", "num_segments": cfg.num_segments, "boundary_condition": "none",
                "timestep_grid": "lcm", "gamma": 1.0}
    return {
        "mode": "lcm",
        "num_segments": 1 if cfg.recipe == "lcm" else cfg.num_segments,
        "boundary_condition": cfg.boundary_condition if cfg.recipe == "lcm" else "none",
        "timestep_grid": cfg.timestep_grid,
        "gamma": 1.0,
    }
