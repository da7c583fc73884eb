"""benchmarks/transfer_toy.py and benchmarks/negative_prompt_toy.py: their pure helpers (fast), and both scripts end
to end at tiny sizes on a random v4 toy pipeline with tiny classifiers (slow: every stage really runs)."""

from __future__ import annotations

import colorsys
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    if str(BENCH) not in sys.path:  # the scripts import _stages and each other
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def transfer():
    return _load("transfer_toy")


@pytest.fixture(scope="module")
def negprompt():
    return _load("negative_prompt_toy")


# --- transfer_toy helpers -------------------------------------------------------------------------------------------
def test_transfer_bars_compare_with_the_target_and_the_direct_student(transfer):
    ref = {"style_score": 0.8}
    direct = {"toy_fid_teacher": 10.0}
    got = transfer.bars({"style_score": 0.73, "alignment": 0.96, "toy_fid_teacher": 15.0}, ref, direct, "finetune",
                        "direct-lcm")
    assert [b["met"] for b in got] == [True, True, True]  # 0.73 >= 0.72; 0.96 >= 0.95; 15 <= 15
    assert got[0]["threshold"] == pytest.approx(0.72) and got[2]["threshold"] == pytest.approx(15.0)
    got = transfer.bars({"style_score": 0.71, "alignment": 0.94, "toy_fid_teacher": 15.1}, ref, direct, "finetune",
                        "direct-lcm")
    assert [b["met"] for b in got] == [False, False, False]
    got = transfer.bars({"alignment": 0.99}, {}, {}, "stylelora", "direct-tlcm")
    assert [b["met"] for b in got] == [None, True, None]  # what was not measured is neither met nor missed
    md = transfer.bars_md([("accel-lcm on finetune", got)])
    assert "not measured" in md and "**yes**" in md


def test_transfer_recommends_the_closest_variant_that_keeps_the_style(transfer):
    cells = {("a", 4): {"style_score": 0.9, "alignment": 0.97, "toy_fid_teacher": 20.0},
             ("b", 4): {"style_score": 0.95, "alignment": 0.96, "toy_fid_teacher": 12.0},
             ("c", 4): {"style_score": 0.5, "alignment": 0.99, "toy_fid_teacher": 5.0},  # style washed out
             ("d", 4): {"style_score": 0.99, "alignment": 0.90, "toy_fid_teacher": 4.0},  # misses alignment
             ("e", 2): {"style_score": 0.99, "alignment": 0.99, "toy_fid_teacher": 1.0}}  # other step count
    assert transfer.best_composition(cells, list("abcde"), ref_style=1.0) == "b"
    assert transfer.best_composition(cells, ["c", "d"], ref_style=1.0) is None
    assert transfer.best_composition(cells, list("abcde"), ref_style=None) is None
    text = transfer.table(cells, ["a", "e", "missing"], [2, 4])
    assert "| a | - | 0.90 / 0.970 / 20.0 |" in text and "| e | 0.99 / 0.990 / 1.0 | - |" in text
    assert "missing" not in text


def test_transfer_refuses_unknown_direct_targets(transfer, tmp_path):
    with pytest.raises(SystemExit, match="--direct"):
        transfer.main(["--out", str(tmp_path), "--direct", "finetune,other", "--no-write"])


# --- negative_prompt_toy helpers ------------------------------------------------------------------------------------
def test_free_prompts_name_no_colour_and_are_reproducible(negprompt):
    from tlcm.toy import scenes

    got = negprompt.free_prompts(40)
    assert len(got) == len(set(got)) == 40 and got == negprompt.free_prompts(40)
    for p in got:
        claims = scenes.parse_prompt(p)  # the world's own parser, not the helper's claims
        assert claims["objects"] is not None and not any("color" in q for q in claims["objects"])
    assert negprompt.free_prompts(5, seed=1) != negprompt.free_prompts(5, seed=2)


