"""The evaluation grid: (model or LoRA) x scheduler x steps x guidance, each cell generated, timed and scored.

A *model* is a base pipeline (hub id, folder or ``"toy"``) optionally with a LoRA (a distilled output folder or a
``.safetensors`` file). Each model carries its own scheduler, step and guidance lists, because a teacher is sampled
with CFG and multistep solvers while a distilled student is sampled with its own scheduler and little or no guidance.

Scheduler names map to diffusers classes (all built from the teacher's scheduler config):

============  ==========================================================================================
``ddim``      ``DDIMScheduler``
``dpmpp``     ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``
``euler``     ``EulerDiscreteScheduler``
``lcm``       ``LCMScheduler``
``tcd:G``     ``TLCMScheduler(mode="tcd", gamma=G)`` (``tcd`` alone: gamma 0.3)
``tlcm``      ``TLCMScheduler`` with the config saved in the LoRA folder (``scheduler/scheduler_config.json``)
============  ==========================================================================================

The teacher's multistep solvers use ``timestep_spacing="trailing"`` (configurable) so that a 1- or 2-step run starts
from t = 999 as the students do; with SD's default ``leading`` spacing a 1-step DDIM run would start at t = 1.

Per cell the sweep records:

- ``latency_s``: wall time of generating the cell's images divided by their number (batched as ``batch_size``; one
  untimed 1-image warm-up per model first); ``images_per_s`` its inverse.
- ``unet_calls``: UNet forward calls per batch (a forward pre-hook counts them), i.e. sequential network passes.
- ``nfe``: network evaluations per image = UNet rows per image. CFG runs the conditional and unconditional rows in one
  call with a doubled batch, so ``nfe = unet_calls x cfg_factor`` where ``cfg_factor`` (1 or 2) is measured as UNet
  input rows over images, not assumed from the guidance value.
- ``peak_mem_mb``: on CUDA, ``torch.cuda.max_memory_allocated`` during the cell; on Linux CPUs, the process's resident
  high-water mark (``VmHWM``) after resetting it through ``/proc/self/clear_refs``; elsewhere the process-lifetime
  ``ru_maxrss`` (then labelled ``peak_mem_kind = "process"``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.evaluate.metrics import MetricSpec, Reference, build_metrics

SCHEDULER_NAMES = ("tlcm", "lcm", "tcd", "ddim", "dpmpp", "euler")
TEACHER_SOLVERS = ("ddim", "dpmpp", "euler")
DEFAULT_TCD_GAMMA = 0.3


# --- specs -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    gamma: float | None = None

    @classmethod
    def parse(cls, text: str) -> SchedulerSpec:
        name, _, arg = text.strip().lower().partition(":")
        name = {"dpm-solver++": "dpmpp", "dpmsolver++": "dpmpp", "dpm++": "dpmpp"}.get(name, name)
        if name not in SCHEDULER_NAMES:
            raise TLCMError(f"unknown scheduler {text!r}", f"use one of {', '.join(SCHEDULER_NAMES)} (tcd:GAMMA)")
        gamma = None
        if name == "tcd":
            try:
                gamma = float(arg) if arg else DEFAULT_TCD_GAMMA
            except ValueError as err:
                raise TLCMError(f"bad tcd gamma in {text!r}", "write tcd:0.3 (gamma in [0, 1])") from err
            if not 0.0 <= gamma <= 1.0:
                raise TLCMError(f"tcd gamma {gamma} is outside [0, 1]", "write tcd:0.3 (gamma in [0, 1])")
        elif arg:
            raise TLCMError(f"scheduler {name!r} takes no argument (got {text!r})", f"write {name}")
        return cls(name, gamma)

    @property
    def label(self) -> str:
        return f"tcd(gamma={self.gamma:g})" if self.name == "tcd" else self.name

    @property
    def slug(self) -> str:
        return f"tcd-g{self.gamma:g}" if self.name == "tcd" else self.name


@dataclass
class ModelSpec:
    """One model of the grid and the cells to run with it. ``extra_loras``: further ``(path, weight)`` LoRAs loaded
    next to ``lora`` (e.g. a style LoRA beside an acceleration LoRA); ``lora`` supplies the scheduler and defaults."""

    name: str
    base: str
    lora: str | None = None
    lora_weight: float = 1.0
    schedulers: list[SchedulerSpec] = field(default_factory=lambda: [SchedulerSpec("ddim")])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    guidance: list[float] = field(default_factory=lambda: [7.5])
    extra_loras: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self):
        self.schedulers = [s if isinstance(s, SchedulerSpec) else SchedulerSpec.parse(s) for s in self.schedulers]
        if not self.name or any(c in self.name for c in "/\\ "):
            raise TLCMError(f"model name {self.name!r} must be non-empty without spaces or slashes",
                            "name models like teacher, tlcm, lcm_lora")
        for s in self.steps:
            if int(s) < 1:
                raise TLCMError(f"step count {s} for {self.name!r} must be >= 1", "pass --steps 1,2,4,8")
        if any(sc.name == "tlcm" for sc in self.schedulers) and not self.lora:
            raise TLCMError(f"scheduler 'tlcm' for {self.name!r} needs a LoRA folder with its saved scheduler config",
                            "use it for a distilled model (--lora NAME=DIR), or pick tcd/lcm for a plain pipeline")


@dataclass(frozen=True)
class Cell:
    model: str
    scheduler: SchedulerSpec
    steps: int
    guidance: float

    @property
    def id(self) -> str:
        return f"{self.model}__{self.scheduler.slug}__s{self.steps}__g{self.guidance:g}"

    @property
    def method(self) -> str:
        """One line on a plot: model, scheduler and guidance (steps vary along the line)."""
        return f"{self.model} / {self.scheduler.label} / cfg {self.guidance:g}"


@dataclass
class ReferenceSpec:
    """The teacher's reference samples (``model`` names a ModelSpec) and where data images come from."""

    model: str | None = None
    scheduler: str = "dpmpp"
    steps: int = 25
    guidance: float = 7.5
    data: str | None = None  # "toy[:WORLD[:STYLE]]" renders the prompts; a folder holds real images; None: no data FID


