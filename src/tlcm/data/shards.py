"""The on-disk training-set format: shards of latents, a manifest, a writer and a streaming reader.

Layout of a dataset folder::

    manifest.json                 teacher, generation config, counts, latent shape, scaling factor, shard checksums
    shard-00000.safetensors       tensors of records [0, R): latents (N,C,H,W), seeds (N,), optional embeddings,
                                  trajectory points
    shard-00000.json              per-record metadata (index, prompt, negative prompt, seed, guidance) + tensors' sha256
    shard-00001.safetensors ...

Why safetensors + JSON and not webdataset tars: the trainer reads whole shards of same-shape tensors, and a
safetensors file loads into torch in one zero-copy call with no pickle and no extra dependency; a tar holds one small
file per record and per field, which is made for object stores but costs a decode per record here. The JSON sidecar
keeps prompts readable with any tool. Each shard is written atomically (temporary file, then ``os.replace``), tensors
first and JSON last, so a shard exists exactly when its JSON does; the manifest is written last of all, and its
sha256 of both files is what the reader checks.

Latents are stored exactly as the UNet sees them (already multiplied by ``vae.config.scaling_factor``), in fp16 by
default; the reader returns float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tlcm.errors import TLCMError

FORMAT = "tlcm-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Per-record tensors (first dim = record) and per-shard tensors (shared by all records of the shard).
RECORD_TENSORS = ("latents", "seeds", "prompt_embeds", "pooled_prompt_embeds", "trajectory")
SHARED_TENSORS = ("trajectory_timesteps",)
# Keys the writer owns in the manifest; ``meta`` may not override them.
_STRUCTURAL = {"format", "version", "complete", "num_records", "num_shards", "records_per_shard", "shards",
               "latent_shape"}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (``os.umask`` can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` (recursively, for a folder) the mode plain ``open()``/``mkdir`` would have given it under the
    user's umask: safetensors (0.8) and ``tempfile`` create private 0600/0700 files and folders."""
    path = Path(path)
    mask = current_umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one, never a part (the
    project's one atomic writer; creates missing parent folders). The file gets the mode ``open()`` would give it
    (0666 minus the umask), not ``mkstemp``'s private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> bytes:
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    atomic_write_bytes(path, data)
    return data


# --------------------------------------------------------------------------------------------------------- writing


def identity_sha256(identity: dict) -> str:
    """The digest that ties a shard to the data set configuration it was generated for (see ``write_shard``)."""
    return sha256_bytes(json.dumps(identity, sort_keys=True, default=str).encode())


def _encode_shard(tensors: dict[str, torch.Tensor], records: list[dict], index: int, first: int,
                  identity: str | None = None) -> tuple[bytes, dict]:
    from safetensors.torch import save

    n = len(records)
    for key, t in tensors.items():
        if key in RECORD_TENSORS:
            assert t.shape[0] == n, f"{key} has {t.shape[0]} rows for {n} records"
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    meta = {
        "format": FORMAT + "/shard",
        "version": FORMAT_VERSION,
        "shard": index,
        "first_record": first,
        "count": n,
        "tensors_sha256": sha256_bytes(blob),
        "tensors_bytes": len(blob),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in tensors.items()},
        "records": records,
    }
    if identity is not None:
        meta["dataset_identity"] = identity
    return blob, meta


def write_shard(out_dir: str | Path, index: int, first_record: int, tensors: dict[str, torch.Tensor],
                records: list[dict], *, identity: str | None = None) -> dict:
    """Atomically write shard ``index`` (tensors, then the JSON that marks it complete); return its manifest entry.

    ``records`` are per-record metadata dicts (``index``, ``prompt``, ``negative_prompt``, ``seed``,
    ``guidance_scale``, ...); ``tensors`` holds ``latents`` (N,C,H,W) and any of :data:`RECORD_TENSORS` /
    :data:`SHARED_TENSORS`. ``identity`` (the data set's ``identity_sha256``) is stored in the JSON, so a resumed
    run adopts only shards written for its own configuration (:func:`shard_status`).
    """
    out_dir = Path(out_dir)
    name = shard_name(index)
    blob, meta = _encode_shard(tensors, records, index, first_record, identity)
    atomic_write_bytes(out_dir / f"{name}.safetensors", blob)
    meta_bytes = atomic_write_json(out_dir / f"{name}.json", meta)
    return _entry(name, meta, sha256_bytes(meta_bytes))


