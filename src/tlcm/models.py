"""Loading teachers and turning prompts into UNet conditioning, for SD1.5/2.1-like and SDXL-like pipelines.

One code path serves a hub id, a local ``save_pretrained`` folder and the shipped toy teacher (``"toy"``): all go
through ``DiffusionPipeline.from_pretrained``. A single ``.safetensors``/``.ckpt`` checkpoint (A1111/ComfyUI style) goes
through ``from_single_file`` of the SD or SDXL pipeline class, picked from the checkpoint's keys; offline it needs
``config=`` (a local pipeline folder with the matching component configs). Text conditioning is computed by the
pipeline's own ``encode_prompt`` so training sees exactly the states that inference will.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tlcm.errors import TLCMError
from tlcm.sd_config import STABLE_DIFFUSION_SCHEDULER_CONFIG  # noqa: F401  (re-exported: tlcm.models' public name)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp16"``/``"float16"``/... to a torch dtype, with a clear error for anything else."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise TLCMError(f"unknown dtype {name!r}", f"use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when present, else CPU; an unknown or unavailable device is a user error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise TLCMError(f"unknown device {str(device)!r}", "pass --device cpu, cuda, cuda:N or mps (or auto)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TLCMError(f"device {str(device)!r} requested but CUDA is not available", "pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TLCMError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA device(s) "
                            "exist", f"pass --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TLCMError(f"device {str(device)!r} requested but MPS is not available", "pass --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, dev.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise TLCMError(f"device {str(device)!r} is not available in this PyTorch installation",
                            "pass --device cpu or cuda")
    return dev


def prompt_token_overflow(pipe, prompts: list[str]) -> tuple[int | None, list[int]]:
    """``(token limit, indices of the prompts longer than it)`` for the pipeline's (first) tokenizer: text encoders
    truncate such prompts silently, so callers warn with the limit."""
    tok = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    limit = getattr(tok, "model_max_length", None)
    if tok is None or not isinstance(limit, int) or limit > 100_000:
        return None, []
    long = []
    for start in range(0, len(prompts), 4096):
        batch = prompts[start:start + 4096]
        ids = tok(batch, truncation=False, add_special_tokens=True, verbose=False)["input_ids"]
        long += [start + i for i, x in enumerate(ids) if len(x) > limit]
    return limit, long


def resolve_model_path(model: str) -> str:
    """Map ``"toy"`` to the shipped toy teacher's folder; check local folders; leave hub ids as they are."""
    if model == "toy":
        try:
            from tlcm.toy import teacher_path
        except ImportError as err:  # pragma: no cover - the toy world ships with the package
            raise TLCMError("the toy teacher is not available in this installation", "reinstall tlcm") from err
        return str(teacher_path())
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
    if looks_local:
        if not path.exists():
            raise TLCMError(f"model path {model!r} does not exist",
                            "pass a diffusers pipeline folder, a hub id such as 'org/name', or 'toy'")
        if path.is_dir() and not (path / "model_index.json").exists():
            raise TLCMError(f"{model!r} is a folder without model_index.json, so it is not a diffusers pipeline",
                            "pass the folder written by pipe.save_pretrained(), or a single .safetensors checkpoint")
    return str(path) if looks_local else model


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    # diffusers renamed ``torch_dtype`` to ``dtype`` (0.36); older releases only know the first.
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.36") else "torch_dtype": dtype}


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def is_single_file_checkpoint(model: str | Path) -> bool:
    """True for a local file with a checkpoint suffix (``.safetensors``, ``.ckpt``, ...), as ``--model`` accepts."""
    path = Path(str(model)).expanduser()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES and path.is_file()


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a single-file checkpoint, read without loading the tensors where the format allows."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise TLCMError(f"could not read the checkpoint {str(path)!r}: {str(err).splitlines()[0] if str(err) else err}",
                        "pass an intact .safetensors/.ckpt Stable Diffusion checkpoint") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return list(state) if isinstance(state, dict) else []


def is_sdxl_checkpoint(keys: list[str]) -> bool:
    """SDXL single files carry a second text encoder (``conditioner.embedders.1``) and the ``label_emb`` of its UNet."""
    return any(k.startswith(("conditioner.embedders.1.", "model.diffusion_model.label_emb.")) for k in keys)


def _single_file_pipeline(path: Path, model: str, config: str | Path | None, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    keys = checkpoint_keys(path)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise TLCMError(f"{model!r} has no 'model.diffusion_model.*' tensors, so it is not a Stable Diffusion "
                        "checkpoint",
                        "pass a full SD1.x/2.x/SDXL checkpoint; a LoRA file goes to --lora, not --model")
    sdxl = is_sdxl_checkpoint(keys)
    kwargs: dict = {}
    if config is not None:
        cfg = Path(config).expanduser()
        if not (cfg / "model_index.json").is_file():
            raise TLCMError(f"--config {str(config)!r} is not a diffusers pipeline folder (no model_index.json)",
                            "pass a local folder written by save_pretrained (or a downloaded hub snapshot) with the "
                            "configs that match the checkpoint")
        class_name = json.loads((cfg / "model_index.json").read_text()).get("_class_name", "")
        if "XL" in class_name:
            sdxl = True
        elif class_name:
            sdxl = False
        kwargs["config"] = str(cfg)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), **kwargs, **_dtype_kwarg(dtype))
    except Exception as err:  # diffusers raises many types here (OSError, ValueError, HTTP errors, KeyError)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if config is None:
            raise TLCMError(
                f"could not load the single-file checkpoint {model!r} as {cls.__name__}: {first}",
                "diffusers needs the original model's component configs, which it fetches from the hub; offline, "
                "pass --config DIR with a local pipeline folder of the same architecture (e.g. a saved SD1.5 or SDXL "
                "base pipeline)",
            ) from err
        raise TLCMError(
            f"could not load the single-file checkpoint {model!r} with the configs in {str(config)!r}: {first}",
            "check that --config is a pipeline of the same architecture as the checkpoint (SD1.x vs SDXL)",
        ) from err


