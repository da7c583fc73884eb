"""LoRAs on diffusers pipelines: loading (diffusers/kohya files, peft adapter folders, tlcm student folders).

Three on-disk formats are accepted wherever a LoRA is asked for (``tlcm sample --lora``, :func:`load_loras`):

* a ``.safetensors`` (or ``.bin``) file in any format ``pipe.load_lora_weights`` reads: diffusers (``unet.*``/
  ``text_encoder.*`` keys, the format LCM-LoRA ships in), kohya/A1111 (``lora_unet_*``), and peft-style keys;
* a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
  writes it, the format the official TLCM SDXL LoRA ships in): the config's ``LoraConfig`` (rank, alpha, target
  modules, rank/alpha patterns) is kept exactly and the weights go onto ``pipe.unet`` through diffusers' peft
  integration, so several LoRAs of different formats combine with ``set_adapters``;
* a tlcm student folder written by our trainer: ``pytorch_lora_weights.safetensors`` (diffusers format) and/or
  ``adapter/`` (peft folder), plus ``scheduler/scheduler_config.json`` (the sampler the student was trained for) and
  ``tlcm_sampling.json`` (guidance scale, steps, base model). :func:`describe_lora` reads those defaults.

A LoRA that does not fit the UNet (no key matches a module, or shapes differ) is a :class:`TLCMError` that names the
file and says it was trained for a different base model.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlcm.errors import TLCMError

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
STUDENT_SAMPLING_FILE = "tlcm_sampling.json"
STUDENT_SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


@dataclass
class LoraSource:
    """What a ``--lora`` argument points at, resolved: the format, the file or folder to load, student defaults."""

    path: str
    kind: str  # "file" (diffusers/kohya weights), "peft" (adapter folder), "hub" (a hub LoRA repo id)
    load_path: str
    scheduler_config: dict | None = None
    sampling: dict = field(default_factory=dict)

    @property
    def is_student(self) -> bool:
        return self.scheduler_config is not None or bool(self.sampling)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``"PATH"`` or ``"PATH:WEIGHT"`` (the weight after the last colon, when it parses as a number) to a spec."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TLCMError(f"could not read {str(path)!r}: {err}", "fix or delete the file") from err
    if not isinstance(data, dict):
        raise TLCMError(f"{str(path)!r} does not hold a JSON object", "fix or delete the file")
    return data


def describe_lora(path: str | Path) -> LoraSource:
    """Resolve a ``--lora`` argument: its format, what to load, and a student folder's sampling defaults."""
    text = str(path)
    p = Path(text).expanduser()
    if not p.exists():
        looks_hub = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not p.suffix
        if looks_hub:
            return LoraSource(text, "hub", text)
        raise TLCMError(f"LoRA path {text!r} does not exist",
                        "pass a .safetensors LoRA file, a peft adapter folder, a tlcm student folder or a hub id")
    if p.is_file():
        if p.suffix.lower() not in (".safetensors", ".bin", ".pt", ".pth"):
            raise TLCMError(f"LoRA file {text!r} is not a .safetensors/.bin file",
                            "pass a LoRA saved by diffusers, kohya/A1111 or peft")
        return LoraSource(text, "file", str(p))
    scheduler_config = None
    if (p / STUDENT_SCHEDULER_CONFIG).is_file():
        scheduler_config = _read_json(p / STUDENT_SCHEDULER_CONFIG)
    sampling = _read_json(p / STUDENT_SAMPLING_FILE) if (p / STUDENT_SAMPLING_FILE).is_file() else {}
    if (p / DIFFUSERS_LORA_FILE).is_file():
        return LoraSource(text, "file", str(p / DIFFUSERS_LORA_FILE), scheduler_config, sampling)
    for folder in (p, p / "adapter"):
        if (folder / PEFT_CONFIG_FILE).is_file():
            return LoraSource(text, "peft", str(folder), scheduler_config, sampling)
    files = sorted(f.name for f in p.glob("*.safetensors"))
    if len(files) == 1:
        return LoraSource(text, "file", str(p / files[0]), scheduler_config, sampling)
    raise TLCMError(
        f"LoRA folder {text!r} holds neither {DIFFUSERS_LORA_FILE}, an adapter_config.json (peft) nor a single "
        f".safetensors file" + (f" (found {', '.join(files)})" if files else ""),
        "pass the LoRA file itself, a peft adapter folder, or a folder written by `tlcm distill`",
    )


