"""Teacher-path states, losses from given states, and backward simulation, against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.losses import (
    NoiseSchedule,
    backward_simulation,
    lcm_loss,
    lcm_loss_at,
    mlcd_loss,
    mlcd_loss_at,
    multistep_sample,
    teacher_path_states,
)
from tlcm.losses.consistency import teacher_path_times
from tlcm.math import segment_edges

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def a_s(t: int) -> tuple[float, float]:
    if t < 0:
        return 1.0, 0.0
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ab = float(np.cumprod(1 - betas)[t])
    return float(np.sqrt(ab)), float(np.sqrt(1 - ab))


def eps_net(scale, shift):
    def net(z, t):
        tt = t.to(z.dtype).reshape(-1, 1, 1, 1)
        return scale * (1 + tt / 1000) * z + shift * torch.cos(tt)

    return net


def teacher(z, t):
    return eps_net(0.3, 0.1)(z, t), eps_net(0.5, -0.2)(z, t)


def ref_teacher_step(z, t, s, w):
    a, sg = a_s(t)
    ce = 0.3 * (1 + t / 1000) * z + 0.1 * np.cos(t)
    ue = 0.5 * (1 + t / 1000) * z - 0.2 * np.cos(t)
    cx, ux = (z - sg * ce) / a, (z - sg * ue) / a
    x0, eps = cx + w * (cx - ux), ce + w * (ce - ue)
    a2, s2 = a_s(s)
    return a2 * x0 + s2 * eps


def test_path_times_take_one_step_per_segment_from_the_top():
    edges = torch.from_numpy(segment_edges(4))  # -1, 239, 499, 739, 999
    t = torch.tensor([999, 800, 739, 600, 100, 0])
    times = torch.stack(teacher_path_times(t, edges), dim=1).tolist()
    assert times[0] == [999, 999, 999, 999, 999]  # the top time itself: pure noise, no step
    assert times[1] == [999, 800, 800, 800, 800]  # top segment: 1 step
    assert times[2] == [999, 739, 739, 739, 739]  # on the edge: 1 step
    assert times[3] == [999, 739, 600, 600, 600]  # 2 steps
    assert times[4] == [999, 739, 499, 239, 100]  # lowest segment: 4 steps (M)
    assert times[5] == [999, 739, 499, 239, 0]
    steps = [sum(a != b for a, b in zip(row[:-1], row[1:])) for row in times]
    assert steps == [0, 1, 1, 2, 4, 4]


def test_teacher_path_states_match_float64_walk():
    schedule = NoiseSchedule.from_config(CFG)
    edges = torch.from_numpy(segment_edges(4))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 4, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([999, 760, 499, 59])
    w = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    z = teacher_path_states(teacher, noise, t, w, schedule, edges)
    for i, ti in enumerate(t.tolist()):
        ref = noise[i].numpy()
        cur = 999
        for e in [739, 499, 239]:
            if e > ti:
                ref, cur = ref_teacher_step(ref, cur, e, float(w[i])), e
        if cur != ti:
            ref = ref_teacher_step(ref, cur, ti, float(w[i]))
        np.testing.assert_allclose(z[i].numpy(), ref, rtol=1e-9, atol=1e-9)


def test_losses_from_states_equal_losses_from_forward_noise():
    schedule = NoiseSchedule.from_config(CFG)
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([19, 519, 999])
    z = schedule.add_noise(x0, noise, t)
    s, tg = eps_net(0.2, 0.3), eps_net(0.25, 0.1)
    a = lcm_loss(s, tg, teacher, x0, noise, t, 3.0, schedule, loss_type="l2")
    b = lcm_loss_at(s, tg, teacher, z, t, 3.0, schedule, loss_type="l2")
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.target, b.target) and torch.equal(a.loss, b.loss)
    edges = torch.from_numpy(segment_edges(2))
    a = mlcd_loss(s, tg, teacher, x0, noise, t, 3.0, schedule, edges)
    b = mlcd_loss_at(s, tg, teacher, z, t, 3.0, schedule, edges)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.target, b.target)


@pytest.mark.parametrize("mode, boundary", [("lcm", "none"), ("lcm", "lcm"), ("segments", "none")])
def test_backward_simulation_value_and_last_step_gradient(mode, boundary):
    """Same sample as multistep_sample; the gradient w.r.t. a network parameter comes from the last step alone."""
    schedule = NoiseSchedule.from_config(CFG)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64)
    times = [999, 759, 499, 259]
    renoise = [torch.randn(2, 4, 2, 2, generator=g, dtype=torch.float64) for _ in times]
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def net(z, t):
        return theta * z

    x = backward_simulation(net, noise, times, schedule, mode, boundary, renoise)
    ref = multistep_sample(net, noise, times, schedule, mode, boundary, renoise)
    torch.testing.assert_close(x.detach(), ref, rtol=1e-12, atol=1e-12)
    x.sum().backward()
    # the state entering the last step, computed independently of the graph
    z_last = multistep_sample(net, noise, times[:-1], schedule, mode, boundary, renoise, stop_at=times[-1])
    a, s = a_s(times[-1])
    # x0 = (z - s theta z) / a  =>  d sum(x0) / d theta = sum(-s z / a); with the LCM boundary scaled by c_out
    dx0 = float((-s * z_last / a).sum())
    if boundary == "lcm":
        from tlcm.math import boundary_scalings

        _, c_out = boundary_scalings(torch.tensor([times[-1]]), 0.5, 10.0)
        dx0 *= float(c_out)
    assert float(theta.grad) == pytest.approx(dx0, rel=1e-9)


def test_backward_simulation_one_step_is_the_plain_prediction():
    schedule = NoiseSchedule.from_config(CFG)
    noise = torch.randn(2, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    net = eps_net(0.2, 0.1)
    x = backward_simulation(net, noise, [999], schedule, "lcm", "none")
    a, s = a_s(999)
    ref = (noise.numpy() - s * (0.2 * 1.999 * noise.numpy() + 0.1 * np.cos(999))) / a
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-9, atol=1e-9)
