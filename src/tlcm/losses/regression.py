"""DMD's regression loss on the teacher's own pairs: a record's initial noise -> the latent the teacher reached.

``tlcm synthesize`` draws each record's initial noise from the record's seed
(:func:`tlcm.data.synthesize.initial_noise`) and solves the teacher's probability-flow ODE from it with a
deterministic solver (DDIM, DPM-Solver++, Euler). So every synthesised record is an exact pair ``(x_T, x_0)`` of the
teacher's own noise-to-latent map, made without any real data. DMD (Yin et al., CVPR 2024) trains its one-step
generator with this regression next to distribution matching: matching distributions says nothing about *which*
noise maps to which image, and a one-step map started from the teacher's blurred average needs that anchor; the
pairs also hold the teacher's modes in place against DMD's mode seeking. Here the pairs come free with the shards.

The student's output is its **one-step** sample from ``x_T`` (the first timestep of its own sampler, as at inference):
a k-step LCM sample re-noises between steps, so only the one-step output is a deterministic function of ``x_T``.
"""

from __future__ import annotations

import torch

from tlcm.losses.consistency import LossOutput, Net, NoiseSchedule, backward_simulation, distance


def regression_loss(net: Net, noise: torch.Tensor, x0_teacher: torch.Tensor, t_start: int, schedule: NoiseSchedule,
                    mode: str = "lcm", boundary: str = "lcm", kind="l2", huber_c: float = 1e-3) -> LossOutput:
    """``distance(student_1step(noise), x0_teacher)``; the student's one step starts at ``t_start`` (its sampler's
    first timestep) and is parameterised as its sampler's (``mode``, ``boundary``)."""
    x = backward_simulation(net, noise, [int(t_start)], schedule, mode, boundary)
    return LossOutput(distance(x, x0_teacher, kind, huber_c), x, x0_teacher, {})
