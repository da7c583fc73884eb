"""DMD's regression loss (tlcm.losses.regression) against a float64 closed form with a stand-in epsilon network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.losses import NoiseSchedule
from tlcm.losses.regression import regression_loss

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def abar(t: int) -> float:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return float(np.cumprod(1 - betas)[t])


class EpsNet(torch.nn.Module):
    """eps = scale (1 + t/1000) z + shift cos(t): depends on z and t, with one trainable parameter."""

    def __init__(self, scale: float, shift: float):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale, dtype=torch.float64))
        self.shift = shift

    def forward(self, z, t):
        tt = t.to(z.dtype).reshape(-1, 1, 1, 1)
        return self.scale * (1 + tt / 1000) * z + self.shift * torch.cos(tt)


@pytest.mark.parametrize("t_start", [999, 759])
@pytest.mark.parametrize("boundary", ["none", "lcm"])
def test_one_step_regression_matches_float64_closed_form(boundary, t_start):
    g = torch.Generator().manual_seed(0)
    noise, x0 = (torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    net = EpsNet(0.3, 0.1)
    out = regression_loss(net, noise, x0, t_start, NoiseSchedule.from_config(CFG), "lcm", boundary, kind="l2")
    a, s = np.sqrt(abar(t_start)), np.sqrt(1 - abar(t_start))
    z = noise.numpy()
    x0_hat = (z - s * (0.3 * (1 + t_start / 1000) * z + 0.1 * np.cos(t_start))) / a
    if boundary == "lcm":  # LCM's boundary condition, sigma_data 0.5, timestep scaling 10
        st = 10.0 * t_start
        c_skip, c_out = 0.25 / (st**2 + 0.25), st / np.sqrt(st**2 + 0.25)
        x0_hat = c_skip * z + c_out * x0_hat
    ref = np.mean((x0_hat - x0.numpy()) ** 2)
    # the distance is taken in float32 (as every consistency loss); the prediction itself stays float64
    rtol32 = 64 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(float(out.loss.detach()), ref, rtol=rtol32)
    np.testing.assert_allclose(out.prediction.detach().numpy(), x0_hat, rtol=1e-10, atol=1e-10)
    # the gradient reaches the network: d loss / d scale by the closed form
    out.loss.backward()
    dx_dscale = -s * (1 + t_start / 1000) * z / a * (c_out if boundary == "lcm" else 1.0)
    ref_grad = np.mean(2 * (x0_hat - x0.numpy()) * dx_dscale)
    np.testing.assert_allclose(float(net.scale.grad), ref_grad, rtol=rtol32)


def test_segments_mode_is_the_plain_x0_prediction():
    g = torch.Generator().manual_seed(1)
    noise, x0 = (torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    net = EpsNet(0.5, -0.2)
    seg = regression_loss(net, noise, x0, 999, NoiseSchedule.from_config(CFG), "segments", "none", kind="l2")
    plain = regression_loss(net, noise, x0, 999, NoiseSchedule.from_config(CFG), "lcm", "none", kind="l2")
    torch.testing.assert_close(seg.prediction, plain.prediction, rtol=0, atol=0)
