"""The v3 (shapes) world: metric sanity with its shipped classifier, the metrics trainer's mechanics, and its shipped
assets' contract (v4: tests/toy/test_scene_assets.py)."""

from __future__ import annotations

import json

import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.math.manifold import knn_precision_recall as precision_recall_from_features
from tlcm.toy import assets_dir, common, default_prompts_path, shapes
from tlcm.toy.metrics import MetricsConfig, ToyMetrics, train_metrics


@pytest.fixture(scope="module")
def metrics():
    return ToyMetrics.load(world="v3")


@pytest.fixture(scope="module")
def real_sets():
    prompt_list = shapes.prompts(300, seed=21)
    a = common.to_tensor(shapes.render_prompts(prompt_list, seed=1))
    b = common.to_tensor(shapes.render_prompts(prompt_list, seed=2))
    return prompt_list, a, b


def test_real_vs_real_fid_is_far_below_real_vs_noise(metrics, real_sets):
    _, a, b = real_sets
    floor = metrics.toy_fid(a, b)
    noise = metrics.toy_fid(a, torch.rand(a.shape, generator=torch.Generator().manual_seed(0)))
    blurred = metrics.toy_fid(a, torch.nn.functional.avg_pool2d(b, 3, 1, 1))
    assert floor * 50 < noise
    assert floor < blurred < noise  # the metric orders degradations


def test_alignment_of_real_images_is_near_classifier_accuracy(metrics, real_sets):
    prompt_list, a, _ = real_sets
    acc = json.loads((assets_dir("v3") / "PROVENANCE.json").read_text())["classifier"]["accuracy_train_mean"]
    align = metrics.alignment(a, prompt_list)
    assert align >= 0.95 and abs(align - acc) < 0.05
    # mismatched prompts score low
    assert metrics.alignment(a, prompt_list[1:] + prompt_list[:1]) < 0.6


def test_metrics_api_accepts_pil_and_reports_shapes(metrics):
    recs = shapes.sample_records(4, seed=3, split="heldout")
    pil = [r[0] for r in recs]
    feats = metrics.features(pil)
    assert feats.ndim == 2 and feats.shape[0] == 4
    pred = metrics.predict(common.to_tensor(pil))
    assert set(pred) == set(shapes.ATTRIBUTES) and pred["shape"].shape == (4,)
    assert metrics.alignment(pil, [r[1] for r in recs]) > 0.75
    with pytest.raises(TLCMError):
        metrics.alignment(pil, ["a red circle"])


def test_precision_recall_in_feature_space():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    p, r = precision_recall_from_features(real, torch.randn(200, 8, generator=g))
    assert p > 0.8 and r > 0.8
    p, r = precision_recall_from_features(real, torch.randn(200, 8, generator=g) + 10)
    assert p < 0.1 and r < 0.1


def test_metrics_trainer_writes_a_loadable_classifier(tmp_path):
    cfg = MetricsConfig(train_images=64, eval_images=20, steps=3, batch_size=8, width=8, feature_dim=16, threads=1)
    report = train_metrics(cfg, tmp_path / "m", progress=False)
    assert {"accuracy_train_mean", "toy_fid_real_vs_real", "toy_fid_real_vs_noise"} <= set(report)
    m = ToyMetrics.load(tmp_path / "m")
    assert m.features(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(TLCMError):
        ToyMetrics.load(tmp_path / "nothing")


def test_shipped_assets_contract():
    prov = json.loads((assets_dir("v3") / "PROVENANCE.json").read_text())
    assert prov["command"].startswith("tlcm toy build") and "seed" in prov and "git_commit" in prov
    assert {"heldin", "heldout"} <= set(prov["evaluation"])
    lines = default_prompts_path("v3").read_text().splitlines()
    assert len(lines) == 2000 and all(shapes.attributes_from_prompt(x) for x in lines[:50])
    size = sum(p.stat().st_size for p in assets_dir("v3").rglob("*") if p.is_file())
    assert size < 32 * 2**20


def test_shipped_teacher_loads_and_samples(tmp_path, monkeypatch):
    from tlcm.toy import load_teacher, teacher_path

    monkeypatch.setenv("TLCM_CACHE", str(tmp_path))
    assert (teacher_path(world="v3") / "model_index.json").is_file()
    pipe = load_teacher(world="v3")
    out = pipe(
        ["a large red circle in the center on a white background"],
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()
