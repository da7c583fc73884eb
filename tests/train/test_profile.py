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
