"""MLCD and TLCM stage-2 targets against independent float64 computations with stand-in networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.losses import (
    ExtraLossContext,
    LossOutput,
    NoiseSchedule,
    extra_losses_total,
    get_loss,
    l2,
    mlcd_loss,
    multistep_sample,
    pseudo_huber,
    register_loss,
    tlcm_loss,
    unregister_loss,
)
from tlcm.losses.consistency import substep_times

CFG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def abar64() -> np.ndarray:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


def a_s(t: int) -> tuple[float, float]:
    if t < 0:
        return 1.0, 0.0
    ab = abar64()[t]
    return float(np.sqrt(ab)), float(np.sqrt(1 - ab))


def make_net(scale: float, shift: float):
    """An epsilon 'network' whose output depends on z and t: eps = scale*(1 + t/1000) z + shift*cos(t)."""

    def net(z, t):
        tt = t.to(z.dtype).reshape(-1, 1, 1, 1)
        return scale * (1 + tt / 1000) * z + shift * torch.cos(tt)

    return net


def teacher_pair(z, t):
    return make_net(0.3, 0.1)(z, t), make_net(0.5, -0.2)(z, t)


def ref_eps(scale, shift, z, t):
    return scale * (1 + t / 1000) * z + shift * np.cos(t)


def ref_teacher_step(z, t, s, w):
    a, sg = a_s(t)
    ce, ue = ref_eps(0.3, 0.1, z, t), ref_eps(0.5, -0.2, z, t)
    cx, ux = (z - sg * ce) / a, (z - sg * ue) / a
    x0, eps = cx + w * (cx - ux), ce + w * (ce - ue)
    a2, s2 = a_s(s)
    return a2 * x0 + s2 * eps


def ref_jump(scale, shift, z, t, e):
    """DDIM of the stand-in net's (x0, eps) from t to e; identity at t == e."""
    if t == e:
        return z
    a, sg = a_s(t)
    eps = ref_eps(scale, shift, z, t)
    x0 = (z - sg * eps) / a
    ae, se = a_s(e)
    return ae * x0 + se * eps


