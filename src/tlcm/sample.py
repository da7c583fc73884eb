"""Few-step sampling: put a TLCM scheduler on a diffusers pipeline, generate deterministically, write annotated PNGs.

Three layers, each usable alone:

* :func:`configure_scheduler` assigns ``TLCMScheduler.from_config(pipe.scheduler.config, mode=..., gamma=...)``, the
  way a user would on any ``StableDiffusion(XL)(Img2Img)Pipeline``;
* :func:`generate` runs an already built pipeline (nothing is reloaded) over prompts with one ``torch.Generator`` per
  image, seeded with that image's seed, so an image does not depend on the batch it was generated in;
* :func:`sample` is what ``tlcm sample`` runs: a :class:`SampleConfig` in, PNG paths out (model and LoRA loading,
  a student folder's sampling defaults, PNG metadata, atomic writes, a grid, the resolved config next to the images).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tlcm.errors import TLCMError

DEFAULT_STEPS = 4
DEFAULT_GUIDANCE_SCALE = 1.0
MAX_RECOMMENDED_STEPS = 8


def configure_scheduler(
    pipe,
    mode: str | None = "lcm",
    gamma: float | None = None,
    num_segments: int | None = None,
    timestep_grid: str | None = None,
    config: dict | None = None,
    **overrides,
):
    """Assign a ``TLCMScheduler`` to ``pipe`` built from ``config`` (e.g. a student's saved scheduler config) or, by
    default, from the pipeline's own scheduler config (so the teacher's beta schedule and prediction type carry over).

    ``None`` arguments keep the value of the base config. Returns the new scheduler.
    """
    base = dict(config if config is not None else pipe.scheduler.config)
    kwargs = {k: v for k, v in dict(mode=mode, gamma=gamma, num_segments=num_segments, timestep_grid=timestep_grid,
                                    **overrides).items() if v is not None}
    from tlcm.scheduler import TLCMScheduler

    pipe.scheduler = TLCMScheduler.from_config(base, **kwargs)
    return pipe.scheduler


def load_student(pipe, path: str, weight: float = 1.0, **scheduler_overrides) -> dict:
    """Put a LoRA (any format :mod:`tlcm.lora` reads) on an already built ``pipe`` and, for a tlcm student folder,
    its trained-for scheduler (``scheduler/scheduler_config.json``; otherwise a default TLCM scheduler built from the
    pipe's config). Returns the folder's sampling defaults (``tlcm_sampling.json``: guidance_scale,
    num_inference_steps, ...), ``{}`` when there are none. ``scheduler_overrides`` (``mode``, ``gamma``, ...) win.
    """
    from tlcm.lora import describe_lora, load_loras

    source = describe_lora(path)
    load_loras(pipe, [(path, weight)])
    if source.scheduler_config is not None:
        configure_scheduler(pipe, **{"mode": None, **scheduler_overrides}, config=source.scheduler_config)
    else:
        configure_scheduler(pipe, **{"mode": source.sampling.get("mode", "lcm"), **scheduler_overrides})
    return dict(source.sampling)


def check_size(height: int | None, width: int | None) -> None:
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if value < 8 or value % 8:
            raise TLCMError(f"--{name} {value} is not a positive multiple of 8",
                            f"use a multiple of 8, e.g. {max(8, round(value / 8) * 8)}")


def check_steps(steps: int) -> str | None:
    """Raise for steps < 1; return a warning text for more steps than a few-step student is made for."""
    if steps < 1:
        raise TLCMError(f"--steps {steps} is less than 1", f"use 1 to {MAX_RECOMMENDED_STEPS} steps (4 is typical)")
    if steps > MAX_RECOMMENDED_STEPS:
        return (f"{steps} steps is more than the {MAX_RECOMMENDED_STEPS} a few-step student is distilled for; quality "
                "may not improve (use --keep-scheduler to sample a teacher with its own scheduler)")
    return None


def _as_list(value, n: int, what: str) -> list:
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise TLCMError(f"{len(value)} {what} for {n} prompts", f"pass one {what[:-1]} per prompt, or a single one")
    return value


def iter_generate(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    seeds: int | Sequence[int],
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    negative_prompt: str | Sequence[str] | None = None,
    images: Sequence | None = None,
    **pipe_kwargs,
) -> Iterator[list]:
    """:func:`generate`, yielding each batch's PIL images as soon as it is done."""
    prompts = list(prompts)
    if isinstance(seeds, int):
        seeds = [seeds + i for i in range(len(prompts))]
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise TLCMError(f"{len(seeds)} seeds for {len(prompts)} prompts", "pass one seed per image, or a base seed")
    if num_inference_steps < 1:
        check_steps(num_inference_steps)
    check_size(height, width)
    if batch_size < 1:
        raise TLCMError(f"batch size {batch_size} is less than 1", "use --batch-size 1 or more")
    negatives = _as_list(negative_prompt, len(prompts), "negative prompts")
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if images is not None:
        images = list(images)
        if len(images) != len(prompts):
            raise TLCMError(f"{len(images)} init images for {len(prompts)} prompts", "pass one image per prompt")
        size = {}  # img2img pipelines take the size from the image
        assert "image" not in pipe_kwargs, "pass init images either as images= (one per prompt) or image=, not both"
    for start, stop in _batches(len(prompts), batch_size, images):
        if images is not None:
            pipe_kwargs["image"] = images[start:stop]
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:stop]]
        neg = negatives[start:stop]
        out = pipe(
            prompt=prompts[start:stop],
            negative_prompt=None if all(n is None for n in neg) else [n or "" for n in neg],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="pil",
            **size,
            **pipe_kwargs,
        )
        yield list(out.images)


