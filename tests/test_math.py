"""tlcm.math against float64 closed forms written out here (never our own code) and against diffusers' schedulers
(DDIM, DDPM, LCM, TCD) wherever they define the same quantity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler

import tlcm.math as tm
from tlcm.math.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULE_CONFIGS = [
    SD,
    dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    dict(SD, rescale_betas_zero_snr=True),
    dict(num_train_timesteps=500, beta_start=0.001, beta_end=0.03, beta_schedule="linear", rescale_betas_zero_snr=True),
]


# --------------------------------------------------------------------------------------------------------------------
# Independent float64 references.


def ref_betas(cfg) -> np.ndarray:
    n = cfg.get("num_train_timesteps", 1000)
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = cfg.get("beta_start", 0.0001), cfg.get("beta_end", 0.02)
    if kind == "linear":
        return np.array([b0 + (b1 - b0) * i / (n - 1) for i in range(n)])
    if kind == "scaled_linear":
        return np.array([(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (n - 1)) ** 2 for i in range(n)])
    f = [math.cos((i / n + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(n + 1)]
    return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(n)])


def ref_abar(cfg) -> np.ndarray:
    abar = np.cumprod(1 - ref_betas(cfg))
    if cfg.get("rescale_betas_zero_snr"):  # Lin et al. 2023, Algorithm 1: sqrt(abar) shifted to 0, first kept
        a = np.sqrt(abar)
        a = (a - a[-1]) * a[0] / (a[0] - a[-1])
        abar = a**2
    return abar


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# schedule.py


@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS)
def test_alphas_cumprod_closed_form(cfg):
    abar = tm.alphas_cumprod_from_config(cfg)
    assert abar.dtype == torch.float64 and abar.shape == (cfg["num_train_timesteps"],)
    np.testing.assert_allclose(abar.numpy(), ref_abar(cfg), rtol=1e-12, atol=1e-15)
    if cfg.get("rescale_betas_zero_snr"):
        assert abar[-1] == 0.0  # zero terminal SNR, exactly, as DDIM/DDPM/LCM keep it
        np.testing.assert_allclose(abar[0].item(), ref_abar({**cfg, "rescale_betas_zero_snr": False})[0], rtol=1e-12)
    np.testing.assert_allclose(torch.cumprod(1 - tm.betas_from_config(cfg), 0).numpy(), abar.numpy(), rtol=1e-12)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, LCMScheduler, TCDScheduler])
@pytest.mark.parametrize("cfg", SCHEDULE_CONFIGS)
def test_alphas_cumprod_equal_diffusers(cls, cfg):
    sched = cls(**cfg)
    # float64 (accurate) agrees with diffusers' float32 table to 1e-6; float32 reproduces it bit for bit.
    torch.testing.assert_close(tm.alphas_cumprod_from_config(sched.config), sched.alphas_cumprod.double(), atol=1e-6,
                               rtol=0)
    assert torch.equal(tm.alphas_cumprod_from_config(sched.config, dtype=torch.float32), sched.alphas_cumprod)
    assert torch.equal(tm.betas_from_config(sched.config, dtype=torch.float32), sched.betas)


def test_trained_betas_and_unknown_schedule():
    betas = [0.01, 0.02, 0.05]
    np.testing.assert_allclose(tm.alphas_cumprod_from_config({"trained_betas": betas}).numpy(),
                               [0.99, 0.99 * 0.98, 0.99 * 0.98 * 0.95], rtol=1e-15)
    with pytest.raises(ValueError, match="beta_schedule"):
        tm.betas_from_config({"beta_schedule": "sigmoidish"})


def test_alpha_sigma_closed_form_and_clean():
    abar = tm.alphas_cumprod_from_config(SD)
    ref = ref_abar(SD)
    t = torch.tensor([[0, 1, 499], [998, 999, tm.CLEAN]])
    a, s = tm.alpha_sigma(abar, t)
    assert a.shape == s.shape == t.shape and a.dtype == torch.float64
    for i, ti in enumerate(t.flatten().tolist()):
        ab = 1.0 if ti == tm.CLEAN else ref[ti]
        assert a.flatten()[i].item() == pytest.approx(math.sqrt(ab), abs=1e-14)
        assert s.flatten()[i].item() == pytest.approx(math.sqrt(1 - ab), abs=1e-14)
    a0, s0 = tm.alpha_sigma(abar, tm.CLEAN)
    assert a0.item() == 1.0 and s0.item() == 0.0
    a1, _ = tm.alpha_sigma(abar.float(), 10)
    assert a1.dtype == torch.float32 and tm.CLEAN == -1


# --------------------------------------------------------------------------------------------------------------------
# parameterization.py


def ref_to_x0_eps(out, z, a, s, kind):
    if kind == "epsilon":
        return (z - s * out) / a, out
    if kind == "sample":
        return out, (z - a * out) / s
    return a * z - s * out, s * z + a * out  # v = a eps - s x0, z = a x0 + s eps


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_prediction_conversions_closed_form_and_round_trip(kind):
    abar = tm.alphas_cumprod_from_config(SD)
    t = torch.tensor([0, 250, 999])
    a, s = (v.view(-1, 1, 1, 1) for v in tm.alpha_sigma(abar, t))
    x0, eps = rand(3, 4, 5, 5, seed=1), rand(3, 4, 5, 5, seed=2)
    z = a * x0 + s * eps
    out = tm.x0_eps_to_model_output(x0, eps, a, s, kind)
    expected = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[kind]
    torch.testing.assert_close(out, expected, atol=1e-14, rtol=0)
    got_x0, got_eps = tm.model_output_to_x0_eps(out, z, a, s, kind)
    ref_x0, ref_eps = ref_to_x0_eps(out, z, a, s, kind)
    torch.testing.assert_close(got_x0, ref_x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_eps, ref_eps, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_x0, x0, atol=1e-10, rtol=0)  # and it inverts the forward map
    torch.testing.assert_close(got_eps, eps, atol=1e-10, rtol=0)


def test_unknown_prediction_type_raises():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="prediction_type"):
        tm.model_output_to_x0_eps(x, x, x + 1, x, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        tm.x0_eps_to_model_output(x, x, x + 1, x, "flow")


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [1, 250, 999])
def test_x0_equals_diffusers_ddpm_pred_original_sample(kind, t):
    sched = DDPMScheduler(**SD, prediction_type=kind, clip_sample=False)
    sched.set_timesteps(1000)
    out, z = rand(2, 4, 4, 4, seed=3, dtype=torch.float32), rand(2, 4, 4, 4, seed=4, dtype=torch.float32)
    theirs = sched.step(out, t, z, generator=torch.Generator().manual_seed(0)).pred_original_sample
    a, s = tm.alpha_sigma(tm.alphas_cumprod_from_config(SD, dtype=torch.float32), t)
    ours, _ = tm.model_output_to_x0_eps(out, z, a, s, kind)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_forward_and_velocity_equal_diffusers_ddpm():
    sched = DDPMScheduler(**SD)
    x0, eps = rand(3, 4, 4, 4, seed=5, dtype=torch.float32), rand(3, 4, 4, 4, seed=6, dtype=torch.float32)
    t = torch.tensor([0, 500, 999])
    a, s = (v.view(-1, 1, 1, 1) for v in tm.alpha_sigma(tm.alphas_cumprod_from_config(SD, torch.float32), t))
    torch.testing.assert_close(tm.ddim_step(x0, eps, a, s), sched.add_noise(x0, eps, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(tm.x0_eps_to_model_output(x0, eps, a, s, "v_prediction"),
                               sched.get_velocity(x0, eps, t), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# solvers.py


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_step_equals_ddimscheduler_eta0(kind, set_alpha_to_one, steps):
    sched = DDIMScheduler(**SD, prediction_type=kind, clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    sched.set_timesteps(steps)
    abar = tm.alphas_cumprod_from_config(SD, dtype=torch.float32)
    z = rand(1, 4, 6, 6, seed=7, dtype=torch.float32)
    for t in sched.timesteps[:3].tolist() + [int(sched.timesteps[-1])]:
        out = torch.tanh(z) + 0.3
        theirs = sched.step(out, t, z, eta=0.0)
        prev = t - 1000 // steps
        a_t, s_t = tm.alpha_sigma(abar, t)
        # DDIM's last step goes to abar = 1 (set_alpha_to_one) or to abar[0]: pass that time explicitly.
        a_p, s_p = tm.alpha_sigma(abar, prev if prev >= 0 else (tm.CLEAN if set_alpha_to_one else 0))
        x0, eps = tm.model_output_to_x0_eps(out, z, a_t, s_t, kind)
        torch.testing.assert_close(x0, theirs.pred_original_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(tm.ddim_step(x0, eps, a_p, s_p), theirs.prev_sample, atol=1e-6, rtol=1e-6)


def test_ddim_step_and_renoise_closed_form():
    abar = ref_abar(SD)
    x0, eps, n = rand(2, 3, seed=8), rand(2, 3, seed=9), rand(2, 3, seed=10)
    t, s = 800, 300
    a_t, s_t, a_s, s_s = (torch.tensor(v, dtype=torch.float64) for v in
                          (math.sqrt(abar[t]), math.sqrt(1 - abar[t]), math.sqrt(abar[s]), math.sqrt(1 - abar[s])))
    torch.testing.assert_close(tm.ddim_step(x0, eps, a_s, s_s), math.sqrt(abar[s]) * x0 + math.sqrt(1 - abar[s]) * eps,
                               atol=1e-15, rtol=0)
    z_s = a_s * x0 + s_s * eps
    r = abar[t] / abar[s]  # q(z_t | z_s) = N(sqrt(r) z_s, (1 - r) I)
    torch.testing.assert_close(tm.renoise(z_s, a_s, s_s, a_t, s_t, n), math.sqrt(r) * z_s + math.sqrt(1 - r) * n,
                               atol=1e-14, rtol=0)
    # from the clean end it is the forward process; to the same time it is the identity
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(tm.renoise(x0, one, zero, a_t, s_t, n), a_t * x0 + s_t * n, atol=1e-15, rtol=0)
    torch.testing.assert_close(tm.renoise(z_s, a_s, s_s, a_s, s_s, n), z_s, atol=1e-7, rtol=0)


def test_renoise_equals_tcdscheduler_transition():
    # TCDScheduler re-noises s -> t_prev as sqrt(abar_p / abar_s) z_s + sqrt(1 - abar_p / abar_s) n.
    sched = TCDScheduler(**SD)
    abar = sched.alphas_cumprod
    z_s, n = rand(1, 4, 4, 4, seed=11, dtype=torch.float32), rand(1, 4, 4, 4, seed=12, dtype=torch.float32)
    for s, p in [(100, 499), (0, 999), (349, 499)]:
        theirs = (abar[p] / abar[s]).sqrt() * z_s + (1 - abar[p] / abar[s]).sqrt() * n
        ours = tm.renoise(z_s, *tm.alpha_sigma(abar, s), *tm.alpha_sigma(abar, p), n)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 1.0, 6.5, torch.tensor([[3.0], [14.0]], dtype=torch.float64)])
def test_cfg_combine_and_guidance_conversions(w):
    cond, uncond = rand(2, 5, seed=13), rand(2, 5, seed=14)
    torch.testing.assert_close(tm.cfg_combine(cond, uncond, w), (1 + w) * cond - w * uncond, atol=1e-13, rtol=0)
    g = tm.guidance_lcm_to_imagen(w)
    # diffusers' pipelines: uncond + g (cond - uncond)
    torch.testing.assert_close(tm.cfg_combine(cond, uncond, w), uncond + g * (cond - uncond), atol=1e-13, rtol=0)
    assert tm.guidance_imagen_to_lcm(7.5) == 6.5 and tm.guidance_lcm_to_imagen(6.5) == 7.5
    if not isinstance(w, torch.Tensor):
        assert tm.guidance_imagen_to_lcm(tm.guidance_lcm_to_imagen(w)) == w


# --------------------------------------------------------------------------------------------------------------------
# consistency.py


def test_boundary_scalings_closed_form_and_lcmscheduler():
    sched = LCMScheduler(**SD)
    t = torch.arange(0, 1000)
    c_skip, c_out = tm.boundary_scalings(t)
    for ti in [0, 1, 2, 19, 259, 999]:
        st = 10.0 * ti
        assert c_skip[ti].item() == pytest.approx(0.25 / (st**2 + 0.25), rel=1e-14, abs=1e-300)
        assert c_out[ti].item() == pytest.approx(st / math.sqrt(st**2 + 0.25), rel=1e-14, abs=1e-300)
    assert c_skip[0] == 1.0 and c_out[0] == 0.0
    ref_skip, ref_out = zip(*(sched.get_scalings_for_boundary_condition_discrete(ti) for ti in range(1000)))
    np.testing.assert_allclose(c_skip.numpy(), ref_skip, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c_out.numpy(), ref_out, rtol=1e-12, atol=1e-15)
    # float32 on tensor times = LCMScheduler's arithmetic on the pipeline's tensor timesteps, bit for bit
    for ti in [torch.tensor(999), torch.tensor(19), torch.tensor(0)]:
        ours = tm.boundary_scalings(ti, dtype=torch.float32)
        theirs = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    # other sigma_data / timestep_scaling
    cs, co = tm.boundary_scalings(7, sigma_data=0.3, timestep_scaling=0.5)
    assert cs.item() == pytest.approx(0.09 / (3.5**2 + 0.09)) and co.item() == pytest.approx(3.5 / math.sqrt(12.34))


def test_boundary_at_clean_end_is_identity():
    c_skip, c_out = tm.boundary_scalings(torch.tensor([tm.CLEAN, 0]))
    assert c_skip.tolist() == [1.0, 1.0] and c_out.tolist() == [0.0, 0.0]
    z, x0 = rand(2, 3, seed=15), rand(2, 3, seed=16)
    torch.testing.assert_close(tm.consistency_output(z, x0, c_skip[0], c_out[0]), z, atol=0, rtol=0)
    cs, co = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1), torch.tensor([0.5, 0.1]).double().view(2, 1)
    torch.testing.assert_close(tm.consistency_output(z, x0, cs, co), cs * z + co * x0, atol=1e-15, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# timesteps.py


def test_skipping_step_grid():
    assert tm.skipping_step_grid().tolist() == [20 * k - 1 for k in range(1, 51)]
    assert tm.skipping_step_grid(1000, 4).tolist() == [249, 499, 749, 999]
    assert tm.skipping_step_grid(1000, 3).tolist() == [332, 665, 998]  # k = T // N, as diffusers' DDIMSolver
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            tm.skipping_step_grid(1000, bad)


def ref_lcm_timesteps(n, t_train=1000, original=50, strength=1.0):
    k = t_train // original
    origin = [k * i - 1 for i in range(int(original * strength), 0, -1)]
    # j * (L / n) in floating point, as numpy's linspace computes it: e.g. L = 45, n = 15 gives floor(26.999..) = 26 at
    # j = 9 where exact arithmetic says 27. diffusers' rule has this quirk, so the reference keeps it.
    return [origin[int(math.floor(j * (len(origin) / n)))] for j in range(n)]


@pytest.mark.parametrize("strength", [1.0, 0.9, 0.77, 0.5, 0.3, 0.1])
@pytest.mark.parametrize("original", [50, 25, 100])
def test_lcm_inference_timesteps_equal_lcmscheduler_all_n(strength, original):
    sched = LCMScheduler(**SD)
    for n in range(1, 51):
        try:
            sched.set_timesteps(n, original_inference_steps=original, strength=strength)
        except ValueError:
            with pytest.raises(ValueError):
                tm.lcm_inference_timesteps(n, 1000, original, strength)
            continue
        ours = tm.lcm_inference_timesteps(n, 1000, original, strength)
        assert ours.tolist() == sched.timesteps.tolist() == ref_lcm_timesteps(n, 1000, original, strength)
    assert tm.lcm_inference_timesteps(4).tolist() == [999, 759, 499, 259]


def test_lcm_inference_timesteps_bad_counts():
    for n in (0, -2):
        with pytest.raises(ValueError, match="at least 1"):
            tm.lcm_inference_timesteps(n)
    with pytest.raises(ValueError):
        tm.lcm_inference_timesteps(51)
    with pytest.raises(ValueError, match="original_inference_steps"):
        tm.lcm_inference_timesteps(4, 1000, 2000)


def test_linspace_inference_timesteps_official_table():
    # OPPO-Mente-Lab/TLCM inference.py: ts = linspace(999, 0, 9, dtype=int) = 999, 874, ..., 124, 0 and per step count
    # the index lists [0,8], [0,4,8], [0,4,7,8], [0,2,4,7,8], [0,2,4,6,7,8], [0,2,4,5,6,7,8], [0,2,3,...,8], all.
    ts = [999, 874, 749, 624, 499, 374, 249, 124]
    table = {1: [0], 2: [0, 4], 3: [0, 4, 7], 4: [0, 2, 4, 7], 5: [0, 2, 4, 6, 7], 6: [0, 2, 4, 5, 6, 7],
             7: [0, 2, 3, 4, 5, 6, 7], 8: list(range(8))}
    for n, idx in table.items():
        assert tm.linspace_inference_timesteps(n).tolist() == [ts[i] for i in idx]
    assert tm.linspace_inference_timesteps(10).tolist() == [int(999 - 99.9 * i) for i in range(10)]
    with pytest.raises(ValueError):
        tm.linspace_inference_timesteps(0)


def ref_segment_edges(m, n_grid=50, t_train=1000):
    k = t_train // n_grid
    return [-1] + [k * ((j * n_grid) // m) - 1 for j in range(1, m + 1)]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 30, 45, 50])
def test_segment_edges_index_and_inference(m):
    edges = tm.segment_edges(m)
    assert edges.tolist() == ref_segment_edges(m)
    assert edges[0] == tm.CLEAN and edges[-1] == 999 and np.all(np.diff(edges) > 0)
    ts = np.arange(0, 1000)
    idx = tm.segment_index(ts, edges)
    for t, i in zip(ts.tolist(), idx.tolist()):  # t in (e_i, e_{i+1}]
        assert edges[i] < t <= edges[i + 1]
    for n in range(1, m + 1):
        got = tm.segment_inference_timesteps(n, edges).tolist()
        upper = edges[1:][::-1].tolist()
        assert got == [upper[int(math.floor(j * m / n))] for j in range(n)]
        assert got[0] == 999 and len(set(got)) == n
    with pytest.raises(ValueError):
        tm.segment_inference_timesteps(m + 1, edges)
    with pytest.raises(ValueError):
        tm.segment_inference_timesteps(0, edges)


def test_segment_edges_examples_and_errors():
    assert tm.segment_edges(4).tolist() == [-1, 239, 499, 739, 999]
    assert tm.segment_edges(1).tolist() == [-1, 999]
    assert tm.segment_inference_timesteps(2, tm.segment_edges(4)).tolist() == [999, 499]
    for bad in (0, 51):
        with pytest.raises(ValueError):
            tm.segment_edges(bad)
    with pytest.raises(ValueError):
        tm.segment_index(np.array([tm.CLEAN]), tm.segment_edges(4))
    with pytest.raises(ValueError):
        tm.segment_index(1000, tm.segment_edges(4))


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.3, 0.5, 0.99])
def test_tcd_intermediate_timestep_equals_tcdscheduler(gamma):
    for t_prev in [999, 759, 499, 259, 19, 1, 0]:
        theirs = int(torch.floor((1 - gamma) * torch.tensor(t_prev)).long())  # TCDScheduler.step
        assert tm.tcd_intermediate_timestep(t_prev, gamma) == theirs == math.floor((1 - gamma) * t_prev)
    assert tm.tcd_intermediate_timestep(tm.CLEAN, gamma) == tm.CLEAN


def test_tcd_intermediate_timestep_ends():
    assert tm.tcd_intermediate_timestep(499, 1.0) == tm.CLEAN  # LCM: re-noise from the clean end
    assert tm.tcd_intermediate_timestep(499, 0.0) == 499  # deterministic DDIM
    for bad in (-0.1, 1.1):
        with pytest.raises(ValueError):
            tm.tcd_intermediate_timestep(499, bad)


# --------------------------------------------------------------------------------------------------------------------
# frechet.py


def test_frechet_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2; diagonal: sum over dimensions; commuting matrices the same in their eigenbasis.
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]])) == \
        pytest.approx(4.0 + 1.0, rel=1e-12)
    v1, v2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    assert frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T) == \
        pytest.approx(want, rel=1e-8)


def test_frechet_general_against_eigen_reference():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(150, 4)) @ rng.normal(size=(4, 4)) + 0.5
    mu1, c1 = a.mean(0), np.cov(a.T)
    mu2, c2 = b.mean(0), np.cov(b.T)
    w, v = np.linalg.eigh(c1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(r1 @ c2 @ r1)))  # tr (C1 C2)^1/2 = tr (C1^1/2 C2 C1^1/2)^1/2
    want = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
    assert frechet_distance_from_features(a, b) == pytest.approx(want, rel=1e-8)
    assert frechet_distance_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(want, rel=1e-8)
    mu, cov = gaussian_stats(a)
    np.testing.assert_allclose(cov, c1, rtol=1e-12)


def test_frechet_edge_cases():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 1))
    assert gaussian_stats(x)[1].shape == (1, 1)  # one feature: still a matrix
    assert frechet_distance_from_features(x, x + 2.0) == pytest.approx(4.0, rel=1e-9)
    few = rng.normal(size=(5, 8))  # singular covariances
    assert frechet_distance_from_features(few, few) == pytest.approx(0.0, abs=1e-5)
    assert frechet_distance_from_features(few, few) >= 0.0
    assert np.isfinite(frechet_distance_from_features(few, rng.normal(size=(6, 8))))
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 3)))


def test_dynamic_threshold_closed_form():
    x = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.4, 0.3, 0.9]], dtype=torch.float64).view(2, 1, 2, 2)
    # ratio 1: s = clamp(max |x|, 1, max_value) per sample; sample 1 stays as it is (s = 1, nothing above 1)
    out = tm.dynamic_threshold(x, ratio=1.0, max_value=2.5)
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.5, -2.5, 2.0, 0.1], dtype=torch.float64) / 2.5)
    torch.testing.assert_close(out[1], x[1])
    assert out.dtype == torch.float64 and out.shape == x.shape
    # max_value 1: plain clipping to [-1, 1]
    torch.testing.assert_close(tm.dynamic_threshold(x, 0.5, 1.0), x.clamp(-1, 1))
