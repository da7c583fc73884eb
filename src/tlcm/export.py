"""``tlcm export``: a student (a ``tlcm distill`` folder, or any LoRA :mod:`tlcm.lora` reads) in the formats other
clients load.

* ``kohya``: one ``.safetensors`` LoRA with ``lora_unet_*.lora_down/lora_up/alpha`` keys and kohya's ``ss_*``
  metadata, for ComfyUI, A1111/Forge and diffusers' ``load_lora_weights`` (naming: :mod:`tlcm.convert`);
* ``peft``: an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for
  ``PeftModel.from_pretrained(unet, path)``;
* ``fused``: a diffusers pipeline folder with the LoRA merged into the UNet (a full-UNet student replaces it), the
  student's scheduler installed and its ``tlcm_sampling.json`` defaults carried over; with ``single_file`` instead an
  original-layout checkpoint (``from_single_file``, ComfyUI/A1111 checkpoint loaders) carrying those defaults as
  ``tlcm.*`` metadata.

The student is loaded exactly as ``tlcm sample`` loads it (base pipeline, then the LoRA through diffusers' peft
integration), so a LoRA for another base model fails here with the same clear error; the formats are then read off
the loaded modules, which makes every output the network that was loaded, whatever format the student came in.
Every output is written to a temporary name next to ``out`` and renamed into place.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlcm.errors import TLCMError

FORMATS = ("kohya", "peft", "fused")
SAMPLING_FILE = "tlcm_sampling.json"
SINGLE_FILE_SAMPLING_KEY = "tlcm.sampling"
SINGLE_FILE_SCHEDULER_KEY = "tlcm.scheduler"
# TLCMScheduler settings under which it is diffusers' LCMScheduler operation for operation (docs/scheduler.md)
LCM_EQUIVALENT = {"mode": "lcm", "boundary_condition": "lcm", "timestep_grid": "lcm"}


@dataclass
class ExportConfig:
    """Everything ``tlcm export`` needs."""

    student: str  # a tlcm distill folder, a peft adapter folder or a LoRA .safetensors file
    to: str  # kohya | peft | fused
    out: str
    model: str | None = None  # the base model; default: the student's tlcm_sampling.json base_model
    config: str | None = None  # pipeline folder with the component configs of a single-file base model
    single_file: bool = False  # fused only: one original-layout .safetensors checkpoint instead of a folder
    dtype: str = "float32"  # dtype of the written weights (the LoRA is loaded and fused in float32)
    scale: float = 1.0  # fused only: the LoRA weight to merge with
    overwrite: bool = False
    device: str | None = "cpu"


@dataclass
class Student:
    """What a student path holds: a LoRA (``lora``: its path for :func:`tlcm.lora.load_loras`) or a full UNet."""

    path: str
    lora: str | None = None
    unet_dir: str | None = None
    scheduler_config: dict | None = None
    sampling: dict = field(default_factory=dict)


def read_student(path: str | Path) -> Student:
    """Resolve a student path. A ``tlcm distill`` folder's ``adapter/`` (peft, with its exact ``LoraConfig``) is
    preferred over its diffusers file, whose keys do not record ``lora_alpha``."""
    from tlcm.lora import PEFT_CONFIG_FILE, describe_lora

    p = Path(path).expanduser()
    if not p.exists():
        raise TLCMError(f"student {str(path)!r} does not exist",
                        "pass a folder written by `tlcm distill`, a peft adapter folder or a LoRA .safetensors file")
    if p.is_dir() and (p / "unet" / "config.json").is_file() and not any(
            (p / name).exists() for name in ("pytorch_lora_weights.safetensors", "adapter", PEFT_CONFIG_FILE)):
        from tlcm.lora import STUDENT_SAMPLING_FILE, STUDENT_SCHEDULER_CONFIG, _read_json

        sched = _read_json(p / STUDENT_SCHEDULER_CONFIG) if (p / STUDENT_SCHEDULER_CONFIG).is_file() else None
        sampling = _read_json(p / STUDENT_SAMPLING_FILE) if (p / STUDENT_SAMPLING_FILE).is_file() else {}
        return Student(str(path), unet_dir=str(p / "unet"), scheduler_config=sched, sampling=sampling)
    try:
        source = describe_lora(str(p))
    except TLCMError as err:
        raise TLCMError(f"{str(path)!r} is not a student folder: {err.problem}",
                        "pass a folder written by `tlcm distill` (it holds pytorch_lora_weights.safetensors and "
                        "adapter/, or unet/ for a full student), a peft adapter folder or a LoRA file") from err
    lora = source.load_path
    if p.is_dir() and (p / "adapter" / PEFT_CONFIG_FILE).is_file():
        lora = str(p / "adapter")
    return Student(str(path), lora=lora, scheduler_config=source.scheduler_config, sampling=dict(source.sampling))


# -- output paths ---------------------------------------------------------------------------------------------------


def _check_out(out: Path, is_file: bool, overwrite: bool, marker: str | None) -> None:
    if is_file and out.suffix.lower() != ".safetensors":
        raise TLCMError(f"--out {str(out)!r} must be a .safetensors file for this format",
                        f"use e.g. --out {out.with_suffix('.safetensors').name}")
    if not out.exists():
        if not out.parent.exists():
            raise TLCMError(f"the folder {str(out.parent)!r} of --out does not exist", "create it first")
        return
    if not overwrite:
        raise TLCMError(f"{str(out)!r} already exists", "pass --overwrite to replace it, or choose another --out")
    if is_file and out.is_dir():
        raise TLCMError(f"{str(out)!r} is a folder, but this format writes one file", "choose a file path for --out")
    if not is_file:
        if out.is_file():
            raise TLCMError(f"{str(out)!r} is a file, but this format writes a folder", "choose a folder for --out")
        if any(out.iterdir()) and not (marker and (out / marker).exists()):
            raise TLCMError(f"{str(out)!r} is a non-empty folder that is not a previous export (no {marker}); "
                            "--overwrite only replaces exports", "choose another --out or delete it yourself")


def _atomic_file(out: Path, write: Callable[[Path], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a ``.safetensors`` header in place with its metadata keys sorted.

    safetensors serialises the metadata from a Rust ``HashMap``, so the same metadata comes out in a different order
    in every process; sorting it makes equal exports equal bytes. The tensors' entries and offsets are kept.
    """
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")
        assert len(text) <= size, "the sorted safetensors header is longer than the original"
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    sort_safetensors_metadata(path)


