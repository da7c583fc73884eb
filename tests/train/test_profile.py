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
