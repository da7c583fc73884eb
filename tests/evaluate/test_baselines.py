"""The undistilled-teacher baseline rows, the best training-free sampler and the students' ratios to it."""

import json
import math

import numpy as np
import pytest

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.evaluate.baselines import add_ratios, best_training_free, is_training_free
from tlcm.evaluate.protocols import config_from_options
from tlcm.evaluate.sweep import ModelSpec, load_model, make_scheduler, run_sweep, saved_scheduler_config


def _models(cfg):
    return {m.name: m for m in cfg.models}


def test_baselines_dedupe_by_resolved_scheduler_config(tiny_sd15_dir, tiny_students, prompt_file, tmp_path):
    s = tiny_students
    # a copy of a's sampler written differently: keys reordered, defaults left out, another diffusers version
    same = tmp_path / "a-copy"
    (same / "scheduler").mkdir(parents=True)
    saved = json.loads((s["a"] / "scheduler" / "scheduler_config.json").read_text())
    defaults = json.loads(json.dumps(dict(make_scheduler_default_config())))
    trimmed = {k: v for k, v in reversed(list(saved.items())) if k.startswith("_") or defaults.get(k) != v}
    trimmed["_diffusers_version"] = "0.0.1"
    (same / "scheduler" / "scheduler_config.json").write_text(json.dumps(trimmed))
    (same / "pytorch_lora_weights.safetensors").write_bytes(
        (s["b"] / "pytorch_lora_weights.safetensors").read_bytes())
    assert saved_scheduler_config(same) == saved_scheduler_config(s["a"])

    loras = [f"a={s['a']}", f"b={s['b']}", f"c={s['c']}", f"d={same}"]
    cfg = config_from_options(out=str(tmp_path / "o"), model=str(tiny_sd15_dir), prompts=str(prompt_file),
                              lora=loras, steps="1,2", schedulers="ddim", guidance="1,3", baselines=True)
    models = _models(cfg)
    assert [m.name for m in cfg.models] == ["teacher", "teacher+a-sampler", "teacher+c-sampler", "a", "b", "c", "d"]
    base_a, base_c = models["teacher+a-sampler"], models["teacher+c-sampler"]
    assert base_a.baseline_of == ["a", "b", "d"] and base_c.baseline_of == ["c"]
    for b, student in ((base_a, "a"), (base_c, "c")):
        assert b.role == "baseline" and b.lora is None and b.training_free
        assert b.scheduler_from == str(s[student]) and [sc.name for sc in b.schedulers] == ["tlcm"]
        assert b.guidance == [1.0, 3.0] and b.steps == [1, 2]
    assert models["a"].role == "student" and not models["a"].training_free

    # off by default without a protocol, on by default with the toy protocol, off on request
    plain = config_from_options(out=str(tmp_path / "o"), model=str(tiny_sd15_dir), prompts=str(prompt_file),
                                lora=loras[:1])
    assert [m.role for m in plain.models] == ["teacher", "student"]
    toy = config_from_options(out=str(tmp_path / "o"), protocol="toy", lora=loras[:1], num_prompts=4)
    assert [m.name for m in toy.models] == ["teacher", "teacher+a-sampler", "a"]
    assert _models(toy)["teacher+a-sampler"].guidance == [1.0, 4.0] and _models(toy)["teacher"].guidance == [1.0, 4.0]
    assert toy.metrics.diversity == (32, 4)
    off = config_from_options(out=str(tmp_path / "o"), protocol="toy", lora=loras[:1], num_prompts=4,
                              baselines=False, no_diversity=True)
    assert [m.name for m in off.models] == ["teacher", "a"] and off.metrics.diversity is None
    # a baseline named after a student never collides with a model already in the grid
    clash = config_from_options(out=str(tmp_path / "o"), model=str(tiny_sd15_dir), prompts=str(prompt_file),
                                lora=[f"teacher+a-sampler={s['c']}", f"a={s['a']}"], baselines=True)
    assert [m.name for m in clash.models] == ["teacher", "teacher+teacher+a-sampler-sampler", "teacher+a-sampler-2",
                                              "teacher+a-sampler", "a"]


def make_scheduler_default_config():
    from tlcm import TLCMScheduler

    return TLCMScheduler().config


def test_baseline_spec_validation():
    with pytest.raises(TLCMError, match="undistilled"):
        ModelSpec("x", "base", lora="some.safetensors", role="baseline", schedulers=["ddim"])
    with pytest.raises(TLCMError, match="role"):
        ModelSpec("x", "base", role="oracle", schedulers=["ddim"])
    assert ModelSpec("x", "base", role="baseline", scheduler_from="dir", schedulers=["tlcm"]).scheduler_dir == "dir"


def _thumbs(out, cell):
    with np.load(out / "thumbs" / f"{cell}.npz") as data:
        return data["images"]


