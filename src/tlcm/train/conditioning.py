"""Conditioning of a training batch for CFG-preserving students: prompt dropout, as pure functions.

A plain consistency student (LCM-LoRA, TLCM) is distilled from the teacher *with* CFG on the conditional branch only:
its one output already carries guidance ``w``, and it has never been trained on the empty or a negative prompt. At
inference, CFG on top (``guidance_scale > 1``) therefore applies guidance twice, and a negative prompt steers
nothing the student was taught. A **CFG-preserving** student (``cfg_preserving: true``; PCM's "normal CFG",
Hyper-SD's CFG-preserved LoRAs) instead distils

- a *small* teacher guidance (``w`` in, e.g., ``[0, 1]`` in the LCM form, diffusers' ``guidance_scale`` 1 to 2), so
  the guidance the user adds at inference is most of the guidance applied: with student outputs ``s(c)`` that follow
  the teacher at guidance ``w``, ``s(n) + g (s(c) - s(n))`` is the teacher's ``n + g (1 + w) (c - n) + w (n - u)``
  (``u``: the unconditional, ``n``: the negative prompt's prediction), i.e. guidance ``g (1 + w)`` away from the
  negative prompt, plus a pull ``w (n - u)`` towards it that stays small only when ``w`` does;
- *prompt dropout*: a share of the rows is conditioned on the row's unconditional prompt (the negative prompt, ``""``
  by default, what the teacher dropped captions to). On those rows the teacher's guided prediction *is* its
  unconditional one (``(1 + w) u - w u = u``), so the student learns the unconditional branch as a consistency model
  of its own, the branch CFG subtracts at inference.

The loop calls :func:`drop_prompts` once per micro-batch, after its other random draws (so a run with
``prompt_dropout: 0`` draws exactly what it drew before this option existed). Everything here is a pure function of
its inputs and the step's ``torch.Generator``, so a resumed run drops the same rows.
"""

from __future__ import annotations

import torch


def prompt_dropout_mask(batch_size: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """``(batch_size,)`` bool: which rows lose their prompt (each independently with probability ``p``).

    Draws nothing from ``generator`` when ``p == 0``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"prompt dropout probability must be in [0, 1), got {p}")
    if p == 0.0:
        return torch.zeros(batch_size, dtype=torch.bool)
    return torch.rand(batch_size, generator=generator) < p


def replace_rows(cond, uncond, mask: torch.Tensor):
    """``cond`` with the rows where ``mask`` is true taken from ``uncond`` (both :class:`tlcm.models.Conditioning`
    of the same batch size; SDXL's pooled text embeddings and time ids go with their rows)."""
    from tlcm.models import Conditioning

    n = cond.encoder_hidden_states.shape[0]
    if uncond.encoder_hidden_states.shape[0] != n or mask.shape != (n,):
        raise ValueError(f"replace_rows needs equal batch sizes, got {n}, "
                         f"{uncond.encoder_hidden_states.shape[0]} and a mask of {tuple(mask.shape)}")

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = mask.to(a.device).view(-1, *([1] * (a.ndim - 1)))
        return torch.where(m, b.to(a.dtype), a)

    extra = None
    if cond.added_cond_kwargs is not None:
        extra = {k: pick(v, uncond.added_cond_kwargs[k]) for k, v in cond.added_cond_kwargs.items()}
    return Conditioning(pick(cond.encoder_hidden_states, uncond.encoder_hidden_states), extra)


def drop_prompts(cond, uncond, p: float, generator: torch.Generator):
    """Prompt dropout for one micro-batch: ``(conditioning, mask)`` where each row, with probability ``p``, is
    conditioned on its unconditional (negative) prompt for the student, its target and the teacher alike."""
    mask = prompt_dropout_mask(cond.encoder_hidden_states.shape[0], p, generator)
    if not bool(mask.any()):
        return cond, mask
    return replace_rows(cond, uncond, mask), mask
