"""The toy reward model: a few-step training run through the CLI, its files and report, loading it as a reward,
its contrastive loss and text pooling against independent computations, and its separation from the metrics
classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tlcm.errors import TLCMError
from tlcm.losses.reward import RewardModel, load_reward
from tlcm.toy import shapes
from tlcm.toy.reward import (
    RewardConfig,
    ToyRewardNet,
    contrastive_loss,
    load_toy_reward,
    resolve_world,
    sentence_embeddings,
    train_reward,
)

TINY = dict(train_images=48, vae_images=16, eval_images=32, steps=3, batch_size=16, checkpoint_every=2, width=8,
            embed_dim=16, text_hidden=32, threads=1, world="shapes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``tlcm toy train-reward`` for 3 steps on 48 images (16 with VAE round trips), through the CLI."""
    from tlcm.cli import main

    root = tmp_path_factory.mktemp("toyreward")
    (root / "cfg.yaml").write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "steps"}))
    rc = main(["toy", "train-reward", "--out", str(root / "out"), "--config", str(root / "cfg.yaml"), "--steps", "3",
               "--no-progress"])
    assert rc == 0
    return root / "out"


def test_outputs_and_report(trained):
    report = json.loads((trained / "report.json").read_text())
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["world"] == "shapes" and cfg["resolution"] == shapes.RESOLUTION
    assert cfg["width"] == 8 and cfg["embed_dim"] == 16 and cfg["seed"] == 2000 and cfg["data_seed"] == 3000
    assert cfg["default_margin"] == report["reward_vae_mean"]
    assert report["steps"] == 3 and report["images"] == 48 and report["eval_images"] == 32
    for key in ("retrieval_i2t_top1_real", "retrieval_t2i_top1_real", "retrieval_i2t_top1_vae", "reward_real_mean",
                "reward_real_mismatched_mean"):
        assert key in report
    assert set(report["attribute_swap_accuracy"]) == set(shapes.ATTRIBUTES)
    from safetensors.torch import load_file

    state = load_file(str(trained / "reward.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert (trained / "reward.safetensors").stat().st_size < 5e6
    data = torch.load(trained / "data.pt", weights_only=True)
    assert data["vae_images"].shape == (16, 32, 32, 3) and data["images"].shape == (48, 32, 32, 3)
    # finished: a second call returns the report without training again
    assert train_reward(RewardConfig(**TINY), trained, progress=False) == report


def test_loads_as_a_reward_and_matches_its_parts(trained):
    reward = load_reward(f"toy:{trained}")
    assert isinstance(reward, RewardModel) and reward.conditional
    assert reward.default_margin == json.loads((trained / "config.json").read_text())["default_margin"]
    recs = shapes.sample_records(4, seed=77)
    x = torch.stack([torch.from_numpy(np.array(r[0])).permute(2, 0, 1).float() / 255 for r in recs])
    prompts = [r[1] for r in recs]
    got = reward(x, prompts)
    # independent: MiniLM mean-pooled per prompt alone (no padding), the net's embeddings, capped exp(logit_scale)
    from tlcm.toy.teacher import load_text_encoder

    tok, enc = load_text_encoder(32)
    with torch.no_grad():
        sent = []
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            sent.append(F.normalize(enc(**ids)[0].mean(1)[0], dim=-1))
        txt = reward.net.text_embeds(torch.stack(sent))
        img = reward.net.image_embeds(x)
        want = min(float(reward.net.logit_scale.exp()), 100.0) * (img * txt).sum(-1)
    # float32 through BERT with and without padding: ~1e-6 relative on unit vectors, times a scale <= 100
    torch.testing.assert_close(got, want, rtol=0, atol=100 * 1e-5)
    # any resolution: resized with antialiased bilinear interpolation, as the toy metrics do
    big = F.interpolate(x, size=(64, 64), mode="nearest")
    small = F.interpolate(big, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(reward(big, prompts), reward(small, prompts), rtol=0, atol=1e-5)
    # differentiable in the images, frozen weights
    xg = x.clone().requires_grad_(True)
    reward(xg, prompts).sum().backward()
    assert float(xg.grad.abs().sum()) > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_sentence_embeddings_ignore_padding():
    from tlcm.toy.teacher import load_text_encoder

    tok, enc = load_text_encoder(32)
    prompts = ["a red circle", "a tiny purple plus sign in the lower right on a grey background"]
    batch = sentence_embeddings(prompts, tok, enc, 32)
    alone = torch.cat([sentence_embeddings([p], tok, enc, 32) for p in prompts])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.norm(dim=-1), torch.ones(2))


def test_contrastive_loss_matches_float64_loops():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 3, 2])
    scale = torch.tensor(7.0)
    got = contrastive_loss(img, txt, labels, scale)
    s = 7.0 * img.double() @ txt.double().T
    total = 0.0
    for m in (s, s.T):  # image->text rows, then text->image rows
        for i in range(6):
            pos = [j for j in range(6) if labels[i] == labels[j]]
            logz = float(torch.logsumexp(m[i], 0))
            total += -sum(float(m[i, j]) - logz for j in pos) / len(pos)
    assert float(got) == pytest.approx(total / 12, rel=1e-6)


def test_separate_from_the_metrics_classifier(tmp_path):
    from tlcm.toy.build import BuildConfig
    from tlcm.toy.metrics import AttributeClassifier, MetricsConfig

    cfg = RewardConfig()
    assert cfg.seed != MetricsConfig.seed and cfg.data_seed not in (MetricsConfig.seed, BuildConfig.seed)
    a = shapes.sample_records(3, seed=cfg.data_seed)
    b = shapes.sample_records(3, seed=MetricsConfig.seed)
    assert all(np.asarray(x[0]).tobytes() != np.asarray(y[0]).tobytes() for x, y in zip(a, b))
    assert not set(ToyRewardNet().state_dict()) & set(AttributeClassifier().state_dict())
    with pytest.raises(TLCMError, match="metrics classifier"):
        train_reward(RewardConfig(data_seed=MetricsConfig.seed), tmp_path / "x", progress=False)


def test_world_resolution_and_errors(tmp_path, monkeypatch):
    assert resolve_world("shapes") is shapes
    with pytest.raises(TLCMError, match="unknown toy world"):
        resolve_world("nosuchworld")
    with pytest.raises(TLCMError, match="unknown toy world"):  # a module of tlcm.toy that is not a world
        resolve_world("common")
    from tlcm.toy.reward import vae_round_trip

    assert vae_round_trip(np.zeros((2, 32, 32, 3), np.uint8), "") is None  # vae: "" trains without round trips
    with pytest.raises(TLCMError, match="no AutoencoderKL"):
        vae_round_trip(np.zeros((2, 32, 32, 3), np.uint8), str(tmp_path))
    import tlcm.toy

    monkeypatch.setattr(tlcm.toy, "assets_dir", lambda world=None: tmp_path)
    with pytest.raises(TLCMError, match="tlcm toy train-reward"):
        load_reward("toy")
    with pytest.raises(TLCMError, match="tlcm toy train-reward"):
        load_toy_reward(tmp_path / "nothing")
