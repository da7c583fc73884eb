"""Chains of phases: each from the previous LoRA; a re-run skips finished phases, resumes an interrupted one, and
refuses a changed config for a phase that has started."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tlcm.errors import TLCMError

CHAIN = """phases:
  - name: s1
    preset: toy-mlcd
  - name: s2
    preset: toy-tlcm
    set: {stage2_sample_steps: 2}
  - name: bag
    preset: toy-tlcm-dmd
    set: {student_sample_steps: [1, 2], gan_real_steps: 2}
"""
COMMON = ["lora_rank=4", "lora_alpha=4", "batch_size=2", "num_segments=2", "max_steps=1", "checkpointing_steps=1",
          "validation_prompts=[]", "logging_steps=1"]


@pytest.fixture
def chain_setup(tmp_path, tiny_sd15_dir):
    from tlcm.data import write_shards

    g = torch.Generator().manual_seed(0)
    shards = write_shards(tmp_path / "shards", torch.randn(4, 4, 16, 16, generator=g), ["a", "b", "c", "d"],
                          records_per_shard=2)
    chain = tmp_path / "tiny-chain.yaml"
    chain.write_text(CHAIN)
    flags = {"teacher": str(tiny_sd15_dir), "data": str(shards), "output_dir": str(tmp_path / "run")}
    return str(chain), flags, tmp_path / "run"


def test_chain_runs_skips_resumes_and_checks_identity(chain_setup, monkeypatch, capsys):
    import tlcm.train.loop as loop
    from tlcm.train.chain import is_chain, run_chain

    chain, flags, root = chain_setup
    assert is_chain(chain) and not is_chain("toy-mlcd")
    run_chain(chain, None, flags, COMMON, progress=False, log_with=None, dry_run=True)
    assert "== phase 3: bag (preset toy-tlcm-dmd)" in capsys.readouterr().out

    calls = []
    real = loop.distill

    def spy(cfg, *a, **k):
        calls.append((cfg.output_dir, k.get("resume")))
        return real(cfg, *a, **k)

    monkeypatch.setattr(loop, "distill", spy)
    last = run_chain(chain, None, flags, COMMON, progress=False, log_with=None)
    dirs = [root / "1-s1", root / "2-s2", root / "3-bag"]
    assert last == dirs[-1] and calls == [(str(d), None) for d in dirs]
    for d in dirs:
        assert (d / "adapter" / "adapter_model.safetensors").is_file() and (d / "train_summary.json").is_file()
    import yaml

    assert yaml.safe_load((dirs[1] / "config.yaml").read_text())["init_lora"] == str(dirs[0])
    assert yaml.safe_load((dirs[2] / "config.yaml").read_text())["init_lora"] == str(dirs[1])
    summary = json.loads((dirs[2] / "train_summary.json").read_text())
    assert sorted(summary["parts"]) == ["discriminator", "fake", "student"]
    record = json.loads((root / "chain.json").read_text())
    assert [p["name"] for p in record["phases"]] == ["s1", "s2", "bag"]

    calls.clear()  # everything done: nothing runs
    run_chain(chain, None, flags, COMMON, progress=False, log_with=None)
    assert calls == []

    # an interrupted last phase: its checkpoint survives, its output does not -> it resumes
    shutil.rmtree(dirs[2] / "adapter")
    (dirs[2] / "train_summary.json").unlink()
    run_chain(chain, None, flags, COMMON, progress=False, log_with=None)
    assert calls == [(str(dirs[2]), "latest")]
    assert json.loads((dirs[2] / "train_summary.json").read_text())["resumed_from_step"] == 1

    # killed before its first checkpoint: nothing to resume, so the phase starts again in its own folder (which
    # still holds that run's run.json: distill would refuse it without overwrite)
    shutil.rmtree(dirs[2] / "adapter")
    shutil.rmtree(dirs[2] / "checkpoints")
    (dirs[2] / "train_summary.json").unlink()
    assert (dirs[2] / "run.json").is_file()
    calls.clear()
    run_chain(chain, None, flags, COMMON, progress=False, log_with=None)
    assert calls == [(str(dirs[2]), None)]
    assert json.loads((dirs[2] / "train_summary.json").read_text())["resumed_from_step"] == 0

    # a finished phase asked for another config: refused, naming the key
    with pytest.raises(TLCMError, match=r"phase s1 .* another config \(max_steps: 1 -> 2\)"):
        run_chain(chain, None, flags, COMMON + ["s1.max_steps=2"], progress=False, log_with=None)
    # per-phase overrides reach only their phase
    from tlcm.train.chain import resolve_chain

    plan = resolve_chain(chain, None, flags, COMMON + ["bag.dmd_weight=0.5"])
    assert [cfg.dmd_weight for _, cfg in plan] == [0.0, 0.0, 0.5]


def test_a_later_phase_started_before_an_earlier_one_finished_is_refused(chain_setup):
    from tlcm.train.chain import check_chain, resolve_chain

    chain, flags, root = chain_setup
    plan = resolve_chain(chain, None, flags, COMMON)
    (root / "2-s2" / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(TLCMError, match="an earlier phase is not finished"):
        check_chain(root, plan)