def _entry(name: str, meta: dict, json_sha: str) -> dict:
    return {"name": name, "first_record": meta["first_record"], "count": meta["count"],
            "sha256": meta["tensors_sha256"], "bytes": meta["tensors_bytes"], "json_sha256": json_sha}


def shard_status(out_dir: str | Path, index: int, *, identity: str | None = None,
                 expect: tuple[int, int] | None = None, verify: bool = False) -> tuple[dict | None, str | None]:
    """``(manifest entry, None)`` if shard ``index`` was written completely, else ``(None, why)``.

    Complete means: its JSON parses and its tensor file has the recorded size; with ``identity``, the JSON names that
    data set identity (a shard of another configuration, or copied from elsewhere, is not adopted); with ``expect``
    = ``(first_record, count)``, it holds those records; with ``verify``, the tensor file's sha256 is the one its
    JSON recorded. ``why`` is ``"missing"`` or a short description of the problem."""
    out_dir = Path(out_dir)
    name = shard_name(index)
    jpath, tpath = out_dir / f"{name}.json", out_dir / f"{name}.safetensors"
    if not jpath.exists() and not tpath.exists():
        return None, "missing"
    if not jpath.exists() or not tpath.exists():
        return None, f"{(tpath if not tpath.exists() else jpath).name} is missing"
    raw = jpath.read_bytes()
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{jpath.name} is not valid JSON"
    if not isinstance(meta, dict) or "tensors_bytes" not in meta or "tensors_sha256" not in meta:
        return None, f"{jpath.name} is not a shard description"
    if tpath.stat().st_size != meta.get("tensors_bytes"):
        return None, f"{tpath.name} has {tpath.stat().st_size} bytes, its JSON says {meta.get('tensors_bytes')}"
    if identity is not None and meta.get("dataset_identity") != identity:
        found = meta.get("dataset_identity")
        return None, ("was written for another data set configuration"
                      + (f" (identity {str(found)[:12]}, this data set's is {identity[:12]})" if found else
                         " (it carries no data set identity)"))
    if expect is not None and (meta.get("first_record"), meta.get("count")) != tuple(expect):
        return None, (f"holds records {meta.get('first_record')}+{meta.get('count')}, expected "
                      f"{expect[0]}+{expect[1]}")
    if verify:
        got = sha256_file(tpath)
        if got != meta["tensors_sha256"]:
            return None, f"{tpath.name} is corrupt: sha256 {got[:16]}... differs from its JSON's"
    return _entry(name, meta, sha256_bytes(raw)), None


def completed_shard(out_dir: str | Path, index: int, **checks) -> dict | None:
    """The manifest entry of shard ``index`` if it was written completely, else ``None`` (see :func:`shard_status`;
    without ``checks`` it is cheap: reads the JSON, not the tensors)."""
    return shard_status(out_dir, index, **checks)[0]


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST
    atomic_write_json(path, manifest)
    return path


def new_manifest(*, num_records: int, records_per_shard: int, latent_shape: Sequence[int] | None = None,
                 meta: dict | None = None) -> dict:
    """A manifest skeleton (``complete: false``, no shards) with ``meta`` (teacher, generation, ...) merged in."""
    meta = dict(meta or {})
    clash = _STRUCTURAL & set(meta)
    if clash:
        raise ValueError(f"meta may not set {sorted(clash)}: the writer owns them")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "complete": False,
        "num_records": int(num_records),
        "records_per_shard": int(records_per_shard),
        "num_shards": math.ceil(num_records / records_per_shard),
        "latent_shape": list(latent_shape) if latent_shape is not None else None,
        "scaling_factor": None,
        "teacher": None,
        "generation": {},
    }
    manifest.update(meta)
    manifest["shards"] = []
    return manifest


