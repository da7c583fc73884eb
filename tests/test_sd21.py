"""Stable Diffusion 2.1: v-prediction at 768 px (and SD2.1-base, epsilon at 512 px), on tiny pipelines built offline.

The prediction conversions the losses use are checked against diffusers' own ``DDIMScheduler`` with
``prediction_type="v_prediction"`` on the SD2.1 config; then the ``sd21-*`` presets run end to end
(synthesize -> distill -> sample) as the SD1.5/SDXL ones do.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm.cli import main
from tlcm.losses import NoiseSchedule
from tlcm.losses.consistency import teacher_ddim_cfg
from tlcm.math import ddim_step
from tlcm.testing import tiny_sd21_components

# float32 arithmetic on O(1..10) values over ~10 operations: a few 1e-6; 2e-5 leaves room without hiding a wrong
# formula (those differ by O(1)).
ATOL = RTOL = 2e-5


@pytest.fixture(scope="module")
def sd21():
    return tiny_sd21_components(0)


def _diffusers_ddim(config):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(50)  # steps of 20: t -> t - 20, as the skipping grid pairs them
    return sched


@pytest.mark.parametrize("t", [999, 499, 39])
def test_v_prediction_x0_and_ddim_step_equal_diffusers(sd21, t):
    config = sd21["scheduler"].config
    assert config.prediction_type == "v_prediction"
    sched = _diffusers_ddim(config)
    g = torch.Generator().manual_seed(t)
    z, v = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    ref = sched.step(v, t, z, eta=0.0)
    schedule = NoiseSchedule.from_config(config)
    tt = torch.full((2,), t)
    x0, eps = schedule.x0_eps(v, z, tt)
    torch.testing.assert_close(x0, ref.pred_original_sample, atol=ATOL, rtol=RTOL)
    a_s, s_s = schedule.alpha_sigma(tt - 20, z)
    torch.testing.assert_close(ddim_step(x0, eps, a_s, s_s), ref.prev_sample, atol=ATOL, rtol=RTOL)


def test_teacher_guided_step_with_a_v_prediction_unet_equals_diffusers(sd21):
    """The loss's teacher step (CFG on x0 and eps, then DDIM) = diffusers' DDIM step on the guided v output (CFG is
    linear, so guiding v or guiding (x0, eps) is the same), on a real SD2.1-shaped UNet."""
    unet, config = sd21["unet"].eval(), sd21["scheduler"].config
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 24, 24, generator=g)
    cond, uncond = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    t, w = torch.tensor([739, 259]), 3.0

    def teacher(x, tt):
        with torch.no_grad():
            return unet(x, tt, cond).sample, unet(x, tt, uncond).sample

    ours = teacher_ddim_cfg(teacher, z, t, t - 20, w, NoiseSchedule.from_config(config))
    v_c, v_u = teacher(z, t)
    v = (1 + w) * v_c - w * v_u
    sched = _diffusers_ddim(config)
    ref = torch.cat([sched.step(v[i:i + 1], int(t[i]), z[i:i + 1], eta=0.0).prev_sample for i in range(2)])
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)


def test_tiny_sd21_looks_like_sd21(sd21):
    from tlcm.testing import tiny_sd21_components

    assert sd21["unet"].config.upcast_attention and sd21["unet"].config.use_linear_projection
    assert sd21["text_encoder"].config.hidden_act == "gelu" and sd21["tokenizer"].pad_token == "!"
    base = tiny_sd21_components(0, base=True)
    assert base["scheduler"].config.prediction_type == "epsilon" and not base["unet"].config.upcast_attention
    assert base["unet"].config.sample_size < sd21["unet"].config.sample_size  # 512 vs 768 there, 32 vs 48 here


# ------------------------------------------------------------------------------------------------------ end to end


def _run(argv, capsys):
    rc = main(argv)
    assert rc == 0, capsys.readouterr().err[-3000:]


def _sample(model, lora, out, capsys):
    args = ["sample", "--model", str(model), "--prompt", "a red circle", "--steps", "2", "--seed", "3", "--out",
            str(out), "--no-progress"]
    _run(args + (["--lora", str(lora)] if lora else []), capsys)
    (png,) = sorted(out.glob("*.png"))
    return Image.open(png)


@pytest.mark.parametrize("kind,size,prediction", [("sd21", 48, "v_prediction"), ("sd21-base", 32, "epsilon")])
def test_sd21_presets_end_to_end(kind, size, prediction, tmp_path, capsys):
    """synthesize -> sd21-mlcd (stage 1) -> sd21-tlcm (stage 2, from stage 1) -> sample; sd21-lcm for one step."""
    from tlcm.data import read_manifest
    from tlcm.testing import save_tiny_pipeline

    teacher = save_tiny_pipeline(kind, tmp_path / "teacher")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na red square\n")
    shards = tmp_path / "shards"
    _run(["synthesize", "--teacher", str(teacher), "--prompts", str(prompts), "--out", str(shards), "--steps", "2",
          "--batch-size", "2", "--records-per-shard", "2", "--no-progress"], capsys)
    manifest = read_manifest(shards, require_complete=True)
    assert manifest["teacher"]["prediction_type"] == prediction
    assert manifest["latent_shape"] == [4, size // 2, size // 2]  # the teacher's own size (VAE factor 2)

    common = ["--teacher", str(teacher), "--data", str(shards), "--no-progress", "--set", "mixed_precision=no",
              "--set", "batch_size=2", "--set", "validation_num_steps=[1]", "--set", "gradient_checkpointing=false"]
    stage1, stage2, lcm = tmp_path / "mlcd", tmp_path / "tlcm", tmp_path / "lcm"
    _run(["distill", "--preset", "sd21-mlcd", "--output-dir", str(stage1), "--max-steps", "2", "--set", "lora_rank=4",
          "--set", "lora_alpha=4", "--set", "learning_rate=0.05", *common], capsys)
    _run(["distill", "--preset", "sd21-tlcm", "--output-dir", str(stage2), "--max-steps", "1", "--set",
          f"init_lora={stage1}", "--set", "stage2_sample_steps=2", "--set", "learning_rate=0.05", *common], capsys)
    for out, recipe in ((stage1, "mlcd"), (stage2, "tlcm")):
        cfg = (out / "config.yaml").read_text()
        assert f"recipe: {recipe}\n" in cfg and f"resolution: {size}\n" in cfg and "num_segments: 8\n" in cfg
        sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "TLCMScheduler" and sched["prediction_type"] == prediction
        grid = Image.open(next((out / "validation").glob("*.png")))
        assert grid.size == (2 * size, size)  # the preset's 2 validation prompts, 1 row, at the teacher's size
    if kind == "sd21":
        _run(["distill", "--preset", "sd21-lcm", "--output-dir", str(lcm), "--max-steps", "1", "--set",
              "lora_rank=4", "--set", "lora_alpha=4", *common], capsys)
        sched = json.loads((lcm / "scheduler" / "scheduler_config.json").read_text())
        assert sched["prediction_type"] == "v_prediction" and sched["boundary_condition"] == "lcm"

    image = _sample(teacher, stage2, tmp_path / "img", capsys)
    assert image.size == (size, size)
    used = json.loads(image.text["scheduler"])
    assert used["class"] == "TLCMScheduler" and used["prediction_type"] == prediction  # the student's scheduler
    plain = _sample(teacher, None, tmp_path / "img-base", capsys)
    assert not np.array_equal(np.asarray(image), np.asarray(plain))  # the trained LoRA is applied