def test_saturation_stats_against_a_per_pixel_reference(negprompt):
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, :, 0, 0] = 0.0  # black: saturation 0 by convention
    x[1, 0, 1, 1] = 1.0
    x[1, 1, 2, 2] = 1.2  # clamped to 255
    got = negprompt.saturation_stats(x.float())
    q = np.round(np.clip(x.numpy(), 0, 1) * 255)
    clipped = np.mean((q == 0) | (q == 255))
    sats = [colorsys.rgb_to_hsv(*x[b, :, i, j].tolist())[1] for b in range(2) for i in range(5) for j in range(7)]
    # both are rounded to 4 decimals (half a unit: 5e-5); float32 vs float64 adds ~1e-7 on values <= 1
    assert got["clipped"] == pytest.approx(clipped, abs=5e-5 + 1e-6)
    assert got["saturation"] == pytest.approx(np.mean(sats), abs=5e-5 + 1e-6)


def test_shows_needs_every_object_claim_of_the_negative_prompt(negprompt):
    class Fake:
        def claim_hits(self, images, prompts):
            assert prompts == ["a red shape"] * 3
            return [{"object": [True]}, {"object": [False]}, {"object": [True, False]}]

    assert negprompt.shows(Fake(), [None] * 3, "a red shape") == [True, False, False]


def test_negative_prompt_bars(negprompt, capsys):
    class Args:
        threads, quick, num_prompts, attribute, negative, no_write = 1, False, 64, "color", "a red shape", True

    cell = negprompt.cell_id
    results = {
        cell("teacher", 50, 4.0, False): {"negated_shown": 0.30},
        cell("teacher", 50, 4.0, True): {"negated_shown": 0.06},
        cell("cfg-lcm", 4, 2.5, True): {"negated_shown": 0.10},  # within 5 points of 0.06
        cell("cfg-lcm", 4, 1.0, False): {"toy_fid_teacher": 11.0},
        cell("plain-lcm", 4, 1.0, False): {"toy_fid_teacher": 10.0},  # 11 <= 1.1 x 10
        cell("cfg-tlcm", 4, 2.0, True): {"negated_shown": 0.12},  # 6 points more than the teacher
        cell("cfg-tlcm", 4, 1.0, False): {"toy_fid_teacher": 11.5},
        cell("plain-tlcm", 4, 1.0, False): {"toy_fid_teacher": 10.0},
    }
    for r in results.values():  # the columns the table prints
        for k, v in dict(model="m", steps=4, guidance=1.0, negative=False, negated_shown=0.0, alignment=1.0,
                         toy_fid_data=1.0, clipped=0.0, saturation=0.5).items():
            r.setdefault(k, v)

    text = negprompt.write_report(Args(), [], results, {"plain-lcm": 1.0, "cfg-lcm": 2.5, "cfg-tlcm": 2.0},
                                  [1, 2, 4, 8], 50, negprompt.Stages())
    bars = [line for line in text.splitlines() if line.startswith("- cfg-")]
    assert len(bars) == 4
    assert "**met**" in bars[0] and "**met**" in bars[1]  # cfg-lcm: 0.10 <= 0.06 + 0.05; 11 <= 1.1 x 10
    assert "**missed**" in bars[2] and "**missed**" in bars[3]  # cfg-tlcm: 0.12 > 0.06 + 0.05; 11.5 > 11


# --- both scripts end to end, tiny ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A random v4 toy pipeline, a tiny metrics classifier and a tiny style classifier: what the scripts need."""
    from tlcm.testing import save_tiny_toy_pipeline
    from tlcm.toy.scene_metrics import SceneMetricsConfig, train_scene_metrics
    from tlcm.toy.style import StyleConfig, train_style_classifier

    root = tmp_path_factory.mktemp("universal-bench")
    teacher = save_tiny_toy_pipeline(root / "teacher")
    train_style_classifier(StyleConfig(vae="", train_images=8, eval_images=4, steps=2, batch_size=4, threads=1),
                           root / "style", progress=False)
    train_scene_metrics(SceneMetricsConfig(train_images=16, eval_images=4, steps=2, batch_size=8, width=8,
                                           feature_dim=16, checkpoint_every=2, threads=1), root / "metrics",
                        progress=False)
    return root, teacher


def _stage_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[transfer_toy] ")]


@pytest.fixture(scope="module")
def transfer_run(transfer, tiny_assets):
    root, teacher = tiny_assets
    args = ["--out", str(root / "transfer"), "--quick", "--teacher", str(teacher), "--metrics", str(root / "metrics"),
            "--style-classifier", str(root / "style"), "--direct", "finetune,stylelora", "--style-scales", "1.5",
            "--in-process", "--no-write"]
    assert transfer.main(args) == 0
    return root, teacher, args


