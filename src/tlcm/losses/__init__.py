"""Distillation losses, and the hook through which extra losses (DMD, adversarial, reward...) join a recipe.

An extra loss is a function ``fn(ctx: ExtraLossContext) -> torch.Tensor`` (a scalar) registered under a name::

    from tlcm.losses import register_loss

    @register_loss("my_loss")
    def my_loss(ctx):
        return ctx.main.prediction.pow(2).mean()

and switched on from a config with a weight: ``extra_losses: {my_loss: 0.1}`` (or ``--set extra_losses.my_loss=0.1``).
The trainer adds ``weight * fn(ctx)`` to the student's loss and logs each term. Modules that define extra losses
must be imported before the config is validated (list them in ``extra_loss_modules`` in the config).

``ctx.state`` is the loss's own dict, kept for the whole run and saved in every checkpoint (so a resumed run continues
from the same state): put tensors, numbers, strings and containers of them there (anything ``torch.save`` pickles).
The bag of techniques (DMD, GAN, reward) is built into the trainer as its own parts and phases (``docs/distill.md``);
this hook is for terms that only need the student and the teacher.
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
    backward_simulation,
    consistency_fn,
    distance,
    guidance_scale_embedding,
    l2,
    lcm_loss,
    lcm_loss_at,
    mlcd_loss,
    mlcd_loss_at,
    multistep_sample,
    pseudo_huber,
    segment_fn,
    teacher_ddim_cfg,
    teacher_ddim_cfg_substeps,
    teacher_path_states,
    tlcm_loss,
)


@dataclass
class ExtraLossContext:
    """What an extra loss may use: the networks (as callables), the schedule, the batch and the main loss's output."""

    student: Callable
    teacher: Callable
    schedule: NoiseSchedule
    batch: dict[str, Any]
    main: LossOutput | None  # the consistency loss's output (None when consistency_weight is 0)
    step: int
    state: dict[str, Any] = field(default_factory=dict)  # this loss's persistent, checkpointed state


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


def extra_losses_total(weights: dict[str, float], ctx: ExtraLossContext,
                       states: dict[str, dict[str, Any]] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``sum_i w_i * loss_i(ctx)`` over the configured extra losses, plus each unweighted term for logging.

    ``states``: the run's persistent per-loss states; loss ``name`` sees ``states[name]`` as ``ctx.state``.
    """
    device = ctx.main.loss.device if ctx.main is not None else None
    total = torch.zeros((), device=device)
    parts: dict[str, float] = {}
    for name, weight in weights.items():
        if weight == 0:
            continue
        if states is not None:
            ctx.state = states.setdefault(name, {})
        value = get_loss(name)(ctx)
        parts[name] = float(value.detach())
        total = total + weight * value
    return total, parts


__all__ = [
    "ExtraLossContext",
    "LossOutput",
    "NoiseSchedule",
    "backward_simulation",
    "consistency_fn",
    "distance",
    "extra_losses_total",
    "get_loss",
    "guidance_scale_embedding",
    "l2",
    "lcm_loss",
    "lcm_loss_at",
    "mlcd_loss",
    "mlcd_loss_at",
    "multistep_sample",
    "pseudo_huber",
    "register_loss",
    "registered_losses",
    "segment_fn",
    "teacher_ddim_cfg",
    "teacher_ddim_cfg_substeps",
    "teacher_path_states",
    "tlcm_loss",
    "unregister_loss",
]
