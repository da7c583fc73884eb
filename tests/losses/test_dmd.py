"""Distribution matching (DMD2 form) against an independent float64 recomputation with stand-in networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.losses import NoiseSchedule
from tlcm.losses.dmd import distribution_matching_loss, dmd_gradient, fake_score_loss, guided_x0

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def abar(t: int) -> float:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1 - betas)[t])


def eps_net(scale: float, shift: float):
    """An epsilon 'network' depending on z and t: eps = scale (1 + t/1000) z + shift cos(t)."""

    def net(z, t):
        tt = t.to(z.dtype).reshape(-1, 1, 1, 1)
        return scale * (1 + tt / 1000) * z + shift * torch.cos(tt)

    return net


def ref_x0(scale, shift, z, t):
    a, s = np.sqrt(abar(t)), np.sqrt(1 - abar(t))
    return (z - s * (scale * (1 + t / 1000) * z + shift * np.cos(t))) / a


def _inputs(bsz=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2)]


def teacher(z, t):
    return eps_net(0.3, 0.1)(z, t), eps_net(0.5, -0.2)(z, t)


def test_dmd_gradient_matches_dmd2_form():
    g = torch.Generator().manual_seed(3)
    x, real, fake = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    got = dmd_gradient(x, real, fake).numpy()
    xn, rn, fn = x.numpy(), real.numpy(), fake.numpy()
    for i in range(2):
        # DMD2: p_real = x - real, p_fake = x - fake, grad = (p_real - p_fake) / mean|p_real|
        p_real, p_fake = xn[i] - rn[i], xn[i] - fn[i]
        np.testing.assert_allclose(got[i], (p_real - p_fake) / np.abs(p_real).mean(), rtol=1e-12, atol=1e-12)


def test_dmd_gradient_zero_scale_gives_zero_not_nan():
    x = torch.ones(2, 1, 2, 2)
    real = x.clone()  # |x - x0_real| = 0: DMD2 sets the NaN/inf gradient to 0
    real[1] = 0.0
    grad = dmd_gradient(x, real, torch.full_like(x, 2.0))
    assert torch.isfinite(grad).all() and bool((grad[0] == 0).all()) and not bool((grad[1] == 0).all())


@pytest.mark.parametrize("w", [0.0, 3.0])
def test_distribution_matching_loss_and_its_gradient(w):
    schedule = NoiseSchedule.from_config(CFG)
    x_in, noise = _inputs()
    t = torch.tensor([20, 500, 980])
    x = x_in.clone().requires_grad_(True)
    fake = eps_net(0.45, 0.05)
    out = distribution_matching_loss(x, teacher, fake, noise, t, torch.full((3,), w, dtype=torch.float64), schedule)
    out.loss.backward()

    n = x_in.numel()
    ref_grad, ref_loss = np.zeros(x_in.shape), 0.0
    for i, ti in enumerate(t.tolist()):
        xi, ni = x_in[i].numpy(), noise[i].numpy()
        z = np.sqrt(abar(ti)) * xi + np.sqrt(1 - abar(ti)) * ni
        cond, uncond = ref_x0(0.3, 0.1, z, ti), ref_x0(0.5, -0.2, z, ti)
        real = cond + w * (cond - uncond)  # CFG in the LCM form, on the clean estimate
        fk = ref_x0(0.45, 0.05, z, ti)
        grad = (fk - real) / np.abs(xi - real).mean()
        ref_grad[i] = grad
        ref_loss += 0.5 * (grad**2).sum() / n  # 0.5 * mean((x - (x - grad))^2)
        np.testing.assert_allclose(out.extras["x0_real"][i].numpy(), real, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.extras["grad"].numpy(), ref_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.loss.detach()), ref_loss, rtol=1e-5)
    # the student's gradient is exactly along the normalised score difference, scaled by 1/numel
    np.testing.assert_allclose(x.grad.numpy(), ref_grad / n, rtol=1e-5, atol=1e-9)


def test_distribution_matching_scores_see_no_gradient():
    """The scores are evaluated under no_grad: a parameter inside the fake net receives nothing."""
    schedule = NoiseSchedule.from_config(CFG)
    x_in, noise = _inputs()
    theta = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def fake(z, t):
        return theta * z

    x = x_in.clone().requires_grad_(True)
    distribution_matching_loss(x, teacher, fake, noise, torch.tensor([100, 200, 300]), 2.0, schedule).loss.backward()
    assert theta.grad is None and x.grad is not None


def test_guided_x0_without_uncond_is_cond():
    schedule = NoiseSchedule.from_config(CFG)
    z, _ = _inputs()
    t = torch.tensor([10, 400, 900])
    only = guided_x0(lambda zz, tt: (eps_net(0.3, 0.1)(zz, tt), None), z, t, 5.0, schedule)
    for i, ti in enumerate(t.tolist()):
        np.testing.assert_allclose(only[i].numpy(), ref_x0(0.3, 0.1, z[i].numpy(), ti), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fake_score_loss_is_epsilon_regression(prediction_type):
    schedule = NoiseSchedule.from_config({**CFG, "prediction_type": prediction_type})
    x_in, noise = _inputs()
    t = torch.tensor([0, 333, 999])
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def fake(z, tt):
        return theta * z

    out = fake_score_loss(fake, x_in, noise, t, schedule)
    out.loss.backward()
    ref = 0.0
    for i, ti in enumerate(t.tolist()):
        a, s = np.sqrt(abar(ti)), np.sqrt(1 - abar(ti))
        z = a * x_in[i].numpy() + s * noise[i].numpy()
        o = 0.7 * z
        eps = o if prediction_type == "epsilon" else s * z + a * o  # v = a eps - s x0  =>  eps = s z + a v
        ref += ((eps - noise[i].numpy()) ** 2).sum()
    np.testing.assert_allclose(float(out.loss.detach()), ref / x_in.numel(), rtol=1e-9)
    assert theta.grad is not None and float(theta.grad) != 0.0
