"""The training resolution comes from the config, the shards or the teacher, and a disagreement stops the run before
any training step (issue 14, item 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.train.resolution import data_image_size, resolve_image_size


def test_rules_of_resolve_image_size():
    teacher = (1024, 1024)
    assert resolve_image_size(0, None, teacher, 8) == teacher  # nothing else said: the teacher's own size
    assert resolve_image_size(0, (1024, 1024), teacher, 8) == teacher
    assert resolve_image_size(512, None, teacher, 8) == (512, 512)  # an explicit size without shards
    assert resolve_image_size(512, (512, 512), teacher, 8) == (512, 512)  # ... and shards made at it, on purpose
    with pytest.raises(TLCMError, match=r"resolution=768 \(768x768\) but the shards hold 512x512 images \(64x64 "
                                        r"latents x VAE factor 8\)"):
        resolve_image_size(768, (512, 512), teacher, 8)
    with pytest.raises(TLCMError, match=r"the shards hold 512x512 images but the teacher's own size is 1024x1024"
                                        r"(.|\n)*set resolution=512"):
        resolve_image_size(0, (512, 512), teacher, 8)
    with pytest.raises(TLCMError, match="not a multiple of the VAE's factor 8"):
        resolve_image_size(500, None, teacher, 8)
    assert data_image_size({"latent_shape": [4, 96, 64]}, 8) == (768, 512)
    assert data_image_size({"latent_shape": None}, 8) is None


@pytest.fixture(scope="module")
def shards_32(tmp_path_factory):
    """Shards of 16x16 latents: 32x32 images for the tiny pipelines (VAE factor 2), their own size."""
    from tlcm.data import write_shards

    g = torch.Generator().manual_seed(0)
    return write_shards(tmp_path_factory.mktemp("s32") / "shards", torch.randn(4, 4, 16, 16, generator=g),
                        ["a red circle", "a blue square"] * 2, records_per_shard=2)


@pytest.fixture(scope="module")
def shards_16(tmp_path_factory):
    from tlcm.data import write_shards

    g = torch.Generator().manual_seed(1)
    return write_shards(tmp_path_factory.mktemp("s16") / "shards", torch.randn(2, 4, 8, 8, generator=g),
                        ["a", "b"], records_per_shard=2)


def _distill(teacher, data, out, *extra):
    return main(["distill", "--preset", "sdxl-mlcd", "--teacher", str(teacher), "--data", str(data),
                 "--output-dir", str(out), "--max-steps", "1", "--no-progress", "--set", "mixed_precision=no",
                 "--set", "batch_size=2", "--set", "lora_rank=4", "--set", "lora_alpha=4",
                 "--set", "validation_num_steps=[1]", *extra])


def test_sdxl_preset_trains_at_the_teachers_own_size(tiny_sdxl_dir, shards_32, tmp_path, monkeypatch):
    """`tlcm distill --preset sdxl-mlcd --teacher <tiny sdxl>` with no resolution setting: 32 px, not the 1024 px
    of real SDXL, in the size conditioning (time_ids), the validation images and the recorded config."""
    from diffusers import StableDiffusionXLPipeline

    seen = []
    real = StableDiffusionXLPipeline._get_add_time_ids

    def spy(self, original_size, crops_coords_top_left, target_size, *a, **k):
        seen.append((tuple(original_size), tuple(crops_coords_top_left), tuple(target_size)))
        return real(self, original_size, crops_coords_top_left, target_size, *a, **k)

    monkeypatch.setattr(StableDiffusionXLPipeline, "_get_add_time_ids", spy)
    out = tmp_path / "xl"
    assert _distill(tiny_sdxl_dir, shards_32, out) == 0
    assert seen and set(seen) == {((32, 32), (0, 0), (32, 32))}
    grid = np.asarray(Image.open(next((out / "validation").glob("*.png"))))
    assert grid.shape == (32, 2 * 32, 3)  # one row (1 step) of the preset's 2 validation prompts, 32x32 each
    cfg = (out / "config.yaml").read_text()
    assert "resolution: 32\n" in cfg and "num_segments: 8\n" in cfg  # the preset's choices, the teacher's size
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 1


def _no_training(monkeypatch):
    import tlcm.train.loop as loop

    def refuse(*a, **k):
        raise AssertionError("the student was built: the size check came too late")

    monkeypatch.setattr(loop, "build_networks", refuse)


def test_shards_at_another_size_than_the_teacher_fail_before_training(tiny_sdxl_dir, shards_16, tmp_path, capsys,
                                                                     monkeypatch):
    _no_training(monkeypatch)
    out = tmp_path / "bad"
    assert _distill(tiny_sdxl_dir, shards_16, out) == 2
    err = capsys.readouterr().err
    assert "hold 16x16 images but the teacher's own size is 32x32" in err and "resolution=16" in err
    assert not (out / "checkpoints").exists()


def test_a_resolution_other_than_the_shards_fails_before_training(tiny_sdxl_dir, shards_32, tmp_path, capsys,
                                                                  monkeypatch):
    _no_training(monkeypatch)
    assert _distill(tiny_sdxl_dir, shards_32, tmp_path / "bad", "--set", "resolution=64") == 2
    err = capsys.readouterr().err
    assert "resolution=64 (64x64) but the shards in" in err and "hold 32x32 images (16x16 latents x VAE factor 2)" \
        in err


def test_shards_with_other_latent_channels_fail_clearly(tiny_sd15_dir, tmp_path, capsys, monkeypatch):
    from tlcm.data import write_shards

    _no_training(monkeypatch)
    data = write_shards(tmp_path / "c8", torch.zeros(2, 8, 16, 16), ["a", "b"], records_per_shard=2)
    assert main(["distill", "--teacher", str(tiny_sd15_dir), "--data", str(data), "--output-dir",
                 str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]) == 2
    assert "8-channel latents but the teacher's UNet takes 4" in capsys.readouterr().err
