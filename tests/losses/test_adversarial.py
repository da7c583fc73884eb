"""GAN losses against their closed forms; multi-head averaging; which way each loss pushes."""

from __future__ import annotations

import math

import pytest
import torch

from tlcm.losses.adversarial import discriminator_loss, generator_loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


REAL = [1.5, -0.5, 0.2]
FAKE = [-2.0, 0.7, 0.0]


def test_non_saturating_closed_form():
    r, f = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    d = sum(softplus(-x) for x in REAL) / 3 + sum(softplus(x) for x in FAKE) / 3
    g = sum(softplus(-x) for x in FAKE) / 3
    assert float(discriminator_loss(r, f, "ns")) == pytest.approx(d, rel=1e-12)
    assert float(generator_loss(f, "ns")) == pytest.approx(g, rel=1e-12)


def test_hinge_closed_form():
    r, f = torch.tensor(REAL, dtype=torch.float64), torch.tensor(FAKE, dtype=torch.float64)
    d = sum(max(0.0, 1 - x) for x in REAL) / 3 + sum(max(0.0, 1 + x) for x in FAKE) / 3
    assert float(discriminator_loss(r, f, "hinge")) == pytest.approx(d, rel=1e-12)
    assert float(generator_loss(f, "hinge")) == pytest.approx(-sum(FAKE) / 3, rel=1e-12)


@pytest.mark.parametrize("kind", ["ns", "hinge"])
def test_heads_are_averaged(kind):
    g = torch.Generator().manual_seed(0)
    heads_r = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)]
    heads_f = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(3)]
    each = [discriminator_loss(r, f, kind) for r, f in zip(heads_r, heads_f)]
    torch.testing.assert_close(discriminator_loss(heads_r, heads_f, kind), torch.stack(each).mean())
    torch.testing.assert_close(generator_loss(heads_f, kind), torch.stack([generator_loss(f, kind)
                                                                             for f in heads_f]).mean())


@pytest.mark.parametrize("kind", ["ns", "hinge"])
def test_directions(kind):
    """D wants real up and fake down; G wants fake up."""
    r = torch.tensor([0.1, -0.3], requires_grad=True)
    f = torch.tensor([0.2, -0.4], requires_grad=True)
    discriminator_loss(r, f, kind).backward()
    assert bool((r.grad <= 0).all()) and bool((f.grad >= 0).all()) and r.grad.abs().sum() > 0
    f2 = torch.tensor([0.2, -0.4], requires_grad=True)
    generator_loss(f2, kind).backward()
    assert bool((f2.grad < 0).all())


def test_bad_kind_and_head_mismatch():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(x, "wgan")
    with pytest.raises(ValueError, match="2 real heads but 1 fake"):
        discriminator_loss([x, x], [x], "ns")
