"""Real-data mode: an image folder with captions becomes the same shard format through the teacher's VAE.

This is what the original LCM recipe trains on (real latents instead of teacher samples), so the trainer can run
LCM and TLCM on identical machinery. Captions come from the Hugging Face ``imagefolder`` convention (a
``metadata.jsonl`` or ``metadata.csv`` with a ``file_name`` column and a caption column, default ``text``) or, failing
that, a ``.txt`` file beside each image (the kohya convention). Images are resized (shorter side) and center-cropped
to the teacher's resolution; original size and crop offset are kept per record (SDXL's size conditioning).
Record ``i`` draws its VAE posterior sample with seed ``seed + i`` (``--sample-mode mean`` stores the mean instead).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tlcm.data.shards import (
    MANIFEST,
    expected_records,
    identity_sha256,
    new_manifest,
    read_manifest,
    shard_name,
    shard_status,
    write_manifest,
    write_shard,
)
from tlcm.errors import TLCMError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class EncodeImagesConfig:
    images: str
    out: str
    teacher: str
    caption_column: str = "text"
    resolution: int | None = None  # default: the teacher's resolution
    sample_mode: str = "sample"  # "sample" (as diffusers' LCM scripts) or "mean"
    seed: int = 0
    batch_size: int = 8
    records_per_shard: int = 256
    dtype: str = "fp32"
    latent_dtype: str = "fp16"
    device: str | None = None
    save_embeddings: bool = False
    overwrite: bool = False
    progress: bool = True


def find_images(folder: str | Path, caption_column: str = "text") -> list[tuple[str, str]]:
    """``(relative path, caption)`` for every image under ``folder``, sorted by path."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise TLCMError(f"image folder {str(root)!r} does not exist or is not a folder",
                        "pass a folder of images with a metadata.jsonl/metadata.csv or one .txt caption per image")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise TLCMError(f"{root} holds no images ({', '.join(IMAGE_EXTS)})", "pass the folder that holds the images")
    captions: dict[str, str] = {}
    meta_jsonl, meta_csv = root / "metadata.jsonl", root / "metadata.csv"
    if meta_jsonl.exists() or meta_csv.exists():
        src = meta_jsonl if meta_jsonl.exists() else meta_csv
        if src.suffix == ".jsonl":
            rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            with open(src, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        cols = list(dict.fromkeys(k for r in rows for k in r))
        if "file_name" not in cols or caption_column not in cols:
            raise TLCMError(f"{src} needs columns 'file_name' and {caption_column!r}; it has {cols}",
                            "pass --caption-column with the caption column's name")
        captions = {str(r["file_name"]): str(r[caption_column] or "").strip() for r in rows}
    else:
        for f in files:
            txt = (root / f).with_suffix(".txt")
            if txt.exists():
                captions[f] = txt.read_text(encoding="utf-8").strip()
    missing = [f for f in files if not captions.get(f)]
    if missing:
        raise TLCMError(f"{len(missing)} of {len(files)} images in {root} have no caption (e.g. {missing[0]})",
                        "add them to metadata.jsonl (file_name, text) or write a .txt beside each image")
    return [(f, captions[f]) for f in files]


def load_image(path: Path, resolution: int):
    """RGB image resized (shorter side) and center-cropped to a square; also (original size, crop top-left)."""
    import numpy as np
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except Exception as err:
        raise TLCMError(f"cannot read image {path}: {err}", "remove or replace the file") from err
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x, (h, w), (top, left)


def _fingerprint(items: list[tuple[str, str]], root: Path) -> str:
    h = hashlib.sha256()
    for f, cap in items:
        h.update(json.dumps([f, cap, (root / f).stat().st_size]).encode())
    return h.hexdigest()


def encode_images(config: EncodeImagesConfig, *, pipe=None) -> Path:
    """Encode an image folder into a dataset folder (resumable, shard by shard; a complete one is verified and its
    damaged shards re-encoded); return the folder. The folder is locked for the run (:mod:`tlcm.runlock`)."""
    from tlcm.data.synthesize import _dist
    from tlcm.runlock import acquire_on_main

    state = _dist(config.device)
    lock = acquire_on_main(Path(config.out).expanduser(), state, what="data set", flag="--out")
    try:
        return _encode_images(config, state, pipe)
    finally:
        if lock is not None:
            lock.release()


@torch.no_grad()
def _encode_images(config: EncodeImagesConfig, state, pipe) -> Path:
    from tlcm.data.synthesize import (
        ENGINE_VERSION,
        _finish,
        _load_teacher,
        fingerprint_matches,
        initial_noise,
        teacher_fingerprint,
        verify_complete,
    )
    from tlcm.models import encode_prompts, parse_dtype, resolve_device
    from tlcm.runlock import LOCK_NAME

    if config.sample_mode not in ("sample", "mean"):
        raise TLCMError(f"unknown --sample-mode {config.sample_mode!r}", "use 'sample' or 'mean'")
    if config.batch_size < 1 or config.records_per_shard < 1:
        raise TLCMError("--batch-size and --records-per-shard must be at least 1", "use e.g. --batch-size 8")
    root = Path(config.images).expanduser()
    items = find_images(root, config.caption_column)
    out = Path(config.out).expanduser()
    existing = read_manifest(out) if (out / MANIFEST).exists() else None
    if existing is not None and config.overwrite:
        existing = None
    if existing is None and out.exists() and [p for p in out.iterdir() if p.name != LOCK_NAME] \
            and not config.overwrite:
        raise TLCMError(f"--out {out} is not empty and holds no tlcm dataset", "pick a new or empty folder")
    if existing is not None and existing.get("source") != "images":
        raise TLCMError(f"--out {out} holds a data set made by `tlcm synthesize`",
                        "pick another --out, or pass --overwrite to replace it")
    device = state.device if state.num_processes > 1 else resolve_device(config.device)
    pipe, dtype = _load_teacher(config, device, pipe)
    vae = pipe.vae
    from tlcm.models import default_image_size

    resolution = config.resolution or default_image_size(pipe)[0]
    if resolution % pipe.vae_scale_factor:
        raise TLCMError(f"--resolution {resolution} is not a multiple of the VAE factor {pipe.vae_scale_factor}",
                        f"use a multiple of {pipe.vae_scale_factor}")
    gen = {"source": "images", "images_sha256": _fingerprint(items, root), "num_records": len(items),
           "records_per_shard": config.records_per_shard, "resolution": resolution, "sample_mode": config.sample_mode,
           "seed": config.seed, "batch_size": config.batch_size,
           "latent_dtype": str(parse_dtype(config.latent_dtype)).removeprefix("torch."),
           "save_embeddings": config.save_embeddings, "dtype": str(dtype).removeprefix("torch."),
           "caption_column": config.caption_column}
    teacher = {"id": config.teacher, "fingerprint": teacher_fingerprint(pipe),
               "fingerprint_dtype": str(dtype).removeprefix("torch."), "pipeline": type(pipe).__name__}
    if existing is not None:
        old = existing.get("generation", {})
        changes = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in gen.items() if k in old and old.get(k) != v]
        if not fingerprint_matches(pipe, existing.get("teacher")):
            changes.append(f"teacher: {existing.get('teacher', {}).get('id')!r} -> {config.teacher!r} (another "
                           "fingerprint)")
        if changes:
            raise TLCMError(f"{out} was encoded with a different configuration: " + "; ".join(changes),
                            "re-run with the original settings to resume, --overwrite to discard it, or another --out")
    c = vae.config.latent_channels
    latent_shape = (c, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    identity = {"format": "tlcm-shards", "engine_version": ENGINE_VERSION, "generation": gen,
                "teacher_fingerprint": teacher["fingerprint"], "latent_shape": list(latent_shape)}
    ident = identity_sha256(identity)
    if existing is not None and existing.get("identity_sha256") not in (None, ident):
        raise TLCMError(f"{out} was encoded with a different configuration (identity {existing['identity_sha256'][:12]}"
                        f" vs {ident[:12]})", "re-run with the original settings, --overwrite, or another --out")
    if existing is not None and existing.get("identity_sha256") is None:
        ident = None  # started by an older tlcm: its shards carry no identity
    if existing is not None and existing.get("complete"):  # verify; damaged shards make it unfinished again
        existing = verify_complete(out, existing, state, "encoding it again")
        if existing.get("complete"):
            if state.is_main_process:
                print(f"{out}: complete ({existing['num_records']} records, every shard's checksum verified), "
                      "nothing to do")
            return out
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            from tlcm.data.synthesize import _clear

            _clear(out)
        for stale in out.glob(".shard-*.tmp"):
            stale.unlink()
        if existing is None:
            write_manifest(out, new_manifest(
                num_records=len(items), records_per_shard=config.records_per_shard, latent_shape=latent_shape,
                meta={"teacher": teacher, "generation": gen, "scaling_factor": vae.config.scaling_factor,
                      "shift_factor": getattr(vae.config, "shift_factor", None), "source": "images",
                      "image_folder": str(root), "identity": identity, "identity_sha256": ident,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    state.wait_for_everyone()
    manifest = read_manifest(out)

    n, per = len(items), config.records_per_shard
    todo = []
    for k in range(math.ceil(n / per)):
        if k % state.num_processes != state.process_index:
            continue
        entry, why = shard_status(out, k, identity=ident, expect=expected_records(manifest, k), verify=True)
        if entry is None:
            todo.append(k)
            if why != "missing":
                print(f"{out}: {shard_name(k)} {why}; encoding it again", flush=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(min(n, (k + 1) * per) - k * per for k in todo), unit="img", desc="encode-images",
               disable=not (config.progress and state.is_main_process), dynamic_ncols=True)
    store = parse_dtype(config.latent_dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for k in todo:
        lo, hi = k * per, min(n, (k + 1) * per)
        lat_parts, emb_parts, pooled_parts, records = [], [], [], []
        for b in range(lo, hi, config.batch_size):
            idx = list(range(b, min(hi, b + config.batch_size)))
            loaded = [load_image(root / items[i][0], resolution) for i in idx]
            pixels = torch.stack([x for x, _, _ in loaded]).to(device=vae.device, dtype=vae.dtype)
            dist = vae.encode(pixels).latent_dist
            z = dist.mean
            if config.sample_mode == "sample":
                eps = initial_noise([config.seed + i for i in idx], tuple(z.shape[1:])).to(z.device, z.dtype)
                z = z + dist.std * eps
            lat_parts.append(((z - shift) * vae.config.scaling_factor).float().cpu())
            if config.save_embeddings:
                cond = encode_prompts(pipe, [items[i][1] for i in idx], resolution, resolution)
                emb_parts.append(cond.encoder_hidden_states.float().cpu())
                if cond.added_cond_kwargs is not None:
                    pooled_parts.append(cond.added_cond_kwargs["text_embeds"].float().cpu())
            for i, (_, orig, crop) in zip(idx, loaded):
                records.append({"index": i, "prompt": items[i][1], "negative_prompt": "", "seed": config.seed + i,
                                "guidance_scale": 0.0, "file": items[i][0], "original_size": list(orig),
                                "crop_top_left": list(crop)})
            bar.update(len(idx))
        tensors = {"latents": torch.cat(lat_parts).to(store),
                   "seeds": torch.tensor([r["seed"] for r in records], dtype=torch.int64)}
        if emb_parts:
            tensors["prompt_embeds"] = torch.cat(emb_parts).to(store)
        if pooled_parts:
            tensors["pooled_prompt_embeds"] = torch.cat(pooled_parts).to(store)
        write_shard(out, k, lo, tensors, records, identity=ident)
    bar.close()
    return _finish(out, manifest, state, n)
