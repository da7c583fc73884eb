"""``tlcm distill`` under ``accelerate launch`` with 2 CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_two_process_ddp_trains_and_exports_same_shapes(tmp_path):
    from tlcm.data import write_shards
    from tlcm.testing import save_tiny_pipeline, tiny_sd15_components
    from tlcm.train.config import DistillConfig
    from tlcm.train.student import build_networks, lora_state_dict

    teacher = save_tiny_pipeline("sd15", tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    shards = write_shards(tmp_path / "shards", torch.randn(8, 4, 16, 16, generator=g),
                          [f"p{i % 3}" for i in range(8)], records_per_shard=2)
    out = tmp_path / "out"
    args = ["distill", "--recipe", "mlcd", "--teacher", str(teacher), "--data", str(shards), "--output-dir", str(out),
            "--max-steps", "2", "--no-progress", "--set", "batch_size=2", "--set", "lora_rank=4", "--set",
            "lora_alpha=4", "--set", "num_segments=2", "--set", "validation_num_steps=[1]", "--set",
            "checkpointing_steps=2"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tlcm.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    assert (out / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").exists()  # both ranks checkpointed
    # same keys and shapes as the LoRA a single process would build on this teacher
    unet = tiny_sd15_components(0)["unet"]
    build_networks(unet, DistillConfig(teacher="t", lora_rank=4, lora_alpha=4))
    expected = {f"base_model.model.{k}": v.shape for k, v in lora_state_dict(unet).items()}
    got = {k: v.shape for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    assert got == expected
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate CLI not installed")
def test_two_process_ddp_multi_part_step(tmp_path):
    """DMD + GAN under 2-process gloo: the parts are synced by hand (broadcast, all-reduce per phase); the loop's
    rank check at each checkpoint and at the end asserts that every process holds the same weights."""
    from tlcm.data import write_shards
    from tlcm.testing import save_tiny_pipeline

    teacher = save_tiny_pipeline("sd15", tmp_path / "teacher")
    g = torch.Generator().manual_seed(0)
    shards = write_shards(tmp_path / "shards", torch.randn(8, 4, 16, 16, generator=g),
                          [f"p{i % 3}" for i in range(8)], records_per_shard=2)
    out = tmp_path / "out"
    sets = ["batch_size=2", "lora_rank=4", "lora_alpha=4", "num_segments=2", "validation_num_steps=[1]",
            "checkpointing_steps=1", "dmd_weight=1", "gan_weight=0.1", "student_sample_steps=[1,2]",
            "gan_real_steps=2", "student_update_every=2", "gradient_accumulation_steps=2"]
    args = ["distill", "--recipe", "mlcd", "--teacher", str(teacher), "--data", str(shards), "--output-dir", str(out),
            "--max-steps", "3", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tlcm.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["parts"]["student"]["updates"] == 2
    assert summary["parts"]["fake"]["updates"] == 3 and summary["parts"]["discriminator"]["updates"] == 3
    for f in ("student_lora.safetensors", "fake_lora.safetensors", "discriminator_heads.safetensors"):
        assert (out / "checkpoints" / "checkpoint-3" / f).is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()