@pytest.mark.slow
def test_transfer_benchmark_runs_end_to_end(transfer, transfer_run, capsys):
    root, teacher, args = transfer_run
    out = (root / "transfer").resolve()
    for f in ("finetune/full/pipeline/model_index.json", "finetune/lora/pytorch_lora_weights.safetensors",
              "base/lcm/README.md", "base/tlcm/README.md", "base/lcm-conv/README.md",
              "direct-finetune/tlcm/README.md", "direct-stylelora/lcm/README.md", "base-style/pipeline/tlcm_toy.json"):
        assert (out / f).is_file(), f
    # the conv-only acceleration LoRA shares no layer with the style LoRA
    from safetensors.torch import load_file

    conv_keys = load_file(str(out / "base/lcm-conv/pytorch_lora_weights.safetensors")).keys()
    assert conv_keys and not any(t in k for k in conv_keys for t in ("to_q", "to_k", "to_v", "ff.net", "proj_in"))

    for target, students in (("finetune", {"accel-lcm", "accel-tlcm", "direct-lcm", "direct-tlcm", "accel-lcm-conv"}),
                             ("stylelora", {"accel-lcm+style", "accel-tlcm+style", "direct-lcm", "direct-tlcm",
                                            "accel-lcm-conv+style"})):
        res = json.loads((out / f"eval-{target}" / "results.json").read_text())
        cells = {(c["model"], c["steps"]): c for c in res["cells"]}
        assert {m for m, _ in cells} == {f"{target}-50", f"{target}-dpmpp"} | students | (
            {"accel-lcm+style@1.5", "accel-tlcm+style@1.5"} if target == "stylelora" else set())
        assert {s for m, s in cells if m in students} == {1, 2}
        for c in cells.values():
            assert 0.0 <= c["style_score"] <= 1.0 and 0.0 <= c["alignment"] <= 1.0
            assert math.isfinite(c["toy_fid_teacher"]) and math.isfinite(c["toy_fid_data"])
        # the reference against itself (same prompts and seeds) is orders of magnitude closer than any student (the
        # tiny classifier's features are small, so are all distances), and the students differ from each other
        ref = cells[(f"{target}-50", 4)]["toy_fid_teacher"]
        fids = [c["toy_fid_teacher"] for (m, _), c in cells.items() if m in students]
        assert min(fids) > 0 and abs(ref) < 0.01 * min(fids) and len(set(fids)) > 1
        if target == "stylelora":  # the stacked rows really carry the style LoRA at their scale
            assert cells[("accel-lcm+style", 1)]["extra_loras"] == [[str(out / "finetune" / "lora"), 1.0]]
            assert cells[("accel-lcm+style@1.5", 2)]["extra_loras"] == [[str(out / "finetune" / "lora"), 1.5]]
    capsys.readouterr()

    # a second run skips every stage and reports the same numbers
    assert transfer.main(args) == 0
    text = capsys.readouterr().out
    assert not _stage_lines(text)
    assert "QUICK RUN" in text and "## Bars (issue 13, at 2 steps)" in text
    bar_rows = [line for line in text.splitlines() if line.startswith("| accel-")
                and (" on finetune |" in line or " on stylelora |" in line)]
    assert len(bar_rows) == 2 * 2 * 3  # 2 recipes x 2 targets x 3 bars
    cells = {(c["model"], c["steps"]): c for c in json.loads(
        (out / "eval-finetune" / "results.json").read_text())["cells"]}
    want = f"{cells[('accel-lcm', 2)]['toy_fid_teacher']:.4f}"
    assert any(line.startswith("| accel-lcm on finetune | toy-FID") and want in line for line in bar_rows)


