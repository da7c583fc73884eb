"""A real SIGKILL in the middle of `tlcm synthesize`, then the same command again: same bytes as an unbroken run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tlcm.data import read_manifest
from tlcm.data.synthesize import SynthesizeConfig, synthesize


@pytest.mark.slow
def test_sigkill_then_resume(sd15_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(16)) + "\n")
    flags = dict(steps=10, records_per_shard=2, batch_size=2)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tlcm.cli", "synthesize", "--teacher", str(sd15_dir), "--prompts", str(prompts),
           "--out", str(out), "--steps", "10", "--records-per-shard", "2", "--batch-size", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / "shard-00001.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if read_manifest(out)["complete"]:
        pytest.skip("the run finished before it could be killed")
    done = len(list(out.glob("shard-*.json")))
    assert 0 < done < 8
    synthesize(SynthesizeConfig(teacher=str(sd15_dir), prompts=str(prompts), out=str(out), progress=False, **flags))
    full = synthesize(SynthesizeConfig(teacher=str(sd15_dir), prompts=str(prompts), out=str(tmp_path / "full"),
                                       progress=False, **flags))
    assert read_manifest(out)["shards"] == read_manifest(full)["shards"]