@dataclass
class SweepConfig:
    models: list[ModelSpec]
    prompts: list[str]
    seeds: list[int]
    out_dir: str
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    negative_prompt: str | None = None
    timestep_spacing: str = "trailing"
    reference: ReferenceSpec = field(default_factory=ReferenceSpec)
    metrics: MetricSpec = field(default_factory=MetricSpec)
    grid_images: int = 16
    resume: bool = True
    protocol: str | None = None

    def cells(self) -> list[Cell]:
        out = []
        for m in self.models:
            for sch in m.schedulers:
                for g in m.guidance:
                    for s in m.steps:
                        out.append(Cell(m.name, sch, int(s), float(g)))
        return out

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise TLCMError(f"no model named {name!r} in the grid", f"use one of {', '.join(m.name for m in self.models)}")


# --- measurement helpers ---------------------------------------------------------------------------------------------
class UNetCounter:
    """Counts UNet forward calls and input rows (a row = one network evaluation for one image)."""

    def __init__(self, unet):
        self.calls = 0
        self.rows = 0
        self._handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += int(sample.shape[0])

    def close(self):
        self._handle.remove()


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or the CPU resident high-water mark (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: float | None = None
        self.kind = "cuda" if device.type == "cuda" else "rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._resettable = False
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
                self._resettable = _proc_status_kb("VmHWM") is not None
            except OSError:
                pass
            if not self._resettable:
                self.kind = "process"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._resettable:
            self.mb = _proc_status_kb("VmHWM") / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return False


# --- pipelines and schedulers ----------------------------------------------------------------------------------------
def make_scheduler(spec: SchedulerSpec, base_config, lora_dir: str | None = None,
                   timestep_spacing: str = "trailing"):
    """A scheduler instance for ``spec`` from the teacher's scheduler config (see the module docstring)."""
    import diffusers

    cfg = dict(base_config)
    if spec.name in TEACHER_SOLVERS:
        cls = {"ddim": diffusers.DDIMScheduler, "dpmpp": diffusers.DPMSolverMultistepScheduler,
               "euler": diffusers.EulerDiscreteScheduler}[spec.name]
        extra = {"timestep_spacing": timestep_spacing}
        if spec.name == "dpmpp":
            extra.update(algorithm_type="dpmsolver++", solver_order=2)
        return cls.from_config(cfg, **extra)
    if spec.name == "lcm":
        return diffusers.LCMScheduler.from_config(cfg)
    from tlcm import TLCMScheduler

    if spec.name == "tcd":
        return TLCMScheduler.from_config(cfg, mode="tcd", gamma=spec.gamma)
    # tlcm: the scheduler config the distillation run saved next to its LoRA
    folder = Path(lora_dir) if lora_dir else None
    if folder is None or not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise TLCMError(f"scheduler 'tlcm' needs {folder}/scheduler/scheduler_config.json",
                        "point --lora at the folder written by `tlcm distill`, or use tcd/lcm")
    return TLCMScheduler.from_pretrained(str(folder), subfolder="scheduler")


def sampling_defaults(lora: str | None) -> dict:
    """The distilled folder's ``tlcm_sampling.json`` (recommended steps/guidance), or ``{}``."""
    if lora and Path(lora).is_dir() and (Path(lora) / "tlcm_sampling.json").is_file():
        try:
            return json.loads((Path(lora) / "tlcm_sampling.json").read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def load_model(spec: ModelSpec, device: str, dtype: str):
    from tlcm.models import load_pipeline

    pipe = load_pipeline(spec.base, device=device, dtype=dtype)
    if spec.lora:
        loras = [(spec.lora, spec.lora_weight), *spec.extra_loras]
        for lora, _ in loras:
            if not Path(lora).expanduser().exists():
                raise TLCMError(f"LoRA {lora!r} for model {spec.name!r} does not exist",
                                "pass the output folder of `tlcm distill` or a .safetensors LoRA file")
        from tlcm.lora import load_loras

        load_loras(pipe, [(str(Path(p).expanduser()), w) for p, w in loras])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_images(pipe, prompts, seeds, steps, guidance, height, width, batch_size, negative_prompt=None):
    """Images for ``prompts``, one seed each, through :func:`tlcm.sample.generate` (deterministic per seed).

    Without ``tlcm.sample`` (older installs) the pipeline is called directly with one seeded generator per image,
    which is deterministic per seed too.
    """
    try:
        from tlcm.sample import generate
    except ImportError:
        images = []
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
            batch = list(prompts[i:i + batch_size])
            neg = None if negative_prompt is None else [negative_prompt] * len(batch)
            images += pipe(prompt=batch, negative_prompt=neg, num_inference_steps=int(steps),
                           guidance_scale=float(guidance), generator=gens, height=height, width=width,
                           output_type="pil").images
        return images
    return generate(pipe, list(prompts), num_inference_steps=int(steps), guidance_scale=float(guidance),
                    seeds=list(seeds), height=height, width=width, batch_size=batch_size,
                    negative_prompt=negative_prompt)


# --- reference images ------------------------------------------------------------------------------------------------
def _save_images_npz(path: Path, images) -> None:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, images=arr)
    os.replace(tmp, path)


def _load_images_npz(path: Path):
    from PIL import Image

    with np.load(path) as data:
        return [Image.fromarray(a) for a in data["images"]]


def load_image_folder(folder: str | Path, n: int, size: tuple[int, int] | None = None):
    """The first ``n`` images (sorted by name) of a folder, optionally resized (center crop + bicubic)."""
    from PIL import Image, ImageOps

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TLCMError(f"reference image folder {str(folder)!r} does not exist",
                        "pass --reference-images DIR with real images (e.g. COCO val2017)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if len(files) < 2:
        raise TLCMError(f"{folder} holds {len(files)} images; a Frechet distance needs at least 2",
                        "point --reference-images at a folder of real images")
    out = []
    for p in files[:n]:
        im = Image.open(p).convert("RGB")
        out.append(ImageOps.fit(im, size, Image.Resampling.BICUBIC) if size else im)
    return out


def build_reference(cfg: SweepConfig, out: Path, log) -> Reference:
    ref = Reference(prompts=list(cfg.prompts))
    rs = cfg.reference
    if rs.data == "toy" or (rs.data or "").startswith("toy:"):  # "toy:v4[:STYLE]": images rendered for the prompts
        from tlcm.toy.worlds import get_world

        name, _, style = rs.data.partition(":")[2].partition(":")
        world = get_world(name or None)
        ref.data_images = world.render_prompts(cfg.prompts, seed=cfg.seeds[0] if cfg.seeds else 0,
                                               **({"style": style} if style else {}))
    elif rs.data:
        size = (cfg.width, cfg.height) if cfg.width and cfg.height else None
        ref.data_images = load_image_folder(rs.data, len(cfg.prompts), size)
    if rs.model:
        spec = cfg.model(rs.model)
        sch = SchedulerSpec.parse(rs.scheduler)
        ref.teacher_label = f"{spec.name} / {sch.label} / {rs.steps} steps / cfg {rs.guidance:g}"
        cache = out / "reference" / f"teacher__{spec.name}__{sch.slug}__s{rs.steps}__g{rs.guidance:g}.npz"
        if cfg.resume and cache.is_file():
            ref.teacher_images = _load_images_npz(cache)
        if ref.teacher_images is None or len(ref.teacher_images) != len(cfg.prompts):
            log(f"reference: {ref.teacher_label} on {len(cfg.prompts)} prompts")
            pipe = load_model(spec, cfg.device, cfg.dtype)
            base_cfg = pipe.scheduler.config
            pipe.scheduler = make_scheduler(sch, base_cfg, spec.lora, cfg.timestep_spacing)
            ref.teacher_images = generate_images(pipe, cfg.prompts, cfg.seeds, rs.steps, rs.guidance, cfg.height,
                                                 cfg.width, cfg.batch_size, cfg.negative_prompt)
            cache.parent.mkdir(parents=True, exist_ok=True)
            _save_images_npz(cache, ref.teacher_images)
            del pipe
    return ref


# --- the sweep -------------------------------------------------------------------------------------------------------
def run_cell(pipe, cell: Cell, cfg: SweepConfig, device: torch.device) -> tuple[dict, list]:
    n = len(cfg.prompts)
    counter = UNetCounter(pipe.unet)
    try:
        with PeakMemory(device) as mem:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            images = generate_images(pipe, cfg.prompts, cfg.seeds, cell.steps, cell.guidance, cfg.height, cfg.width,
                                     cfg.batch_size, cfg.negative_prompt)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - t0
    finally:
        counter.close()
    n_batches = math.ceil(n / cfg.batch_size)
    unet_calls = counter.calls / n_batches
    nfe = counter.rows / n
    row = {
        "cell": cell.id,
        "model": cell.model,
        "scheduler": cell.scheduler.label,
        "steps": cell.steps,
        "guidance": cell.guidance,
        "unet_calls": unet_calls,
        "cfg_factor": nfe / unet_calls if unet_calls else float("nan"),
        "nfe": nfe,
        "num_images": n,
        "latency_s": wall / n,
        "images_per_s": n / wall if wall > 0 else float("nan"),
        "wall_s": wall,
        "peak_mem_mb": mem.mb,
        "peak_mem_kind": mem.kind,
    }
    return row, images


def _warm_up(pipe, cfg: SweepConfig, cell: Cell):
    generate_images(pipe, cfg.prompts[:1], cfg.seeds[:1], 1, cell.guidance, cfg.height, cfg.width, 1,
                    cfg.negative_prompt)


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Run every cell (resuming finished ones), score them, and write the report; return the results dict."""
    from tlcm.evaluate import report
    from tlcm.models import resolve_device

    if not cfg.prompts:
        raise TLCMError("the evaluation has no prompts", "pass --prompts FILE or a protocol with a prompt set")
    if len(cfg.seeds) != len(cfg.prompts):
        raise TLCMError(f"{len(cfg.prompts)} prompts but {len(cfg.seeds)} seeds", "give one seed per prompt")
    if cfg.batch_size < 1:
        raise TLCMError(f"batch size must be >= 1, got {cfg.batch_size}", "pass --batch-size 1 or more")
    names = [m.name for m in cfg.models]
    if len(set(names)) != len(names):
        raise TLCMError(f"model names must be unique, got {names}", "give each --lora a distinct NAME=")
    for m in cfg.models:  # fail before hours of generation, not after
        for lora in ([m.lora] if m.lora else []) + [p for p, _ in m.extra_loras]:
            if not Path(lora).expanduser().exists():
                raise TLCMError(f"LoRA {lora!r} for model {m.name!r} does not exist",
                                "pass the output folder of `tlcm distill` or a .safetensors LoRA file")
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    report.write_json(out / "config.json", config_dict(cfg))

    metrics, notices = build_metrics(cfg.metrics)
    for note in notices:
        log(f"notice: {note}")
    reference = build_reference(cfg, out, log)
    for m in metrics:
        for note in m.prepare(reference):
            notices.append(note)
            log(f"notice: {note}")

    rows: list[dict] = []
    cells = cfg.cells()
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model, []).append(c)
    done = 0
    for model_name, model_cells in by_model.items():
        spec = cfg.model(model_name)
        todo = []
        for c in model_cells:
            cached = out / "cells" / f"{c.id}.json"
            if cfg.resume and cached.is_file() and (out / "grids" / f"{c.id}.png").is_file():
                rows.append(json.loads(cached.read_text()))
                done += 1
            else:
                todo.append(c)
        if not todo:
            continue
        pipe = load_model(spec, cfg.device, cfg.dtype)
        base_cfg = pipe.scheduler.config
        sampling = sampling_defaults(spec.lora)
        warmed = False
        for c in todo:
            scheduler = make_scheduler(c.scheduler, base_cfg, spec.lora, cfg.timestep_spacing)
            try:  # e.g. a 4-segment MLCD student walks 1..4 steps only: skip the cell, say why
                scheduler.set_timesteps(c.steps)
            except ValueError as err:
                note = f"{c.id} skipped: {err}"
                notices.append(note)
                log(f"notice: {note}")
                continue
            pipe.scheduler = scheduler
            if not warmed:
                _warm_up(pipe, cfg, c)
                warmed = True
            row, images = run_cell(pipe, c, cfg, device)
            row["lora"] = spec.lora
            if spec.extra_loras:
                row["extra_loras"] = [[p, w] for p, w in spec.extra_loras]
            if sampling:
                row["lora_sampling"] = sampling
            for m in metrics:
                row.update(m.compute(images, cfg.prompts))
            report.save_grid(out / "grids" / f"{c.id}.png", images[: cfg.grid_images])
            report.save_thumbs(out / "thumbs" / f"{c.id}.npz", images[:8])
            report.write_json(out / "cells" / f"{c.id}.json", row)
            rows.append(row)
            done += 1
            shown = {k: v for k, v in row.items() if k in report.metric_keys([row])}
            log(f"[{done}/{len(cells)}] {c.id}: nfe {row['nfe']:g}, {row['latency_s'] * 1000:.1f} ms/img, "
                + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        del pipe
    order = {c.id: i for i, c in enumerate(cells)}
    rows.sort(key=lambda r: order.get(r["cell"], len(order)))
    results = {
        "protocol": cfg.protocol,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine_info(device),
        "command": " ".join(["tlcm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "tlcm" else None,
        "num_prompts": len(cfg.prompts),
        "reference": {"teacher": reference.teacher_label, "data": cfg.reference.data},
        "notices": notices,
        "nfe_note": "nfe = UNet calls per batch x cfg_factor (UNet input rows per image; CFG doubles the batch, "
                    "not the calls)",
        "cells": rows,
    }
    report.write_report(out, results)
    return results


def machine_info(device: torch.device) -> dict:
    import platform

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def config_dict(cfg: SweepConfig) -> dict:
    d = asdict(cfg)
    d["prompts"] = {"count": len(cfg.prompts), "first": cfg.prompts[:3]}
    d["seeds"] = {"first": cfg.seeds[0] if cfg.seeds else None, "count": len(cfg.seeds)}
    for m in d["models"]:
        m["schedulers"] = [SchedulerSpec(**s).label for s in m["schedulers"]]
    return d
