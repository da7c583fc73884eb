"""The scenes world's metrics model: training labels, loading through ToyMetrics, claims per image, diversity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlcm.toy import scenes
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


def test_scene_labels_put_each_object_in_the_cell_of_its_centre():
    from tlcm.toy.scene_metrics import CELL_ATTRIBUTES, GRID, cell_of, region_cells

    for i in range(50):
        scene, _, _ = scenes.record(2, "train", i)
        labels = _scene_labels(scene)
        assert scenes.COUNTS[int(labels["count"])] == scene["count"]
        cells = {cell_of(o["x"], o["y"]) for o in scene["objects"]}
        assert set(np.flatnonzero(labels["object"])) == cells
        obj = scene["objects"][0]
        c = cell_of(obj["x"], obj["y"])
        assert all(CELL_ATTRIBUTES[k][labels[k][c]] == obj[k] for k in CELL_ATTRIBUTES)
        assert c in region_cells(obj["region"])  # each caption region is exactly 2x2 cells
        assert (labels["shape"] >= 0).sum() == len(cells) <= GRID * GRID


def test_match_probability_is_the_best_cell_of_the_product_of_named_values():
    from tlcm.toy.scene_metrics import CELL_ATTRIBUTES, SceneClassifier

    g = torch.Generator().manual_seed(0)
    cells = {"object": torch.randn(1, 36, generator=g, dtype=torch.float64)}
    for k, v in CELL_ATTRIBUTES.items():
        cells[k] = torch.randn(1, 36, len(v), generator=g, dtype=torch.float64)
    q = {"shape": "cross", "color": "red", "region": "bottom right"}
    p_cells = [torch.sigmoid(cells["object"][0, c]) * torch.softmax(cells["shape"][0, c], -1)[3]
               * torch.softmax(cells["color"][0, c], -1)[0] for c in (28, 29, 34, 35)]
    assert float(SceneClassifier.match_probability(cells, 0, q)) == pytest.approx(float(max(p_cells)), rel=1e-12)


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