def load_pipeline(
    model: str,
    device: str | torch.device | None = "cpu",
    dtype: str | torch.dtype = torch.float32,
    config: str | Path | None = None,
):
    """Load a text-to-image pipeline (hub id, local folder, ``"toy"`` or a single-file checkpoint) onto ``device``.

    ``config`` is only used for single-file checkpoints: a local pipeline folder whose component configs match it.
    """
    from diffusers import DiffusionPipeline

    dtype = parse_dtype(dtype)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    source = resolve_model_path(model)
    if is_single_file_checkpoint(source):
        pipe = _single_file_pipeline(Path(source), model, config, dtype)
    else:
        if Path(source).is_file():
            raise TLCMError(f"model path {model!r} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})",
                            "pass a diffusers pipeline folder, a hub id, 'toy' or a .safetensors checkpoint")
        try:
            pipe = DiffusionPipeline.from_pretrained(source, **_dtype_kwarg(dtype))
        except (OSError, ValueError, KeyError) as err:
            raise TLCMError(
                f"could not load a diffusers pipeline from {model!r}: {str(err).splitlines()[0]}",
                "check the hub id or path; without internet, a hub id must already be in the local HF cache",
            ) from err
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise TLCMError(f"{model!r} loaded as {type(pipe).__name__}, which has no UNet and VAE",
                        "tlcm distils latent UNet pipelines (Stable Diffusion 1.x/2.x, SDXL and fine-tunes)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_image_size(pipe) -> tuple[int, int]:
    """The (height, width) a pipeline generates when none is given: UNet sample size times the VAE factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return h * pipe.vae_scale_factor, w * pipe.vae_scale_factor


def is_sdxl(pipe) -> bool:
    """SDXL-like pipelines carry a second text encoder and ``text_time`` added conditioning."""
    return getattr(pipe, "text_encoder_2", None) is not None or (
        getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
    )


@dataclass
class Conditioning:
    """What the UNet needs besides ``(z_t, t)``: ``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs``."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict[str, torch.Tensor] | None = None

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kw["added_cond_kwargs"] = self.added_cond_kwargs
        return kw

    def index(self, idx) -> Conditioning:
        extra = None if self.added_cond_kwargs is None else {k: v[idx] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[idx], extra)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        extra = None
        if items[0].added_cond_kwargs is not None:
            extra = {k: torch.cat([c.added_cond_kwargs[k] for c in items]) for k in items[0].added_cond_kwargs}
        return Conditioning(torch.cat([c.encoder_hidden_states for c in items]), extra)

    def to(self, device=None, dtype=None) -> Conditioning:
        extra = None
        if self.added_cond_kwargs is not None:
            extra = {k: v.to(device=device, dtype=dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(device=device, dtype=dtype), extra)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], height: int | None = None, width: int | None = None) -> Conditioning:
    """UNet conditioning for ``prompts`` via the pipeline's own ``encode_prompt`` (``""`` is the unconditional)."""
    device = pipe.unet.device
    if is_sdxl(pipe):
        h = height or pipe.default_sample_size * pipe.vae_scale_factor
        w = width or pipe.default_sample_size * pipe.vae_scale_factor
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        proj_dim = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        time_ids = pipe._get_add_time_ids(
            (h, w), (0, 0), (h, w), dtype=embeds.dtype, text_encoder_projection_dim=proj_dim
        ).to(device)
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)})
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return Conditioning(embeds)


def zero_conditioning(cond: Conditioning) -> Conditioning:
    """The zeroed unconditional branch: all-zero text states (and SDXL pooled embeds), the size conditioning (SDXL
    time ids) kept, as diffusers' SDXL pipeline builds it for ``force_zeros_for_empty_prompt``."""
    extra = None
    if cond.added_cond_kwargs is not None:
        extra = {"text_embeds": torch.zeros_like(cond.added_cond_kwargs["text_embeds"]),
                 "time_ids": cond.added_cond_kwargs["time_ids"]}
    return Conditioning(torch.zeros_like(cond.encoder_hidden_states), extra)


def zeros_for_empty_negatives(pipe, mode: str = "auto", manifest: dict | None = None) -> bool:
    """Whether an empty negative prompt means the zeroed unconditional branch (``mode="auto"``): diffusers' rule for
    SDXL pipelines with ``force_zeros_for_empty_prompt`` when no negative prompt is given, applied per data set as
    the synthesizer applies it (a data set with negative prompts encodes its empty ones as ``""``)."""
    if mode != "auto" or not is_sdxl(pipe) or not getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        return False
    return not ((manifest or {}).get("generation") or {}).get("has_negative_prompts", False)
