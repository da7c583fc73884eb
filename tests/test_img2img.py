"""img2img in ``tlcm sample`` (``--image``, ``--strength``): diffusers' Img2Img pipelines with the TLCM scheduler.

The independent reference is diffusers' own ``LCMScheduler`` in the same Img2Img pipeline: a TLCMScheduler in mode
``lcm`` must pick the same times, add the same noise and give the same images. Images are uint8, so "<= 1" is one
pixel level (the batched/unbatched float32 rounding of the tiny networks; equal settings give equal bytes).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.sample import SampleConfig, configure_scheduler, generate, resolve, sample


def _arr(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _blocks(seed: int, size=(32, 32)) -> Image.Image:
    """A smooth test image: random 8x8 colour blocks."""
    h, w = size
    cells = np.random.RandomState(seed).rand((h + 7) // 8, (w + 7) // 8, 3)
    return Image.fromarray((np.kron(cells, np.ones((8, 8, 1)))[:h, :w] * 255).astype(np.uint8))


def _img2img(kind: str):
    from diffusers import AutoPipelineForImage2Image

    from tlcm.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sd15_pipeline if kind == "sd15" else tiny_sdxl_pipeline)(0)
    pipe.set_progress_bar_config(disable=True)
    return AutoPipelineForImage2Image.from_pipe(pipe)


def _unet_times(pipe) -> list[int]:
    seen: list[int] = []
    pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(int((args[1] if len(args) > 1 else
                                                                              kw["timestep"]).flatten()[0])),
                                        with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (4, 1.0), (8, 0.3)])
def test_tlcm_img2img_equals_diffusers_lcmscheduler(kind, steps, strength):
    from diffusers import LCMScheduler

    pipe = _img2img(kind)
    seen = _unet_times(pipe)
    init = [_blocks(1), _blocks(2)]
    kw = dict(num_inference_steps=steps, guidance_scale=1.0, seeds=[5, 6], images=init, strength=strength)
    teacher_config = pipe.scheduler.config
    pipe.scheduler = LCMScheduler.from_config(teacher_config)
    reference = np.stack([_arr(i) for i in generate(pipe, ["a", "b"], **kw)])
    lcm_times = list(seen)
    seen.clear()
    configure_scheduler(pipe, mode="lcm")
    ours = np.stack([_arr(i) for i in generate(pipe, ["a", "b"], **kw)])
    assert seen == lcm_times
    # diffusers' img2img semantics: the last int(steps * strength) of the steps-step schedule
    full = LCMScheduler.from_config(teacher_config)
    full.set_timesteps(steps)
    assert seen == full.timesteps.tolist()[steps - int(steps * strength):] * 2  # two images, one batch each
    assert np.abs(ours - reference).max() <= 1


def test_segments_student_img2img_starts_on_segment_edges():
    pipe = _img2img("sd15")
    configure_scheduler(pipe, mode="segments", num_segments=4, boundary_condition="none")
    seen = _unet_times(pipe)
    generate(pipe, ["a"], num_inference_steps=4, guidance_scale=1.0, seeds=0, images=[_blocks(1)], strength=0.5)
    edges = pipe.scheduler.segment_edges()  # ascending [clean, e1, e2, e3, e4]
    assert seen == [int(edges[2]), int(edges[1])]  # the last two segments: e2 -> e1 -> clean


def test_strength_controls_how_much_of_the_image_survives():
    """Two different init images give outputs that differ less and less as strength grows (at 1.0 only the
    alpha_999 ~ 0.07 trace of the image is left in the starting latent)."""
    pipe = _img2img("sd15")
    configure_scheduler(pipe, mode="lcm")
    gaps = []
    for strength in (0.125, 0.5, 1.0):
        a, b = (_arr(generate(pipe, ["a"], num_inference_steps=8, guidance_scale=1.0, seeds=0, images=[im],
                              strength=strength)[0]) for im in (_blocks(1), _blocks(2)))
        gaps.append(np.abs(a - b).mean())
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[0] > 10 * gaps[2]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    _blocks(1, (40, 48)).save(folder / "a.png")
    _blocks(2, (40, 48)).save(folder / "b.png")
    _blocks(3, (37, 45)).save(folder / "c.jpg")  # not a multiple of 8: resized down to 32x40
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_sample_img2img_sizes_metadata_batching_and_determinism(tiny_sd15_dir, images_dir, tmp_path):
    def run(out, batch_size):
        return sample(SampleConfig(model=str(tiny_sd15_dir), prompts=["a red circle"], images=[str(images_dir)],
                                   strength=0.5, steps=4, out=str(out), batch_size=batch_size, progress=False))

    paths = run(tmp_path / "b3", 3)
    assert [Image.open(p).size for p in paths] == [(48, 40), (48, 40), (40, 32)]
    meta = Image.open(paths[2]).text
    assert meta["image"] == str(images_dir / "c.jpg") and meta["strength"] == "0.5" and meta["prompt"] == "a red circle"
    record = json.loads((tmp_path / "b3" / "sample_config.json").read_text())
    assert record["strength"] == 0.5 and len(record["images"]) == 3 and record["prompts"] == ["a red circle"] * 3
    single = run(tmp_path / "b1", 1)
    for a, b in zip(paths, single):
        assert np.abs(_arr(Image.open(a)) - _arr(Image.open(b))).max() <= 1  # batching never changes an image
    again = run(tmp_path / "again", 3)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))
    assert not np.array_equal(_arr(Image.open(paths[0])), _arr(Image.open(paths[1])))  # the image is used


def test_sample_img2img_size_flags_and_lora(tiny_sd15_dir, sd15_lora_file, images_dir, tmp_path):
    common = dict(model=str(tiny_sd15_dir), prompts=["a", "b"], images=[str(images_dir / "a.png")], steps=2,
                  strength=1.0, height=32, width=24, progress=False)
    plain = sample(SampleConfig(out=str(tmp_path / "plain"), **common))
    assert [Image.open(p).size for p in plain] == [(24, 32)] * 2
    lora = sample(SampleConfig(out=str(tmp_path / "lora"), loras=[(str(sd15_lora_file), 1.0)], **common))
    assert np.abs(_arr(Image.open(plain[0])) - _arr(Image.open(lora[0]))).max() > 5


def test_img2img_errors(tiny_sd15_dir, images_dir, tmp_path, capsys):
    def fails(match, **kw):
        cfg = dict(model=str(tiny_sd15_dir), prompts=["a"], images=[str(images_dir / "a.png")])
        cfg.update(kw)
        with pytest.raises(TLCMError, match=match) as info:
            resolve(SampleConfig(**cfg))
        assert info.value.fix

    fails("outside \\(0, 1\\]", strength=1.5)
    fails("outside \\(0, 1\\]", strength=0.0)
    fails("no --image was given", images=[], strength=0.5)
    fails("runs int\\(4 x 0.2\\) = 0 steps", strength=0.2, steps=4)
    fails("does not exist", images=[str(tmp_path / "nope.png")])
    fails("holds no images", images=[str(tmp_path)])
    fails("3 init images for 2 prompts", images=[str(images_dir)], prompts=["a", "b"])
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    rc = main(["sample", "--model", str(tiny_sd15_dir), "--prompt", "a", "--image", str(bad), "--out",
               str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "could not read the init image" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # failed before loading the model or writing anything


def test_cli_img2img(tiny_sdxl_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["sample", "--model", str(tiny_sdxl_dir), "--prompt", "a", "--prompt", "b", "--image",
               str(images_dir / "a.png"), "--strength", "0.5", "--steps", "2", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert [Image.open(p).size for p in sorted(out.glob("0*.png"))] == [(48, 40)] * 2
