"""Rewards: differentiable CLIP preprocessing against transformers' processor, CLIP score / PickScore / aesthetic
scores against transformers' own embeddings in float64 (tiny CLIP models saved and loaded back, never a download),
offline-loading errors, the reward losses, mismatched prompts, and the differentiable decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tlcm.errors import TLCMError
from tlcm.losses.reward import (
    OPENAI_CLIP_STD,
    PICKSCORE_PROCESSOR,
    ClipPreprocess,
    decode_for_reward,
    load_reward,
    mismatched_prompts,
    reward_loss,
)

PROMPTS = ["a red circle", "blue box, top left", "a tiny green cross", "white background"]


def clip_image_processor(**kwargs):
    """transformers' CLIP image processor (its PIL backend here: torchvision is not installed)."""
    import warnings

    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor(**kwargs)


def random_images(n: int, h: int, w: int, seed: int, smooth: bool = False) -> np.ndarray:
    """uint8 (n, h, w, 3): white noise (the hardest case for resampling) or a smooth pattern."""
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    out = []
    for _ in range(n):
        f = rng.uniform(1, 4, 3)
        img = np.stack([0.5 + 0.45 * np.sin(2 * np.pi * (f[c] * xx + f[(c + 1) % 3] * yy)) for c in range(3)], -1)
        out.append(np.round(img * 255).astype(np.uint8))
    return np.stack(out)


def to01(arr: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.from_numpy(arr).permute(0, 3, 1, 2).double() / 255).to(dtype)


# --- preprocessing against CLIPImageProcessor ----------------------------------------------------------------------
# The reference stores uint8 after each of PIL's two separable passes and after resizing; we do not round (it has no
# gradient). The intermediate rounding (<= 0.5/255) passes through the second pass, whose weights have an L1 norm of at
# most 1.25 (Keys' cubic, a = -0.5: taps 0.5625, 0.5625, -0.0625, -0.0625 at a half-pixel offset; antialiased
# downsampling stretches the kernel, whose L1 norm tends to 1 + 2 * 0.0417), and the final rounding adds <= 0.5/255:
# |ours - reference| <= (0.5 * 1.25 + 0.5) / 255 in [0, 1] units, divided by the std in normalised units. Bilinear
# weights are non-negative (L1 norm 1): (0.5 + 0.5) / 255. Float32 arithmetic adds ~1e-6.
BICUBIC_BOUND = (0.5 * 1.25 + 0.5) / 255 + 1e-6
BILINEAR_BOUND = (0.5 + 0.5) / 255 + 1e-6


@pytest.mark.parametrize("h,w", [(32, 32), (48, 40), (300, 257), (512, 512), (225, 700)])
@pytest.mark.parametrize("smooth", [False, True])
def test_preprocess_matches_clip_image_processor(h, w, smooth):
    proc = clip_image_processor()
    arr = random_images(2, h, w, seed=h * 1000 + w, smooth=smooth)
    want = proc(images=[Image.fromarray(a) for a in arr], return_tensors="pt").pixel_values.double()
    pre = ClipPreprocess.from_config(proc.to_dict(), 224)
    got = pre(to01(arr)).double()
    assert got.shape == want.shape == (2, 3, 224, 224)
    err = ((got - want).abs() * torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)).max()
    assert float(err) <= BICUBIC_BOUND


def test_preprocess_bilinear_and_fixed_size_configs():
    proc = clip_image_processor(resample=2, size={"shortest_edge": 64}, crop_size={"height": 48, "width": 64})
    arr = random_images(2, 100, 90, seed=3)
    want = proc(images=[Image.fromarray(a) for a in arr], return_tensors="pt").pixel_values.double()
    got = ClipPreprocess.from_config(proc.to_dict(), 224)(to01(arr)).double()
    assert got.shape == want.shape == (2, 3, 48, 64)
    err = ((got - want).abs() * torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)).max()
    assert float(err) <= BILINEAR_BOUND


def test_preprocess_is_differentiable():
    x = to01(random_images(1, 40, 48, seed=1, smooth=True)).requires_grad_(True)
    ClipPreprocess.from_config(None, 224)(x).square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


# --- tiny CLIP models saved like hub checkpoints ---------------------------------------------------------------


def tiny_clip(seed: int = 0, projection_dim: int = 16, logit_scale: float = 37.0):
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    cfg = CLIPConfig(
        text_config=dict(common, vocab_size=514, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                         max_position_embeddings=24),
        vision_config=dict(common, image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(logit_scale)))
    return model.eval()


