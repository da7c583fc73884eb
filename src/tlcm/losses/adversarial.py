"""Adversarial losses on discriminator logits: non-saturating (DMD2, StyleGAN) and hinge (Hyper-SD, SDXL-Lightning).

The discriminator itself (features of the teacher or fake-score UNet plus small trainable heads) lives in
:mod:`tlcm.train.discriminator`; here only logits come in, as one tensor or a list with one ``(B,)`` tensor per head.
Several heads are averaged: each head's loss is computed, then the mean over heads is taken.

* non-saturating: ``L_D = softplus(-D(real)) + softplus(D(fake))``, ``L_G = softplus(-D(fake))``;
* hinge: ``L_D = relu(1 - D(real)) + relu(1 + D(fake))``, ``L_G = -D(fake)``;

each averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

GAN_LOSSES = ("ns", "hinge")


def _heads(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not out:
        raise ValueError("no discriminator logits")
    return [x.to(torch.promote_types(x.dtype, torch.float32)).reshape(x.shape[0], -1).mean(dim=1) for x in out]


def _check(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def discriminator_loss(real_logits, fake_logits, kind: str = "ns") -> torch.Tensor:
    """The discriminator's loss: real should score high, fake low (mean over heads of the batch mean)."""
    _check(kind)
    real, fake = _heads(real_logits), _heads(fake_logits)
    if len(real) != len(fake):
        raise ValueError(f"{len(real)} real heads but {len(fake)} fake heads")
    terms = []
    for r, f in zip(real, fake):
        if kind == "ns":
            terms.append(F.softplus(-r).mean() + F.softplus(f).mean())
        else:
            terms.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
    return torch.stack(terms).mean()


def generator_loss(fake_logits, kind: str = "ns") -> torch.Tensor:
    """The generator's (student's) loss: make the discriminator score its samples as real."""
    _check(kind)
    terms = [F.softplus(-f).mean() if kind == "ns" else -f.mean() for f in _heads(fake_logits)]
    return torch.stack(terms).mean()


__all__ = ["GAN_LOSSES", "discriminator_loss", "generator_loss"]
