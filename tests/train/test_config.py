"""Config layers, presets, overrides, and early, clear failures for bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.train.config import (
    DistillConfig,
    apply_overrides,
    preset_names,
    resolve_config,
    validate_config,
)

REPO = Path(__file__).resolve().parents[2]


def test_presets_ship_in_package_and_match_repo_configs():
    names = preset_names()
    assert {f"{m}-{r}" for m in ("toy", "sd15", "sd21", "sdxl") for r in ("lcm", "mlcd", "tlcm")} <= set(names)
    for name in names:
        shipped = (REPO / "src" / "tlcm" / "configs" / f"{name}.yaml").read_text()
        assert (REPO / "configs" / f"{name}.yaml").read_text() == shipped, name
        cfg = resolve_config(name, flags={"teacher": "x", "output_dir": "o", "init_lora": ""})
        assert cfg.recipe == name.split("-")[1]


def test_layers_and_overrides(tmp_path):
    extra = tmp_path / "c.yaml"
    extra.write_text("lora_rank: 8\nlearning_rate: 3.0e-4\n")
    cfg = resolve_config("toy-mlcd", str(extra), {"max_steps": 7, "data": None},
                         ["learning_rate=1e-5", "validation_num_steps=[1,4]", "lora_conv=false",
                          "lora_target_modules=to_q,to_k"])
    assert cfg.recipe == "mlcd" and cfg.lora_rank == 8 and cfg.max_steps == 7
    assert cfg.learning_rate == 1e-5 and cfg.validation_num_steps == [1, 4] and cfg.lora_conv is False
    assert cfg.target_modules() == ["to_q", "to_k"]
    with pytest.raises(TLCMError, match="unknown config key 'lora_rnk'.*\n.*lora_rank"):
        apply_overrides(cfg, ["lora_rnk=3"])
    with pytest.raises(TLCMError, match="expects an integer"):
        apply_overrides(cfg, ["lora_rank=abc"])
    with pytest.raises(TLCMError, match="unknown preset"):
        resolve_config("toy-nope")


def _valid(**kw) -> DistillConfig:
    return DistillConfig(**{"teacher": "t", "output_dir": "o", **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(recipe="mlcd", num_segments=51), "num_segments=51 exceeds the 50 points"),
        (dict(recipe="mlcd", num_segments=8, num_ddim_timesteps=4), "num_segments=8 exceeds the 4 points"),
        (dict(lora_rank=0), "lora_rank=0"),
        (dict(recipe="dmd"), "recipe='dmd' is not one of"),
        (dict(w_min=5, w_max=2), "guidance range"),
        (dict(recipe="tlcm"), "init_lora is empty"),
        (dict(init_lora="/nonexistent"), "holds no adapter"),
        (dict(extra_losses={"dmd": 1.0}), "unknown extra loss 'dmd'"),
        (dict(num_ddim_timesteps=30), "must divide 1000"),
        (dict(validation_num_steps=[1, 64]), "validation_num_steps"),
    ],
)
def test_bad_configs_fail_early(kw, match):
    with pytest.raises(TLCMError, match=match):
        validate_config(_valid(**kw), need_data=False)


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(TLCMError, match="fp16 needs a CUDA"):
        validate_config(_valid(mixed_precision="fp16"), need_data=False)


def test_missing_or_incomplete_shards(tmp_path):
    with pytest.raises(TLCMError, match="does not exist"):
        validate_config(_valid(data=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TLCMError):
        validate_config(_valid(data=str(tmp_path / "empty")))
    with pytest.raises(TLCMError, match="no training data"):
        validate_config(_valid())


def test_unknown_target_module_fails_with_names():
    from tlcm.testing import tiny_sd15_components
    from tlcm.train.student import build_networks

    unet = tiny_sd15_components(0)["unet"]
    with pytest.raises(TLCMError, match="'to_qq' matches no layer.*\n.*to_q"):
        build_networks(unet, _valid(lora_target_modules=["to_q", "to_qq"]))


def test_lora_student_shares_teacher_weights():
    from tlcm.testing import tiny_sd15_components
    from tlcm.train.student import build_networks

    unet = tiny_sd15_components(0)["unet"]
    nets = build_networks(unet, _valid(lora_rank=2, lora_alpha=2))
    assert nets.student is nets.teacher_unet and nets.target_unet is None
    trainable = [n for n, p in nets.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("conv1" in n for n in trainable) and any("time_emb_proj" in n for n in trainable)
    z, t, e = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 16, 32)
    with torch.no_grad():
        for n, p in nets.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        base = nets.student(z, t, e).sample
        with nets.teacher_context(nets.student) as teacher:
            off = teacher(z, t, e).sample
        on = nets.student(z, t, e).sample
    assert not torch.allclose(base, off) and torch.equal(base, on)


def test_cli_dry_run_prints_plan(capsys):
    from tlcm.cli import main

    rc = main(["distill", "--preset", "toy-mlcd", "--output-dir", "o", "--data", "d", "--dry-run",
               "--set", "num_segments=4"])
    out = capsys.readouterr().out
    assert rc == 0 and "recipe: mlcd" in out and "edges [-1, 249, 499, 749, 999]" in out  # the preset's 20-point grid
    rc = main(["distill", "--preset", "toy-mlcd", "--output-dir", "o", "--data", "d", "--dry-run",
               "--set", "num_ddim_timesteps=50"])
    assert rc == 0 and "edges [-1, 239, 499, 739, 999]" in capsys.readouterr().out


def test_cli_missing_shards_exit_code(tmp_path, capsys):
    from tlcm.cli import main

    rc = main(["distill", "--preset", "toy-lcm", "--data", str(tmp_path / "none"), "--output-dir", str(tmp_path)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_set_keeps_yaml_boolean_words_as_strings_for_string_keys():
    from tlcm.train.config import apply_mapping

    assert resolve_config(overrides=["mixed_precision=no"]).mixed_precision == "no"  # not YAML's False
    assert resolve_config(overrides=["gradient_checkpointing=no"]).gradient_checkpointing is False
    # `mixed_precision: no` unquoted in a YAML file is YAML's False: a string choice takes the matching word ...
    assert apply_mapping(DistillConfig(), {"mixed_precision": False}).mixed_precision == "no"
    # ... a free-form string key has no word to map to: a clear error, not the string 'False'
    with pytest.raises(TLCMError, match=r"(?s)'lr_scheduler' expects a string.*quote the value"):
        apply_mapping(DistillConfig(), {"lr_scheduler": False})
