"""Run identity with several parts (student, fake score, discriminator heads): every part's settings are compared on
resume, the learning rates apply to each part's own optimiser and schedule, every part's checkpoint file is checked,
and every randomly initialised part is seeded by the one mechanism (tlcm.train.seeding)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tlcm.errors import TLCMError
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.config import DistillConfig
from tlcm.train.loop import distill

# lcm + DMD (fake score) + GAN on the frozen teacher (discriminator heads): three parts, three optimisers
PARTS = dict(dmd_weight=1.0, gan_weight=0.1, gan_backbone="teacher", gan_features="mid", gan_real_steps=1,
             student_sample_steps=[1], fake_lora_rank=2)


def _cfg(out, **kw):
    base = dict(teacher="tiny", output_dir=str(out), recipe="lcm", max_steps=2, batch_size=2, lora_rank=4,
                lora_alpha=4, checkpointing_steps=1, checkpoints_total_limit=5, validation_prompts=[],
                learning_rate=1e-2, fake_learning_rate=0.0, disc_learning_rate=1e-2, logging_steps=1, seed=0,
                **PARTS)
    return DistillConfig(**{**base, **kw})


def _run(cfg, dataset_fn, **kw):
    return distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False, **kw)


def _rates(ckpt) -> dict[str, tuple[float, float]]:
    """Each part's (optimiser lr, LR schedule base) as the checkpoint stored them."""
    state = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)
    return {name: (s["optimizer"]["param_groups"][0]["lr"], s["lr_scheduler"]["base_lrs"][0])
            for name, s in state["parts"].items()}


def test_learning_rates_on_resume_apply_to_each_part(finished_run, tmp_path, dataset_fn):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    assert _rates(out / "checkpoints" / "checkpoint-2") == {"student": (1e-2, 1e-2), "fake": (1e-2, 1e-2),
                                                            "discriminator": (1e-2, 1e-2)}
    # learning_rate also moves the fake score (fake_learning_rate 0 = the student's); the heads get their own
    _run(_cfg(out, max_steps=3, learning_rate=1e-3, disc_learning_rate=1e-4), dataset_fn, resume="latest")
    assert _rates(out / "checkpoints" / "checkpoint-3") == {"student": (1e-3, 1e-3), "fake": (1e-3, 1e-3),
                                                            "discriminator": (1e-4, 1e-4)}
    # fake_learning_rate alone moves the fake score only
    _run(_cfg(out, max_steps=4, learning_rate=1e-3, disc_learning_rate=1e-4, fake_learning_rate=1e-5), dataset_fn,
         resume="latest")
    assert _rates(out / "checkpoints" / "checkpoint-4") == {"student": (1e-3, 1e-3), "fake": (1e-5, 1e-5),
                                                            "discriminator": (1e-4, 1e-4)}
    history = json.loads((out / "run.json").read_text())["resume_history"]
    assert [h["changes"] for h in history] == [  # (the copied folder's new path is recorded too)
        {"max_steps": [2, 3], "learning_rate": [0.01, 0.001], "disc_learning_rate": [0.01, 0.0001],
         "output_dir": [str(finished_run), str(out)]},
        {"max_steps": [3, 4], "fake_learning_rate": [0.0, 1e-05]},
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 2-step multi-part run (checkpoints 1 and 2), shared by the tests that only read it or copy it."""
    from tests.train.conftest import memory_dataset

    out = tmp_path_factory.mktemp("multipart") / "run"
    torch.manual_seed(0)  # the global RNG's state must not matter (test_two_multi_part_runs_...)
    _run(_cfg(out), memory_dataset())
    return out


@pytest.mark.parametrize("change, match", [
    (dict(fake_lora_rank=4), r"fake_lora_rank: 2 -> 4"),
    (dict(dmd_weight=0.5), r"dmd_weight: 1.0 -> 0.5"),
    (dict(gan_features="down+mid"), r"gan_features: 'mid' -> 'down\+mid'"),
    (dict(student_update_every=2), r"student_update_every: 1 -> 2"),
])
def test_resume_with_other_part_settings_is_refused_before_loading(finished_run, dataset_fn, change, match,
                                                                  monkeypatch):
    monkeypatch.setattr("accelerate.Accelerator.load_state", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(TLCMError, match=match):
        _run(_cfg(finished_run, max_steps=3, **change), dataset_fn, resume="latest")


@pytest.mark.parametrize("name", ["fake_lora.safetensors", "discriminator_heads.safetensors",
                                  "custom_checkpoint_0.pkl"])
def test_a_damaged_part_file_is_named(finished_run, tmp_path, dataset_fn, name):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    path = out / "checkpoints" / "checkpoint-2" / name
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # same size, other content
    path.write_bytes(bytes(blob))
    with pytest.raises(TLCMError, match=rf"checkpoint-2 is damaged: {name} does not match its recorded sha256") \
            as err:
        _run(_cfg(out, max_steps=3), dataset_fn, resume="latest")
    assert f"--resume {out / 'checkpoints' / 'checkpoint-1'}" in str(err.value)
    path.unlink()
    with pytest.raises(TLCMError, match=rf"checkpoint-2 is damaged: {name} is missing"):
        _run(_cfg(out, max_steps=3), dataset_fn, resume="latest")


def test_two_multi_part_runs_with_equal_arguments_write_identical_parts(finished_run, tmp_path, dataset_fn):
    """Every part's initial weights follow --seed alone (seeded_rng), so a repeat run is bit-identical in every
    part's checkpoint file, whatever the global RNG held before."""
    files = ["student_lora.safetensors", "fake_lora.safetensors", "discriminator_heads.safetensors"]

    torch.manual_seed(123)  # the fixture's run started from another global RNG state
    _run(_cfg(tmp_path / "b", max_steps=1), dataset_fn)
    a, b = ({f: load_file(str(d / "checkpoints" / "checkpoint-1" / f)) for f in files}
            for d in (finished_run, tmp_path / "b"))
    for f in files:
        assert a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f]), f


def test_each_part_draws_its_own_seeded_stream():
    """Different purposes give independent initial weights; equal (seed, purpose) equal ones; the global RNG stays."""
    from tlcm.train.seeding import derived_seed, seeded_rng

    before = torch.random.get_rng_state()
    with seeded_rng(3, "fake-adapter"):
        a = torch.randn(8)
    with seeded_rng(3, "fake-adapter"):
        b = torch.randn(8)
    with seeded_rng(3, "discriminator-heads"):
        c = torch.randn(8)
    with seeded_rng(4, "fake-adapter"):
        d = torch.randn(8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert len({derived_seed(s, p) for s in (0, 1) for p in ("lora-init", "fake-adapter", "discriminator-heads")}) == 6
