"""What each recipe trains (its parts and phases), on what (times) and how its student samples: config -> plain values.

The formulas live in :mod:`tlcm.losses` and :mod:`tlcm.math`, the phase losses in :mod:`tlcm.train.phases`; this
module only chooses among them.
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------------------------------------------
# parts and phases
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartSpec:
    """A trainable part: its own AdamW optimiser, learning rate and schedule, updated every ``every`` steps."""

    name: str  # student | fake | discriminator
    learning_rate: float
    lr_scheduler: str
    lr_warmup_steps: int
    every: int

    def num_updates(self, max_steps: int) -> int:
        """How many times the part steps in a run of ``max_steps`` (its LR schedule's length)."""
        return math.ceil(max_steps / self.every)


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of a step: train ``part`` on the loss :class:`tlcm.train.phases.StepLosses` ``.<name>`` computes."""

    name: str  # the StepLosses method: student | fake | discriminator
    part: str
    every: int
    terms: tuple[str, ...]  # what the loss sums (for --dry-run and the docs)

    def due(self, step: int) -> bool:
        """Runs at steps 0, every, 2 every, ... (0-based: the first step trains every part)."""
        return step % self.every == 0


def recipe_parts(cfg: DistillConfig) -> list[PartSpec]:
    """The trainable parts the config's techniques need, the student first."""
    from tlcm.train.student import needs_fake_score

    parts = [PartSpec("student", cfg.learning_rate, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.student_update_every)]
    if needs_fake_score(cfg):
        parts.append(PartSpec("fake", cfg.fake_learning_rate or cfg.learning_rate, "constant", 0, 1))
    if cfg.gan_weight > 0 and cfg.gan_backbone == "teacher":
        parts.append(PartSpec("discriminator", cfg.disc_learning_rate, "constant", 0, 1))
    return parts


def recipe_learning_rates(cfg: DistillConfig) -> dict[str, float]:
    """Each part's base learning rate (``fake_learning_rate`` 0 means the student's), by part name."""
    return {spec.name: spec.learning_rate for spec in recipe_parts(cfg)}


def recipe_phases(cfg: DistillConfig) -> list[PhaseSpec]:
    """The phases of one step, in order: the student (every ``student_update_every`` steps), then the fake score and
    the discriminator (every step): DMD2's order and two time-scale rule."""
    from tlcm.train.student import needs_fake_score

    terms = []
    if cfg.consistency_weight > 0:
        terms.append(f"{cfg.consistency_weight:g} x {cfg.recipe} consistency ({cfg.state_source})"
                     if cfg.recipe != "tlcm" else f"{cfg.consistency_weight:g} x tlcm stage-2 consistency")
    if cfg.dmd_weight > 0:
        terms.append(f"{cfg.dmd_weight:g} x DMD")
    if cfg.gan_weight > 0:
        terms.append(f"{cfg.gan_weight:g} x GAN generator ({cfg.gan_loss})")
    if cfg.regression_weight > 0:
        terms.append(f"{cfg.regression_weight:g} x regression on the teacher's (noise, latent) pairs")
    if cfg.reward_weight > 0:
        terms.append(f"{cfg.reward_weight:g} x reward {cfg.reward_kind} ({cfg.reward_model})")
    terms += [f"{w:g} x {name}" for name, w in cfg.extra_losses.items() if w]
    phases = [PhaseSpec("student", "student", cfg.student_update_every, tuple(terms))]
    if needs_fake_score(cfg):
        fake_terms = ["fake-score denoising"]
        if cfg.gan_weight > 0 and cfg.gan_backbone == "fake":
            fake_terms.append(f"{cfg.gan_disc_weight:g} x GAN discriminator ({cfg.gan_loss}, heads on the fake score)")
        phases.append(PhaseSpec("fake", "fake", 1, tuple(fake_terms)))
    if cfg.gan_weight > 0 and cfg.gan_backbone == "teacher":
        phases.append(PhaseSpec("discriminator", "discriminator", 1,
                                (f"{cfg.gan_disc_weight:g} x GAN discriminator ({cfg.gan_loss}, heads on the "
                                 "frozen teacher)",)))
    return phases