def finalize_manifest(out_dir: str | Path, manifest: dict) -> dict:
    """Collect every shard's entry, check that they cover ``[0, num_records)`` and write the manifest as complete."""
    out_dir = Path(out_dir)
    entries = []
    for i in range(manifest["num_shards"]):
        entry, why = shard_status(out_dir, i, identity=manifest.get("identity_sha256"),
                                  expect=expected_records(manifest, i))
        if entry is None:
            raise TLCMError(f"shard {out_dir / shard_name(i)}.safetensors: {why}",
                            "re-run the same command to generate the missing shards")
        entries.append(entry)
    covered = sum(e["count"] for e in entries)
    assert covered == manifest["num_records"], f"shards hold {covered} records, manifest says {manifest['num_records']}"
    manifest = {**manifest, "shards": entries, "complete": True}
    write_manifest(out_dir, manifest)
    return manifest


def write_shards(out_dir: str | Path, latents: torch.Tensor, prompts: Sequence[str], *, records_per_shard: int = 1000,
                 meta: dict | None = None, negative_prompts: Sequence[str] | None = None,
                 seeds: Sequence[int] | None = None, guidance_scale: float | Sequence[float] = 0.0,
                 prompt_embeds: torch.Tensor | None = None, pooled_prompt_embeds: torch.Tensor | None = None,
                 trajectory: torch.Tensor | None = None, trajectory_timesteps: torch.Tensor | None = None,
                 latent_dtype: torch.dtype = torch.float16) -> Path:
    """Write a complete dataset straight from tensors (no teacher): for tests and for bringing your own latents.

    ``latents`` is (N, C, H, W), already scaled by the VAE's scaling factor. ``meta`` goes into the manifest
    (e.g. ``{"teacher": {...}, "scaling_factor": 0.18215, "generation": {...}}``). Returns the folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = latents.shape[0]
    if n == 0:
        raise ValueError("no records to write")
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} latents")
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * n
    seeds = list(seeds) if seeds is not None else list(range(n))
    guidance = [float(guidance_scale)] * n if isinstance(guidance_scale, (int, float)) else list(guidance_scale)
    manifest = new_manifest(num_records=n, records_per_shard=records_per_shard, latent_shape=latents.shape[1:],
                            meta=meta)
    write_manifest(out_dir, manifest)
    for k in range(manifest["num_shards"]):
        lo, hi = k * records_per_shard, min(n, (k + 1) * records_per_shard)
        tensors = {"latents": latents[lo:hi].to(latent_dtype), "seeds": torch.tensor(seeds[lo:hi], dtype=torch.int64)}
        for key, t in (("prompt_embeds", prompt_embeds), ("pooled_prompt_embeds", pooled_prompt_embeds),
                       ("trajectory", trajectory)):
            if t is not None:
                tensors[key] = t[lo:hi].to(latent_dtype)
        if trajectory_timesteps is not None:
            tensors["trajectory_timesteps"] = torch.as_tensor(trajectory_timesteps).to(torch.int64)
        records = [{"index": i, "prompt": prompts[i], "negative_prompt": negative_prompts[i], "seed": int(seeds[i]),
                    "guidance_scale": guidance[i]} for i in range(lo, hi)]
        write_shard(out_dir, k, lo, tensors, records)
    finalize_manifest(out_dir, manifest)
    return out_dir


# --------------------------------------------------------------------------------------------------------- reading


def _dataset_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not path.exists():
        raise TLCMError(f"dataset {str(path)!r} does not exist",
                        "pass the --out folder of `tlcm synthesize` or `tlcm encode-images`")
    if not (path / MANIFEST).exists():
        raise TLCMError(f"{str(path)!r} has no {MANIFEST}, so it is not a tlcm dataset",
                        "pass the --out folder of `tlcm synthesize` or `tlcm encode-images`")
    return path


def read_manifest(path: str | Path, *, require_complete: bool = False) -> dict:
    """The manifest of the dataset at ``path`` (its folder or its ``manifest.json``)."""
    mpath = _dataset_dir(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise TLCMError(f"{mpath} is not valid JSON ({err})",
                        "re-run the command that wrote the dataset; it rewrites the manifest last") from err
    if manifest.get("format") != FORMAT:
        raise TLCMError(f"{mpath} is not a tlcm dataset manifest (format={manifest.get('format')!r})",
                        "pass the --out folder of `tlcm synthesize` or `tlcm encode-images`")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise TLCMError(f"{mpath} has format version {manifest['version']}, newer than this tlcm ({FORMAT_VERSION})",
                        "upgrade tlcm")
    if require_complete and not manifest.get("complete"):
        raise TLCMError(f"dataset {mpath.parent} is incomplete: generation was interrupted or is still running",
                        "re-run the same `tlcm synthesize` command to finish it")
    return manifest


def repair_hint(root: str | Path) -> str:
    """The fix for a damaged or missing shard: the writer verifies every shard and regenerates the bad ones."""
    return (f"run `tlcm synthesize --repair --out {root}` (synthetic data) or the same `tlcm encode-images` command "
            "again (real images): it verifies every shard and regenerates the damaged ones")


def load_shard(root: str | Path, entry: dict, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Load one shard's tensors and JSON; with ``verify`` check both against the manifest entry's sha256."""
    from safetensors.torch import load

    root = Path(root)
    tpath, jpath = root / f"{entry['name']}.safetensors", root / f"{entry['name']}.json"
    for p in (tpath, jpath):
        if not p.exists():
            raise TLCMError(f"shard file {p} is missing", repair_hint(root))
    blob, raw = tpath.read_bytes(), jpath.read_bytes()
    if verify:
        for p, data, want in ((tpath, blob, entry["sha256"]), (jpath, raw, entry["json_sha256"])):
            got = sha256_bytes(data)
            if got != want:
                raise TLCMError(
                    f"shard file {p} is corrupt or truncated: sha256 {got[:16]}... does not match the manifest's "
                    f"{want[:16]}... ({len(data)} bytes)",
                    repair_hint(root),
                )
    try:
        tensors = load(blob)
        meta = json.loads(raw)
    except Exception as err:  # safetensors raises its own error types
        raise TLCMError(f"shard {tpath} cannot be read: {err}",
                        repair_hint(root)) from err
    return tensors, meta


