"""The benchmark scripts' CPU paths: the GPU script's dry run (configs, shapes, plan) and its helpers."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gpu():
    return _load("gpu_full_size")


def test_gpu_dry_run_builds_public_configs_and_counts_lora(gpu, capsys):
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {r["model"]: r for r in gpu.plan(["sd15", "sdxl"], 64)}
    # the public UNets: 859.52M (SD1.5) and 2567.46M (SDXL) parameters
    assert rows["sd15"]["unet_params_M"] == pytest.approx(859.52, abs=0.01)
    assert rows["sdxl"]["unet_params_M"] == pytest.approx(2567.46, abs=0.01)
    # rank-64 LoRA on the release's targets: close to diffusers' LCM-LoRA sizes (67M, 197M)
    assert rows["sd15"]["lora_params_M"] == pytest.approx(67.2, abs=0.5)
    assert rows["sdxl"]["lora_params_M"] == pytest.approx(196.8, abs=1.0)
    # the batches are the presets' (what `tlcm distill --preset` runs), the paper's for MPS / DMD+GAN
    assert "sdxl-mlcd, batch 4" in rows["sdxl"]["stage1"] and "sd15-mlcd, batch 12" in rows["sd15"]["stage1"]
    assert "(batch 8)" in rows["sdxl"]["estimated"]["mps"] and "(batch 4)" in rows["sdxl"]["estimated"]["dmd_gan"]
    assert '"model": "sdxl"' in out and "paper schedule" in out
    section = gpu.dry_run_section(gpu.plan(["sd15"], 64), ["--dry-run"])
    assert "not yet measured" in section and "| sd15 | 859.52 | 64 |" in section and "70 A100-hours" in section


def test_gpu_script_refuses_without_cuda_and_projects_hours(gpu, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--models", "sd15"]) == 2
    steps = {"stage1": 1.0, "stage2": 3.0, "mps": 2.0, "dmd_gan": 4.0}
    hours = (12_000 * 1.0 + 2_000 * 3.0 + 500 * 2.0 + 1_000 * 4.0) * 4 / 3600
    proj = gpu.project(steps, 2.0, "NVIDIA H100 80GB HBM3")
    assert proj["complete"] and proj["measured_gpu_hours"] == pytest.approx(hours)
    assert proj["h100_hours"] == pytest.approx(hours) and proj["a100_hours"] == pytest.approx(2 * hours)
    assert gpu.project(steps, 2.0, "NVIDIA H200")["a100_hours"] == pytest.approx(2 * hours)
    assert gpu.project(steps, 2.0, "NVIDIA A100-SXM4-80GB")["a100_hours"] == pytest.approx(hours)
    assert gpu.project(steps, 2.0, "NVIDIA L4")["a100_hours"] is None  # no conversion for an unknown class
    partial = gpu.project({**steps, "dmd_gan": None}, 2.0, "NVIDIA A100")
    assert not partial["complete"] and partial["hours"]["dmd_gan"] is None
    prims = {"f(8)": 1.0, "fb(8)": 2.0, "f(4)": 0.5, "f2(4)": 0.9, "fb(4)": 1.1}
    est = gpu.estimate_steps(prims, vae_s=0.25, clip_s=0.3)
    assert est["mps"] == pytest.approx(3 * 1.0 + 2.0 + 8 * 0.25 + 0.3)  # ESTIMATES["mps"]
    assert est["dmd_gan"] == pytest.approx(5 * 0.5 + 0.9 + 3.5 * 1.1)  # ESTIMATES["dmd_gan"]


def _smoke(gpu, tmp_path, model):
    out, md = tmp_path / "gpu.json", tmp_path / "evaluate.md"
    argv = ["--smoke", "--models", model, "--train-steps", "3", "--repeats", "1", "--json", str(out), "--write",
            "--results-md", str(md), "--workdir", str(tmp_path / "work")]
    assert gpu.main(argv) == 0
    return json.loads(out.read_text()), md.read_text()


def _check_smoke(results, md, model):
    res = results["models"][model]
    assert [(r["recipe"], r["checkpointing"]) for r in res["train"][:2]] == [("mlcd", False), ("mlcd", True)]
    fastest = min(res["train"][:2], key=lambda r: r["step_s"])
    assert [(r["recipe"], r["checkpointing"]) for r in res["train"][2:]] == [("tlcm", fastest["checkpointing"])]
    for r in res["train"]:
        # the step clock of tlcm's own loop worked: 3 steps, 2 gaps after the first
        assert r["step_s"] > 0 and r["timing"] == "median of 2 step gaps" and r["resolution"] == 32
    assert set(res["primitives"]) >= {"f(4)", "f2(4)", "fb(4)", "f(8)", "f2(8)", "fb(8)", "vae(1)", "clip(8)"}
    assert res["synthesize"]["images_per_s"] > 0 and res["latency"]["latency_s"] > 0
    proj = res["projection"]
    assert proj["complete"] and not results["skipped"]
    s1 = min(r["step_s"] for r in res["train"] if r["recipe"] == "mlcd")
    assert proj["hours"]["stage1"] == pytest.approx(12_000 * s1 * 4 / 3600)
    assert proj["hours"]["mps"] == pytest.approx(500 * res["estimated_step_s"]["mps"] * 4 / 3600)
    assert f"| {model} | mlcd | 2 | 32 | on |" in md and "paper A100-h" in md and "<!-- BEGIN gpu_full_size -->" in md


def test_gpu_smoke_runs_every_measurement_through_tlcms_own_code(gpu, tmp_path):
    """--smoke: the GPU run's code on tiny pipelines on the CPU (distill, primitives, synthesize, latency, report)."""
    _check_smoke(*_smoke(gpu, tmp_path, "sd15"), "sd15")


