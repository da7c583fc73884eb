"""The whole `tlcm toy build` at miniature settings through the CLI (slow: run with `pytest -m slow tests/toy`)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_build_runs_every_stage_and_writes_provenance(tmp_path, monkeypatch):
    from tlcm.cli import main

    monkeypatch.setenv("TLCM_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    settings = [
        "images=64",
        "heldout_images=8",
        "threads=1",
        "eval_prompts=8",
        "eval_heldout_prompts=4",
        "eval_steps=3",
        "prompt_file_lines=2000",
        "vae.steps=5",
        "vae.batch_size=4",
        "vae.eval_images=4",
        "teacher.steps=5",
        "teacher.batch_size=4",
        "teacher.block_out_channels=[32,32]",
        "teacher.sample_prompts=2",
        "teacher.sample_steps=2",
        "metrics.train_images=64",
        "metrics.steps=5",
        "metrics.eval_images=16",
    ]
    argv = ["toy", "build", "--work", str(work), "--no-progress"]
    for s in settings:
        argv += ["--set", s]
    assert main(argv) == 0
    prov = json.loads((work / "assets" / "PROVENANCE.json").read_text())
    assert set(prov["timings_seconds"]) >= {"dataset", "train_vae", "train_teacher", "train_metrics", "evaluate"}
    assert prov["evaluation"]["heldin"]["prompts"] == 8 and 0 <= prov["evaluation"]["heldin"]["alignment"] <= 1
    assert (work / "report.md").is_file() and (work / "eval" / "samples_heldin.png").is_file()
    assert len((work / "assets" / "prompts.txt").read_text().splitlines()) == 2000
    # resuming a finished build redoes nothing but the evaluation
    assert main(argv) == 0


@pytest.mark.slow
def test_shipped_teacher_reproduces_its_provenance_metrics(tmp_path, monkeypatch):
    """Issue 3: the teacher loaded from the installed package scores what PROVENANCE.json says (same prompts, seeds,
    sampler), so the shipped numbers are the teacher's, not a different build's (about 3 minutes on 2 cores)."""
    from tlcm.toy import assets_dir, provenance, teacher_path
    from tlcm.toy.build import evaluate_teacher
    from tlcm.toy.metrics import ToyMetrics

    monkeypatch.setenv("TLCM_CACHE", str(tmp_path))
    prov = provenance()
    cfg, recorded = prov["config"], prov["evaluation"]
    result = evaluate_teacher(
        teacher_path(),
        ToyMetrics.load(assets_dir() / "metrics"),
        cfg["eval_prompts"],
        cfg["eval_heldout_prompts"],
        recorded["steps"],
        recorded["guidance_scale"],
        seed=prov["seed"],
        scheduler=recorded["scheduler"],
        progress=False,
    )
    for split in ("heldin", "heldout"):
        assert result[split]["alignment"] == pytest.approx(recorded[split]["alignment"], abs=0.01)
        assert result[split]["toy_fid"] == pytest.approx(recorded[split]["toy_fid"], rel=0.05, abs=1.0)
