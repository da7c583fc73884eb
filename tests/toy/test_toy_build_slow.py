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
