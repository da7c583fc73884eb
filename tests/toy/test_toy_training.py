"""Short real training runs of the toy VAE and teacher, the saved pipeline, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.toy import autoencoder, common, shapes, teacher


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 48-image dataset, a VAE trained a few dozen steps and a teacher trained a few dozen steps on it."""
    torch.set_num_threads(1)  # the test machine is shared: one thread avoids OpenMP stalls under load
    root = tmp_path_factory.mktemp("toyworld")
    shapes.export_imagefolder(root / "data", 48, seed=0, n_heldout=4)
    vae_cfg = autoencoder.VAEConfig(
        data=str(root / "data"),
        lr=2e-3,
        steps=40,
        batch_size=8,
        crop=0,  # whole images, as the build trains (with its foreground-weighted loss)
        eval_images=8,
        checkpoint_every=10,
        warmup_steps=5,
        threads=1,
    )
    vae_report = autoencoder.train_vae(vae_cfg, root / "vae", progress=False)
    t_cfg = teacher.TeacherConfig(
        data=str(root / "data"),
        vae=str(root / "vae" / "vae"),
        block_out_channels=(32, 32),
        steps=40,
        batch_size=16,
        warmup_steps=5,
        lr=2e-3,
        sample_prompts=2,
        sample_steps=4,
        checkpoint_every=20,
        threads=1,
    )
    t_report = teacher.train_teacher(t_cfg, root / "teacher", progress=False)
    return root, vae_report, t_report


def test_vae_training_lowers_its_loss_and_sets_the_sd_scaling(tiny_world):
    root, report, _ = tiny_world
    assert report["final_loss"] < 0.85 * report["first_loss"]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(root / "vae" / "vae")
    assert vae.config.scaling_factor == pytest.approx(1.0 / report["latent_std"])
    with torch.no_grad():
        lat = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert lat.shape == (1, 4, 8, 8)  # f = 4, 4 latent channels
    assert (root / "vae" / "reconstructions.png").is_file() and np.isfinite(report["psnr_db"])
    assert (root / "vae" / "config.yaml").is_file()


def test_vae_training_resumes_from_its_checkpoint(tiny_world, tmp_path):
    root, _, _ = tiny_world
    ckpt = torch.load(root / "vae" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 40
    # a longer run in a copy of the folder starts at step 40, not 0
    import shutil

    shutil.copytree(root / "vae", tmp_path / "vae")
    (tmp_path / "vae" / "report.json").unlink()
    cfg = autoencoder.VAEConfig(data=str(root / "data"), steps=42, batch_size=4, crop=16, eval_images=4, threads=1)
    report = autoencoder.train_vae(cfg, tmp_path / "vae", progress=False)
    assert torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=False)["step"] == 42
    assert report["steps"] == 42


def test_teacher_training_lowers_its_loss(tiny_world):
    _, _, report = tiny_world
    assert report["final_loss"] < 0.8 * report["first_loss"]
    assert report["truncated_captions"] == 0 and report["images"] == 48


