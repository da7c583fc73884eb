"""Training runs: one run per folder, identity checked on resume, `--set` applied or refused, damaged checkpoints,
data from another teacher, bit-identical repeat runs. Tiny SD1.5 teacher, 2-4 steps."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.config import DistillConfig
from tlcm.train.loop import distill

from .conftest import make_shards


def _cfg(out, **kw):
    base = dict(teacher="tiny", output_dir=str(out), recipe="lcm", max_steps=2, batch_size=2, lora_rank=4,
                lora_alpha=4, checkpointing_steps=1, checkpoints_total_limit=5, validation_prompts=[],
                learning_rate=1e-2, logging_steps=1, seed=0)
    return DistillConfig(**{**base, **kw})


def _run(cfg, dataset_fn, **kw):
    return distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False, **kw)


def _lora(folder):
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_a_new_run_into_a_folder_holding_a_run_is_refused(tmp_path, dataset_fn):
    out = tmp_path / "run"
    _run(_cfg(out), dataset_fn)
    with pytest.raises(TLCMError, match=r"already holds a finished run \(step 2, last checkpoint checkpoint-2\)") \
            as err:
        _run(_cfg(out, seed=1), dataset_fn)
    assert "--resume latest" in str(err.value) and "--overwrite" in str(err.value)
    # an interrupted one too
    (out / "run.json").write_text(json.dumps({**json.loads((out / "run.json").read_text()), "status": "unfinished"}))
    with pytest.raises(TLCMError, match="already holds an unfinished run"):
        _run(_cfg(out, seed=1), dataset_fn)
    (out / "notes.txt").write_text("mine")
    _run(_cfg(out, seed=1, max_steps=1), dataset_fn, overwrite=True)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]  # the old run's are gone
    assert (out / "notes.txt").read_text() == "mine"  # and nothing else was touched
    assert json.loads((out / "run.json").read_text())["identity"]["config"]["seed"] == 1


def test_set_learning_rate_on_resume_is_applied_and_recorded(tmp_path, dataset_fn):
    out = tmp_path / "run"
    _run(_cfg(out, max_steps=2), dataset_fn)
    ckpt = load_file(str(out / "checkpoints" / "checkpoint-2" / "student_lora.safetensors"))
    _run(_cfg(out, max_steps=4, learning_rate=1e-7), dataset_fn, resume="latest")
    after = {k.removeprefix("base_model.model."): v for k, v in _lora(out).items()}
    assert after.keys() == ckpt.keys()
    moved = max(float((after[k] - v).abs().max()) for k, v in ckpt.items())
    # Adam moves each weight by about lr per step: 2 steps at 1e-7, not at the checkpoint's 1e-2
    assert 0 < moved < 1e-5
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["resume_history"][-1]["step"] == 2
    assert run["resume_history"][-1]["changes"] == {"max_steps": [2, 4], "learning_rate": [0.01, 1e-07]}
    assert "learning_rate: 1.0e-07" in (out / "config.yaml").read_text()


def test_set_learning_rate_keeps_the_schedule_position():
    from diffusers.optimization import get_scheduler

    from tlcm.train.identity import set_learning_rate

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=10, num_training_steps=100)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 4 / 10)
    set_learning_rate([opt], [sched], 1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 * 4 / 10)
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


@pytest.mark.parametrize("change, match", [
    (dict(lora_rank=8, lora_alpha=8), r"lora_rank: 4 -> 8; lora_alpha: 4 -> 8"),
    (dict(recipe="mlcd"), r"recipe: 'lcm' -> 'mlcd'"),
    (dict(batch_size=3), r"batch_size: 2 -> 3"),
    (dict(seed=5), r"seed: 0 -> 5"),
])
def test_resume_with_other_weight_settings_is_refused_before_loading(tmp_path, dataset_fn, change, match,
                                                                    monkeypatch):
    out = tmp_path / "run"
    _run(_cfg(out), dataset_fn)
    monkeypatch.setattr("accelerate.Accelerator.load_state", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(TLCMError, match=match) as err:
        _run(_cfg(out, **change), dataset_fn, resume="latest")
    assert "another --output-dir" in str(err.value)


def test_resume_with_bookkeeping_changes_is_allowed(tmp_path, dataset_fn):
    out = tmp_path / "run"
    _run(_cfg(out), dataset_fn)
    _run(_cfg(out, max_steps=3, logging_steps=5, checkpointing_steps=0, validation_prompts=["x"]), dataset_fn,
         resume="latest")
    changes = json.loads((out / "run.json").read_text())["resume_history"][-1]["changes"]
    assert set(changes) == {"max_steps", "logging_steps", "checkpointing_steps", "validation_prompts"}


def test_damaged_checkpoints_are_named_with_the_way_out(tmp_path, dataset_fn, capsys):
    out = tmp_path / "run"
    _run(_cfg(out, max_steps=3), dataset_fn)
    lora = out / "checkpoints" / "checkpoint-3" / "student_lora.safetensors"
    lora.write_bytes(lora.read_bytes()[:50])  # truncated
    with pytest.raises(TLCMError, match=r"checkpoint-3 is damaged: student_lora.safetensors has 50 bytes") as err:
        _run(_cfg(out, max_steps=3), dataset_fn, resume="latest")
    assert f"--resume {out / 'checkpoints' / 'checkpoint-2'}" in str(err.value)
    ckpt = out / "checkpoints" / "checkpoint-2"
    opt = next(p for p in ckpt.iterdir() if p.name.startswith("optimizer"))
    blob = bytearray(opt.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size, other content
    opt.write_bytes(bytes(blob))
    with pytest.raises(TLCMError, match=rf"checkpoint-2 is damaged: {opt.name} does not match its recorded sha256"):
        _run(_cfg(out, max_steps=3), dataset_fn, resume=str(ckpt))
    (out / "checkpoints" / "checkpoint-1" / "training_state.json").unlink()
    code = main(["distill", "--teacher", "x", "--output-dir", str(out), "--resume",
                 str(out / "checkpoints" / "checkpoint-1"), "--data", str(tmp_path)])  # fails before any loading
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err


def test_unloadable_checkpoint_is_a_clear_error(tmp_path, dataset_fn):
    out = tmp_path / "run"
    _run(_cfg(out), dataset_fn)
    ckpt = out / "checkpoints" / "checkpoint-2"
    state = json.loads((ckpt / "training_state.json").read_text())
    (ckpt / "student_lora.safetensors").write_bytes(b"not a safetensors file")
    state["files"]["student_lora.safetensors"] = {"bytes": 22, "sha256": None}  # as if the damage went unrecorded
    (ckpt / "training_state.json").write_text(json.dumps(state))
    with pytest.raises(TLCMError, match=r"checkpoint .*checkpoint-2 could not be loaded"):
        _run(_cfg(out), dataset_fn, resume="latest")


def test_a_second_trainer_in_the_same_folder_is_refused(tmp_path, dataset_fn):
    from tlcm.runlock import hold

    with hold(tmp_path / "run", command="tlcm distill (first)"):
        with pytest.raises(TLCMError, match=r"is in use: .*\(tlcm distill \(first\)\)"):
            _run(_cfg(tmp_path / "run"), dataset_fn)


# ----------------------------------------------------------------------------------------------------- data vs teacher


def test_data_from_another_teacher_is_refused_unless_allowed(tmp_path, tiny_sd15_dir, sd15_other_seed_dir,
                                                              capsys):
    data = make_shards(tmp_path / "other-teacher", sd15_other_seed_dir)
    args = ["distill", "--teacher", str(tiny_sd15_dir), "--data", str(data), "--recipe", "lcm", "--max-steps", "1",
            "--device", "cpu", "--no-progress", "--set", "batch_size=2", "--set", "lora_rank=4", "--set",
            "validation_prompts=[]", "--set", "checkpointing_steps=0"]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "does not match --teacher" in err and "teacher: the shards were generated by" in err
    assert "--allow-teacher-mismatch" in err and not (tmp_path / "a" / "run.json").exists()
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--allow-teacher-mismatch"]) == 0
    assert "warning: --allow-teacher-mismatch" in capsys.readouterr().err


def test_init_lora_from_another_teacher_or_other_segments_is_refused(tmp_path, dataset_fn, capsys):
    """Starting from a run of another teacher is mixing teachers (allowed, warned, with --allow-teacher-mismatch);
    stage 2 on other segments than its stage 1 learns from samples its start never learnt to draw (always refused)."""
    stage1 = tmp_path / "stage1"
    _run(_cfg(stage1, recipe="mlcd", num_segments=2, num_ddim_timesteps=10), dataset_fn)
    stage2 = dict(recipe="tlcm", num_segments=2, num_ddim_timesteps=10, init_lora=str(stage1), max_steps=1,
                  stage2_sample_steps=2, stage2_substeps=1)
    other = tiny_sd15_pipeline(7)
    with pytest.raises(TLCMError, match=r"init_lora .* was distilled from another teacher \(fingerprint") as err:
        distill(_cfg(tmp_path / "a", **stage2), pipe=other, dataset_fn=dataset_fn, log_with=None, progress=False)
    assert "--allow-teacher-mismatch" in str(err.value) and not (tmp_path / "a" / "adapter").exists()
    distill(_cfg(tmp_path / "b", **stage2, allow_teacher_mismatch=True), pipe=other, dataset_fn=dataset_fn,
            log_with=None, progress=False)
    assert "warning: --allow-teacher-mismatch: init_lora" in capsys.readouterr().err
    for key, value in (("num_segments", 1), ("num_ddim_timesteps", 20)):
        cfg = _cfg(tmp_path / key, **{**stage2, key: value}, allow_teacher_mismatch=True)
        with pytest.raises(TLCMError, match=rf"on other segments than its stage 1: {key}: stage 1 \d+, here {value}"):
            _run(cfg, dataset_fn)
    _run(_cfg(tmp_path / "same", **stage2), dataset_fn)  # the same teacher and segments: trains
    assert (tmp_path / "same" / "adapter").is_dir()


def test_latent_shape_and_scaling_are_checked(tmp_path, tiny_sd15_dir):
    from tlcm.data import read_manifest

    pipe = tiny_sd15_pipeline(0)
    # channels and size: tlcm.train.resolution's checks, which --allow-teacher-mismatch does not lift
    for kw, match in ((dict(channels=3), "hold 3-channel latents but the teacher's UNet takes 4"),
                      (dict(scaling=0.13025), r"VAE scaling_factor: shards 0\.13025")):
        data = make_shards(tmp_path / f"d{len(kw)}{kw}", tiny_sd15_dir, **kw)
        cfg = _cfg(tmp_path / "o", data=str(data), teacher=str(tiny_sd15_dir), allow_teacher_mismatch="channels" in kw)
        with pytest.raises(TLCMError, match=match):
            distill(cfg, pipe=pipe, log_with=None, progress=False)
    assert read_manifest(data)["complete"]
    data = make_shards(tmp_path / "d16", tiny_sd15_dir)
    cfg = _cfg(tmp_path / "o", data=str(data), teacher=str(tiny_sd15_dir), resolution=64)
    with pytest.raises(TLCMError, match=r"resolution=64 \(64x64\) but the shards in .* hold 32x32 images"):
        distill(cfg, pipe=pipe, log_with=None, progress=False)


def test_batch_larger_than_the_data_set_is_refused(tmp_path, tiny_sd15_dir, tiny_shards):
    cfg = _cfg(tmp_path / "o", data=str(tiny_shards), teacher=str(tiny_sd15_dir), batch_size=100000)
    with pytest.raises(TLCMError, match=r"batch_size=100000 x 1 process\(es\) exceeds the 8 records"):
        distill(cfg, pipe=tiny_sd15_pipeline(0), log_with=None, progress=False)


def test_resume_on_other_data_is_refused(tmp_path, tiny_sd15_dir, tiny_shards):
    out = tmp_path / "run"
    cfg = _cfg(out, data=str(tiny_shards), teacher=str(tiny_sd15_dir))
    distill(cfg, pipe=tiny_sd15_pipeline(0), log_with=None, progress=False)
    other = make_shards(tmp_path / "other-data", tiny_sd15_dir, seed=1)
    cfg = _cfg(out, data=str(other), teacher=str(tiny_sd15_dir))
    with pytest.raises(TLCMError, match=r"data: '[0-9a-f]+' -> '[0-9a-f]+'"):
        distill(cfg, pipe=tiny_sd15_pipeline(0), log_with=None, progress=False, resume="latest")


# --------------------------------------------------------------------------------------------------- reproducibility


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_with_equal_arguments_write_identical_loras(tmp_path, tiny_sd15_dir, tiny_shards):
    def run(out, seed):
        torch.manual_seed(1234 + len(out.name))  # whatever ran before in the process must not matter
        torch.randn(7)
        assert main(["distill", "--teacher", str(tiny_sd15_dir), "--data", str(tiny_shards), "--output-dir",
                     str(out), "--recipe", "mlcd", "--max-steps", "2", "--seed", str(seed), "--device", "cpu",
                     "--no-progress", "--set", "batch_size=2", "--set", "lora_rank=4", "--set", "lora_alpha=4",
                     "--set", "num_segments=2", "--set", "validation_prompts=[]", "--set",
                     "checkpointing_steps=0"]) == 0
        return _sha(out / "pytorch_lora_weights.safetensors"), _sha(out / "adapter" / "adapter_model.safetensors")

    first = run(tmp_path / "a", 0)
    assert run(tmp_path / "bb", 0) == first
    assert run(tmp_path / "ccc", 1) != first  # and the seed does reach the weights


def test_diffusers_lora_header_has_its_metadata_sorted(tmp_path):
    """safetensors writes the metadata from a Rust HashMap, whose order varies between writes: the exported file's
    header must list ``format`` before ``lora_adapter_metadata`` every time, or equal runs give unequal bytes."""
    import struct

    from tlcm.train.export import save_diffusers_lora
    from tlcm.train.student import build_networks

    pipe = tiny_sd15_pipeline(0)
    build_networks(pipe.unet, _cfg("unused"))
    for i in range(12):  # each write draws a fresh HashMap order (1 in 4096 that 12 come out sorted by chance)
        out = tmp_path / str(i)
        out.mkdir()
        raw = save_diffusers_lora(pipe, pipe.unet, out).read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8:8 + size])["__metadata__"]
        assert sorted(meta) == ["format", "lora_adapter_metadata"]
        header = raw[8:8 + size].decode()
        assert header.index('"format"') < header.index('"lora_adapter_metadata"')
        assert len(load_file(str(out / "pytorch_lora_weights.safetensors"))) > 0  # still a valid file


def test_lora_init_depends_on_the_seed_only():
    from tlcm.train.student import build_networks

    def init(seed, noise):
        unet = tiny_sd15_pipeline(0).unet
        torch.manual_seed(noise)  # the global RNG's state before the run
        before = torch.random.get_rng_state()
        build_networks(unet, _cfg("unused", seed=seed))
        assert torch.equal(torch.random.get_rng_state(), before)  # drawn from a forked, seeded state
        return {k: v.clone() for k, v in unet.state_dict().items() if "lora_A" in k}

    a, b, c = init(0, 1), init(0, 2), init(1, 1)
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_copied_checkpoint_resumes_in_another_folder(tmp_path, dataset_fn):
    full, part = tmp_path / "full", tmp_path / "part"
    _run(_cfg(full, max_steps=2), dataset_fn)
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-1", part / "checkpoints" / "checkpoint-1")
    _run(_cfg(part, max_steps=2), dataset_fn, resume="latest")
    a, b = _lora(full), _lora(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_files_follow_the_umask(tmp_path, dataset_fn):
    import os

    old = os.umask(0o027)
    try:
        out = _run(_cfg(tmp_path / "run", max_steps=1), dataset_fn)
    finally:
        os.umask(old)
    for name in ("adapter", "scheduler"):
        assert (out / name).stat().st_mode & 0o777 == 0o750, name  # not mkdtemp's 0700
    for name in ("pytorch_lora_weights.safetensors", "README.md", "tlcm_sampling.json", "config.yaml", "run.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o640, name  # not mkstemp's 0600
