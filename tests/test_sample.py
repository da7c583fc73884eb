"""``tlcm sample`` and the Python sampling API on tiny SD1.5-like and SDXL-like pipelines saved to disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.sample import SampleConfig, configure_scheduler, generate, make_grid, read_prompts_file, sample


def _arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15_dir):
    from tlcm.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd15_dir))
    configure_scheduler(pipe)
    return pipe


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cli_generates_at_1_2_4_8_steps_with_metadata(kind, request, tmp_path, capsys):
    model = request.getfixturevalue(f"tiny_{kind}_dir")
    outputs = {}
    for steps in (1, 2, 4, 8):
        out = tmp_path / f"s{steps}"
        rc = main(["sample", "--model", str(model), "--prompt", "a red circle", "--steps", str(steps), "--seed", "5",
                   "--out", str(out), "--no-progress", "--gamma", "1.0"])
        assert rc == 0, capsys.readouterr().err
        (png,) = sorted(out.glob("*.png"))
        image = Image.open(png)
        assert image.size == (32, 32)
        meta = image.text
        assert meta["prompt"] == "a red circle" and meta["seed"] == "5" and meta["steps"] == str(steps)
        assert meta["guidance_scale"] == "1.0" and meta["gamma"] == "1.0" and meta["model"] == str(model)
        assert json.loads(meta["scheduler"])["class"] == "TLCMScheduler"
        assert json.loads(meta["loras"]) == []
        outputs[steps] = _arr(image)
        record = json.loads((out / "sample_config.json").read_text())
        assert record["steps"] == steps and record["prompts"] == ["a red circle"]
    assert not np.array_equal(outputs[1], outputs[4])  # the step count is really used


def test_cli_prompts_file_grid_batches_and_seeds(tiny_sd15_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n a dog \na bird\n")
    out = tmp_path / "out"
    rc = main(["sample", "--model", str(tiny_sd15_dir), "--prompts-file", str(prompts), "--steps", "2",
               "--images-per-prompt", "2", "--batch-size", "4", "--seed", "10", "--grid", "--out", str(out),
               "--height", "40", "--width", "48"])
    assert rc == 0
    assert "wrote 6 image(s)" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("0*.png"))
    assert pngs == ["0000_00_seed10.png", "0000_01_seed11.png", "0001_00_seed12.png", "0001_01_seed13.png",
                    "0002_00_seed14.png", "0002_01_seed15.png"]
    first = Image.open(out / "0001_01_seed13.png")
    assert first.size == (48, 40) and first.text["prompt"] == "a dog" and first.text["seed"] == "13"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 48, 3 * 40)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files
    # batching does not change images: generate image 13 alone, unbatched
    rc = main(["sample", "--model", str(tiny_sd15_dir), "--prompt", "a dog", "--steps", "2", "--seed", "13",
               "--out", str(tmp_path / "single"), "--height", "40", "--width", "48", "--no-progress"])
    assert rc == 0
    single = _arr(Image.open(tmp_path / "single" / "0000_00_seed13.png"))
    assert np.abs(single - _arr(first)).max() <= 1


def test_generate_is_deterministic_per_seed_and_batch_independent(sd15_pipe):
    prompts = ["a cat", "a dog", "a bird"]
    one = generate(sd15_pipe, prompts, num_inference_steps=2, guidance_scale=1.0, seeds=[3, 4, 5], batch_size=1)
    three = generate(sd15_pipe, prompts, num_inference_steps=2, guidance_scale=1.0, seeds=3, batch_size=3)
    assert len(one) == len(three) == 3
    for a, b in zip(one, three):
        assert np.abs(_arr(a) - _arr(b)).max() <= 1
    other = generate(sd15_pipe, prompts[:1], num_inference_steps=2, guidance_scale=1.0, seeds=[99])
    assert not np.array_equal(_arr(other[0]), _arr(one[0]))


def test_cfg_and_negative_prompt_are_used(sd15_pipe):
    kw = dict(num_inference_steps=2, seeds=[0])
    plain = _arr(generate(sd15_pipe, ["a cat"], guidance_scale=1.0, **kw)[0])
    zero = _arr(generate(sd15_pipe, ["a cat"], guidance_scale=0.0, **kw)[0])
    cfg = _arr(generate(sd15_pipe, ["a cat"], guidance_scale=5.0, **kw)[0])
    neg = _arr(generate(sd15_pipe, ["a cat"], guidance_scale=5.0, negative_prompt="blurry", **kw)[0])
    assert np.array_equal(plain, zero)  # 0 and 1 both mean: no CFG
    assert not np.array_equal(plain, cfg) and not np.array_equal(cfg, neg)


def test_guidance_embedding_unet_gets_w_without_cfg():
    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0, time_cond_proj_dim=8)
    pipe.set_progress_bar_config(disable=True)
    configure_scheduler(pipe)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    low = _arr(generate(pipe, ["a cat"], num_inference_steps=1, guidance_scale=1.0, seeds=[0])[0])
    high = _arr(generate(pipe, ["a cat"], num_inference_steps=1, guidance_scale=8.0, seeds=[0])[0])
    assert batches == [1, 1]  # no unconditional branch: guidance goes through the embedding
    assert not np.array_equal(low, high)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_scheduler_assignment_works_in_img2img_pipelines(kind):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    from tlcm.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    if kind == "sd15":
        pipe = StableDiffusionImg2ImgPipeline(**tiny_sd15_pipeline(0).components)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**tiny_sdxl_pipeline(0).components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    scheduler = configure_scheduler(pipe, mode="tcd", gamma=0.3)
    assert type(scheduler).__name__ == "TLCMScheduler" and scheduler.config.gamma == 0.3
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    a = generate(pipe, ["a cat"], num_inference_steps=4, guidance_scale=1.0, seeds=[1], image=init, strength=0.6)
    b = generate(pipe, ["a cat"], num_inference_steps=4, guidance_scale=1.0, seeds=[1], image=init, strength=0.6)
    assert a[0].size == (32, 32) and np.array_equal(_arr(a[0]), _arr(b[0]))


def test_configure_scheduler_keeps_teacher_schedule_and_overrides(sd15_pipe):
    teacher = dict(sd15_pipe.scheduler.config)
    scheduler = configure_scheduler(sd15_pipe, mode="segments", num_segments=4)
    assert scheduler.config.mode == "segments" and scheduler.config.num_segments == 4
    assert scheduler.config.beta_schedule == teacher["beta_schedule"]
    assert scheduler.config.prediction_type == teacher["prediction_type"]
    saved = dict(scheduler.config)
    again = configure_scheduler(sd15_pipe, mode=None, gamma=0.5, config=saved)
    assert again.config.mode == "segments" and again.config.gamma == 0.5
    configure_scheduler(sd15_pipe)  # back to LCM for the other tests of this module
    assert sd15_pipe.scheduler.config.mode == "lcm"


def test_student_folder_supplies_model_scheduler_and_guidance(tiny_sd15_dir, sd15_lora_file, tmp_path):
    student = tmp_path / "student"
    (student / "scheduler").mkdir(parents=True)
    (student / "pytorch_lora_weights.safetensors").write_bytes(sd15_lora_file.read_bytes())
    from tlcm.scheduler import TLCMScheduler

    TLCMScheduler(mode="segments", num_segments=4).save_config(str(student / "scheduler"))
    (student / "tlcm_sampling.json").write_text(json.dumps(
        {"guidance_scale": 0.0, "num_inference_steps": 2, "base_model": str(tiny_sd15_dir)}))
    out = tmp_path / "out"
    assert main(["sample", "--lora", str(student), "--prompt", "a cat", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "sample_config.json").read_text())
    assert record["model"] == str(tiny_sd15_dir) and record["steps"] == 2 and record["guidance_scale"] == 0.0
    assert record["scheduler"]["mode"] == "segments" and record["scheduler"]["num_segments"] == 4
    # explicit flags override the student's defaults
    out2 = tmp_path / "out2"
    assert main(["sample", "--lora", str(student), "--prompt", "a cat", "--out", str(out2), "--steps", "4",
                 "--guidance-scale", "1.5", "--no-progress"]) == 0
    record = json.loads((out2 / "sample_config.json").read_text())
    assert record["steps"] == 4 and record["guidance_scale"] == 1.5


def test_python_sample_api_and_step_warning(tiny_sdxl_dir, tmp_path):
    seen = []
    paths = sample(SampleConfig(model=str(tiny_sdxl_dir), prompts=["x"], steps=9, out=str(tmp_path), progress=False),
                   warn=seen.append)
    assert len(paths) == 1 and paths[0].exists()
    assert seen and "9 steps is more than the 8" in seen[0]


def test_step_warning_is_printed_by_cli(tiny_sd15_dir, tmp_path, capsys):
    assert main(["sample", "--model", str(tiny_sd15_dir), "--prompt", "x", "--steps", "10", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert "tlcm sample: warning: 10 steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--steps", "0"], "--steps 0 is less than 1"),
        (["--prompt", "x", "--height", "30"], "--height 30 is not a positive multiple of 8"),
        (["--prompt", "x", "--width", "44"], "--width 44 is not a positive multiple of 8"),
        ([], "no prompts given"),
        (["--prompts-file", "{tmp}/missing.txt"], "missing.txt' does not exist"),
        (["--prompts-file", "{tmp}/empty.txt"], "empty.txt' is empty"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size 0 is less than 1"),
    ],
)
def test_cli_errors_name_problem_and_fix(extra, message, tiny_sd15_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = ["sample", "--model", str(tiny_sd15_dir), "--out", str(tmp_path / "o")]
    argv += [a.format(tmp=tmp_path) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tlcm sample: error: ") and message in err and "fix:" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # validation happens before anything is written


def test_cli_error_for_missing_model(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "model path" in err and "does not exist" in err and "fix:" in err
    assert main(["sample", "--prompt", "x"]) == 2
    assert "no model given" in capsys.readouterr().err


def test_read_prompts_file_and_grid(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\n two \n")
    assert read_prompts_file(f) == ["one", "two"]
    with pytest.raises(TLCMError, match="does not exist"):
        read_prompts_file(tmp_path / "none.txt")
    tiles = [Image.new("RGB", (4, 2), (i * 40, 0, 0)) for i in range(5)]
    grid = make_grid(tiles)
    assert grid.size == (12, 4) and grid.getpixel((4, 0)) == (40, 0, 0) and grid.getpixel((0, 2)) == (120, 0, 0)


def test_scheduler_settings_it_rejects_are_clear_errors(tiny_sd15_dir, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_sd15_dir), "--prompt", "x", "--out", str(tmp_path), "--no-progress"]
    assert main(base + ["--mode", "segments", "--steps", "9"]) == 2  # 9 steps over the default 8 segments
    err = capsys.readouterr().err
    assert "tlcm sample: error: the TLCM scheduler rejects these settings" in err and "fix:" in err
    assert main(base + ["--gamma", "1.5"]) == 2
    assert "gamma must be in [0, 1]" in capsys.readouterr().err


def test_load_student_on_a_built_pipeline(sd15_lora_file, tmp_path):
    from tlcm.sample import load_student
    from tlcm.scheduler import TLCMScheduler
    from tlcm.testing import tiny_sd15_pipeline

    student = tmp_path / "student"
    (student / "scheduler").mkdir(parents=True)
    (student / "pytorch_lora_weights.safetensors").write_bytes(sd15_lora_file.read_bytes())
    TLCMScheduler(mode="segments", num_segments=2, boundary_condition="none").save_config(str(student / "scheduler"))
    (student / "tlcm_sampling.json").write_text(json.dumps({"guidance_scale": 0.0, "num_inference_steps": 2}))
    pipe = tiny_sd15_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    base = _arr(generate(pipe, ["a cat"], num_inference_steps=2, guidance_scale=0.0, seeds=[0])[0])
    defaults = load_student(pipe, str(student))
    assert defaults == {"guidance_scale": 0.0, "num_inference_steps": 2}
    assert pipe.scheduler.config.mode == "segments" and pipe.scheduler.config.boundary_condition == "none"
    assert pipe.get_list_adapters() == {"unet": ["student"]}
    out = _arr(generate(pipe, ["a cat"], seeds=[0], **defaults)[0])
    assert not np.array_equal(base, out)


def test_keep_scheduler_samples_a_teacher_with_its_own_scheduler(tiny_sd15_dir, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_sd15_dir), "--prompt", "x", "--no-progress", "--keep-scheduler"]
    assert main(base + ["--steps", "10", "--out", str(tmp_path / "o")]) == 0
    assert "warning" not in capsys.readouterr().err  # many steps are expected for a teacher
    record = json.loads((tmp_path / "o" / "sample_config.json").read_text())
    assert record["scheduler"]["class"] == "DDIMScheduler" and record["steps"] == 10
    assert main(base + ["--gamma", "0.5", "--out", str(tmp_path / "p")]) == 2
    assert "--keep-scheduler keeps the pipeline's own" in capsys.readouterr().err


def test_dry_run_prints_resolved_settings_and_writes_nothing(sd15_lora_file, tmp_path, capsys):
    student = tmp_path / "student"
    student.mkdir()
    (student / "pytorch_lora_weights.safetensors").write_bytes(sd15_lora_file.read_bytes())
    (student / "tlcm_sampling.json").write_text(json.dumps(
        {"guidance_scale": 0.0, "num_inference_steps": 3, "base_model": "org/base"}))
    out = tmp_path / "out"
    assert main(["sample", "--lora", f"{student}:0.7", "--prompt", "x", "--out", str(out), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "org/base" and plan["steps"] == 3 and plan["guidance_scale"] == 0.0
    assert plan["loras"] == [[str(student), 0.7]] and not out.exists()
