"""Latent LPIPS: loading, the LPIPS formula recomputed in float64, distance properties, gradients, and its use as
the distance of the consistency losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tlcm.errors import TLCMError
from tlcm.losses import NoiseSchedule, distance, l2, mlcd_loss, pseudo_huber
from tlcm.losses.perceptual import STAGE_STARTS, LatentLPIPS, load_latent_lpips

TINY = (4, 8, 8, 16, 16)
CONVS = (2, 2, 3, 3, 3)


def random_state(channels=TINY, in_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A complete state dict in the released layout, with random convs, batch-norm statistics and non-negative heads
    (so every parameter matters; default initialisation would leave BN an identity)."""
    g = torch.Generator().manual_seed(seed)
    model = LatentLPIPS(in_channels, channels)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.startswith("lin"):
            state[k] = torch.rand(v.shape, generator=g)
        elif v.ndim == 4:
            fan_in = v.shape[1] * v.shape[2] * v.shape[3]
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
        else:
            state[k] = 0.1 * torch.randn(v.shape, generator=g) + (1.0 if k.endswith(".weight") else 0.0)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("lpips") / "latent_lpips.safetensors"
    save_file(random_state(), str(path))
    return path


@pytest.fixture(scope="module")
def lpips(weights_file):
    return load_latent_lpips(weights_file)