def test_baseline_rows_are_the_base_pipeline_with_the_students_sampler(tiny_sd15_dir, tiny_students, prompt_file,
                                                                       fake_inception, tmp_path):
    s = tiny_students
    out = tmp_path / "eval"
    cfg = config_from_options(out=str(out), model=str(tiny_sd15_dir), prompts=str(prompt_file), num_prompts=3,
                              lora=[f"a={s['a']}", f"c={s['c']}"], steps="2", schedulers="ddim", guidance="3",
                              reference_solver="dpmpp:2", inception_weights=str(fake_inception), device="cpu",
                              batch_size=3, baselines=True, diversity="2x2")
    results = run_sweep(cfg, log=lambda *_: None)
    rows = {r["cell"]: r for r in results["cells"]}
    baseline_cells = sorted(c for c in rows if c.startswith("teacher+"))
    assert baseline_cells == sorted(f"teacher+{n}-sampler__tlcm__s2__g{g}" for n in "ac" for g in (1, 3))
    for n in "ac":
        base, student = rows[f"teacher+{n}-sampler__tlcm__s2__g1"], rows[f"{n}__tlcm__s2__g1"]
        assert base["role"] == "baseline" and base["lora"] is None and base["baseline_of"] == [n]
        assert base["scheduler_config"] == student["scheduler_config"] == saved_scheduler_config(s[n])
        assert base["nfe"] == 2 and rows[f"teacher+{n}-sampler__tlcm__s2__g3"]["nfe"] == 4
        assert not np.array_equal(_thumbs(out, base["cell"]), _thumbs(out, student["cell"]))  # no LoRA applied

    # the baseline cell equals the plain base pipeline sampled with the student's saved scheduler
    from tlcm.evaluate.sweep import generate_images

    pipe = load_model(ModelSpec("plain", str(tiny_sd15_dir), schedulers=["ddim"]), "cpu", "float32")
    for n in "ac":
        pipe.scheduler = make_scheduler(cfg.model("a").schedulers[0], pipe.scheduler.config, str(s[n]))
        direct = generate_images(pipe, cfg.prompts, cfg.seeds, 2, 1.0, None, None, 3)
        direct = np.stack([np.asarray(im.convert("RGB")) for im in direct])
        np.testing.assert_array_equal(_thumbs(out, f"teacher+{n}-sampler__tlcm__s2__g1"), direct)
    # ... and each baseline uses its own student's sampler
    assert not np.array_equal(_thumbs(out, "teacher+a-sampler__tlcm__s2__g1"),
                              _thumbs(out, "teacher+c-sampler__tlcm__s2__g1"))

    # best training-free sampler and the students' ratios, in results.json, .csv and .md
    best = results["training_free_best"]
    assert best["primary"] == "fid_teacher" and set(best["by_steps"]) == {"2"}
    for r in results["cells"]:
        if r["role"] == "student":
            b = best["by_steps"][str(r["steps"])]["fid_teacher"]
            assert r["fid_teacher_ratio_tf"] == pytest.approx(r["fid_teacher"] / b["value"])
            assert rows[b["cell"]]["role"] in ("teacher", "baseline") and rows[b["cell"]]["steps"] == r["steps"]
            bn = best["by_nfe"][f"{r['nfe']:g}"]["fid_teacher"]
            assert rows[bn["cell"]]["nfe"] <= r["nfe"]
        else:
            assert not any(k.endswith("_ratio_tf") for k in r)
    md = (out / "results.md").read_text()
    assert "### Training-free" in md and "### Distilled students" in md and "best training-free" in md.lower()
    assert md.index("| teacher+a-sampler |") < md.index("### Distilled students") < md.index("| a | tlcm |")
    assert "fid_teacher ÷ best TF (steps)" in md
    csv_head = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"role", "baseline_of", "fid_teacher_ratio_tf", "fid_teacher_ratio_tf_nfe"} <= set(csv_head)
    assert (out / "plots" / "fid_teacher.png").is_file()
    # diversity: 2 prompts x 2 seeds reuse each cell's image for the first seed: 2 extra images per cell
    assert results["diversity"] == {"prompts": 2, "seeds_per_prompt": 2, "extra_images_per_cell": 2}
    assert results["reference"]["metrics"]["inception_diversity"] > 0
    assert all(r["diversity_extra_images"] == 2 and r["inception_diversity"] >= 0 for r in results["cells"])

    # a changed student sampler invalidates its cached cells (and its baseline's), nothing else
    sched_file = s["c"] / "scheduler" / "scheduler_config.json"
    original = sched_file.read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    try:
        sched_file.write_text(json.dumps({**json.loads(original), "original_inference_steps": 40}))
        run_sweep(cfg, log=lambda *_: None)
    finally:
        sched_file.write_text(original)
    changed = {p.name for p in (out / "cells").iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {f"{c}.json" for c in rows if c.startswith(("c__", "teacher+c-sampler__"))}


def _row(model, steps, g, fid, align, nfe, role=None, lora=None):
    r = {"cell": f"{model}__s{steps}__g{g}", "model": model, "scheduler": "x", "steps": steps, "guidance": g,
         "nfe": nfe, "toy_fid_teacher": fid, "alignment": align}
    if role:
        r["role"] = role
    if lora:
        r["lora"] = lora
    return r


def test_best_training_free_and_ratios_on_a_hand_made_table():
    rows = [
        _row("teacher", 1, 4.0, 700.0, 0.70, 2, "teacher"),
        _row("teacher", 2, 4.0, 250.0, 0.80, 4, "teacher"),
        _row("teacher", 1, 1.0, 300.0, 0.60, 1, "teacher"),
        _row("teacher", 2, 1.0, 90.0, 0.85, 2, "teacher"),
        _row("teacher+s-sampler", 1, 1.0, 60.0, 0.90, 1, "baseline"),
        _row("teacher+s-sampler", 2, 1.0, 20.0, 0.95, 2, "baseline"),
        _row("teacher+s-sampler", 2, 4.0, 25.0, 0.97, 4, "baseline"),
        _row("s", 1, 1.0, 30.0, 0.88, 1, "student"),
        _row("s", 2, 1.0, 8.0, 0.96, 2, lora="dir"),  # an old row without a role: a LoRA makes it a student
        _row("t", 2, 4.0, 5.0, 0.99, 4, lora="dir2"),
        _row("teacher", 4, 4.0, float("nan"), 0.99, 8),  # no role, no LoRA: training-free; nan never wins
    ]
    best = best_training_free(rows)
    assert best["primary"] == "toy_fid_teacher" and best["keys"] == ["toy_fid_teacher", "alignment"]
    steps2 = best["by_steps"]["2"]
    assert steps2["toy_fid_teacher"]["cell"] == "teacher+s-sampler__s2__g1.0"
    assert steps2["toy_fid_teacher"]["value"] == 20
    assert steps2["alignment"]["cell"] == "teacher+s-sampler__s2__g4.0"  # the best alignment is another row
    assert best["by_steps"]["4"]["alignment"]["value"] == 0.99 and "toy_fid_teacher" not in best["by_steps"]["4"]
    # budgets: the students use NFE 1, 2 and 4; the 4-step CFG row (NFE 8) is inside none of them
    assert set(best["by_nfe"]) == {"1", "2", "4"}
    assert best["by_nfe"]["1"]["toy_fid_teacher"]["value"] == 60
    assert best["by_nfe"]["2"]["toy_fid_teacher"]["value"] == 20  # NFE 2: 1-step CFG and 2-step g=1 rows compete
    assert best["by_nfe"]["2"]["alignment"]["value"] == 0.95
    assert best["by_nfe"]["4"]["alignment"]["value"] == 0.97

    add_ratios(rows, best)
    s1, s2, t2 = rows[7], rows[8], rows[9]
    assert s1["toy_fid_teacher_ratio_tf"] == pytest.approx(30 / 60) and s1["toy_fid_teacher_ratio_tf_nfe"] == 0.5
    assert s1["alignment_delta_tf"] == pytest.approx(0.88 - 0.90)
    assert s2["toy_fid_teacher_ratio_tf"] == pytest.approx(8 / 20)
    assert s2["alignment_delta_tf"] == pytest.approx(0.96 - 0.97)  # the best 2-step alignment: the CFG baseline
    assert t2["toy_fid_teacher_ratio_tf"] == pytest.approx(5 / 20)
    assert t2["alignment_delta_tf_nfe"] == pytest.approx(0.99 - 0.97)
    assert not any(k.endswith(("_tf", "_tf_nfe")) for r in rows[:7] for k in r)
    # recomputing replaces the derived columns; a best value of 0 gives an undefined ratio, not infinity
    rows[5]["toy_fid_teacher"] = 0.0
    add_ratios(rows, best_training_free(rows))
    assert math.isnan(s2["toy_fid_teacher_ratio_tf"])
    free_only = best_training_free([r for r in rows if is_training_free(r)])
    assert free_only["by_nfe"] == {} and free_only["by_steps"]  # no student: no budgets


def test_cli_baseline_flags_and_dry_run(tiny_sd15_dir, tiny_students, prompt_file, tmp_path, capsys):
    argv = ["evaluate", "--model", str(tiny_sd15_dir), "--prompts", str(prompt_file), "--lora",
            f"a={tiny_students['a']}", "--steps", "1", "--schedulers", "ddim", "--guidance", "3",
            "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(argv + ["--baselines"]) == 0
    shown = capsys.readouterr().out
    assert "teacher+a-sampler__tlcm__s1__g1" in shown and "teacher+a-sampler__tlcm__s1__g3" in shown
    assert main(argv) == 0
    assert "teacher+a-sampler" not in capsys.readouterr().out
    assert main(argv + ["--diversity", "3"]) == 2
    assert "KxS" in capsys.readouterr().err