def save_clip(folder, model, tokenizer: bool = True, processor: bool = True):
    from tlcm.testing import tiny_clip_tokenizer

    model.save_pretrained(str(folder))
    if tokenizer:
        tiny_clip_tokenizer(24).save_pretrained(str(folder))
    if processor:
        clip_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
            str(folder)
        )
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", tiny_clip(0))


def reference_pixels(proc, arr: np.ndarray) -> torch.Tensor:
    """The processor's pixel values in float64: its resize and crop (uint8 values, exact in float32), then its own
    rescale and normalisation constants applied in float64 (its float32 output would round them)."""
    raw = proc(images=[Image.fromarray(a) for a in arr], do_rescale=False, do_normalize=False, return_tensors="pt")
    mean = torch.tensor(proc.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(proc.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    return (raw.pixel_values.double() * proc.rescale_factor - mean) / std


def reference_scores(folder, arr: np.ndarray, prompts, scale: str) -> torch.Tensor:
    """transformers end to end in float64: processor -> get_image_features / get_text_features -> scaled cosine."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(str(folder)).double().eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    proc = clip_image_processor(**{k: v for k, v in json.loads((folder / "preprocessor_config.json").read_text())
                                   .items() if k in ("size", "crop_size", "resample")})
    pixels = reference_pixels(proc, arr)
    text = tok(list(prompts), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
        return cos * (100.0 if scale == "cos100" else model.logit_scale.exp())


# float32 against float64: the embeddings pass ~10 sequential float32 reductions of width <= 37 (2^-24 relative
# each), so the cosine is within 10 * 37 * 2^-24 and the scores within that times the scale.
COS_TOL_F32 = 10 * 37 * 2.0**-24


@pytest.mark.parametrize("kind,scale", [("clip", 100.0), ("pickscore", 37.0)])
def test_clip_score_and_pickscore_match_transformers(clip_dir, kind, scale):
    arr = random_images(4, 32, 32, seed=5, smooth=True)  # the model's size: preprocessing is exact (no resize)
    want = reference_scores(clip_dir, arr, PROMPTS, "cos100" if kind == "clip" else "logit_scale")
    r64 = load_reward(f"{kind}:{clip_dir}", dtype=torch.float64)
    got64 = r64(to01(arr, torch.float64), PROMPTS)
    torch.testing.assert_close(got64.double(), want, rtol=0, atol=scale * 1e-12)
    r32 = load_reward(f"{kind}:{clip_dir}")
    got32 = r32(to01(arr), PROMPTS)
    assert got32.dtype == torch.float32 and got32.shape == (4,)
    torch.testing.assert_close(got32.double(), want, rtol=0, atol=scale * COS_TOL_F32)
    assert r32.conditional and r32.spec == f"{kind}:{clip_dir}"
    assert float(want.std()) > 10 * scale * COS_TOL_F32  # the scores differ by far more than the tolerance


def test_reward_gradients_reach_images_only(clip_dir):
    reward = load_reward(f"clip:{clip_dir}")
    reward.train()
    assert not reward.training
    x = to01(random_images(2, 48, 40, seed=6, smooth=True)).requires_grad_(True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_pickscore_processor_fallbacks(tmp_path, clip_dir):
    """PickScore's repo has no tokenizer of its own in some copies: ``processor=`` names one; without it we look in the
    model folder, then the LAION CLIP-H repo, and the error names that repo."""
    bare = save_clip(tmp_path / "bare", tiny_clip(0), tokenizer=False, processor=False)
    arr = random_images(2, 32, 32, seed=7, smooth=True)
    with_proc = load_reward(f"pickscore:{bare},processor={clip_dir}")
    torch.testing.assert_close(
        with_proc(to01(arr), PROMPTS[:2]).double(), reference_scores(clip_dir, arr, PROMPTS[:2], "logit_scale"),
        rtol=0, atol=37 * COS_TOL_F32,
    )
    with pytest.raises(TLCMError, match=PICKSCORE_PROCESSOR):
        load_reward(f"pickscore:{bare}")


def test_missing_models_name_the_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(TLCMError, match="hf download yuvalkirstain/PickScore_v1"):
        load_reward("pickscore")
    with pytest.raises(TLCMError, match="hf download openai/clip-vit-large-patch14"):
        load_reward("clip")
    with pytest.raises(TLCMError, match="improved-aesthetic-predictor"):
        load_reward(f"aesthetic:{tmp_path / 'nope.pth'}")
    with pytest.raises(TLCMError, match="improved-aesthetic-predictor"):
        load_reward("aesthetic")
    with pytest.raises(TLCMError, match="unknown reward"):
        load_reward("imagereward:x")
    with pytest.raises(TLCMError, match="unknown options"):
        load_reward("clip:x,foo=1")


# --- aesthetic predictor -------------------------------------------------------------------------------------------


def mlp_state(dims, seed: int) -> dict[str, torch.Tensor]:
    """The sac+logos+ava1-l14-linearMSE layout (Linear layers at Sequential indices 0, 2, 4, 6, 7) at tiny widths."""
    g = torch.Generator().manual_seed(seed)
    idx = [0, 2, 4, 6, 7]
    state = {}
    for i, (a, b) in zip(idx, zip(dims[:-1], dims[1:])):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=g) / a**0.5
        state[f"layers.{i}.bias"] = torch.randn(b, generator=g) * 0.1
    return state


def test_aesthetic_mlp_and_linear_layouts(tmp_path, clip_dir):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    arr = random_images(3, 32, 32, seed=8, smooth=True)
    model = CLIPModel.from_pretrained(str(clip_dir)).double().eval()
    proc = clip_image_processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = reference_pixels(proc, arr)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=pixels)
    emb = F.normalize(getattr(emb, "pooler_output", emb), dim=-1)

    mlp = mlp_state([16, 32, 8, 4, 2, 1], seed=1)
    torch.save(mlp, tmp_path / "mlp.pth")
    want = emb
    for i in (0, 2, 4, 6, 7):  # no activations: the released MLP has its ReLUs commented out
        want = want @ mlp[f"layers.{i}.weight"].double().T + mlp[f"layers.{i}.bias"].double()
    reward = load_reward(f"aesthetic:{tmp_path / 'mlp.pth'},clip={clip_dir}")
    assert not reward.conditional
    got = reward(to01(arr), None)
    torch.testing.assert_close(got.double(), want[:, 0], rtol=0, atol=COS_TOL_F32 * float(want.abs().max() + 1) * 10)
    assert torch.equal(reward(to01(arr), PROMPTS[:3]), got)  # the prompt is ignored

    lin = {"weight": torch.randn(1, 16, generator=torch.Generator().manual_seed(2)), "bias": torch.tensor([5.0])}
    save_file(lin, str(tmp_path / "linear.safetensors"))
    got = load_reward(f"aesthetic:{tmp_path / 'linear.safetensors'},clip={clip_dir}")(to01(arr))
    want = emb @ lin["weight"].double().T + 5.0
    torch.testing.assert_close(got.double(), want[:, 0], rtol=0, atol=COS_TOL_F32 * 20)


def test_aesthetic_errors(tmp_path, clip_dir):
    torch.save(mlp_state([768, 1024, 128, 64, 16, 1], seed=0), tmp_path / "l14.pth")
    with pytest.raises(TLCMError, match="768-d"):
        load_reward(f"aesthetic:{tmp_path / 'l14.pth'},clip={clip_dir}")
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "odd.pth")
    with pytest.raises(TLCMError, match="not a LAION aesthetic predictor"):
        load_reward(f"aesthetic:{tmp_path / 'odd.pth'},clip={clip_dir}")


# --- losses ------------------------------------------------------------------------------------------------------


def test_reward_loss_formulas():
    r = torch.tensor([10.0, 17.0, 15.5, 20.0], requires_grad=True)
    r_mis = torch.tensor([12.0, 14.0, 15.0, 1.0], requires_grad=True)
    assert float(reward_loss(r.detach())) == pytest.approx(-15.625)
    # hinge, margin 16: relu(16 - r) = 6, 0, 0.5, 0 -> 1.625; mismatch hinge with margin' 1: relu(r_mis - r + 1) =
    # 3, 0, 0.5, 0 -> 0.875
    loss = reward_loss(r, r_mis, kind="hinge", margin=16.0, mismatch_margin=1.0)
    assert float(loss.detach()) == pytest.approx(1.625 + 0.875)
    loss.backward()
    assert r.grad.tolist() == pytest.approx([-0.5, 0.0, -0.5, 0.0])  # each active hinge: -1/B, from both terms
    assert r_mis.grad.tolist() == pytest.approx([0.25, 0.0, 0.25, 0.0])
    assert float(reward_loss(r.detach(), kind="hinge", margin=16.0)) == pytest.approx(1.625)
    with pytest.raises(ValueError, match="margin"):
        reward_loss(r, kind="hinge")
    with pytest.raises(ValueError, match="plain"):
        reward_loss(r, r_mis)
    with pytest.raises(ValueError, match="unknown reward loss"):
        reward_loss(r, kind="dpo")


@pytest.mark.parametrize("seed", range(25))
def test_mismatched_prompts_is_a_text_derangement(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 12))
    vocab = [f"prompt {i}" for i in range(int(rng.integers(2, 6)))]
    prompts = [vocab[int(rng.integers(len(vocab)))] for _ in range(n)]
    counts = {p: prompts.count(p) for p in prompts}
    if 2 * max(counts.values()) <= n:
        got = mismatched_prompts(prompts, torch.Generator().manual_seed(seed))
        assert got == mismatched_prompts(prompts, torch.Generator().manual_seed(seed))  # deterministic
        assert sorted(got) == sorted(prompts)  # a permutation of the batch
        assert all(a != b for a, b in zip(got, prompts))
    else:
        with pytest.raises(TLCMError, match="pool"):
            mismatched_prompts(prompts, torch.Generator().manual_seed(seed))
        pooled = mismatched_prompts(prompts, torch.Generator().manual_seed(seed), pool=vocab)
        assert all(a != b and a in vocab for a, b in zip(pooled, prompts))


def test_mismatched_prompts_varies_with_the_generator():
    prompts = [f"p{i}" for i in range(8)]
    outs = {tuple(mismatched_prompts(prompts, torch.Generator().manual_seed(s))) for s in range(10)}
    assert len(outs) > 1
    assert mismatched_prompts(["only"], torch.Generator().manual_seed(0), pool=["only", "other"]) == ["other"]
    assert mismatched_prompts([], torch.Generator()) == []


# --- decoding -------------------------------------------------------------------------------------------------


def test_decode_for_reward_matches_the_pipeline_and_passes_gradients():
    from diffusers.image_processor import VaeImageProcessor

    from tlcm.testing import _tiny_vae

    torch.manual_seed(0)
    vae = _tiny_vae().eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=0.5)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        raw = vae.decode(latents / 0.5).sample
        want = VaeImageProcessor(vae_scale_factor=2).postprocess(raw, output_type="pt")
    z = latents.clone().requires_grad_(True)
    got = decode_for_reward(vae, z)
    assert torch.equal(got.detach(), want)
    assert float(((raw / 2 + 0.5) - (raw / 2 + 0.5).clamp(0, 1)).abs().max()) > 0  # some pixels are clamped
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * w).sum().backward()
    z2 = latents.clone().requires_grad_(True)
    ((vae.decode(z2 / 0.5).sample / 2 + 0.5) * w).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad)  # straight-through: the gradient of the unclamped decode
    z3 = latents.clone().requires_grad_(True)
    (decode_for_reward(vae, z3, straight_through=False) * w).sum().backward()
    assert not torch.allclose(z3.grad, z.grad)  # a hard clamp zeroes the saturated pixels' share


def test_decode_for_reward_undoes_shift_and_latent_statistics():
    from tlcm.testing import _tiny_vae

    torch.manual_seed(0)
    vae = _tiny_vae().eval().requires_grad_(False)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    vae.register_to_config(scaling_factor=0.7, shift_factor=0.2)
    with torch.no_grad():
        want = (vae.decode(latents / 0.7 + 0.2).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(decode_for_reward(vae, latents), want)
        mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 1.0, 2.0]
        vae.register_to_config(latents_mean=mean, latents_std=std, shift_factor=None)
        z = latents * torch.tensor(std).view(1, 4, 1, 1) / 0.7 + torch.tensor(mean).view(1, 4, 1, 1)
        want = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(decode_for_reward(vae, latents), want, rtol=0, atol=1e-6)


def test_reward_through_decode_reaches_latents(clip_dir):
    from tlcm.testing import _tiny_vae

    torch.manual_seed(0)
    vae = _tiny_vae().eval().requires_grad_(False)
    reward = load_reward(f"clip:{clip_dir}")
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    r = reward(decode_for_reward(vae, z), PROMPTS[:2])
    r_mis = reward(decode_for_reward(vae, z), mismatched_prompts(PROMPTS[:2], torch.Generator().manual_seed(0)))
    reward_loss(r, r_mis, kind="hinge", margin=float(r.detach().max()) + 1, mismatch_margin=1e3).backward()
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
