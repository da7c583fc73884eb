"""The scenes world's metrics model: training labels, loading through ToyMetrics, claims per image, diversity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.toy import scenes
from tlcm.toy.acceptance import per_prompt_diversity
from tlcm.toy.scene_metrics import SceneMetricsConfig, _scene_labels, sample_query, train_scene_metrics


def test_training_queries_are_labelled_by_ground_truth_with_hard_negatives():
    rng = np.random.default_rng(0)
    truths = []
    for i in range(600):
        scene, _, _ = scenes.record(1, "train", i)
        query, truth = sample_query(scene, rng)
        assert query and set(query) <= set(scenes.OBJECT_ATTRIBUTES)
        assert truth == any(all(o[k] == v for k, v in query.items()) for o in scene["objects"])
        truths.append(truth)
    # about half are true: the verifier cannot win by always answering one way
    assert 0.35 < np.mean(truths) < 0.75


def test_scene_labels_mark_every_value_present():
    scene, _, _ = scenes.record(2, "train", 0)
    labels = _scene_labels(scene)
    assert scenes.COUNTS[int(labels["count"])] == scene["count"]
    for obj in scene["objects"]:
        v = scenes.query_vector({k: obj[k] for k in scenes.OBJECT_ATTRIBUTES})
        assert np.all(labels["presence"][v > 0] == 1)
    assert labels["presence"].sum() <= 5 * scene["count"]


@pytest.fixture(scope="module")
def tiny_scene_metrics(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene_metrics")
    cfg = SceneMetricsConfig(train_images=40, eval_images=8, steps=3, batch_size=8, width=8, feature_dim=16,
                             checkpoint_every=2, threads=1)
    report = train_scene_metrics(cfg, out, progress=False)
    return out, report


def test_train_writes_a_loadable_v4_classifier(tiny_scene_metrics):
    from tlcm.toy.metrics import ToyMetrics

    out, report = tiny_scene_metrics
    assert (out / "classifier.safetensors").is_file() and (out / "checkpoint.pt").is_file()
    for key in ("claims_train", "verifier_accuracy_heldout", "alignment_real_train", "toy_fid_real_vs_real"):
        assert key in report
    m = ToyMetrics.load(out)
    assert m.world == "v4" and m.resolution == scenes.RESOLUTION
    recs = scenes.sample_records(5, seed=4)
    images = [r[0] for r in recs]
    prompts = [r[1] for r in recs]
    feats = m.features(images)
    assert feats.shape == (5, 16) and torch.isfinite(feats).all()
    hits = m.claim_hits(images, prompts)
    for h, p in zip(hits, prompts):
        claims = scenes.parse_prompt(p)
        assert len(h["object"]) == len(claims["objects"])
        assert set(h) - {"object"} == {k for k in ("count", "background", "style") if k in claims}
    per_image = m.alignment_per_image(images, prompts)
    assert per_image.shape == (5,) and ((per_image >= 0) & (per_image <= 1)).all()
    # a resized input (32 px) is brought to the world's resolution
    assert m.features(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_toy_metrics_for_model_picks_the_world_of_the_teacher(tmp_path):
    import json

    from tlcm.toy import world_of_model

    assert world_of_model("toy-v3") == "v3" and world_of_model("toy-v4") == "v4"
    (tmp_path / "model_index.json").write_text("{}")
    assert world_of_model(tmp_path) == "v3"  # pipelines from before v4 carry no marker
    (tmp_path / "tlcm_toy.json").write_text(json.dumps({"world": "v4"}))
    assert world_of_model(tmp_path) == "v4"


def test_per_prompt_diversity_against_a_closed_form():
    f = torch.zeros(2, 3, 4, dtype=torch.float64)
    assert per_prompt_diversity(f) == 0.0
    # prompt 0: three points on a line at 0, 1, 3 -> pairwise distances 1, 3, 2 (each counted twice over 6 pairs)
    f[0, 1, 0], f[0, 2, 0] = 1.0, 3.0
    # prompt 1: an equilateral arrangement of side 2
    f[1, 1, 0] = 2.0
    f[1, 2, 0], f[1, 2, 1] = 1.0, 3.0 ** 0.5  # python floats keep float64 precision
    expected = ((1 + 3 + 2) / 3 + 2.0) / 2
    assert per_prompt_diversity(f) == pytest.approx(expected, rel=1e-12)
