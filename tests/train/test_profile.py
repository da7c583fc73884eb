"""The step-cost profile (profile_steps): what it reports, and that it changes nothing the run trains."""

from __future__ import annotations

import json

import pytest

from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.loop import distill


def _run(cfg, dataset_fn, profile_steps):
    cfg.profile_steps = profile_steps
    out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False,
                  overwrite=True)
    return (out / "adapter" / "adapter_model.safetensors").read_bytes(), json.loads(
        (out / "train_summary.json").read_text())


@pytest.mark.parametrize("recipe", ["lcm", "tlcm"])
def test_profile_reports_each_network_and_trains_the_same_bytes(recipe, tiny_cfg, dataset_fn, tmp_path):
    init = {}
    if recipe == "tlcm":  # stage 2 starts from a stage-1 LoRA
        distill(tiny_cfg(recipe="mlcd", max_steps=1, output_dir=str(tmp_path / "init")), pipe=tiny_sd15_pipeline(0),
                dataset_fn=dataset_fn, log_with=None, progress=False)
        init = {"init_lora": str(tmp_path / "init"), "stage2_sample_steps": 2}
    plain, summary = _run(tiny_cfg(recipe=recipe, max_steps=3, **init), dataset_fn, 0)
    assert "step_profile" not in summary
    profiled, summary = _run(tiny_cfg(recipe=recipe, max_steps=3, **init), dataset_fn, 5)
    assert profiled == plain  # replays draw nothing and leave no gradient: the same weights, byte for byte
    prof = summary["step_profile"]
    assert prof["profiled_steps"] == [1, 2]  # the first step is a warm-up
    expected = {"student fwd+bwd", "target fwd", "teacher fwd"} | (
        {"stage-2 sampling fwd"} if recipe == "tlcm" else set())
    assert set(prof["networks"]) == expected
    assert all(v > 0 for v in prof["networks"].values())
    assert prof["networks_s"] == pytest.approx(sum(prof["networks"].values()), rel=0.05, abs=1e-3)
    assert prof["step_over_networks"] == pytest.approx(prof["step_s"] / prof["networks_s"], rel=0.01)


def test_profile_steps_must_not_be_negative(tiny_cfg):
    from tlcm.errors import TLCMError
    from tlcm.train.config import validate_config

    with pytest.raises(TLCMError, match="profile_steps"):
        validate_config(tiny_cfg(profile_steps=-1), need_data=False)


def test_merged_no_grad_student_is_the_adapter_function(tiny_cfg):
    """lora_merged_no_grad: the merged forward equals the adapter's forward to float32 rounding of the output's
    magnitude, follows the weights after a step, and leaves the base weights (the teacher) untouched."""
    import torch

    from tlcm.models import encode_prompts
    from tlcm.train.student import build_networks

    pipe = tiny_sd15_pipeline(0)
    nets = build_networks(pipe.unet, tiny_cfg(lora_merged_no_grad=True))
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    cond = encode_prompts(pipe, ["a", "b"])
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 259])
    for _ in range(2):
        with torch.no_grad():
            for p in nets.student_parameters():  # a non-trivial adapter (B starts at zero)
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        nets.student_stepped()
        with torch.no_grad():
            ref = pipe.unet(z, t, **cond.unet_kwargs()).sample
            with nets.use("teacher"):
                merged = nets.merged_student(z, t, **cond.unet_kwargs()).sample
                teacher = pipe.unet(z, t, **cond.unet_kwargs()).sample
        scale = float(ref.abs().max())
        # float32: each layer's W x + s B A x and (W + s B A) x differ by a few ulps of their magnitude; some tens
        # of layers compound it
        assert torch.allclose(merged, ref, rtol=0, atol=1e3 * torch.finfo(torch.float32).eps * scale)
        assert not torch.allclose(merged, teacher, rtol=0, atol=1e-3 * scale)  # the adapter is in it
    after = {k: v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_merged_no_grad_is_refused_where_it_cannot_apply(tiny_cfg):
    from tlcm.errors import TLCMError
    from tlcm.train.config import validate_config

    with pytest.raises(TLCMError, match="LoRA student"):
        validate_config(tiny_cfg(lora_merged_no_grad=True, student="full"), need_data=False)
    with pytest.raises(TLCMError, match="mixed_precision"):
        validate_config(tiny_cfg(lora_merged_no_grad=True, mixed_precision="bf16"), need_data=False)


def test_merged_no_grad_trains(tiny_cfg, dataset_fn, tmp_path):
    """A tlcm run with lora_merged_no_grad trains (its no-grad passes merged) close to the default run."""
    from safetensors.torch import load_file

    distill(tiny_cfg(recipe="mlcd", max_steps=1, output_dir=str(tmp_path / "init")), pipe=tiny_sd15_pipeline(0),
            dataset_fn=dataset_fn, log_with=None, progress=False)
    runs = {}
    for merged in (False, True):
        cfg = tiny_cfg(recipe="tlcm", max_steps=2, init_lora=str(tmp_path / "init"), stage2_sample_steps=2,
                       lora_merged_no_grad=merged, output_dir=str(tmp_path / f"m{merged}"), profile_steps=1)
        out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
        runs[merged] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a, b = runs[False], runs[True]
    assert a.keys() == b.keys()
    init = load_file(str(tmp_path / "init" / "adapter" / "adapter_model.safetensors"))
    moved = sum(float((a[k] - init[k]).abs().sum()) for k in a)
    differ = sum(float((a[k] - b[k]).abs().sum()) for k in a)
    assert moved > 0 and differ < 1e-2 * moved  # rounding-level differences next to two optimiser steps


def test_profile_of_the_multi_part_phases_trains_the_same_bytes(tiny_cfg, dataset_fn, tmp_path):
    """DMD + GAN (on the teacher) + reward: the fake score, the discriminator, the VAE decoder and the reward are
    replayed in their own roles; a profiled run writes the same student and the same fake adapter."""
    from tests.losses.test_reward import save_clip, tiny_clip

    reward = f"clip:{save_clip(tmp_path / 'clip', tiny_clip(0))}"
    multi = dict(recipe="mlcd", dmd_weight=1.0, gan_weight=0.1, gan_backbone="teacher", student_sample_steps=[1, 2],
                 gan_real_steps=2, max_steps=3, reward_weight=0.5, reward_model=reward, reward_sample_steps=[1],
                 validation_prompts=[], learning_rate=1e-2, fake_learning_rate=1e-2, disc_learning_rate=1e-2,
                 checkpointing_steps=3)
    outs = {}
    for steps in (0, 2):
        cfg = tiny_cfg(output_dir=str(tmp_path / f"p{steps}"), profile_steps=steps, **multi)
        outs[steps] = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    for name in ("adapter/adapter_model.safetensors", "checkpoints/checkpoint-3/fake_lora.safetensors",
                 "checkpoints/checkpoint-3/discriminator_heads.safetensors"):
        assert (outs[0] / name).read_bytes() == (outs[2] / name).read_bytes(), name
    prof = json.loads((outs[2] / "train_summary.json").read_text())["step_profile"]
    assert {"student fwd+bwd", "student fwd", "teacher fwd", "fake fwd", "fake fwd+bwd", "discriminator fwd+bwd",
            "vae decode fwd+bwd", "reward fwd+bwd"} <= set(prof["networks"]), prof["networks"]