def test_saved_teacher_is_a_stable_diffusion_pipeline_sampled_by_diffusers_schedulers(tiny_world):
    from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, StableDiffusionPipeline

    root, _, _ = tiny_world
    path = root / "teacher" / "pipeline"
    index = json.loads((path / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["text_encoder"] == ["transformers", "BertModel"]
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == common.TEXT_MAX_LENGTH
    pipe.set_progress_bar_config(disable=True)
    outs = []
    for sched in (
        DDIMScheduler.from_config(pipe.scheduler.config),
        DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++"),
    ):
        pipe.scheduler = sched
        g = torch.Generator().manual_seed(0)
        img = pipe(
            ["a big red square in the center on a white background"] * 2,
            num_inference_steps=3,
            guidance_scale=5.0,
            generator=g,
            output_type="pt",
        ).images
        assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all()
        outs.append(img)
    assert not torch.allclose(outs[0], outs[1])  # two different solvers


def test_training_text_states_equal_the_pipelines_encode_prompt(tiny_world):
    from diffusers import DiffusionPipeline

    root, _, _ = tiny_world
    pipe = DiffusionPipeline.from_pretrained(str(root / "teacher" / "pipeline"))
    texts = ["a small blue cross in the bottom right on a gray background", ""]
    cond, uncond = pipe.encode_prompt(texts[:1], "cpu", 1, True)
    tok, enc = teacher.load_text_encoder()
    ref = teacher.encode_text(texts, tok, enc)
    assert cond.shape == (1, common.TEXT_MAX_LENGTH, 384)
    torch.testing.assert_close(cond, ref[:1])
    torch.testing.assert_close(uncond, ref[1:])  # the empty prompt used for caption dropout is CFG's negative


def test_teacher_path_assembles_an_atomic_cache_from_assets(tiny_world, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from tlcm.toy import teacher_path

    root, _, _ = tiny_world
    monkeypatch.setenv("TLCM_CACHE", str(tmp_path / "cache"))
    path = teacher_path(root / "teacher" / "pipeline")
    assert path.parent == tmp_path / "cache" and path.name.startswith("toy-teacher-")
    assert teacher_path(root / "teacher" / "pipeline") == path  # second call reuses it
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    pipe = DiffusionPipeline.from_pretrained(str(path))
    assert type(pipe.text_encoder).__name__ == "BertModel"
    with pytest.raises(TLCMError):
        teacher_path(tmp_path / "nothing")


def test_teacher_can_start_from_a_trained_unet_of_the_same_architecture(tiny_world, tmp_path):
    from diffusers import UNet2DConditionModel

    root, _, _ = tiny_world
    base = dict(data=str(root / "data"), vae=str(root / "vae" / "vae"), block_out_channels=(32, 32), batch_size=4,
                warmup_steps=1, sample_prompts=0, threads=1, init_unet=str(root / "teacher" / "pipeline"))
    # one step at learning rate 0: AdamW, weight decay and the EMA all leave the init's weights exactly as they were
    teacher.train_teacher(teacher.TeacherConfig(**base, steps=1, lr=0.0), tmp_path / "same", progress=False)
    init = UNet2DConditionModel.from_pretrained(str(root / "teacher" / "unet")).state_dict()
    saved = UNet2DConditionModel.from_pretrained(str(tmp_path / "same" / "unet")).state_dict()
    assert init.keys() == saved.keys() and all(torch.equal(init[k], saved[k]) for k in init)
    # the pipeline names its world, so evaluation picks that world's prompts and metrics (no marker reads as v3)
    from tlcm.toy import world_of_model

    assert world_of_model(root / "teacher" / "pipeline") == "v3"
    teacher.train_teacher(teacher.TeacherConfig(**base, steps=1, lr=0.0, world="v4"), tmp_path / "v4", progress=False)
    assert world_of_model(tmp_path / "v4" / "pipeline") == "v4"
    # a marker-less folder is read as v3 only when its latents are v3's 8x8
    (tmp_path / "v4" / "pipeline" / "tlcm_toy.json").unlink()
    assert world_of_model(tmp_path / "v4" / "pipeline") == "v3"  # the tiny world's UNet: 32 px images, 8x8 latents
    cfg = tmp_path / "v4" / "pipeline" / "unet" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "sample_size": 12}))
    with pytest.raises(TLCMError, match="12x12 latents"):
        world_of_model(tmp_path / "v4" / "pipeline")
    with pytest.raises(TLCMError, match="block_out_channels"):
        teacher.train_teacher(teacher.TeacherConfig(**{**base, "block_out_channels": (32, 64)}, steps=1),
                              tmp_path / "other", progress=False)
    with pytest.raises(TLCMError, match="not a UNet folder"):
        teacher.train_teacher(teacher.TeacherConfig(**{**base, "init_unet": str(tmp_path)}, steps=1),
                              tmp_path / "none", progress=False)


def test_teacher_trainer_refuses_missing_inputs(tmp_path):
    with pytest.raises(TLCMError):
        teacher.train_teacher(teacher.TeacherConfig(data=str(tmp_path), vae=str(tmp_path)), tmp_path / "out")
    with pytest.raises(TLCMError):
        autoencoder.train_vae(autoencoder.VAEConfig(data=str(tmp_path / "none")), tmp_path / "out2")


def test_cli_dataset_and_errors(tmp_path, capsys):
    from tlcm.cli import main

    assert main(["toy", "dataset", "--out", str(tmp_path / "d"), "--n", "3", "--heldout", "1", "--no-progress"]) == 0
    assert len(shapes.load_imagefolder(tmp_path / "d")) == 3
    assert main(["toy", "train-vae", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "v")]) == 2
    assert "no such image folder" in capsys.readouterr().err
    assert main(["toy", "build", "--work", str(tmp_path / "w"), "--set", "teacher.steps=5", "--dry-run"]) == 0
    assert '"steps": 5' in capsys.readouterr().out
    assert main(["toy", "build", "--work", str(tmp_path / "w"), "--set", "nope=1", "--dry-run"]) == 2


def test_vae_foreground_weights_emphasise_the_shape_and_keep_mean_one():
    x = torch.full((2, 3, 8, 8), -0.8)  # a dark background...
    x[0, 0, 2:4, 2:4] = 0.9  # ...with a 2x2 red patch in image 0; image 1 is flat
    w = autoencoder.foreground_weights(x, weight=10.0)
    assert w.shape == (2, 1, 8, 8)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.ones(2))
    # image 0: 4 foreground pixels weigh 11x the 60 background ones; normaliser 64 / (60 + 44)
    assert w[0, 0, 2, 2].item() == pytest.approx(11 * 64 / 104)
    assert w[0, 0, 0, 0].item() == pytest.approx(64 / 104)
    torch.testing.assert_close(w[1], torch.ones(1, 8, 8))  # nothing to emphasise: plain pixel loss
    torch.testing.assert_close(autoencoder.foreground_weights(x, weight=0.0), torch.ones(2, 1, 8, 8))