def check_entry(root: str | Path, entry: dict) -> str | None:
    """``None`` if both files of a manifest entry exist with the manifest's sha256, else what is wrong. Streams the
    files (no tensor is loaded)."""
    root = Path(root)
    for suffix, want in ((".safetensors", entry["sha256"]), (".json", entry["json_sha256"])):
        p = root / f"{entry['name']}{suffix}"
        if not p.exists():
            return f"shard file {p} is missing"
        got = sha256_file(p)
        if got != want:
            return (f"shard file {p} is corrupt or truncated: sha256 {got[:16]}... does not match the manifest's "
                    f"{want[:16]}... ({p.stat().st_size} bytes)")
    return None


def expected_records(manifest: dict, index: int) -> tuple[int, int]:
    """``(first_record, count)`` of shard ``index`` in a data set of this manifest."""
    per, n = manifest["records_per_shard"], manifest["num_records"]
    return index * per, min(n, (index + 1) * per) - index * per


def verify_dataset(path: str | Path) -> list[str]:
    """Check every shard; return one line per problem (empty when all is well). A complete data set is checked
    against the manifest's sha256; an unfinished one shard by shard against each shard's own JSON (and its data set
    identity), so a damaged or foreign shard is reported before it would be adopted."""
    root = _dataset_dir(path)
    manifest = read_manifest(root)
    problems = []
    if manifest.get("complete"):
        for entry in manifest.get("shards", []):
            why = check_entry(root, entry)
            if why:
                problems.append(why)
        return problems
    problems.append(f"{root / MANIFEST}: dataset is incomplete (generation interrupted or still running)")
    for k in range(manifest.get("num_shards", 0)):
        _, why = shard_status(root, k, identity=manifest.get("identity_sha256"), expect=expected_records(manifest, k),
                              verify=True)
        if why and why != "missing":
            problems.append(f"{root / shard_name(k)}: {why}")
    return problems


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (torch.distributed.get_rank() if rank is None else rank,
                torch.distributed.get_world_size() if world_size is None else world_size)
    return (rank or 0), (world_size or 1)