def _atomic_dir(out: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a fresh folder beside ``out``, then swap it in (the old one is removed only after)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        write(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# -- loading --------------------------------------------------------------------------------------------------------


def _raise(text: str) -> None:
    raise TLCMError(f"{text}; an export would silently drop those layers",
                    "export on the base model the LoRA was trained for (--model)")


def load_for_export(student: Student, model: str, config: str | None = None, device: str | None = "cpu"):
    """The base pipeline in float32 with the student on it; returns ``(pipe, adapter_names)``."""
    from tlcm.lora import load_loras
    from tlcm.models import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=torch.float32, config=config)
    if student.unet_dir is not None:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(student.unet_dir).to(torch.float32)
        base = dict(pipe.unet.config)
        mismatch = [k for k in ("block_out_channels", "cross_attention_dim", "down_block_types", "in_channels",
                                "addition_embed_type") if base.get(k) != unet.config.get(k)]
        if mismatch:
            raise TLCMError(f"the student UNet in {student.unet_dir!r} does not match the base model {model!r} "
                            f"({mismatch[0]}: {unet.config.get(mismatch[0])} vs {base.get(mismatch[0])})",
                            "pass the base model the student was distilled from with --model")
        pipe.unet = unet.to(pipe.device)
        return pipe, []
    return pipe, load_loras(pipe, [(student.lora, 1.0)], warn=_raise)


def lora_layers(unet, adapter: str):
    """The adapter's layers on ``unet`` as :class:`tlcm.convert.LoraWeights` (scale = alpha / rank as loaded)."""
    from peft.tuners.lora import LoraLayer

    from tlcm.convert import LoraWeights

    layers = []
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
            raise TLCMError(f"layer {name!r} of the LoRA uses DoRA or a LoRA bias, which kohya files cannot hold",
                            "export it with --to peft or --to fused")
        rank = module.r[adapter]
        layers.append(LoraWeights(name, module.lora_A[adapter].weight.detach().cpu(),
                                  module.lora_B[adapter].weight.detach().cpu(), float(module.scaling[adapter]) * rank))
    return layers


def _unet_only(pipe, names: list[str], fmt: str) -> str:
    if not names:
        raise TLCMError(f"the student is a full UNet, not a LoRA, so there is nothing to write as a {fmt} LoRA",
                        "export it with --to fused (a pipeline folder or, with --single-file, a checkpoint)")
    (name,) = names
    others = sorted(c for c, adapters in pipe.get_list_adapters().items() if name in adapters and c != "unet")
    if others:
        raise TLCMError(f"the LoRA also adapts {', '.join(others)}; {fmt} export writes UNet LoRAs only",
                        "export it with --to fused, which merges every component")
    return name


# -- formats --------------------------------------------------------------------------------------------------------


def base_model_version(pipe) -> tuple[str, str]:
    """kohya's ``ss_base_model_version`` and the modelspec architecture of ``pipe``'s family."""
    from tlcm.models import is_sdxl

    if is_sdxl(pipe):
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base"
    if pipe.unet.config.cross_attention_dim == 1024:
        return "sd_v2", "stable-diffusion-v2-512"
    return "sd_v1", "stable-diffusion-v1"


def kohya_state(pipe, adapter: str, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya state dict and metadata of ``adapter`` on ``pipe`` (sgm names for SDXL, diffusers names else)."""
    from tlcm.convert import kohya_lora
    from tlcm.models import is_sdxl

    layers = lora_layers(pipe.unet, adapter)
    naming = "sgm" if is_sdxl(pipe) else "diffusers"
    state = kohya_lora(layers, naming, pipe.unet.config, dtype=dtype)
    ranks = sorted({layer.rank for layer in layers})
    alphas = sorted({layer.alpha for layer in layers})
    version, arch = base_model_version(pipe)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(alphas[-1] if len(alphas) == 1 else max(alphas)),
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_network_args": json.dumps({"conv_dim": str(ranks[-1]), "conv_alpha": str(alphas[-1])}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "tlcm.kohya_naming": naming,
        "tlcm.layers": str(len(layers)),
    }
    if len(ranks) > 1:
        meta["tlcm.ranks"] = json.dumps(ranks)
    return state, meta


def student_scheduler(pipe, student: Student):
    """The scheduler the student samples with, as diffusers' ``LCMScheduler`` when that is operation-for-operation
    the same sampler (so the pipeline loads without tlcm), else ``TLCMScheduler``."""
    from diffusers import LCMScheduler

    from tlcm.scheduler import TLCMScheduler

    if student.scheduler_config is not None:
        sched = TLCMScheduler.from_config(student.scheduler_config)
    else:
        sched = TLCMScheduler.from_config(pipe.scheduler.config, mode=student.sampling.get("mode", "lcm"))
    if all(sched.config[k] == v for k, v in LCM_EQUIVALENT.items()):
        known = inspect.signature(LCMScheduler.__init__).parameters
        return LCMScheduler.from_config({k: v for k, v in sched.config.items() if k in known})
    return sched


def _sampling_record(student: Student, model: str, cfg: ExportConfig) -> dict:
    sampling = {k: v for k, v in student.sampling.items() if k != "base_model"}
    sampling["exported_from"] = {"student": str(student.path), "base_model": str(model), "scale": cfg.scale}
    return sampling


def fuse(pipe, names: list[str], scale: float) -> None:
    """Merge the loaded LoRA into the weights (``W + scale * alpha/r * B A``) and remove the adapter layers."""
    if names:
        pipe.fuse_lora(lora_scale=scale, adapter_names=names)
        pipe.unload_lora_weights()
    from peft.tuners.lora import LoraLayer

    left = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert not left, f"LoRA layers left after fusing: {left[:3]}"


def single_file_state(pipe, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``pipe`` (SD1.x or SDXL) as one original-layout state dict: UNet, VAE and text encoder(s)."""
    from tlcm.convert import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
    from tlcm.models import is_sdxl

    version, _ = base_model_version(pipe)
    if version == "sd_v2":
        raise TLCMError("single-file export supports SD1.x and SDXL; SD2.x checkpoints store an OpenCLIP text "
                        "encoder with a layer diffusers does not keep", "export SD2.x students as a fused folder")
    expected = {"text_encoder": "CLIPTextModel"}
    if is_sdxl(pipe):
        expected["text_encoder_2"] = "CLIPTextModelWithProjection"
    for name, cls in expected.items():
        found = type(getattr(pipe, name, None)).__name__
        if found != cls:
            raise TLCMError(f"the pipeline's {name} is {found}, but original-layout checkpoints of the SD family "
                            f"hold a {cls} there (is this the toy world, or an SDXL refiner?)",
                            "export it as a fused folder (--to fused without --single-file)")
    state = {**unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config), **vae_to_ldm(pipe.vae.state_dict(),
                                                                                   pipe.vae.config)}
    if is_sdxl(pipe):
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        enc2 = pipe.text_encoder_2
        state.update(open_clip_to_ldm(enc2.state_dict(), "conditioner.embedders.1.model.",
                                      enc2.config.num_hidden_layers))
    else:
        state.update(clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}


def _model_card(cfg: ExportConfig, model: str, sched_name: str, sampling: dict) -> str:
    steps = sampling.get("num_inference_steps", 4)
    guidance = sampling.get("guidance_scale", 1.0)
    return "\n".join([
        f"# `{cfg.student}` fused into `{model}`",
        "",
        f"Written by `tlcm export --to fused` (LoRA scale {cfg.scale}). The scheduler is `{sched_name}`"
        + (" (needs `pip install tlcm`)." if sched_name == "TLCMScheduler" else "."),
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained(DIR)",
        f"image = pipe(prompt, num_inference_steps={steps}, guidance_scale={guidance}).images[0]",
        "```",
        "",
        f"or `tlcm sample --model DIR --prompt \"...\"` (defaults from `{SAMPLING_FILE}`).",
        "",
    ])


def export(cfg: ExportConfig) -> Path:
    """Write ``cfg.student`` as ``cfg.to`` to ``cfg.out``; returns the path written."""
    from tlcm.models import parse_dtype

    if cfg.to not in FORMATS:
        raise TLCMError(f"unknown export format {cfg.to!r}", f"use one of {', '.join(FORMATS)}")
    if cfg.single_file and cfg.to != "fused":
        raise TLCMError("--single-file is an option of --to fused", "drop it, or use --to fused --single-file")
    if cfg.scale != 1.0 and cfg.to != "fused":
        raise TLCMError("--scale applies when fusing; a LoRA file's weight is chosen where it is loaded",
                        "drop --scale, or use --to fused")
    dtype = parse_dtype(cfg.dtype)
    out = Path(cfg.out).expanduser()
    is_file = cfg.to == "kohya" or cfg.single_file
    marker = {"peft": "adapter_config.json", "fused": "model_index.json"}.get(cfg.to)
    _check_out(out, is_file, cfg.overwrite, marker)
    student = read_student(cfg.student)
    model = cfg.model or student.sampling.get("base_model")
    if not model:
        raise TLCMError(f"the student {cfg.student!r} does not record its base model",
                        "pass --model (the hub id, folder or checkpoint the LoRA was trained on)")
    pipe, names = load_for_export(student, str(model), cfg.config, cfg.device)

    if cfg.to == "kohya":
        state, meta = kohya_state(pipe, _unet_only(pipe, names, "kohya"), dtype)
        meta.update({"ss_sd_model_name": str(model), "ss_output_name": out.stem, "modelspec.title": out.stem})
        if student.scheduler_config is not None:
            meta[SINGLE_FILE_SCHEDULER_KEY] = json.dumps(student.scheduler_config, sort_keys=True)
        meta[SINGLE_FILE_SAMPLING_KEY] = json.dumps(_sampling_record(student, model, cfg), sort_keys=True)
        _atomic_file(out, lambda tmp: _save_safetensors(state, tmp, meta))
        return out

    if cfg.to == "peft":
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        name = _unet_only(pipe, names, "peft")
        config = pipe.unet.peft_config[name]
        state = {f"base_model.model.{k}": v.detach().to("cpu", dtype).contiguous()
                 for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=name).items()}

        def write_peft(tmp: Path) -> None:
            config.save_pretrained(str(tmp))
            data = json.loads((tmp / "adapter_config.json").read_text())
            data["base_model_name_or_path"] = str(model)
            if isinstance(data.get("target_modules"), list):
                data["target_modules"] = sorted(data["target_modules"])
            (tmp / "adapter_config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

        _atomic_dir(out, write_peft)
        return out

    fuse(pipe, names, cfg.scale)
    scheduler = student_scheduler(pipe, student)
    sampling = _sampling_record(student, model, cfg)
    if cfg.single_file:
        state = single_file_state(pipe, dtype)
        _, arch = base_model_version(pipe)
        meta = {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch,
                "modelspec.title": out.stem, SINGLE_FILE_SAMPLING_KEY: json.dumps(sampling, sort_keys=True),
                SINGLE_FILE_SCHEDULER_KEY: json.dumps(json.loads(scheduler.to_json_string()), sort_keys=True)}
        _atomic_file(out, lambda tmp: _save_safetensors(state, tmp, meta))
        return out

    pipe.scheduler = scheduler
    if dtype != torch.float32:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                component.to(dtype=dtype)

    def write_folder(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_model_card(cfg, str(model), type(scheduler).__name__, sampling))

    _atomic_dir(out, write_folder)
    return out


# -- reading the defaults back (tlcm sample --model EXPORT) ---------------------------------------------------------


def exported_defaults(model: str | Path) -> tuple[dict, dict | None] | None:
    """``(sampling defaults, scheduler config)`` baked into a fused export (folder or single file), else ``None``.

    Lets ``tlcm sample --model EXPORT`` sample as ``--model BASE --lora STUDENT`` would.
    """
    p = Path(str(model)).expanduser()
    try:
        if p.is_dir() and (p / SAMPLING_FILE).is_file() and (p / "model_index.json").is_file():
            sampling = json.loads((p / SAMPLING_FILE).read_text())
            sched_file = p / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched_file.read_text()) if sched_file.is_file() else None
            return sampling, sched
        if p.is_file() and p.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            is_lora = meta.get("modelspec.architecture", "").endswith("/lora")
            if SINGLE_FILE_SAMPLING_KEY in meta and SINGLE_FILE_SCHEDULER_KEY in meta and not is_lora:
                return json.loads(meta[SINGLE_FILE_SAMPLING_KEY]), json.loads(meta[SINGLE_FILE_SCHEDULER_KEY])
    except (OSError, ValueError) as err:
        raise TLCMError(f"could not read the tlcm defaults of {str(model)!r}: {err}",
                        "re-export the model with `tlcm export`, or delete its tlcm_sampling.json") from err
    return None
