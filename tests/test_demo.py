"""The demo's code path on a tiny random teacher (the CI smoke test runs `tlcm demo --quick` on the toy teacher)."""

import json

import pytest

import tlcm.demo as demo
from tlcm.errors import TLCMError


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return str(save_tiny_pipeline("sd15", tmp_path_factory.mktemp("teacher") / "sd15"))


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=teacher, device="cpu", records=8, synth_steps=1, mlcd_steps=1, tlcm_steps=1,
                distill_batch=4, baseline_lcm=False, eval_prompts=3, eval_steps=(1, 2), teacher_solvers=("ddim",),
                teacher_ceiling_steps=3, reference_steps=1, diversity=(2, 2), progress=False, world="v3",
                reward_steps=0, dmd_steps=0)
    base.update(kw)
    return demo.demo_config(True, **base)


def test_demo_end_to_end_then_resume_skips_every_stage(tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    results = demo.run_demo(_cfg(out, tiny_teacher, workers=1), log=lambda *_: None)
    cells = {c["cell"] for c in results["cells"]}
    # the teacher's solvers with and without CFG, and the teacher with each student's sampler (TLCM and MLCD save
    # different scheduler configs: two baselines)
    baselines = {f"teacher+{n}-sampler__tlcm__s{s}__g{g}" for n in ("tlcm", "mlcd") for s in (1, 2) for g in (1, 4)}
    assert cells == {"teacher__ddim__s1__g1", "teacher__ddim__s2__g1", "teacher__ddim__s1__g4",
                     "teacher__ddim__s2__g4", "teacher3__ddim__s3__g4", *baselines,
                     "tlcm__tlcm__s1__g1", "tlcm__tlcm__s2__g1", "mlcd__tlcm__s1__g1", "mlcd__tlcm__s2__g1"}
    for c in results["cells"]:
        assert c["nfe"] == c["steps"] * (2 if c["guidance"] > 1 else 1)
        assert c["role"] == ("baseline" if c["cell"] in baselines else "student" if c["lora"] else "teacher")
        assert c["diversity_extra_images"] == 2 and "diversity" in c and "recall_teacher" in c
    for name in ("README.md", "overview.png", "results.csv", "results.json", "plots/latency_s.png"):
        assert (out / "report" / name).is_file(), name
    readme = (out / "report" / "README.md").read_text()
    assert "| tlcm | tlcm | 2 | 1 | 2 |" in readme and "| distill tlcm |" in readme
    assert "| teacher+tlcm-sampler | tlcm | 2 | 1 | 2 |" in readme and "## Training-free" in readme
    assert "Best training-free sampler at equal steps" in readme
    assert "toy_fid_teacher ÷ best TF (steps)" in readme
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"synthesize", "distill mlcd", "distill tlcm", "evaluate"}

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(demo, "_synthesize", boom)
    monkeypatch.setattr(demo, "_distill", boom)
    again = demo.run_demo(_cfg(out, tiny_teacher), log=lambda *_: None)
    assert [c["cell"] for c in again["cells"]] == [c["cell"] for c in results["cells"]]

    with pytest.raises(TLCMError, match="other settings"):
        demo.run_demo(_cfg(out, tiny_teacher, records=9), log=lambda *_: None)


def _quality(results):
    # timings, and the student folders' paths (each run has its own --out)
    other = ("latency_s", "images_per_s", "wall_s", "encode_cached_s", "peak_mem_mb", "diversity_extra_s", "lora",
             "scheduler_from")
    return {c["cell"]: {k: v for k, v in c.items() if k not in other} for c in results["cells"]}


def test_two_workers_change_only_the_timings(tiny_teacher, tmp_path):
    # the side process evaluates the teacher while the students train, then the MLCD/TLCM students while the
    # LCM-LoRA trains; the final sweep reuses those cells. Students and every number but the timings: as with 1.
    kw = dict(baseline_lcm=True, lcm_steps=1, reward_steps=1, dmd_steps=1)
    one = demo.run_demo(_cfg(tmp_path / "one", tiny_teacher, workers=1, **kw), log=lambda *_: None)
    two = demo.run_demo(_cfg(tmp_path / "two", tiny_teacher, workers=2, **kw), log=lambda *_: None)
    stages = json.loads((tmp_path / "two" / "stages.json").read_text())
    assert {k for k, v in stages.items() if v.get("side")} == {"evaluate teacher", "distill lcm",
                                                                 "evaluate tlcm, mlcd, lcm"}
    assert {"distill tlcm reward", "distill tlcm dmd-gan"} <= set(stages)
    assert {"tlcm-full__tlcm__s1__g1", "lcm__tlcm__s2__g1"} <= set(_quality(two))
    cells = (tmp_path / "two" / "eval" / "cells")
    side_cells = {json.loads(p.read_text())["cell"] for p in cells.glob("*.json")}
    assert _quality(one) == _quality(two) and len(side_cells) == len(two["cells"])
    for name in ("tlcm", "tlcm-full", "mlcd", "lcm"):
        a, b = (tmp_path / d / "students" / name / demo.LORA_FILE for d in ("one", "two"))
        assert a.read_bytes() == b.read_bytes(), name
    assert "side process" in (tmp_path / "two" / "report" / "README.md").read_text()
    assert demo.resolve_workers(demo.demo_config(True, device="cuda")) == 1


def test_demo_refuses_a_worker_count_it_cannot_use(tmp_path):
    with pytest.raises(TLCMError, match="--workers 3"):
        demo.run_demo(demo.demo_config(True, out=str(tmp_path / "d"), workers=3))


def test_quick_is_smaller_with_the_same_stages():
    full, quick = demo.demo_config(False), demo.demo_config(True)
    for key in ("records", "mlcd_steps", "tlcm_steps", "lcm_steps", "eval_prompts"):
        assert getattr(quick, key) < getattr(full, key)
    assert quick.eval_steps == full.eval_steps and quick.teacher_solvers == full.teacher_solvers
    assert quick.baselines and full.baselines and quick.diversity[0] < full.diversity[0]
    assert demo.demo_config(True, records=5).records == 5


def test_demo_refuses_a_file_as_out(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TLCMError, match="is a file"):
        demo.run_demo(demo.demo_config(True, out=str(tmp_path / "f")))


def test_demo_refuses_a_teacher_of_no_toy_world_until_one_is_named(tiny_teacher, tmp_path):
    # the tiny SD1.5 pipeline carries no tlcm_toy.json and samples 16x16 latents: neither v3's nor v4's teacher, so
    # guessing a world would measure it with the wrong captions and metrics
    with pytest.raises(TLCMError, match="--world"):
        demo.run_demo(_cfg(tmp_path / "d", tiny_teacher, world=None), log=lambda *_: None)
    assert not (tmp_path / "d").exists()  # refused before anything is written
