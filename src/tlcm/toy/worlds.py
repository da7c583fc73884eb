"""The toy worlds by name, and what every world shares (its imagefolder export).

- ``v3`` (``shapes``, :mod:`tlcm.toy.shapes`): one shape per 32x32 image, captions that name all five attributes.
  Kept buildable and loadable (``--teacher toy-v3``) so that earlier results can be reproduced.
- ``v4`` (``scenes``, :mod:`tlcm.toy.scenes`): 48x48 scenes of one to three objects with partial captions, where a
  caption stands for many images; the default (``--teacher toy``).

A world module provides ``NAME``, ``VERSION``, ``RESOLUTION``, ``TEXT_MAX_LENGTH``, ``SPLITS``, ``iter_records``,
``sample_records``, ``prompts``, ``render_prompts`` and ``record_metadata``.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType

from tlcm.errors import TLCMError

WORLDS = {"v3": "tlcm.toy.shapes", "v4": "tlcm.toy.scenes"}
ALIASES = {"shapes": "v3", "scenes": "v4"}
DEFAULT = "v4"


def world_version(name: str | None = None) -> str:
    """``None`` -> the default world; ``"shapes"``/``"scenes"`` -> ``"v3"``/``"v4"``; unknown names are errors."""
    if name is None or name == "":
        return DEFAULT
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in WORLDS:
        raise TLCMError(f"unknown toy world {name!r}", f"use one of {', '.join([*WORLDS, *ALIASES])}")
    return key


def get_world(name: str | None = None) -> ModuleType:
    """The module of a toy world (see the module docstring for what it provides)."""
    return importlib.import_module(WORLDS[world_version(name)])


def export_imagefolder(world: str | ModuleType | None, out_dir: str | os.PathLike, n: int, seed: int = 0,
                       n_heldout: int = 0, progress: bool = False) -> Path:
    """Write ``n`` training-split records to ``out_dir/train`` and ``n_heldout`` held-out ones to ``out_dir/test``.

    Each split folder holds PNGs and a ``metadata.jsonl`` (``file_name``, ``text`` and the world's description of
    the record), so ``datasets.load_dataset("imagefolder", data_dir=out_dir)`` loads it. Resumable: existing images are
    kept, and the metadata is written last (atomically), so a folder with metadata is complete.
    """
    from tqdm.auto import tqdm

    from tlcm.toy.common import atomic_save_image, atomic_write_text

    mod = world if isinstance(world, ModuleType) else get_world(world)
    out = Path(out_dir)
    for split, folder, count in (("train", "train", n), ("heldout", "test", n_heldout)):
        if count <= 0:
            continue
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        rows = []
        records = (r for r, _ in zip(mod.iter_records(seed, split), range(count)))
        for i, (img, text, attrs) in enumerate(tqdm(records, total=count, desc=f"{mod.NAME} {folder}",
                                                    disable=not progress, mininterval=2)):
            name = f"{i:07d}.png"
            if not (d / name).exists():
                atomic_save_image(img, d / name)
            rows.append({"file_name": name, "text": text, **mod.record_metadata(attrs)})
        atomic_write_text(d / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(
            d.parent / "dataset_info.json",
            json.dumps({"generator": mod.__name__, "world": mod.VERSION, "seed": seed, "train": n,
                        "test": n_heldout}, indent=1),
        )
    return out