def latents(seed: int, shape=(3, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def reference_lpips64(state: dict[str, torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The formula written out in float64 from the raw state dict: VGG-16-BN convs (eval batch norm), the last two
    stages closed by 2x2 max-pools, channel-normalised squared differences, non-negative 1x1 heads, spatial mean,
    sum over the five stages."""
    sd = {k: v.double() for k, v in state.items()}

    def trunk(x):
        outs = []
        for s in range(5):
            i = STAGE_STARTS[s]
            for _ in range(CONVS[s]):
                p, q = f"net.slice{s + 1}.{i}", f"net.slice{s + 1}.{i + 1}"
                x = F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], padding=1)
                x = (x - sd[q + ".running_mean"][:, None, None]) / torch.sqrt(
                    sd[q + ".running_var"][:, None, None] + 1e-5
                ) * sd[q + ".weight"][:, None, None] + sd[q + ".bias"][:, None, None]
                x = torch.clamp(x, min=0)
                i += 3
            if s >= 3:
                x = F.max_pool2d(x, 2)
            outs.append(x)
        return outs

    total = torch.zeros(a.shape[0], dtype=torch.float64)
    for s, (fa, fb) in enumerate(zip(trunk(a.double()), trunk(b.double()))):
        na = fa / (torch.sqrt((fa**2).sum(1, keepdim=True)) + 1e-10)
        nb = fb / (torch.sqrt((fb**2).sum(1, keepdim=True)) + 1e-10)
        w = sd[f"lin{s}.model.1.weight"][0, :, 0, 0]
        total += torch.einsum("bchw,c->bhw", (na - nb) ** 2, w).mean(dim=(1, 2))
    return total


# float32 against float64 through 13 convolutions of fan-in <= 9 * 16: each output sums <= 144 products, so its
# rounding error is below 144 * 2^-24 relative; 13 layers in a row and the five-term sum stay under ~2e-4.
RTOL_F32 = 13 * 144 * 2.0**-24 * 2


def test_matches_float64_formula(weights_file, lpips):
    from safetensors.torch import load_file

    state = load_file(str(weights_file))
    a, b = latents(1), latents(2)
    got = lpips(a, b)
    want = reference_lpips64(state, a, b)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert float(want.min()) > 0.05  # a non-trivial distance, so the relative check means something
    torch.testing.assert_close(got.double(), want, rtol=RTOL_F32, atol=0)
    # float64 copy of the module: the same formula to float64 rounding
    lp64 = load_latent_lpips(weights_file, dtype=torch.float64)
    got64 = lp64(a.double(), b.double())
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=0)


def test_feature_map_sizes(lpips):
    feats = lpips.net(latents(0, (1, 4, 16, 16)))
    assert [tuple(f.shape[1:]) for f in feats] == [(4, 16, 16), (8, 16, 16), (8, 16, 16), (16, 8, 8), (16, 4, 4)]


def test_identity_symmetry_and_l1(weights_file, lpips):
    a, b = latents(3), latents(4)
    d_ab = lpips(a, b)
    assert torch.all(d_ab > 0)
    assert float(lpips(a, a).abs().max()) <= 1e-6 * float(d_ab.min())
    torch.testing.assert_close(lpips(b, a), d_ab, rtol=1e-6, atol=0)
    with_l1 = load_latent_lpips(weights_file, l1_weight=0.5)
    torch.testing.assert_close(with_l1(a, b), d_ab + 0.5 * (a - b).abs().mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)


def test_gradients_reach_inputs_not_the_frozen_net(lpips):
    a = latents(5).requires_grad_(True)
    b = latents(6)
    lpips.train()  # stays frozen: eval-mode batch norm, no dropout
    assert not lpips.training
    lpips(a, b).sum().backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips.parameters())


def test_gradcheck_float64(weights_file):
    lp = load_latent_lpips(weights_file, dtype=torch.float64)
    a = latents(7, (1, 4, 4, 8)).double().requires_grad_(True)
    b = latents(8, (1, 4, 4, 8)).double()
    assert torch.autograd.gradcheck(lambda x: lp(x, b), (a,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_roundtrip_pth_layout_with_release_quirks(tmp_path, lpips, weights_file):
    """The release's .pth: heads registered twice (lin0 and lins.0), DataParallel's ``module.`` prefix is tolerated,
    and a nested ``state_dict`` too; outputs equal the safetensors load."""
    from safetensors.torch import load_file

    state = load_file(str(weights_file))
    quirky = {f"module.{k}": v for k, v in state.items()}
    quirky.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})
    torch.save({"state_dict": quirky}, tmp_path / "w.pth")
    a, b = latents(9), latents(10)
    assert torch.equal(load_latent_lpips(tmp_path / "w.pth")(a, b), lpips(a, b))


def test_channel_sizes_read_from_file(tmp_path):
    from safetensors.torch import save_file

    save_file(random_state((8, 8, 16, 16, 32), in_channels=16, seed=3), str(tmp_path / "w16.safetensors"))
    lp = load_latent_lpips(tmp_path / "w16.safetensors")
    assert lp.net.in_channels == 16 and lp.net.channels == (8, 8, 16, 16, 32)
    assert lp(latents(1, (2, 16, 8, 8)), latents(2, (2, 16, 8, 8))).shape == (2,)


def test_errors_name_the_weights(tmp_path, weights_file):
    from safetensors.torch import load_file, save_file

    with pytest.raises(TLCMError, match="Mingguksky/elatentlpips"):
        load_latent_lpips(tmp_path / "nowhere.pth")
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TLCMError, match="net.slice1.0.weight"):
        load_latent_lpips(tmp_path / "other.safetensors")
    state = load_file(str(weights_file))
    del state["lin3.model.1.weight"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(TLCMError, match="lin3.model.1.weight"):
        load_latent_lpips(tmp_path / "missing.safetensors")
    state = load_file(str(weights_file))
    state["lin2.model.1.weight"] = -state["lin2.model.1.weight"]
    save_file(state, str(tmp_path / "negative.safetensors"))
    with pytest.raises(TLCMError, match="negative"):
        load_latent_lpips(tmp_path / "negative.safetensors")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(TLCMError, match="cannot read"):
        load_latent_lpips(tmp_path / "junk.pth")


def test_input_checks(lpips):
    with pytest.raises(ValueError, match="one shape"):
        lpips(latents(0), latents(1, (3, 4, 16, 16)))
    with pytest.raises(ValueError, match="4x4"):
        lpips(latents(0, (1, 4, 2, 2)), latents(1, (1, 4, 2, 2)))


def test_consistency_distance_accepts_a_per_sample_callable(lpips):
    a, b = latents(11), latents(12)
    assert torch.equal(distance(a, b, lpips), lpips(a, b).mean())
    # string kinds are untouched
    assert torch.equal(distance(a, b, "l2"), l2(a, b))
    assert torch.equal(distance(a, b, "huber", 0.01), pseudo_huber(a, b, 0.01))
    with pytest.raises(ValueError, match="one value per sample"):
        distance(a, b, lambda x, y: (x - y).pow(2).mean())
    with pytest.raises(ValueError, match="per-sample distance callable"):
        distance(a, b, "lpips")


def test_mlcd_loss_with_latent_lpips(lpips):
    """Every consistency loss takes the callable as ``loss_type``: the loss is the mean LPIPS of its two sides."""
    schedule = NoiseSchedule.from_config(
        dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    )

    def net(z, t):
        return 0.3 * z + 0.01 * t.reshape(-1, 1, 1, 1).to(z.dtype) / 1000

    def teacher(z, t):
        return net(z, t), None

    x0 = latents(13, (2, 4, 8, 8))
    noise = latents(14, (2, 4, 8, 8))
    edges = torch.tensor([-1, 499, 999])
    t = torch.tensor([999, 300])
    out = mlcd_loss(net, net, teacher, x0, noise, t, None, schedule, edges, loss_type=lpips)
    assert torch.equal(out.loss, lpips(out.prediction, out.target).mean())
    assert float(out.loss) > 0