@pytest.mark.slow
def test_negative_prompt_benchmark_runs_end_to_end(negprompt, transfer_run, capsys):
    root, teacher, _ = transfer_run
    out = root / "negprompt"
    args = ["--out", str(out), "--quick", "--teacher", str(teacher), "--metrics", str(root / "metrics"),
            "--shards", str(root / "transfer" / "base" / "shards"), "--plain-from", str(root / "transfer" / "base"),
            "--recipes", "lcm", "--guidances", "2", "--in-process", "--no-write"]
    assert negprompt.main(args) == 0
    text = capsys.readouterr().out
    assert json.loads((out / "cfg" / "lcm" / "tlcm_sampling.json").read_text())["cfg_preserving"] is True
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    cid = negprompt.cell_id
    want = {cid("teacher", 4, 4.0, False), cid("teacher", 4, 4.0, True)}
    for s in (1, 2):
        want |= {cid("plain-lcm", s, 1.0, False), cid("plain-lcm", s, 2.0, True),
                 cid("cfg-lcm", s, 1.0, False), cid("cfg-lcm", s, 2.0, True), cid("cfg-lcm", s, 2.5, True),
                 cid("cfg-lcm", s, 2.5, False)}
    assert set(cells) == want
    for c in cells.values():
        for key in ("negated_shown", "alignment", "clipped", "saturation"):
            assert 0.0 <= c[key] <= 1.0
        assert math.isfinite(c["toy_fid_data"]) and math.isfinite(c["toy_fid_teacher"])
    # the negative prompt changes the teacher's samples (CFG subtracts it), so their statistics differ
    t_none, t_neg = cells[cid("teacher", 4, 4.0, False)], cells[cid("teacher", 4, 4.0, True)]
    assert (t_none["toy_fid_data"], t_none["saturation"]) != (t_neg["toy_fid_data"], t_neg["saturation"])
    assert len({c["toy_fid_teacher"] for c in cells.values()}) > 1
    assert "Recommended guidance of each student (its tlcm_sampling.json): plain-lcm 1, cfg-lcm 2.5" in text
    assert sum(line.startswith("- cfg-lcm ") for line in text.splitlines()) == 2


def test_stages_are_done_only_when_their_output_is_complete(tmp_path):
    """A synthesize stage writes its manifest first and marks it complete last; a fine-tune writes report.json after
    its first variant: neither file alone may skip the stage on resume."""
    st = _load("_stages")
    shards = tmp_path / "shards"
    shards.mkdir()
    check = st.synthesized(shards)
    assert not check()
    (shards / "manifest.json").write_text(json.dumps({"complete": False}))
    assert not st.is_done(check)
    (shards / "manifest.json").write_text(json.dumps({"complete": True}))
    assert st.is_done(check)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("")
    assert st.is_done(a) and not st.is_done([a, b]) and not st.is_done(b)
    stages = st.Stages({}, in_process=True)
    stages.run("x", st.tlcm_cmd("--version"), a)  # done: not run
    assert stages.log == [{"stage": "x", "command": "tlcm --version", "skipped": True}]
    stages.python("y", "f()", lambda: b.write_text("ran"), b)
    assert b.read_text() == "ran" and stages.log[-1]["stage"] == "y" and "wall_s" in stages.log[-1]
    assert stages.markdown()[0] == "- x: `tlcm --version` (done earlier)"
    assert stages.markdown()[1].startswith("- y: `f()` (") and stages.markdown()[1].endswith(" s)")


def test_failing_stage_stops_the_benchmark_and_interrupted_runs_resume(tmp_path):
    st = _load("_stages")
    stages = st.Stages(None, tag="t")
    with pytest.raises(SystemExit, match="stage z failed with exit code 3"):
        stages.run("z", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "never")
    assert stages.log[-1]["stage"] == "z" and "skipped" not in stages.log[-1]
    run = tmp_path / "run"
    assert st.resume_flag(run) == []  # a new stage
    run.mkdir()
    (run / "config.yaml").write_text("x: 1")
    assert st.resume_flag(run) == ["--overwrite"]  # killed before its first checkpoint: nothing to continue
    (run / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    assert st.resume_flag(run) == ["--resume", "latest"]
    (run / "README.md").write_text("card")
    (run / "train_summary.json").write_text("{}")
    assert st.resume_flag(run) == []  # finished: skipped, shown as it first ran
    # the toy-assets wrapper is shown as the tlcm command a user would type
    old = st.TOY_ASSETS
    try:
        st.TOY_ASSETS = str(tmp_path)
        cmd = st.tlcm_cmd("sample", "--prompt", "a red circle")
        assert cmd[1] == "-c" and st.shown(cmd) == "tlcm sample --prompt 'a red circle'"
    finally:
        st.TOY_ASSETS = old
    assert st.shown(["ls", "-l"]) == "ls -l"
