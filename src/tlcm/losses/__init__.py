"""Distillation losses, and the hook through which extra losses (DMD, adversarial, reward...) join a recipe.

An extra loss is a function ``fn(ctx: ExtraLossContext) -> torch.Tensor`` (a scalar) registered under a name::

    from tlcm.losses import register_loss

    @register_loss("my_loss")
    def my_loss(ctx):
        return ctx.main.prediction.pow(2).mean()

and switched on from a config with a weight: ``extra_losses: {my_loss: 0.1}`` (or ``--set extra_losses.my_loss=0.1``).
The trainer adds ``weight * fn(ctx)`` to the consistency loss and logs each term. Modules that define extra losses
must be imported before the config is validated (list them in ``extra_loss_modules`` in the config).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tlcm.errors import TLCMError
from tlcm.losses.consistency import (
    LossOutput,
    NoiseSchedule,
    consistency_fn,
    distance,
    guidance_scale_embedding,
    l2,
    lcm_loss,
    mlcd_loss,
    multistep_sample,
    pseudo_huber,
    segment_fn,
    teacher_ddim_cfg,
    teacher_ddim_cfg_substeps,
    tlcm_loss,
)


@dataclass
class ExtraLossContext:
    """What an extra loss may use: the networks (as callables), the schedule, the batch and the main loss's output."""

    student: Callable
    teacher: Callable
    schedule: NoiseSchedule
    batch: dict[str, Any]
    main: LossOutput
    step: int
    state: dict[str, Any] = field(default_factory=dict)  # per-loss persistent state (e.g. an auxiliary model)


ExtraLossFn = Callable[[ExtraLossContext], torch.Tensor]
_REGISTRY: dict[str, ExtraLossFn] = {}


def register_loss(name: str) -> Callable[[ExtraLossFn], ExtraLossFn]:
    """Decorator: make ``fn`` available to configs as ``extra_losses: {name: weight}``."""

    def deco(fn: ExtraLossFn) -> ExtraLossFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"an extra loss named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def unregister_loss(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_losses() -> list[str]:
    return sorted(_REGISTRY)


def get_loss(name: str) -> ExtraLossFn:
    if name not in _REGISTRY:
        known = ", ".join(registered_losses()) or "none are registered"
        raise TLCMError(f"unknown extra loss {name!r} (registered: {known})",
                        "remove it from extra_losses, or list the module that registers it in extra_loss_modules")
    return _REGISTRY[name]


def extra_losses_total(weights: dict[str, float], ctx: ExtraLossContext) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_i w_i * loss_i(ctx)`` over the configured extra losses, plus each unweighted term for logging."""
    total = torch.zeros((), device=ctx.main.loss.device)
    parts: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        value = get_loss(name)(ctx)
        parts[name] = float(value.detach())
        total = total + weight * value
    return total, parts


__all__ = [
    "ExtraLossContext",
    "LossOutput",
    "NoiseSchedule",
    "consistency_fn",
    "distance",
    "extra_losses_total",
    "get_loss",
    "guidance_scale_embedding",
    "l2",
    "lcm_loss",
    "mlcd_loss",
    "multistep_sample",
    "pseudo_huber",
    "register_loss",
    "registered_losses",
    "segment_fn",
    "teacher_ddim_cfg",
    "teacher_ddim_cfg_substeps",
    "tlcm_loss",
    "unregister_loss",
]