def _inputs(bsz=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(bsz, 4, 2, 2, generator=g, dtype=torch.float64),
            torch.randn(bsz, 4, 2, 2, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("num_segments", [1, 4])
def test_mlcd_target_is_independent_computation(num_segments):
    from tlcm.math import segment_edges

    edges = torch.from_numpy(segment_edges(num_segments))
    schedule = NoiseSchedule.from_config(CFG)
    x0, noise = _inputs()
    t_start = torch.tensor([19, 259, 499, 999])  # 259 sits one step above the 4-segment edge 239
    w = torch.tensor([3.0, 3.0, 5.0, 7.0], dtype=torch.float64)
    student, target = make_net(0.2, 0.3), make_net(0.25, 0.1)
    out = mlcd_loss(student, target, teacher_pair, x0, noise, t_start, w, schedule, edges, skip=20, loss_type="l2")

    e_list = edges.tolist()
    for i, t in enumerate(t_start.tolist()):
        e = max(x for x in e_list if x < t)
        t_prev = max(t - 20, e)
        assert int(out.extras["t_prev"][i]) == t_prev and int(out.extras["edge"][i]) == e
        a, sg = a_s(t)
        z = a * x0[i].numpy() + sg * noise[i].numpy()
        pred = ref_jump(0.2, 0.3, z, t, e)
        z_prev = ref_teacher_step(z, t, t_prev, float(w[i]))
        tgt = ref_jump(0.25, 0.1, z_prev, t_prev, e)
        np.testing.assert_allclose(out.prediction[i].numpy(), pred, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(out.target[i].numpy(), tgt, rtol=1e-9, atol=1e-9)
        if t_prev == e:  # the teacher step lands on the edge: the target is the teacher point itself
            np.testing.assert_allclose(out.target[i].numpy(), z_prev, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.loss, ((out.prediction - out.target) ** 2).mean().float())


def test_mlcd_never_crosses_an_edge_with_coarse_skip():
    from tlcm.math import segment_edges

    edges = torch.from_numpy(segment_edges(4))
    schedule = NoiseSchedule.from_config(CFG)
    x0, noise = _inputs(4)
    t_start = torch.tensor([259, 279, 519, 759])
    out = mlcd_loss(make_net(0.2, 0.3), make_net(0.2, 0.3), teacher_pair, x0, noise, t_start, 2.0, schedule, edges,
                    skip=100)
    assert out.extras["t_prev"].tolist() == [239, 239, 499, 739]


def test_mlcd_one_segment_is_edge_lcm():
    """1 segment: boundary at the clean end; from t = 19 the target is the teacher's guided x0 (no c_skip/c_out)."""
    from tlcm.math import segment_edges

    schedule = NoiseSchedule.from_config(CFG)
    x0, noise = _inputs(1)
    out = mlcd_loss(make_net(0.2, 0.3), make_net(0.2, 0.3), teacher_pair, x0, noise, torch.tensor([19]), 4.0,
                    schedule, torch.from_numpy(segment_edges(1)))
    a, sg = a_s(19)
    z = a * x0[0].numpy() + sg * noise[0].numpy()
    np.testing.assert_allclose(out.target[0].numpy(), ref_teacher_step(z, 19, -1, 4.0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("substeps", [1, 3])
def test_tlcm_target_is_independent_computation(substeps):
    schedule = NoiseSchedule.from_config(CFG)
    x0, noise = _inputs(3)
    t_hi, t_lo = torch.tensor([999, 519, 219]), torch.tensor([749, 269, -1])
    w = 3.0
    out = tlcm_loss(make_net(0.2, 0.3), make_net(0.25, 0.1), teacher_pair, x0, noise, t_hi, t_lo, w, schedule,
                    num_substeps=substeps, boundary="none")
    for i in range(3):
        th, tl = int(t_hi[i]), int(t_lo[i])
        a, sg = a_s(th)
        z = a * x0[i].numpy() + sg * noise[i].numpy()
        pred = (z - sg * ref_eps(0.2, 0.3, z, th)) / a
        times = [th] + [int(round(th + (tl - th) * k / substeps)) for k in range(1, substeps)] + [tl]
        zz = z
        for t, s in zip(times[:-1], times[1:]):
            zz = ref_teacher_step(zz, t, s, w)
        if tl < 0:
            tgt = zz
        else:
            al, sl = a_s(tl)
            tgt = (zz - sl * ref_eps(0.25, 0.1, zz, tl)) / al
        np.testing.assert_allclose(out.prediction[i].numpy(), pred, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(out.target[i].numpy(), tgt, rtol=1e-9, atol=1e-9)


def test_substep_times_are_even_and_keep_ends():
    ts = substep_times(torch.tensor([999, 239]), torch.tensor([749, -1]), 3)
    assert [t.tolist() for t in ts] == [[999, 239], [916, 159], [832, 79], [749, -1]]


def test_distances():
    a, b = torch.tensor([0.0, 1.0]), torch.tensor([0.0, -1.0])
    torch.testing.assert_close(l2(a, b), torch.tensor(2.0))
    c = 1e-3
    torch.testing.assert_close(pseudo_huber(a, b, c), torch.tensor(((4 + c * c) ** 0.5 - c) / 2))


def test_segments_sampling_with_exact_denoiser_recovers_x0():
    """A network that knows x0 makes every DDIM jump exact: the segments walk returns x0 at any step count."""
    schedule = NoiseSchedule.from_config(CFG)
    x0 = torch.randn(2, 4, 2, 2, dtype=torch.float64)

    def oracle(z, t):
        a, s = schedule.alpha_sigma(t, z)
        return (z - a * x0) / s

    for times in ([999], [999, 499], [999, 739, 499, 239]):
        out = multistep_sample(oracle, torch.randn_like(x0), times, schedule, mode="segments")
        torch.testing.assert_close(out, x0)
        out = multistep_sample(oracle, torch.randn_like(x0), times, schedule, mode="lcm", boundary="none")
        torch.testing.assert_close(out, x0)


def test_extra_loss_hook_registry():
    @register_loss("unit_test_square")
    def square(ctx):
        return ctx.main.prediction.pow(2).mean()

    try:
        main = LossOutput(torch.tensor(1.0), torch.full((2,), 3.0), torch.zeros(2))
        ctx = ExtraLossContext(None, None, None, {}, main, 0)
        total, parts = extra_losses_total({"unit_test_square": 0.5}, ctx)
        assert float(total) == pytest.approx(4.5) and parts == {"unit_test_square": 9.0}
        with pytest.raises(ValueError):
            register_loss("unit_test_square")(lambda ctx: ctx)
    finally:
        unregister_loss("unit_test_square")
    with pytest.raises(TLCMError, match="unknown extra loss"):
        get_loss("unit_test_square")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_segments_walk_matches_tlcm_scheduler(steps):
    """The validation/stage-2 sampler walks exactly as the exported TLCMScheduler (mode segments) does."""
    from tlcm.scheduler import TLCMScheduler

    sched = TLCMScheduler(**CFG, mode="segments", num_segments=4, boundary_condition="none")
    sched.set_timesteps(steps)
    net = make_net(0.2, 0.3)
    noise = torch.randn(2, 4, 2, 2)
    z = noise
    for t in sched.timesteps:
        z = sched.step(net(z, t.repeat(2)), t, z).prev_sample
    ours = multistep_sample(net, noise, sched.timesteps.tolist(), NoiseSchedule.from_config(CFG), mode="segments")
    torch.testing.assert_close(ours, z, atol=1e-4, rtol=1e-4)
