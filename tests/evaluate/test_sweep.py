import csv
import json

import pytest

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.evaluate import report
from tlcm.evaluate.protocols import config_from_options, parse_lora
from tlcm.evaluate.sweep import ModelSpec, SchedulerSpec, SweepConfig, run_sweep


def test_scheduler_spec_parsing():
    assert SchedulerSpec.parse("tcd:0.5") == SchedulerSpec("tcd", 0.5)
    assert SchedulerSpec.parse("TCD").gamma == 0.3
    assert SchedulerSpec.parse("dpm-solver++").name == "dpmpp"
    assert SchedulerSpec.parse("tcd:0.5").slug == "tcd-g0.5"
    for bad, match in (("heun", "unknown scheduler"), ("tcd:2", "outside"), ("ddim:3", "takes no argument"),
                       ("tcd:x", "bad tcd gamma")):
        with pytest.raises(TLCMError, match=match):
            SchedulerSpec.parse(bad)


def test_model_spec_validation_and_lora_parsing():
    with pytest.raises(TLCMError, match="needs a LoRA folder"):
        ModelSpec("t", "base", schedulers=["tlcm"])
    with pytest.raises(TLCMError, match=">= 1"):
        ModelSpec("t", "base", steps=[0])
    assert parse_lora("s=/a/b@0.5") == ("s", "/a/b", 0.5)
    assert parse_lora("s=/a/b") == ("s", "/a/b", 1.0)
    with pytest.raises(TLCMError, match="NAME=PATH"):
        parse_lora("/a/b")


def test_tiny_grid_writes_all_files_and_counts_network_evaluations(tiny_sd15_dir, prompt_file, fake_inception,
                                                                   tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_sd15_dir), "--prompts", str(prompt_file), "--steps", "1,2",
            "--schedulers", "ddim", "--guidance", "1,3", "--num-prompts", "3", "--reference-solver", "dpmpp:2",
            "--inception-weights", str(fake_inception), "--device", "cpu", "--batch-size", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| teacher | ddim | 2 | 3 | 4 |" in printed
    assert "CLIP score skipped" in printed
    for name in ("results.json", "results.csv", "results.md", "config.json", "overview.png",
                 "plots/fid_teacher.png", "plots/latency_s.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    cells = results["cells"]
    assert len(cells) == 4
    for c in cells:
        assert (out / "grids" / f"{c['cell']}.png").is_file()
        cfg_factor = 2 if c["guidance"] > 1 else 1
        assert c["unet_calls"] == c["steps"]
        assert c["cfg_factor"] == cfg_factor and c["nfe"] == c["steps"] * cfg_factor
        assert c["latency_s"] > 0 and c["images_per_s"] > 0 and c["peak_mem_mb"] > 0
        assert c["fid_teacher"] >= -1e-6 and "fid_data" not in c  # no data images for a plain prompt file
    assert any("fid_data skipped" in n for n in results["notices"])
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and "fid_teacher" in rows[0]
    md = (out / "results.md").read_text()
    assert md.count("| teacher |") == 4 and "overview.png" in md

    # resuming recomputes nothing: the cell files stay as they were
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(argv) == 0
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}


def test_same_sampler_as_reference_gives_zero_teacher_fid(tiny_sd15_dir, prompt_file, fake_inception, tmp_path):
    cfg = config_from_options(out=str(tmp_path / "e"), model=str(tiny_sd15_dir), prompts=str(prompt_file),
                              schedulers="dpmpp", steps="2", guidance="3", reference_solver="dpmpp:2",
                              inception_weights=str(fake_inception), device="cpu")
    results = run_sweep(cfg, log=lambda *_: None)
    (cell,) = results["cells"]
    assert abs(cell["fid_teacher"]) < 1e-6  # same solver, steps, guidance and seeds as the reference