class ShardDataset(IterableDataset):
    """Streams the records of a dataset folder as dicts; see :func:`open_shards`."""

    def __init__(self, path: str | Path, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, infinite: bool = False, verify: bool = True,
                 buffer_size: int = 1024):
        super().__init__()
        self.root = _dataset_dir(path)
        self.manifest = read_manifest(self.root, require_complete=True)
        self.shuffle, self.seed, self.infinite, self.verify = shuffle, seed, infinite, verify
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        shards = len(self.manifest["shards"])
        if shards < self.world_size:  # each process reads its own shards; fewer would share files and I/O
            per = max(1, self.manifest["num_records"] // self.world_size)
            raise TLCMError(
                f"dataset {self.root} has {shards} shard(s) for {self.world_size} processes: each process needs at "
                "least one shard of its own",
                f"re-run `tlcm synthesize` (or encode-images) with --records-per-shard {per} or less, or train on at "
                f"most {shards} process(es)")
        self.buffer_size = buffer_size
        self.epoch = 0
        self._verified: set[str] = set()

    @property
    def num_records(self) -> int:
        return self.manifest["num_records"]

    def __len__(self) -> int:
        """Records this rank sees per epoch (exact without DataLoader workers; with W workers the split is over
        ``world_size * W`` readers, so the rank's total may differ by up to W records)."""
        whole, rest = self._split(list(self.manifest["shards"]), self.world_size)
        shared = sum(e["count"] for e in rest)
        return sum(e["count"] for e in whole[self.rank::self.world_size]) + len(range(self.rank, shared,
                                                                                      self.world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _split(self, shards: list[dict], parts: int) -> tuple[list[dict], list[dict]]:
        """Whole shards to deal round-robin (as many full shards as divide evenly among ``parts`` readers) and the
        rest, whose records are dealt by global index modulo ``parts``: disjoint, complete, balanced to one record,
        and each reader reads only its own whole shards plus fewer than ``parts + 1`` shared ones. The shared
        records are dealt by their position in the shared list, so counts stay balanced to one record."""
        per = self.manifest["records_per_shard"]
        full = [e for e in shards if e["count"] == per]
        k = (len(full) // parts) * parts
        return full[:k], full[k:] + [e for e in shards if e["count"] != per]

    def _records(self, epoch: int, part: int, parts: int) -> Iterator[dict]:
        shards = list(self.manifest["shards"])
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}/shards").shuffle(shards)
        whole, rest = self._split(shards, parts)
        rng = random.Random(f"{self.seed}/{epoch}/{part}/{parts}")
        offsets, total = [], 0
        for e in rest:
            offsets.append(total)
            total += e["count"]
        jobs = [(e, None) for e in whole[part::parts]] + list(zip(rest, offsets))
        for entry, offset in jobs:
            verify = self.verify and entry["name"] not in self._verified
            tensors, meta = load_shard(self.root, entry, verify=verify)
            self._verified.add(entry["name"])
            order = list(range(meta["count"]))
            if offset is not None:  # shared shard: records dealt by position in the (epoch-ordered) shared list
                order = [j for j in order if (offset + j) % parts == part]
            if self.shuffle:
                rng.shuffle(order)
            for j in order:
                yield _record(tensors, meta["records"][j], j)

    def _epoch(self, epoch: int, part: int, parts: int) -> Iterator[dict]:
        if not self.shuffle:
            yield from self._records(epoch, part, parts)
            return
        rng = random.Random(f"{self.seed}/{epoch}/{part}/{parts}/buffer")
        buffer: list[dict] = []
        for rec in self._records(epoch, part, parts):
            if len(buffer) < self.buffer_size:
                buffer.append(rec)
                continue
            k = rng.randrange(len(buffer))
            yield buffer[k]
            buffer[k] = rec
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        part, parts = self.rank * nw + wid, self.world_size * nw
        epoch = self.epoch
        while True:
            yield from self._epoch(epoch, part, parts)
            epoch += 1
            self.epoch = epoch
            if not self.infinite:
                return


def _record(tensors: dict[str, torch.Tensor], rec: dict, j: int) -> dict:
    out = {
        "latents": tensors["latents"][j].to(torch.float32, copy=True),
        "prompt": rec["prompt"],
        "negative_prompt": rec.get("negative_prompt", ""),
        "seed": int(rec["seed"]),
        "guidance_scale": float(rec.get("guidance_scale", 0.0)),
        "index": int(rec["index"]),
    }
    for key in ("prompt_embeds", "pooled_prompt_embeds", "trajectory"):
        if key in tensors:
            out[key] = tensors[key][j].to(torch.float32, copy=True)
    if "trajectory_timesteps" in tensors:
        out["trajectory_timesteps"] = tensors["trajectory_timesteps"].clone()
    return out


def open_shards(path: str | Path, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                world_size: int | None = None, infinite: bool = False, verify: bool = True,
                buffer_size: int = 1024) -> ShardDataset:
    """A torch ``IterableDataset`` over the records of a complete dataset folder.

    Each item is a dict: ``latents`` float32 (C,H,W) exactly as the UNet sees them (scaled by the VAE's scaling
    factor), ``prompt``, ``negative_prompt``, ``seed``, ``guidance_scale``, ``index``, and when stored
    ``prompt_embeds``, ``pooled_prompt_embeds``, ``trajectory`` (K,C,H,W) with ``trajectory_timesteps`` (K,).

    Records are split across processes (``rank``/``world_size``, by default from ``torch.distributed``) and
    DataLoader workers: by shard (full shards dealt round-robin) then by record (the few shards left over are
    shared, their records dealt by index), so every reader sees disjoint records and counts differ by at most one.
    A dataset with fewer shards than processes is a :class:`TLCMError` (each process must own at least one shard).
    With ``shuffle`` the shard order is permuted and records pass a ``buffer_size`` shuffle buffer that
    spans shards, deterministically in ``(seed, epoch)``; the epoch advances after each full pass (or set it with
    ``set_epoch``). ``infinite`` repeats epochs forever. ``verify`` checks each shard's sha256 on its first read
    and raises :class:`TLCMError` naming a corrupt file.
    """
    return ShardDataset(path, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, infinite=infinite,
                        verify=verify, buffer_size=buffer_size)


def to_hf_dataset(path: str | Path, *, verify: bool = True):
    """The dataset as an in-memory ``datasets.Dataset`` (torch format), in record order."""
    import datasets

    ds = open_shards(path, shuffle=False, rank=0, world_size=1, verify=verify)

    def gen():
        for rec in ds:
            yield {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in rec.items()}

    return datasets.Dataset.from_generator(gen).with_format("torch")
