"""FSDP (torch's fully_shard) with 2 CPU processes over gloo: LoRA and full students, checkpoint and resume.

The slow tests launch ``tlcm distill`` with ``configs/accelerate/fsdp-cpu-2.yaml`` (``accelerate launch --cpu
--num_processes 2`` would start one process without CUDA) and check that a run resumed from a sharded checkpoint ends
bit-identical to the uninterrupted one, and that FSDP trains the same LoRA as DDP. The fast tests cover how the
launch's FSDP settings are read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tlcm.errors import TLCMError
from tlcm.train import distributed

REPO = Path(__file__).resolve().parents[2]
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")
needs_accelerate = pytest.mark.skipif(not os.path.exists(ACCELERATE) and shutil.which("accelerate") is None,
                                      reason="accelerate CLI not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str | None, args: list[str]) -> subprocess.CompletedProcess:
    launch = ["--config_file", str(REPO / "configs" / "accelerate" / config)] if config else \
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd = [ACCELERATE if os.path.exists(ACCELERATE) else "accelerate", "launch", *launch, "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "tlcm.cli", "distill", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tlcm.data import write_shards
    from tlcm.testing import save_tiny_pipeline

    root = tmp_path_factory.mktemp("fsdp")
    teacher = save_tiny_pipeline("sd15", root / "teacher")
    g = torch.Generator().manual_seed(0)
    shards = write_shards(root / "shards", torch.randn(8, 4, 16, 16, generator=g), [f"p{i % 3}" for i in range(8)],
                          records_per_shard=2)
    return root, teacher, shards


def _args(teacher, shards, out, *extra):
    base = ["--teacher", str(teacher), "--data", str(shards), "--output-dir", str(out), "--max-steps", "4",
            "--no-progress", "--set", "batch_size=2", "--set", "lora_rank=4", "--set", "lora_alpha=4",
            "--set", "checkpointing_steps=2", "--set", "checkpoints_total_limit=2", "--set", "learning_rate=1e-2",
            "--set", "validation_num_steps=[1]", "--set", "validation_prompts=[a]"]
    return base + list(extra)


def _resume_from_step_2(full: Path, part: Path, teacher, shards, *extra):
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-2", part / "checkpoints" / "checkpoint-2")
    return _launch("fsdp-cpu-2.yaml", _args(teacher, shards, part, "--resume", "latest", *extra))


@pytest.mark.slow
@needs_accelerate
def test_fsdp_lora_resume_equals_uninterrupted_and_matches_ddp(setup):
    root, teacher, shards = setup
    extra = ["--recipe", "mlcd", "--set", "num_segments=2"]
    full = root / "lora-full"
    proc = _launch("fsdp-cpu-2.yaml", _args(teacher, shards, full, *extra))
    assert "FSDP (fully_shard) over 2 processes: 1 UNet(s)" in proc.stdout + proc.stderr
    summary = json.loads((full / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 4
    ckpt = full / "checkpoints" / "checkpoint-2"
    for name in (distributed.LORA_FILE, distributed.OPTIMIZER_FILE, "random_states_1.pkl"):
        assert (ckpt / name).is_file(), name
    # the checkpoint holds the whole LoRA (gathered from both ranks) under peft's names, as an unsharded one does
    lora2 = load_file(str(ckpt / distributed.LORA_FILE))
    final = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    assert {f"base_model.model.{k}" for k in lora2} == set(final)
    assert all(lora2[k].shape == final[f"base_model.model.{k}"].shape for k in lora2)
    assert any(not torch.equal(lora2[k], final[f"base_model.model.{k}"]) for k in lora2)  # steps 3-4 moved it

    part = root / "lora-part"
    proc = _resume_from_step_2(full, part, teacher, shards, *extra)
    assert json.loads((part / "train_summary.json").read_text())["resumed_from_step"] == 2
    resumed = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)

    # the same run under DDP trains the same LoRA, up to the order of the gradient reductions: float32 rounding,
    # which AdamW amplifies to up to +-lr per step where a gradient is ~0 (its update is ~sign(g)). So the bound is
    # on norms: the two runs differ by under 5 % of what steps 3-4 moved the LoRA (a wrong shard layout or data
    # split differs by about 100 %)
    ddp = root / "lora-ddp"
    _launch(None, _args(teacher, shards, ddp, *extra))
    other = load_file(str(ddp / "adapter" / "adapter_model.safetensors"))
    a, b = torch.cat([final[k].flatten() for k in final]), torch.cat([other[k].flatten() for k in final])
    base = torch.cat([lora2[k.removeprefix("base_model.model.")].flatten() for k in final])
    assert float((a - b).norm()) < 0.05 * float((a - base).norm())
    # and the exported diffusers LoRA loads into the plain pipeline
    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    pipe.load_lora_weights(str(full))
    assert len(list((full / "validation").glob("*.png"))) == 1


@pytest.mark.slow
@needs_accelerate
def test_fsdp_full_student_with_ema_resume_equals_uninterrupted(setup):
    from diffusers import UNet2DConditionModel

    root, teacher, shards = setup
    extra = ["--recipe", "lcm", "--set", "student=full", "--set", "ema_decay=0.5", "--set", "learning_rate=1e-3"]
    full = root / "unet-full"
    proc = _launch("fsdp-cpu-2.yaml", _args(teacher, shards, full, *extra))
    assert "FSDP (fully_shard) over 2 processes: 3 UNet(s)" in proc.stdout + proc.stderr  # student, teacher, EMA
    ckpt = full / "checkpoints" / "checkpoint-2"
    for name in (distributed.STUDENT_FILE, distributed.EMA_FILE, distributed.OPTIMIZER_FILE):
        assert (ckpt / name).is_file(), name
    part = root / "unet-part"
    _resume_from_step_2(full, part, teacher, shards, *extra)
    a = UNet2DConditionModel.from_pretrained(str(full / "unet")).state_dict()
    b = UNet2DConditionModel.from_pretrained(str(part / "unet")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = UNet2DConditionModel.from_pretrained(str(teacher / "unet")).state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in base)  # the EMA target did train
    # the checkpoint's EMA target is whole (both ranks' shards) and loads as the UNet's state dict
    ema = load_file(str(ckpt / distributed.EMA_FILE))
    assert ema.keys() == base.keys() and all(ema[k].shape == base[k].shape for k in base)


# ------------------------------------------------------------------------------------------- fast: launch settings


def test_fsdp_request_reads_accelerate_launch_settings():
    assert distributed.fsdp_request({}) is None
    assert distributed.fsdp_request({"ACCELERATE_USE_FSDP": "false"}) is None
    s = distributed.fsdp_request({"ACCELERATE_USE_FSDP": "true"})
    assert s == distributed.FSDPSettings(True, False, distributed.DEFAULT_WRAP)
    s = distributed.fsdp_request({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false",
                                  "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock",
                                  "FSDP_OFFLOAD_PARAMS": "true"})
    assert s == distributed.FSDPSettings(False, True, ("BasicTransformerBlock",))
    # FSDP1-style strategy names (accelerate sets them for fsdp_version 1 configs)
    assert not distributed.fsdp_request({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}
                                        ).reshard_after_forward
    assert distributed.fsdp_request({"ACCELERATE_USE_FSDP": "true", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP"}
                                    ).wrap_classes == ()
    with pytest.raises(TLCMError, match="HYBRID_SHARD"):
        distributed.fsdp_request({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "HYBRID_SHARD"})


def test_accelerator_is_built_without_accelerates_fsdp_plugin(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with distributed.accelerate_without_fsdp():
        assert os.environ["ACCELERATE_USE_FSDP"] == "false"
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"  # restored: shard_networks still sees the request
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with distributed.accelerate_without_fsdp():
        assert "ACCELERATE_USE_FSDP" not in os.environ


def test_fsdp_with_one_process_trains_unsharded(monkeypatch, tiny_cfg, dataset_fn):
    from tlcm.testing import tiny_sd15_pipeline
    from tlcm.train.loop import distill

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = distill(tiny_cfg(max_steps=1, validation_prompts=[]), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn,
                  log_with=None, progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoint_file_name_matches_the_unsharded_one():
    from tlcm.train.loop import LORA_CKPT_FILE

    assert distributed.LORA_FILE == LORA_CKPT_FILE


def test_multi_part_runs_refuse_an_fsdp_launch(monkeypatch):
    """DMD / GAN parts sync their own gradients on replicated weights: an FSDP launch of two processes is refused
    before anything is sharded (accelerate itself reports plain processes: tlcm builds it without its FSDP plugin)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    two = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_CPU)
    distributed.refuse_multi_part(two, 2)  # plain DDP: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    distributed.refuse_multi_part(two, 1)  # one part shards
    distributed.refuse_multi_part(SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO), 3)
    with pytest.raises(TLCMError, match="not FSDP"):
        distributed.refuse_multi_part(two, 2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(TLCMError, match="DEEPSPEED"):
        distributed.refuse_multi_part(SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED), 3)