def _batches(n: int, batch_size: int, images: Sequence | None) -> Iterator[tuple[int, int]]:
    # Consecutive runs of at most batch_size; with init images also of one image size, since a pipeline resizes a
    # batch to its first image's size, which would make an image depend on its neighbours.
    start = 0
    while start < n:
        stop = min(start + batch_size, n)
        if images is not None:
            stop = next((i for i in range(start + 1, stop) if images[i].size != images[start].size), stop)
        yield start, stop
        start = stop


def generate(
    pipe,
    prompts: Sequence[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    seeds: int | Sequence[int],
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    negative_prompt: str | Sequence[str] | None = None,
    images: Sequence | None = None,
    **pipe_kwargs,
) -> list:
    """One PIL image per prompt from an already built pipeline, deterministic per seed.

    ``seeds`` is one seed per prompt (image ``i`` uses a CPU ``torch.Generator().manual_seed(seeds[i])`` for its
    initial noise and its scheduler noise, so the noise is the same on every device) or a base seed ``s`` meaning
    ``s, s+1, ...``; the batch size changes speed, not images. Guidance follows diffusers: ``guidance_scale > 1``
    runs classifier-free guidance, unless the UNet has a guidance embedding (``time_cond_proj_dim``), which then
    receives ``guidance_scale - 1`` instead. Extra keyword arguments go to the pipeline call (``image=``,
    ``strength=`` for img2img pipelines). ``images`` (img2img) is one init image per prompt, each batch getting
    its own (height and width then come from the images, see :func:`load_init_image`).
    """
    results: list = []
    for batch in iter_generate(pipe, prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               seeds=seeds, height=height, width=width, batch_size=batch_size,
                               negative_prompt=negative_prompt, images=images, **pipe_kwargs):
        results.extend(batch)
    return results


def make_grid(images: Sequence, cols: int | None = None):
    """Tile equally sized PIL images into one image, row by row (``cols`` defaults to a near-square layout)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``image`` as PNG atomically (temp file + ``os.replace``), with ``metadata`` as tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value, default=str))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. A missing or empty file is a user error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TLCMError(f"prompts file {str(path)!r} does not exist", "pass a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise TLCMError(f"prompts file {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start})",
                        f"convert it, e.g. iconv -f latin1 -t utf-8 {path} > prompts-utf8.txt") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise TLCMError(f"prompts file {str(path)!r} is empty (no non-blank lines)",
                        "write one prompt per line, or pass --prompt")
    return prompts


# -- img2img -------------------------------------------------------------------------------------------------------

DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def resolve_img2img(paths: Sequence[str], strength: float | None) -> tuple[list[str], float | None]:
    """Expand ``--image`` arguments (files, or folders: their images sorted by name) and check ``--strength``."""
    if not paths:
        if strength is not None:
            raise TLCMError("--strength is an img2img setting, but no --image was given",
                            "pass --image PATH (a file or a folder of images), or drop --strength")
        return [], None
    strength = DEFAULT_STRENGTH if strength is None else float(strength)
    if not 0.0 < strength <= 1.0:
        raise TLCMError(f"--strength {strength} is outside (0, 1]",
                        "use e.g. 0.3 (stay close to the image) to 1.0 (keep only its faintest trace)")
    files: list[str] = []
    for text in paths:
        p = Path(text).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TLCMError(f"image folder {text!r} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                                "pass a folder of images or the image files themselves")
            files += found
        elif p.is_file():
            files.append(str(p))
        else:
            raise TLCMError(f"init image {text!r} does not exist", "pass an image file or a folder of images")
    return files, strength


def pair_images(prompts: list[str], images: list[str]) -> tuple[list[str], list[str]]:
    """One init image per prompt: one image serves every prompt, one prompt serves every image, else pairs."""
    if len(images) == 1:
        return prompts, images * len(prompts)
    if len(prompts) == 1:
        return prompts * len(images), images
    if len(images) != len(prompts):
        raise TLCMError(f"{len(images)} init images for {len(prompts)} prompts",
                        "pass one image, one prompt, or as many images as prompts (paired in order)")
    return prompts, images


def check_strength_steps(strength: float, steps: int) -> None:
    """diffusers' img2img pipelines run the last ``int(steps * strength)`` of the ``steps`` times; 0 is an error."""
    if int(steps * strength) < 1:
        least = math.ceil(1 / strength)
        raise TLCMError(f"--strength {strength} with --steps {steps} runs int({steps} x {strength}) = 0 steps",
                        f"raise --strength to at least {1 / steps:g}, or --steps to at least {least}")


def load_init_image(path: str, height: int | None = None, width: int | None = None):
    """An init image as RGB, resized to ``height`` x ``width`` when given, else to its own size rounded down to a
    multiple of 8 (as diffusers' image processor would, with the same Lanczos filter)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise TLCMError(f"could not read the init image {path!r}: {err}",
                        "pass a PNG/JPEG/WebP image that opens in an image viewer") from err
    w, h = image.size
    target = (width or w // 8 * 8, height or h // 8 * 8)
    if min(target) < 8:
        raise TLCMError(f"init image {path!r} is {w}x{h}, smaller than 8 pixels", "use a larger image")
    check_size(target[1], target[0])
    return image if target == (w, h) else image.resize(target, Image.LANCZOS)


def _exported_defaults(model: str):
    """A fused ``tlcm export`` (folder or single file) as a student source: its sampling defaults and scheduler."""
    from tlcm.export import exported_defaults
    from tlcm.lora import LoraSource

    found = exported_defaults(model)
    if found is None:
        return None
    sampling, scheduler_config = found
    return LoraSource(str(model), "model", str(model), scheduler_config, sampling)


@dataclass
class SampleConfig:
    """Everything ``tlcm sample`` needs. ``None`` means: take it from a student LoRA folder, else the default."""

    model: str | None = None  # hub id, folder, .safetensors file or "toy"; None: the student's base_model
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    negative_prompt: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    steps: int | None = None  # student's num_inference_steps, else 4
    guidance_scale: float | None = None  # student's guidance_scale, else 1.0 (no CFG)
    gamma: float | None = None
    mode: str | None = None  # TLCMScheduler mode: lcm, tcd, segments
    keep_scheduler: bool = False  # sample with the pipeline's own scheduler (a teacher)
    seed: int = 0
    images_per_prompt: int = 1
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    out: str = "samples"
    grid: bool = False
    device: str | None = None
    dtype: str = "float32"
    config: str | None = None  # pipeline folder with configs for a single-file --model
    progress: bool = True
    images: list[str] = field(default_factory=list)  # img2img init images (files or folders); empty: text-to-image
    strength: float | None = None  # img2img strength, default DEFAULT_STRENGTH


@dataclass
class ResolvedSample:
    """A :class:`SampleConfig` with every default filled in, as written to ``sample_config.json``."""

    model: str
    prompts: list[str]
    negative_prompt: str | None
    loras: list[tuple[str, float]]
    steps: int
    guidance_scale: float
    gamma: float | None
    mode: str | None
    keep_scheduler: bool
    scheduler_config: dict | None
    seed: int
    images_per_prompt: int
    batch_size: int
    height: int | None
    width: int | None
    out: str
    grid: bool
    device: str | None
    dtype: str
    config: str | None
    warnings: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # one init image per prompt (img2img), else empty
    strength: float | None = None


def resolve(config: SampleConfig) -> ResolvedSample:
    """Validate ``config`` and fill its defaults from the first student LoRA folder, then the library defaults."""
    from tlcm.lora import describe_lora

    prompts = list(config.prompts or [])
    if config.prompts_file:
        prompts += read_prompts_file(config.prompts_file)
    if not prompts:
        raise TLCMError("no prompts given", "pass --prompt TEXT (repeatable) or --prompts-file FILE")
    if config.images_per_prompt < 1:
        raise TLCMError(f"--images-per-prompt {config.images_per_prompt} is less than 1", "use 1 or more")
    if config.batch_size < 1:
        raise TLCMError(f"--batch-size {config.batch_size} is less than 1", "use 1 or more")
    check_size(config.height, config.width)
    bad = [(p, w) for p, w in config.loras if not math.isfinite(float(w))]
    if bad:
        raise TLCMError(f"LoRA {bad[0][0]!r} has weight {bad[0][1]}, not a finite number",
                        "give a finite weight after the colon, e.g. --lora PATH:0.8")
    if config.guidance_scale is not None and (not math.isfinite(config.guidance_scale) or config.guidance_scale < 0):
        raise TLCMError(f"--guidance-scale {config.guidance_scale} is not a finite number >= 0",
                        "use 0 or 1 (no CFG) or a scale > 1")
    student = next((s for s in (describe_lora(p) for p, _ in config.loras) if s.is_student), None)
    if student is None and config.model:
        student = _exported_defaults(config.model)
    images, strength = resolve_img2img(config.images, config.strength)
    if images:
        prompts, images = pair_images(prompts, images)
    sampling = student.sampling if student else {}
    model = config.model or sampling.get("base_model")
    if not model:
        raise TLCMError("no model given", "pass --model (a hub id, a pipeline folder, a .safetensors file or 'toy')")
    steps = config.steps if config.steps is not None else int(sampling.get("num_inference_steps", DEFAULT_STEPS))
    notes = []
    note = check_steps(steps)
    if note and not config.keep_scheduler:
        notes.append(note)
    guidance = config.guidance_scale
    if guidance is None:
        guidance = float(sampling.get("guidance_scale", DEFAULT_GUIDANCE_SCALE))
    gamma = config.gamma if config.gamma is not None else sampling.get("gamma")
    mode = config.mode if config.mode is not None else sampling.get("mode")
    if mode is None and config.gamma is not None and student is None:
        mode = "tcd"  # gamma only acts in TCD-style sampling (gamma = 1 is LCM)
    if images:
        check_strength_steps(strength, steps)
    if config.keep_scheduler and (config.gamma is not None or config.mode is not None):
        raise TLCMError("--gamma/--mode configure the TLCM scheduler, but --keep-scheduler keeps the pipeline's own",
                        "drop one of them")
    return ResolvedSample(
        model=str(model), prompts=prompts, negative_prompt=config.negative_prompt, loras=list(config.loras),
        steps=steps, guidance_scale=float(guidance), gamma=None if gamma is None else float(gamma), mode=mode,
        keep_scheduler=config.keep_scheduler, scheduler_config=student.scheduler_config if student else None,
        seed=config.seed, images_per_prompt=config.images_per_prompt, batch_size=config.batch_size,
        height=config.height, width=config.width, out=str(config.out), grid=config.grid, device=config.device,
        dtype=config.dtype, config=config.config, warnings=notes, images=images, strength=strength,
    )


def _scheduler_summary(scheduler) -> dict:
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return {"class": type(scheduler).__name__, **cfg}


def prepare_pipeline(run: ResolvedSample, warn: Callable[[str], None] | None = None):
    """Load the model and LoRAs of a resolved run and put the sampling scheduler on it."""
    from tlcm.lora import load_loras
    from tlcm.models import load_pipeline

    pipe = load_pipeline(run.model, device=run.device, dtype=run.dtype, config=run.config)
    if not run.keep_scheduler:
        try:
            if run.scheduler_config is not None:
                configure_scheduler(pipe, mode=run.mode, gamma=run.gamma, config=run.scheduler_config)
            else:
                configure_scheduler(pipe, mode=run.mode or "lcm", gamma=run.gamma)
            pipe.scheduler.set_timesteps(run.steps)
        except ValueError as err:
            raise TLCMError(f"the TLCM scheduler rejects these settings: {err}",
                            "change --steps/--gamma/--mode (see docs/scheduler.md), or the student's "
                            "scheduler/scheduler_config.json") from err
    load_loras(pipe, run.loras, warn=warn)
    if run.images:
        from diffusers import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)  # same modules, LoRAs and scheduler
    return pipe


def sample(config: SampleConfig, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Generate ``images_per_prompt`` images for every prompt into ``config.out``; return the PNG paths in order.

    Image ``i`` (prompt-major) uses seed ``config.seed + i``. Each PNG carries prompt, negative prompt, seed, steps,
    guidance scale, gamma, model, LoRAs and scheduler as text chunks; ``grid.png`` tiles them when ``config.grid``;
    ``sample_config.json`` records the resolved settings.
    """
    from tqdm.auto import tqdm

    warn = warn or (lambda text: warnings.warn(text, UserWarning, stacklevel=3))
    run = resolve(config)
    for note in run.warnings:
        warn(note)
    loaded = {path: load_init_image(path, run.height, run.width) for path in dict.fromkeys(run.images)}
    from tlcm.runlock import check_output_folder

    out = Path(run.out).expanduser()
    check_output_folder(out, "--out")  # before the model loads
    pipe = prepare_pipeline(run, warn)
    from tlcm.models import prompt_token_overflow

    limit, long = prompt_token_overflow(pipe, run.prompts)
    if long:
        warn(f"{len(long)} of {len(run.prompts)} prompts are longer than the text encoder's limit of {limit} tokens "
             f"and are truncated to it (first: prompt #{long[0]}, {run.prompts[long[0]][:60]!r}...)")
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(p, k) for p in range(len(run.prompts)) for k in range(run.images_per_prompt)]
    seeds = [run.seed + i for i in range(len(jobs))]
    scheduler = _scheduler_summary(pipe.scheduler)
    common = {
        "negative_prompt": run.negative_prompt or "",
        "steps": str(run.steps),
        "guidance_scale": str(run.guidance_scale),
        "gamma": "" if run.gamma is None else str(run.gamma),
        "model": run.model,
        "loras": json.dumps([[p, w] for p, w in run.loras]),
        "scheduler": json.dumps(scheduler, default=str),
    }
    img2img = {}
    if run.images:
        common["strength"] = str(run.strength)
        img2img = {"images": [loaded[run.images[p]] for p, _ in jobs], "strength": run.strength}
    height, width = run.height, run.width
    paths: list[Path] = []
    images = []
    bar = tqdm(total=len(run.prompts), unit="prompt", desc="sampling", disable=not config.progress)
    done = 0
    batches = iter_generate(
        pipe, [run.prompts[p] for p, _ in jobs], num_inference_steps=run.steps, guidance_scale=run.guidance_scale,
        seeds=seeds, height=height, width=width, batch_size=run.batch_size, negative_prompt=run.negative_prompt,
        **img2img,
    )
    for batch in batches:
        for image in batch:
            p, k = jobs[done]
            meta = {"prompt": run.prompts[p], "seed": str(seeds[done]), **common,
                    "prompt_index": str(p), "image_index": str(k)}
            if run.images:
                meta["image"] = run.images[p]
            paths.append(save_png(image, out / f"{p:04d}_{k:02d}_seed{seeds[done]}.png", meta))
            if run.grid:
                images.append(image)
            done += 1
        bar.update(done // run.images_per_prompt - bar.n)
    bar.close()
    if run.grid:
        cols = run.images_per_prompt if run.images_per_prompt > 1 else None
        save_png(make_grid(images, cols), out / "grid.png", {"prompts": json.dumps(run.prompts), **common})
    record = {k: v for k, v in asdict(run).items() if k != "warnings"}
    record["scheduler"] = scheduler
    _write_text(out / "sample_config.json", json.dumps(record, indent=2, default=str) + "\n")
    return paths
