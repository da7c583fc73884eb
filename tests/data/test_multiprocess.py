"""``tlcm synthesize`` under ``accelerate launch`` with 2 CPU processes (gloo): disjoint work, every record once."""

import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tlcm.data import open_shards, read_manifest
from tlcm.data.synthesize import SynthesizeConfig, synthesize


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate CLI not installed")
def test_two_processes_cover_every_prompt_once(sd15_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(9)) + "\n")
    out = tmp_path / "mp"
    args = ["synthesize", "--teacher", str(sd15_dir), "--prompts", str(prompts), "--out", str(out), "--steps", "2",
            "--records-per-shard", "2", "--batch-size", "2", "--no-progress"]
    # On a machine without CUDA, --multi_gpu only starts the processes; tlcm joins them in a gloo group.
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), "-m", "tlcm.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = dict(re.findall(r"process (\d)/2 generated (\d+) records", proc.stdout))
    assert report == {"0": "5", "1": "4"}, proc.stdout  # shards 0,2,4 and 1,3: disjoint halves
    m = read_manifest(out)
    assert m["complete"] and m["num_records"] == 9 and len(m["shards"]) == 5
    recs = list(open_shards(out, shuffle=False))
    assert [r["index"] for r in recs] == list(range(9))
    assert sorted(r["prompt"] for r in recs) == sorted(f"prompt number {i}" for i in range(9))
    # Same records as a single-process run.
    single = synthesize(SynthesizeConfig(teacher=str(sd15_dir), prompts=str(prompts), out=str(tmp_path / "one"),
                                         steps=2, records_per_shard=2, batch_size=2, progress=False))
    one = torch.stack([r["latents"] for r in open_shards(single, shuffle=False)])
    torch.testing.assert_close(torch.stack([r["latents"] for r in recs]), one, rtol=1e-3, atol=1e-3)
