"""The benchmark scripts' CPU paths: the GPU script's dry run (configs, shapes, plan) and its helpers."""

import importlib.util
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
    rows = {r["model"]: r for r in gpu.plan(["sd15", "sdxl"], {"sd15": 16, "sdxl": 4}, 64)}
    # the public UNets: 859.52M (SD1.5) and 2567.46M (SDXL) parameters
    assert rows["sd15"]["unet_params_M"] == pytest.approx(859.52, abs=0.01)
    assert rows["sdxl"]["unet_params_M"] == pytest.approx(2567.46, abs=0.01)
    # rank-64 LoRA on the release's targets: close to diffusers' LCM-LoRA sizes (67M, 197M)
    assert rows["sd15"]["lora_params_M"] == pytest.approx(67.2, abs=0.5)
    assert rows["sdxl"]["lora_params_M"] == pytest.approx(196.8, abs=1.0)
    assert rows["sdxl"]["latent_shape"] == (4, 4, 128, 128) and rows["sd15"]["latent_shape"] == (16, 4, 64, 64)
    assert '"model": "sdxl"' in out and "paper schedule" in out
    section = gpu.dry_run_section(gpu.plan(["sd15"], {"sd15": 16}, 64), ["--dry-run"])
    assert "not yet measured" in section and "| sd15 | 859.52 | 64 |" in section


def test_gpu_script_refuses_without_cuda_and_projects_hours(gpu, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--models", "sd15"]) == 2
    proj = gpu.project({"stage1_step_s": 1.0, "stage2_step_s_est": 3.0}, 2.0, "NVIDIA H100 80GB HBM3")
    hours = (12_000 * 1.0 + 2_000 * 3.0) * 4 / 3600
    assert proj["h100_hours"] == pytest.approx(hours) and proj["a100_hours"] == pytest.approx(2 * hours)
    assert gpu.project({"stage1_step_s": 1.0, "stage2_step_s_est": 3.0}, 2.0, "NVIDIA A100")["a100_hours"] == \
        pytest.approx(hours)


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
