"""Config of the bag of techniques: validation, parts and phases, dry-run text, presets and chains shipped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.train.config import DistillConfig, apply_overrides, resolve_config, validate_config
from tlcm.train.recipes import recipe_parts, recipe_phases

REPO = Path(__file__).resolve().parents[2]


def _valid(**kw) -> DistillConfig:
    return DistillConfig(**{"teacher": "t", "output_dir": "o", **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dmd_weight=-1.0), "dmd_weight=-1.0 must not be negative"),
        (dict(consistency_weight=0.0), "every loss term has weight 0"),
        (dict(student_sample_steps=[0]), "student step counts"),
        (dict(reward_sample_steps=[]), "student step counts"),
        (dict(dmd_t_min=500, dmd_t_max=100), "dmd_t_min=500"),
        (dict(gan_t_max=1000), "gan_t_max=1000"),
        (dict(recipe="tlcm", init_lora="", state_source="teacher_path", student="full"), "stage 2 has stage2_source"),
        (dict(state_source="noise"), "state_source='noise' is not one of"),
        (dict(gan_loss="wgan"), "gan_loss='wgan'"),
        (dict(reward_weight=1.0), "no reward_model"),
        (dict(loss_type="lpips"), "lpips_weights"),
        (dict(student_update_every=0), "student_update_every=0"),
        (dict(reward_mismatch_margin=-1.0), "reward_mismatch_margin=-1.0 must not be negative"),
    ],
)
def test_bad_technique_configs_fail_early(kw, match):
    with pytest.raises(TLCMError, match=match):
        validate_config(_valid(**kw), need_data=False)


def test_several_optimisers_refuse_fp16():
    if not torch.cuda.is_available():
        pytest.skip("fp16 is refused without CUDA before this check")
    with pytest.raises(TLCMError, match="bf16"):
        validate_config(_valid(dmd_weight=1.0, mixed_precision="fp16"), need_data=False)


def test_trajectory_source_needs_stored_points(tmp_path):
    from tlcm.data import write_shards

    plain = write_shards(tmp_path / "plain", torch.zeros(2, 4, 8, 8), ["a", "b"])
    with pytest.raises(TLCMError, match="store no trajectory points"):
        validate_config(_valid(data=str(plain), state_source="trajectory"))


def test_step_lists_parse_from_the_command_line():
    cfg = apply_overrides(_valid(), ["student_sample_steps=1,2,4", "reward_sample_steps=[2]"])
    assert cfg.student_sample_steps == [1, 2, 4] and cfg.reward_sample_steps == [2]
    with pytest.raises(TLCMError, match="a list of integers"):
        apply_overrides(cfg, ["student_sample_steps=a,b"])


def test_parts_and_phases_follow_the_techniques():
    assert [p.name for p in recipe_parts(_valid())] == ["student"]
    assert [p.name for p in recipe_phases(_valid())] == ["student"]
    cfg = _valid(dmd_weight=1.0, gan_weight=0.1, student_update_every=5, learning_rate=1e-5,
                 disc_learning_rate=1e-4, max_steps=5000)
    parts = {p.name: p for p in recipe_parts(cfg)}
    assert list(parts) == ["student", "fake", "discriminator"]
    assert parts["student"].num_updates(cfg.max_steps) == 1000 and parts["fake"].num_updates(cfg.max_steps) == 5000
    assert parts["fake"].learning_rate == 1e-5 and parts["discriminator"].learning_rate == 1e-4
    phases = recipe_phases(cfg)
    assert [(p.name, p.part, p.every) for p in phases] == [("student", "student", 5), ("fake", "fake", 1),
                                                           ("discriminator", "discriminator", 1)]
    assert [s for s in range(11) if phases[0].due(s)] == [0, 5, 10]
    fake_backbone = _valid(gan_weight=0.1, gan_backbone="fake")
    assert [p.name for p in recipe_parts(fake_backbone)] == ["student", "fake"]
    assert "GAN discriminator" in " ".join(recipe_phases(fake_backbone)[1].terms)


def test_dry_run_prints_parts_phases_and_schedule(capsys, tmp_path):
    from tlcm.cli import main

    (tmp_path / "prev" / "adapter").mkdir(parents=True)
    (tmp_path / "prev" / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["distill", "--preset", "toy-tlcm-dmd", "--output-dir", "o", "--dry-run",
                 "--set", f"init_lora={tmp_path / 'prev'}"]) == 0
    out = capsys.readouterr().out
    for text in ("part student: AdamW lr 0.0001", "part fake: AdamW lr 0.001", "part discriminator: AdamW lr 0.001",
                 "phase student (trains student, every 1): 1 x tlcm stage-2 consistency + 1 x DMD",
                 "phase fake (trains fake, every 1): fake-score denoising", "real = the student's 4-step output"):
        assert text in out, text
    assert main(["distill", "--preset", "toy-tlcm-reward", "--output-dir", "o", "--dry-run", "--set",
                 f"init_lora={tmp_path / 'prev'}", "--set", "reward_kind=hinge", "--set", "reward_margin=3"]) == 0
    out = capsys.readouterr().out
    assert "reward: toy (hinge, margin 3.0, plus a hinge on a mismatched prompt (margin 0.0) when the reward reads " \
           "the prompt), weight 0.1, on the decoded output of the student's [4]-step walk" in out


def test_chain_presets_ship_and_match_repo_configs():
    from tlcm.train.chain import chain_names, load_chain

    names = chain_names()
    assert {"toy-tlcm-full", "sd15-tlcm-full", "sdxl-tlcm-full"} <= set(names)
    for name in names:
        shipped = (REPO / "src" / "tlcm" / "configs" / "chains" / f"{name}.yaml").read_text()
        assert (REPO / "configs" / "chains" / f"{name}.yaml").read_text() == shipped, name
        phases = load_chain(name)
        assert [p.name for p in phases] == ["stage1", "stage2", "reward", "dmd-gan"]
        kind = name.split("-")[0]
        assert [p.preset for p in phases] == [f"{kind}-mlcd", f"{kind}-tlcm", f"{kind}-tlcm-reward",
                                              f"{kind}-tlcm-dmd"]


@pytest.mark.parametrize("kind, batch", [("sd15", 12), ("sdxl", 4)])
def test_paper_schedule_in_the_real_model_presets(kind, batch):
    """The paper: stage 1 12k at 1e-4; stage 2 2k at 1e-5 from the student's 4-step samples; reward 500 x batch 8
    at 1e-5; DMD+GAN 1k student updates at batch 4, G 1e-5, D 1e-4."""
    s1 = resolve_config(f"{kind}-mlcd", flags={"teacher": "x"})
    s2 = resolve_config(f"{kind}-tlcm", flags={"teacher": "x"})
    rw = resolve_config(f"{kind}-tlcm-reward", flags={"teacher": "x"})
    dm = resolve_config(f"{kind}-tlcm-dmd", flags={"teacher": "x"})
    assert (s1.max_steps, s1.learning_rate, s1.batch_size) == (12000, 1e-4, batch)
    assert (s2.max_steps, s2.learning_rate, s2.stage2_sample_steps) == (2000, 1e-5, 4)
    assert (rw.max_steps, rw.batch_size, rw.learning_rate, rw.reward_kind) == (500, 8, 1e-5, "hinge")
    assert dm.max_steps // dm.student_update_every == 1000 and dm.batch_size == 4
    assert (dm.learning_rate, dm.disc_learning_rate, dm.mixed_precision) == (1e-5, 1e-4, "bf16")
    assert dm.dmd_weight > 0 and dm.gan_weight > 0 and dm.gan_real == "student" and dm.gan_real_steps == 4