def test_user_errors(tiny_sd15_dir, prompt_file, tmp_path, capsys):
    base = ["evaluate", "--model", str(tiny_sd15_dir), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main(base + ["--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--prompts", str(prompt_file), "--lora", "s=" + str(tmp_path / "nolora")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(base + ["--prompts", str(prompt_file), "--num-prompts", "9"]) == 2
    assert "has 4 prompts but 9" in capsys.readouterr().err
    assert main(["evaluate", "--protocol", "coco2017-5k-sdxl", "--out", str(tmp_path / "c"), "--dry-run"]) == 2
    assert "captions_val2017.json" in capsys.readouterr().err
    with pytest.raises(TLCMError, match="seeds"):
        run_sweep(SweepConfig(models=[ModelSpec("t", str(tiny_sd15_dir))], prompts=["a"], seeds=[], out_dir="x"))


def test_dry_run_prints_the_plan(prompt_file, tmp_path, capsys):
    (tmp_path / "stu").mkdir()
    argv = ["evaluate", "--model", "some/hub-model", "--prompts", str(prompt_file), "--lora",
            f"tlcm={tmp_path / 'stu'}", "--student-schedulers", "lcm,tcd:0.2", "--steps", "1,4",
            "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "evaluate: 10 cells x 4 prompts" in out
    assert "tlcm__tcd-g0.2__s4__g1" in out and "teacher__euler__s1__g7.5" in out
    assert not (tmp_path / "o").exists()


def test_markdown_table_formats_missing_values():
    rows = [{"cell": "a", "model": "m", "scheduler": "ddim", "steps": 1, "guidance": 7.5, "nfe": 2.0,
             "latency_s": 0.0123, "images_per_s": 81.3, "peak_mem_mb": 100.0, "toy_fid_data": 1.5},
            {"cell": "b", "model": "m", "scheduler": "ddim", "steps": 2, "guidance": 7.5, "nfe": 4.0,
             "latency_s": 0.02, "images_per_s": 50.0, "peak_mem_mb": None}]
    table = report.markdown_table(rows)
    assert "| m | ddim | 1 | 7.5 | 2 | 1.5 | 12.3 |" in table
    assert table.splitlines()[-1] == "| m | ddim | 2 | 7.5 | 4 | – | 20.0 | 50 | – |"


def test_prompt_embedding_cache_is_invisible_in_the_images(tiny_sd15_dir):
    import numpy as np

    from tlcm.evaluate.sweep import PromptEmbeddingCache, generate_images, load_model

    pipe = load_model(ModelSpec("t", str(tiny_sd15_dir)), "cpu", "float32")
    prompts, seeds = ["a red circle", "a blue box", "a green cross"], [0, 1, 2]

    def images():
        return np.stack([np.asarray(im) for im in generate_images(pipe, prompts, seeds, 1, 3.0, None, None, 2)])

    plain = images()
    cache = PromptEmbeddingCache(pipe)
    first, second = images(), images()
    assert cache.hits == 2  # the second run's two batches (CFG: prompt and negative encoded in one call)
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    cache.close()
    assert "encode_prompt" not in vars(pipe)
    full = PromptEmbeddingCache(pipe, max_bytes=0)  # over budget: computed every time
    images(), images()
    assert full.hits == 0
    full.close()


def test_cached_results_are_tied_to_the_prompt_set(prompt_file, tmp_path):
    from tlcm.evaluate.sweep import prompt_set_digest

    cfg = config_from_options(out=str(tmp_path / "e"), model="x", prompts=str(prompt_file))
    same = config_from_options(out=str(tmp_path / "f"), model="x", prompts=str(prompt_file))
    other_seed = config_from_options(out=str(tmp_path / "e"), model="x", prompts=str(prompt_file), seed=3)
    fewer = config_from_options(out=str(tmp_path / "e"), model="x", prompts=str(prompt_file), num_prompts=3)
    assert prompt_set_digest(cfg) == prompt_set_digest(same)
    assert len({prompt_set_digest(c) for c in (cfg, other_seed, fewer)}) == 3


def test_cells_scored_without_a_reference_are_not_reused_by_a_run_with_one(tiny_sd15_dir, prompt_file, fake_inception,
                                                                          tmp_path):
    """A cell from a ``--no-reference`` run has no ``*_teacher`` numbers: a later run with a reference in the same
    folder must recompute it, not report the cell without them (and say nothing)."""
    opts = dict(out=str(tmp_path / "e"), model=str(tiny_sd15_dir), prompts=str(prompt_file), schedulers="ddim",
                steps="1", guidance="3", reference_solver="dpmpp:2", inception_weights=str(fake_inception),
                device="cpu")
    (first,) = run_sweep(config_from_options(no_reference=True, **opts), log=lambda *_: None)["cells"]
    assert "fid_teacher" not in first
    said = []
    (second,) = run_sweep(config_from_options(**opts), log=said.append)["cells"]
    assert second["fid_teacher"] >= -1e-6
    assert any("another reference or metrics" in s for s in said)
    stamp = (tmp_path / "e" / "cells" / f"{second['cell']}.json").stat().st_mtime_ns
    (third,) = run_sweep(config_from_options(**opts), log=lambda *_: None)["cells"]  # same scoring: reused
    assert (tmp_path / "e" / "cells" / f"{third['cell']}.json").stat().st_mtime_ns == stamp
    assert third["fid_teacher"] == second["fid_teacher"]


def test_lcm_and_tcd_for_a_student_walk_the_grid_it_was_trained_on(tmp_path):
    """A student distilled on a 20-point skipping grid samples 999, 749, 499, 249 in 4 steps; the teacher's default
    grid (50 points) would give 999, 759, 499, 259: lcm/tcd cells of a student take its saved grid."""
    from tlcm import TLCMScheduler
    from tlcm.evaluate.sweep import make_scheduler
    from tlcm.sd_config import STABLE_DIFFUSION_SCHEDULER_CONFIG

    base = dict(STABLE_DIFFUSION_SCHEDULER_CONFIG)
    TLCMScheduler.from_config(base, original_inference_steps=20, boundary_condition="none").save_pretrained(
        tmp_path / "student" / "scheduler")
    for name in ("lcm", "tcd:0.4"):
        teacher_grid = make_scheduler(SchedulerSpec.parse(name), base)
        student_grid = make_scheduler(SchedulerSpec.parse(name), base, str(tmp_path / "student"))
        teacher_grid.set_timesteps(4)
        student_grid.set_timesteps(4)
        assert teacher_grid.timesteps.tolist() == [999, 759, 499, 259], name
        assert student_grid.timesteps.tolist() == [999, 749, 499, 249], name
    tcd = make_scheduler(SchedulerSpec.parse("tcd:0.4"), base, str(tmp_path / "student"))
    assert tcd.config.mode == "tcd" and tcd.config.gamma == 0.4 and tcd.config.boundary_condition == "none"


def test_a_student_retrained_into_the_same_folder_is_evaluated_again(tiny_sd15_dir, prompt_file, fake_inception,
                                                                      tmp_path):
    """Cached cells are tied to the LoRA's weights: a student folder re-written with other weights (a re-run of
    `tlcm distill --overwrite`) must not be reported with the old student's numbers."""
    from .conftest import save_student

    student = save_student(tmp_path / "student", 11, original_inference_steps=20)
    opts = dict(out=str(tmp_path / "e"), model=str(tiny_sd15_dir), prompts=str(prompt_file), schedulers="ddim",
                steps="1", guidance="3", lora=[f"s={student}"], reference_solver="dpmpp:2",
                inception_weights=str(fake_inception), device="cpu")
    first = {c["cell"]: c for c in run_sweep(config_from_options(**opts), log=lambda *_: None)["cells"]}
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "e" / "cells").iterdir()}
    same = {c["cell"]: c for c in run_sweep(config_from_options(**opts), log=lambda *_: None)["cells"]}
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "e" / "cells").iterdir()}  # reused
    save_student(student, 12, original_inference_steps=20)  # other weights, same folder and sampler
    said = []
    again = {c["cell"]: c for c in run_sweep(config_from_options(**opts), log=said.append)["cells"]}
    student_cells = [k for k, c in again.items() if c.get("role") == "student"]
    assert student_cells and all(f"{k}: the cached result" in " ".join(said) for k in student_cells)
    assert all(again[k]["fid_teacher"] != first[k]["fid_teacher"] for k in student_cells)
    teacher_cells = [k for k in again if k not in student_cells]
    assert teacher_cells and all(again[k]["fid_teacher"] == same[k]["fid_teacher"] for k in teacher_cells)
