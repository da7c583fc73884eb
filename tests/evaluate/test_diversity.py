"""Per-prompt diversity and k-NN precision/recall: the math against float64 loops, and on tiny pipelines a model that
ignores its noise (diversity 0) against one that does not."""

import itertools

import numpy as np
import pytest
import torch

from tlcm.evaluate import sweep
from tlcm.evaluate.diversity import plan_diversity
from tlcm.evaluate.metrics import MetricSpec
from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SweepConfig, run_sweep
from tlcm.math.manifold import knn_precision_recall, per_prompt_diversity


def test_plan_reuses_the_cells_images_and_tops_up_with_fresh_seeds():
    plan = plan_diversity(["p0", "p1", "p2", "p3"], [10, 11, 12, 13], num_prompts=2, seeds_per_prompt=3)
    assert plan.groups == ((0, 4, 5), (1, 6, 7))  # image i of the cell, then the extra images 4.. after it
    assert plan.extra_prompts == ("p0", "p0", "p1", "p1") and plan.extra_seeds == (14, 15, 16, 17)
    # prompts already repeated in the list (with their own seeds) are used first: no extra image for "a"
    plan = plan_diversity(["a", "b", "a", "c", "a", "b"], list(range(6)), num_prompts=2, seeds_per_prompt=3)
    assert plan.groups == ((0, 2, 4), (1, 5, 6)) and plan.extra_prompts == ("b",) and plan.extra_seeds == (6,)
    # fewer distinct prompts than asked: all of them
    assert len(plan_diversity(["a", "a", "b"], [0, 1, 2], 5, 2).groups) == 2
    with pytest.raises(ValueError, match="seeds per prompt"):
        plan_diversity(["a"], [0], 1, 1)


def test_per_prompt_diversity_matches_a_float64_loop():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 5, generator=g)
    groups = [(0, 1, 2, 3), (4, 5), (6, 7, 8), (9,)]  # a one-image group has no pair and is left out
    expected = np.mean([np.mean([np.linalg.norm(feats[i].double().numpy() - feats[j].double().numpy())
                                 for i, j in itertools.combinations(grp, 2)]) for grp in groups[:3]])
    assert per_prompt_diversity(feats, groups) == pytest.approx(expected, rel=1e-12)
    same = feats[[0, 0, 0, 4, 4]]
    assert per_prompt_diversity(same, [(0, 1, 2), (3, 4)]) == 0.0
    with pytest.raises(ValueError, match="at least one group"):
        per_prompt_diversity(feats, [(0,)])


def test_knn_precision_recall_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(40, 3, generator=g)
    fake = torch.randn(30, 3, generator=g) * 0.5 + 0.8  # a shifted, narrower distribution
    k = 3

    def brute(a, b):  # share of b's points inside a's k-NN balls
        a, b = a.double().numpy(), b.double().numpy()
        radius = [sorted(np.linalg.norm(a - x, axis=1))[k] for x in a]  # index k: the k-th *other* point
        return np.mean([any(np.linalg.norm(y - a[i]) <= radius[i] for i in range(len(a))) for y in b])

    precision, recall = knn_precision_recall(real, fake, k=k)
    assert precision == pytest.approx(brute(real, fake), abs=1e-12)
    assert recall == pytest.approx(brute(fake, real), abs=1e-12)
    assert 0 < recall < 1 and precision > recall  # the narrow set sits inside the wide one, and misses much of it
    assert knn_precision_recall(real, real, k=k) == (1.0, 1.0)


def test_a_model_that_ignores_its_noise_has_zero_diversity(tiny_sd15_dir, tiny_students, prompt_file, fake_inception,
                                                           tmp_path, monkeypatch):
    real_load = sweep.load_model

    def load(spec, device, dtype):  # "collapsed": every image starts from the same latents, whatever its seed
        pipe = real_load(spec, device, dtype)
        if spec.name == "collapsed":
            prepare = pipe.prepare_latents

            def same_noise(batch_size, channels, height, width, dtype, device, generator, latents=None):
                fixed = [torch.Generator().manual_seed(0) for _ in range(batch_size)]
                return prepare(batch_size, channels, height, width, dtype, device, fixed, latents)

            pipe.prepare_latents = same_noise
        return pipe

    monkeypatch.setattr(sweep, "load_model", load)
    prompts = [p for p in prompt_file.read_text().splitlines() if p and not p.startswith("#")][:3]
    base = str(tiny_sd15_dir)
    grid = dict(schedulers=["ddim"], steps=[2], guidance=[1.0])  # DDIM (eta 0): the initial noise is all the noise
    cfg = SweepConfig(
        models=[ModelSpec("teacher", base, **grid), ModelSpec("collapsed", base, lora=str(tiny_students["a"]), **grid)],
        prompts=prompts, seeds=[0, 1, 2], out_dir=str(tmp_path / "e"), batch_size=3,
        reference=ReferenceSpec(model="teacher", scheduler="ddim", steps=2, guidance=1.0),
        metrics=MetricSpec(fid=True, inception_weights=str(fake_inception), diversity=(3, 3)))
    results = run_sweep(cfg, log=lambda *_: None)
    teacher, collapsed = results["cells"]
    assert results["diversity"]["extra_images_per_cell"] == 6
    assert teacher["inception_diversity"] > 0 and results["reference"]["metrics"]["inception_diversity"] > 0
    # the teacher's cell is the reference sampler on the same seeds: exactly the reference's diversity
    assert teacher["inception_diversity_vs_teacher"] == pytest.approx(1.0, abs=1e-12)
    assert collapsed["inception_diversity"] < 1e-6 * teacher["inception_diversity"]
    assert collapsed["inception_diversity_vs_teacher"] < 1e-6
