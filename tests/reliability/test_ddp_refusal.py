"""Under `accelerate launch`, a refusal on the main process stops every rank (no rank left waiting at a barrier)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate"))
                    and shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_refuse_a_folder_holding_a_run(tmp_path, tiny_sd15_dir):
    from tlcm.data import write_shards

    shards = write_shards(tmp_path / "shards", torch.randn(8, 4, 16, 16), [f"p{i}" for i in range(8)],
                          records_per_shard=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "finished", "step": 2}))
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tlcm.cli", "distill", "--recipe", "lcm", "--teacher", str(tiny_sd15_dir),
           "--data", str(shards), "--output-dir", str(out), "--max-steps", "1", "--no-progress", "--set",
           "batch_size=2", "--set", "lora_rank=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("already holds a finished run") == 2, proc.stderr[-3000:]  # both ranks, same message
    assert "Traceback" not in proc.stderr.split("already holds")[0]
