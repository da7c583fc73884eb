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