@pytest.mark.slow
def test_gpu_smoke_sdxl(gpu, tmp_path):
    _check_smoke(*_smoke(gpu, tmp_path, "sdxl"), "sdxl")


def test_results_sections_replace_only_their_own(tmp_path):
    res = _load("_results")
    path = tmp_path / "evaluate.md"
    res.update_section("a", "## A\n1", path)
    res.update_section("b", "## B\n2", path)
    res.update_section("a", "## A\n3", path)
    text = path.read_text()
    assert text.startswith("# Evaluation benchmarks")
    assert "## A\n3" in text and "## A\n1" not in text and "## B\n2" in text
    assert text.index("BEGIN a") < text.index("BEGIN b")


def test_distill_benchmark_compares_students_with_the_best_training_free_sampler():
    from tlcm.evaluate.baselines import add_ratios, best_training_free

    bench = _load("distill_toy")

    def row(model, role, steps, g, fid, ali, nfe, recall=None):
        return {"cell": f"{model}__s{steps}__g{g}", "model": model, "role": role, "scheduler": "tlcm" if role !=
                "teacher" else "dpmpp", "steps": steps, "guidance": g, "nfe": nfe, "toy_fid_teacher": fid,
                "alignment": ali, "recall_data": recall, "lora": "dir" if role == "student" else None}

    rows = [row("teacher", "teacher", 2, 4.0, 250.0, 0.80, 4), row("teacher", "teacher", 2, 1.0, 90.0, 0.85, 2),
            row("teacher+tlcm-sampler", "baseline", 2, 1.0, 20.0, 0.95, 2),
            row("tlcm", "student", 2, 1.0, 8.0, 0.97, 2, recall=0.90), row("lcm", "student", 2, 1.0, 12.0, 0.93, 2),
            row("tlcm", "student", 4, 1.0, 9.0, 0.90, 4, recall=0.50)]
    best = best_training_free(rows)
    add_ratios(rows, best)
    md, by = bench.table(rows, best)
    lines = md.splitlines()
    assert lines[2].startswith("| teacher / dpmpp / cfg 4 | - | 250.00 / 0.800 |")
    assert lines[4].startswith("| teacher+tlcm-sampler / tlcm / cfg 1 | - | 20.00 / 0.950 |")
    assert lines[5].startswith("| **best training-free** | - | 20.00 / 0.950 | - |")
    assert lines[6].startswith("| **lcm** |") or lines[6].startswith("| **tlcm** |")
    bars = bench.bar_lines(by, best, {"alignment": 0.98, "recall_data": 0.95})
    text = "\n".join(bars)
    assert "tlcm at 2 steps: toy-FID vs teacher <= 0.5x the best training-free sampler at 2 steps (8 vs 20, " \
           "teacher+tlcm-sampler / tlcm / cfg 1; ratio 0.4): **met**" in text
    assert "within its 2 network evaluations (8 vs 20, teacher+tlcm-sampler / tlcm / cfg 1; ratio 0.4): **met**" in text
    assert "tlcm at 2 steps: alignment within 0.02 of the teacher at 25 steps (0.97 vs 0.98): **met**" in text
    assert "tlcm at 2 steps: recall vs data >= 0.9x the teacher's (0.9 vs 0.95): **met**" in text
    # no training-free row at 4 steps: the ratio bar is not measured, not met; the recall bar is missed
    assert "tlcm at 4 steps: toy-FID vs teacher <= 0.5x the best training-free sampler at 4 steps (9 vs –; ratio " \
           "–): not measured" in text
    assert "tlcm at 4 steps: recall vs data >= 0.9x the teacher's (0.5 vs 0.95): **missed**" in text
    # ... but within its 4 network evaluations the 2-step training-free rows compete
    assert "within its 4 network evaluations (9 vs 20, teacher+tlcm-sampler / tlcm / cfg 1; ratio 0.45): **met**" \
        in text
    assert "tlcm beats lcm at 2 steps" in text and text.count("**met**") == 6
    table = bench.student_table(rows, {"recall_data": 0.95, "diversity": 2.0, "alignment": 0.98})
    assert "| tlcm | 2 | 2 | 8.00 | 0.400 | 0.400 | 0.020 | 0.900 (0.95) | – |" in table