def _adapter_name(path: str, index: int, taken: set[str]) -> str:
    stem = Path(path.rstrip("/")).stem if Path(path).suffix else Path(path.rstrip("/")).name
    base = re.sub(r"[^0-9A-Za-z_]", "_", stem)[:40] or "lora"
    name, n = f"{base}", 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


def read_peft_adapter(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A peft adapter folder as (UNet-relative peft state dict, ``LoraConfig`` kwargs).

    Keys lose peft's ``base_model.model.`` wrapper and any ``unet.`` prefix, keeping ``<module>.lora_A.weight``.
    """
    from peft import LoraConfig

    folder = Path(folder)
    config = _read_json(folder / PEFT_CONFIG_FILE)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise TLCMError(f"{str(folder)!r} is a peft {peft_type} adapter, not a LoRA", "pass a LoRA adapter folder")
    weights = next((folder / f for f in PEFT_WEIGHT_FILES if (folder / f).is_file()), None)
    if weights is None:
        raise TLCMError(f"peft adapter folder {str(folder)!r} has adapter_config.json but no weights",
                        f"it must also hold {' or '.join(PEFT_WEIGHT_FILES)}")
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(weights))
    else:
        raw = torch.load(str(weights), map_location="cpu", weights_only=True)
    state = {}
    for key, value in raw.items():
        for prefix in ("base_model.model.", "unet."):
            key = key.removeprefix(prefix)
        state[key] = value
    allowed = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in config.items() if k in allowed}
    for drop in ("base_model_name_or_path", "revision", "inference_mode", "task_type", "auto_mapping", "peft_type"):
        kwargs.pop(drop, None)
    return state, kwargs


def _mismatch(source: LoraSource, err: BaseException | str) -> TLCMError:
    if isinstance(err, str):
        detail = err
    else:
        lines = [line.strip() for line in str(err).strip().splitlines()] or [type(err).__name__]
        detail = next((line for line in lines if "size mismatch" in line or "not found" in line), lines[0])
    return TLCMError(
        f"LoRA {source.path!r} does not match this model's UNet ({detail[:300]}): it was trained for a different "
        "base model",
        "load it on the base model it was trained for (SD1.5 LoRAs on SD1.5-family models, SDXL LoRAs on SDXL), "
        "or drop it",
    )


def _load_one(pipe, source: LoraSource, name: str) -> None:
    if source.kind == "peft":
        state, config = read_peft_adapter(source.load_path)
        modules = dict(pipe.unet.named_modules())
        targets = {k.split(".lora_")[0] for k in state if ".lora_" in k}
        if not targets:
            raise _mismatch(source, "the adapter holds no lora_A/lora_B tensors")
        missing = sorted(t for t in targets if t not in modules)
        if missing:
            raise _mismatch(source, f"{len(missing)} of {len(targets)} adapted modules are not in the UNet, "
                                    f"e.g. {missing[0]!r}")
        pipe.unet.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=config, _pipeline=pipe)
        return
    if source.kind == "file":
        file = Path(source.load_path)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    else:
        pipe.load_lora_weights(source.load_path, adapter_name=name)


@contextlib.contextmanager
def _quiet_diffusers():
    """diffusers logs a failed LoRA load at ERROR and warns about absent text-encoder keys: we report it ourselves."""
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*No LoRA keys associated.*")
            # peft warns on every adapter after the first; several adapters are what load_loras is for
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
            yield
    finally:
        dlogging.set_verbosity(level)


def loaded_adapters(pipe) -> set[str]:
    """Names of all LoRA adapters present on any component of ``pipe``."""
    names: set[str] = set()
    for adapters in pipe.get_list_adapters().values():
        names.update(adapters)
    return names


_DOWN_SUFFIXES = {".lora.down.weight": "diffusers' old .lora.down/.lora.up", ".lora_A.weight": "peft lora_A/lora_B",
                  ".lora_down.weight": "kohya lora_down/lora_up"}


def _unet_key_formats(file: str | Path) -> dict[str, int] | None:
    """``{naming: number of UNet layers}`` of a LoRA file's keys (diffusers, peft or kohya naming); None if it
    cannot tell."""
    from safetensors import safe_open

    if Path(file).suffix.lower() != ".safetensors":
        return None
    with safe_open(str(file), framework="pt") as f:
        keys = list(f.keys())
    counts: dict[str, int] = {}
    for k in keys:
        if k.startswith(("unet.", "lora_unet_")):
            for suffix, naming in _DOWN_SUFFIXES.items():
                if k.endswith(suffix):
                    counts[naming] = counts.get(naming, 0) + 1
    return counts or None


def _expected_unet_layers(file: str | Path) -> int | None:
    """How many UNet layers a LoRA file adapts, from its keys (diffusers or kohya naming); None if it cannot tell."""
    counts = _unet_key_formats(file)
    return sum(counts.values()) if counts else None


def adapted_unet_layers(pipe, name: str) -> int:
    """Number of UNet layers that carry adapter ``name``."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in pipe.unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A)


def load_loras(pipe, specs: list[tuple[str, float]], warn: Callable[[str], None] | None = None) -> list[str]:
    """Load each ``(path, weight)`` LoRA onto ``pipe`` as its own adapter and activate all with their weights.

    Returns the adapter names, in order. Errors that a user can fix (missing file, LoRA for another base model,
    nothing matched) are :class:`TLCMError`; a LoRA of which only some UNet layers found a module is loaded with a
    warning through ``warn`` (default :func:`warnings.warn`), since diffusers silently ignores the rest.
    """
    if not specs:
        return []
    warn = warn or (lambda text: warnings.warn(text, UserWarning, stacklevel=3))
    taken = loaded_adapters(pipe)
    names = []
    for i, (path, _) in enumerate(specs):
        source = describe_lora(path)
        name = _adapter_name(path, i, taken)
        taken.add(name)
        try:
            with _quiet_diffusers():
                _load_one(pipe, source, name)
        except TLCMError:
            raise
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError) as err:
            text = str(err)
            if source.kind == "hub" and ("not found" in text.lower() or "connect" in text.lower()):
                raise TLCMError(f"could not fetch the LoRA {path!r} from the hub: {text.splitlines()[0]}",
                                "check the id, or download it and pass the local file") from err
            raise _mismatch(source, err) from err
        except OSError as err:
            raise TLCMError(f"could not read the LoRA {path!r}: {str(err).splitlines()[0]}",
                            "check the path or hub id; offline, a hub LoRA must already be in the HF cache") from err
        if name not in loaded_adapters(pipe):
            raise _mismatch(source, "none of its keys matches a UNet or text-encoder module")
        formats = _unet_key_formats(source.load_path) if source.kind == "file" else None
        if formats:
            expected, found = sum(formats.values()), adapted_unet_layers(pipe, name)
            if found < expected and len(formats) > 1:
                mix = ", ".join(f"{n} in {naming} naming" for naming, n in formats.items())
                warn(f"only {found} of the {expected} UNet layers of LoRA {path!r} were loaded: the file mixes key "
                     f"formats ({mix}) and diffusers reads one format per file, so the rest are ignored; re-save it "
                     "with one naming (e.g. the peft names of get_peft_model_state_dict, as `tlcm distill` writes)")
            elif found < expected:
                warn(f"only {found} of the {expected} UNet layers of LoRA {path!r} exist in this UNet; the rest are "
                     "ignored (was it trained for a different base model?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[float(w) for _, w in specs])
    return names
