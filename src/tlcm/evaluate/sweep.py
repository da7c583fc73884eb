"""The evaluation grid: (model or LoRA) x scheduler x steps x guidance, each cell generated, timed and scored.

A *model* is a base pipeline (hub id, folder or ``"toy"``) optionally with a LoRA (a distilled output folder or a
``.safetensors`` file). Each model carries its own scheduler, step and guidance lists, because a teacher is sampled
with CFG and multistep solvers while a distilled student is sampled with its own scheduler and little or no guidance.

Scheduler names map to diffusers classes (all built from the teacher's scheduler config):

============  ==========================================================================================
``ddim``      ``DDIMScheduler``
``dpmpp``     ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``
``euler``     ``EulerDiscreteScheduler``
``lcm``       ``LCMScheduler`` (for a student: on its trained grid, the saved ``original_inference_steps``)
``tcd:G``     ``TLCMScheduler(mode="tcd", gamma=G)`` (``tcd`` alone: gamma 0.3; for a student: its saved config)
``tlcm``      ``TLCMScheduler`` with the config saved in the LoRA folder (``scheduler/scheduler_config.json``)
============  ==========================================================================================

The teacher's multistep solvers use ``timestep_spacing="trailing"`` (configurable) so that a 1- or 2-step run starts
from t = 999 as the students do; with SD's default ``leading`` spacing a 1-step DDIM run would start at t = 1.

Per cell the sweep records:

- ``latency_s``: wall time of generating the cell's images divided by their number (batched as ``batch_size``; one
  untimed 1-image warm-up per model first), prompt encoding included even where :class:`PromptEmbeddingCache` reused
  it (its measured time, ``encode_cached_s``, is added); ``images_per_s`` its inverse.
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
from tlcm.evaluate.diversity import DiversityPlan, plan_diversity
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


ROLES = ("teacher", "baseline", "student")


@dataclass
class ModelSpec:
    """One model of the grid and the cells to run with it.

    ``role``: ``teacher`` (the base model with its own solvers), ``baseline`` (the undistilled base model sampled with
    a student's scheduler: training-free, see :mod:`tlcm.evaluate.baselines`) or ``student`` (a LoRA or distilled
    UNet); default ``student`` with a LoRA, else ``teacher``. ``scheduler_from``: the folder whose
    ``scheduler/scheduler_config.json`` the ``tlcm`` scheduler loads (default: the LoRA folder). ``extra_loras``:
    further ``(path, weight)`` LoRAs loaded next to ``lora`` (e.g. a style LoRA beside an acceleration LoRA); ``lora``
    supplies the scheduler and defaults.
    """

    name: str
    base: str
    lora: str | None = None
    lora_weight: float = 1.0
    schedulers: list[SchedulerSpec] = field(default_factory=lambda: [SchedulerSpec("ddim")])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    guidance: list[float] = field(default_factory=lambda: [7.5])
    role: str | None = None
    scheduler_from: str | None = None
    baseline_of: list[str] = field(default_factory=list)  # for a baseline: the students whose sampler it uses
    extra_loras: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self):
        self.schedulers = [s if isinstance(s, SchedulerSpec) else SchedulerSpec.parse(s) for s in self.schedulers]
        if not self.name or any(c in self.name for c in "/\\ "):
            raise TLCMError(f"model name {self.name!r} must be non-empty without spaces or slashes",
                            "name models like teacher, tlcm, lcm_lora")
        for s in self.steps:
            if int(s) < 1:
                raise TLCMError(f"step count {s} for {self.name!r} must be >= 1", "pass --steps 1,2,4,8")
        if any(sc.name == "tlcm" for sc in self.schedulers) and not self.scheduler_dir:
            raise TLCMError(f"scheduler 'tlcm' for {self.name!r} needs a LoRA folder with its saved scheduler config",
                            "use it for a distilled model (--lora NAME=DIR), or pick tcd/lcm for a plain pipeline")
        if self.role is None:
            self.role = "student" if self.lora else "teacher"
        if self.role not in ROLES:
            raise TLCMError(f"model role {self.role!r} for {self.name!r} is unknown", f"use one of {', '.join(ROLES)}")
        if self.role != "student" and self.lora:
            raise TLCMError(f"{self.name!r} has a LoRA but role {self.role!r}: teacher and baseline rows are the "
                            "undistilled model", "drop the LoRA, or make it a student")

    @property
    def scheduler_dir(self) -> str | None:
        """Where the ``tlcm`` scheduler's saved config lives."""
        return self.scheduler_from or self.lora

    @property
    def training_free(self) -> bool:
        return self.role != "student"


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
    # "toy": a scene drawn for each prompt; "toy:WORLD[:STYLE]": the same in a world / rendering style;
    # "toy-records:SPLIT:SEED": the toy world's records whose captions the prompts are (exact conditional samples);
    # a folder holds real images; None: no data FID
    data: str | None = None


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
def _has_saved_scheduler(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` (a student's output folder; ``None`` or a LoRA file: no) saved its TLCMScheduler config."""
    return folder is not None and (Path(folder) / "scheduler" / "scheduler_config.json").is_file()


def make_scheduler(spec: SchedulerSpec, base_config, lora_dir: str | None = None,
                   timestep_spacing: str = "trailing"):
    # ``lora_dir``: the folder holding ``scheduler/scheduler_config.json`` (a student's, also for its baseline)
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
    from tlcm import TLCMScheduler

    folder = Path(lora_dir) if lora_dir else None
    saved = _has_saved_scheduler(lora_dir)
    # lcm / tcd for a student (or its baseline): on the timestep grid the student was trained on (its saved
    # original_inference_steps, e.g. 20 for the toy TLCM presets), not the teacher's default of 50
    if spec.name == "lcm":
        if saved:
            trained = TLCMScheduler.from_pretrained(str(folder), subfolder="scheduler").config
            cfg["original_inference_steps"] = trained.original_inference_steps
        return diffusers.LCMScheduler.from_config(cfg)
    if spec.name == "tcd":
        if saved:
            return TLCMScheduler.from_pretrained(str(folder), subfolder="scheduler", mode="tcd", gamma=spec.gamma)
        return TLCMScheduler.from_config(cfg, mode="tcd", gamma=spec.gamma)
    # tlcm: the scheduler config the distillation run saved next to its LoRA
    if not saved:
        raise TLCMError(f"scheduler 'tlcm' needs {folder}/scheduler/scheduler_config.json",
                        "point --lora at the folder written by `tlcm distill`, or use tcd/lcm")
    return TLCMScheduler.from_pretrained(str(folder), subfolder="scheduler")


def saved_scheduler_config(folder: str | os.PathLike) -> dict:
    """The resolved config of a student folder's saved TLCMScheduler (defaults filled in, private keys dropped):
    two folders sample identically exactly when these dicts are equal."""
    sched = make_scheduler(SchedulerSpec("tlcm"), {}, str(folder))
    return json.loads(json.dumps({k: v for k, v in dict(sched.config).items() if not k.startswith("_")},
                                 default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


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


def prompt_set_digest(cfg: SweepConfig, prompts=None, seeds=None) -> str:
    """A short hash of what every image of a cell depends on besides the model: prompts, seeds, size, negative prompt.
    Cached reference images and cell results are reused only when it matches."""
    import hashlib

    blob = json.dumps([list(cfg.prompts if prompts is None else prompts), [int(s) for s in
                       (cfg.seeds if seeds is None else seeds)], cfg.height, cfg.width, cfg.negative_prompt])
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


class PromptEmbeddingCache:
    """Memoises ``pipe.encode_prompt`` while the sweep runs (installed on the pipe instance, removed by ``close``).

    Every cell of a model encodes the same prompt batches; on the toy world the text encoder costs as much as a few
    UNet steps per image, so re-encoding them was about half of a 2-step cell's time. Only calls whose arguments are
    all plain values (strings, numbers, devices; no tensors) are cached, up to ``max_bytes`` of embeddings. The cached
    tensors are the ones the first call returned, so the images are bit-identical to uncached ones (the pipelines
    concatenate the embeddings into new tensors and never write into them).

    Latency stays end to end: each entry keeps the seconds its encoding took, and ``saved_s`` adds them up for every
    hit, so that a cell's timer can charge the encoding it did not redo (:func:`run_cell`).
    """

    def __init__(self, pipe, max_bytes: int = 256 * 2**20):
        self.pipe = pipe
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.saved_s = 0.0
        self._store: dict = {}
        self._encode = pipe.encode_prompt
        pipe.encode_prompt = self

    @staticmethod
    def _key(args, kwargs):
        def plain(v):
            if v is None or isinstance(v, (str, int, float, bool)):
                return v
            if isinstance(v, (list, tuple)) and all(x is None or isinstance(x, str) for x in v):
                return tuple(v)
            if isinstance(v, torch.device):
                return str(v)
            raise TypeError
        try:
            return tuple(plain(a) for a in args), tuple(sorted((k, plain(v)) for k, v in kwargs.items()))
        except TypeError:
            return None

    def __call__(self, *args, **kwargs):
        key = self._key(args, kwargs)
        if key is not None and key in self._store:
            out, seconds = self._store[key]
            self.hits += 1
            self.saved_s += seconds
            return out
        t0 = time.perf_counter()
        out = self._encode(*args, **kwargs)
        tensors = [t for t in out if isinstance(t, torch.Tensor)]
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize(tensors[0].device)
        seconds = time.perf_counter() - t0
        if key is not None:
            size = sum(t.numel() * t.element_size() for t in tensors)
            if self.bytes + size <= self.max_bytes:
                self._store[key] = (out, seconds)
                self.bytes += size
        return out

    def close(self):
        if self.pipe.__dict__.get("encode_prompt") is self:
            del self.pipe.encode_prompt
        self._store.clear()


class PipelineCache:
    """Holds the one pipeline in use: models with the same base and LoRA (the teacher, its baselines, the reference)
    share it instead of loading the weights again; a different model replaces it."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.key = None
        self.pipe = None
        self.embeddings: PromptEmbeddingCache | None = None
        self.warmed = False

    def get(self, spec: ModelSpec):
        key = (spec.base, str(Path(spec.lora).expanduser()) if spec.lora else None, float(spec.lora_weight),
               tuple((str(Path(p).expanduser()), float(w)) for p, w in spec.extra_loras))
        if key != self.key:
            self.close()
            self.pipe = load_model(spec, self.cfg.device, self.cfg.dtype)
            self.embeddings = PromptEmbeddingCache(self.pipe)
            self.base_scheduler_config = self.pipe.scheduler.config
            self.key, self.warmed = key, False
        return self.pipe

    def close(self):
        if self.embeddings is not None:
            self.embeddings.close()
        self.pipe, self.embeddings, self.key = None, None, None


def _reference_images(cfg: SweepConfig, pipes: PipelineCache, spec: ModelSpec, sch: SchedulerSpec, cache: Path,
                      prompts, seeds, log, what: str):
    rs = cfg.reference
    if cfg.resume and cache.is_file():
        images = _load_images_npz(cache)
        if len(images) == len(prompts):
            return images
    log(f"reference: {what} on {len(prompts)} prompts")
    pipe = pipes.get(spec)
    pipe.scheduler = make_scheduler(sch, pipes.base_scheduler_config, spec.scheduler_dir, cfg.timestep_spacing)
    images = generate_images(pipe, prompts, seeds, rs.steps, rs.guidance, cfg.height, cfg.width, cfg.batch_size,
                             cfg.negative_prompt)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _save_images_npz(cache, images)
    return images


def toy_data_images(spec: str, prompts: list[str], world: str | None, seed: int = 0, log=print) -> list:
    """Real toy-world images for ``prompts``: the records ``toy-records:SPLIT:SEED`` names when their captions are
    exactly the prompts (exact samples of the world's conditional distribution), else a scene drawn for each prompt
    (``render_prompts``: named attributes as claimed, free ones at random); ``toy:WORLD:STYLE`` draws them in a
    fine-tune's rendering style (e.g. ``toy:v4:shadow``)."""
    from tlcm.toy.worlds import get_world

    style = None
    if spec.startswith("toy:"):  # "toy:v4[:STYLE]"
        name, _, style = spec.partition(":")[2].partition(":")
        world = name or world
    mod = get_world(world)
    if spec.startswith("toy-records:"):
        _, split, record_seed = spec.split(":")
        records = mod.sample_records(len(prompts), int(record_seed), split)
        if [r[1] for r in records] == list(prompts):
            return [r[0] for r in records]
        log(f"reference data: the prompts are not the {mod.NAME} world's records ({split}, seed {record_seed}); "
            "drawing a scene for each prompt instead")
    return mod.render_prompts(prompts, seed=seed, **({"style": style} if style else {}))


def build_reference(cfg: SweepConfig, out: Path, log, pipes: PipelineCache | None = None,
                    plan: DiversityPlan | None = None) -> Reference:
    ref = Reference(prompts=list(cfg.prompts), diversity_groups=plan.groups if plan else None)
    rs = cfg.reference
    if rs.data and (rs.data == "toy" or rs.data.startswith(("toy:", "toy-records:"))):
        ref.data_images = toy_data_images(rs.data, cfg.prompts, cfg.metrics.toy_world,
                                          seed=cfg.seeds[0] if cfg.seeds else 0, log=log)
    elif rs.data:
        size = (cfg.width, cfg.height) if cfg.width and cfg.height else None
        ref.data_images = load_image_folder(rs.data, len(cfg.prompts), size)
    if rs.model:
        pipes = pipes or PipelineCache(cfg)
        spec = cfg.model(rs.model)
        sch = SchedulerSpec.parse(rs.scheduler)
        ref.teacher_label = f"{spec.name} / {sch.label} / {rs.steps} steps / cfg {rs.guidance:g}"
        stem = f"teacher__{spec.name}__{sch.slug}__s{rs.steps}__g{rs.guidance:g}__{prompt_set_digest(cfg)}"
        ref.teacher_images = _reference_images(cfg, pipes, spec, sch, out / "reference" / f"{stem}.npz",
                                               cfg.prompts, cfg.seeds, log, ref.teacher_label)
        if plan and plan.num_extra:
            digest = prompt_set_digest(cfg, plan.extra_prompts, plan.extra_seeds)
            ref.teacher_extra_images = _reference_images(
                cfg, pipes, spec, sch, out / "reference" / f"{stem}__diversity-{digest}.npz", plan.extra_prompts,
                plan.extra_seeds, log, f"{ref.teacher_label} (extra seeds for diversity)")
    return ref


# --- the sweep -------------------------------------------------------------------------------------------------------
def run_cell(pipe, cell: Cell, cfg: SweepConfig, device: torch.device,
             plan: DiversityPlan | None = None) -> tuple[dict, list, list]:
    """Generate (timed) and count one cell; then, untimed, the plan's extra diversity images.

    The wall time includes the prompt encoding that a :class:`PromptEmbeddingCache` on the pipe saved (its measured
    seconds), so latency means the same for the first cell of a model and the rest. Returns
    ``(row, images, extra_images)``."""
    n = len(cfg.prompts)
    embeddings = pipe.__dict__.get("encode_prompt")
    saved0 = embeddings.saved_s if isinstance(embeddings, PromptEmbeddingCache) else 0.0
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
    encode_cached_s = (embeddings.saved_s - saved0) if isinstance(embeddings, PromptEmbeddingCache) else 0.0
    wall += encode_cached_s
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
        "encode_cached_s": encode_cached_s,
        "peak_mem_mb": mem.mb,
        "peak_mem_kind": mem.kind,
    }
    extra = []
    if plan and plan.num_extra:
        t0 = time.perf_counter()
        extra = generate_images(pipe, plan.extra_prompts, plan.extra_seeds, cell.steps, cell.guidance, cfg.height,
                                cfg.width, cfg.batch_size, cfg.negative_prompt)
        row["diversity_extra_images"] = len(extra)
        row["diversity_extra_s"] = time.perf_counter() - t0
    return row, images, extra


def _warm_up(pipe, cfg: SweepConfig, cell: Cell):
    generate_images(pipe, cfg.prompts[:1], cfg.seeds[:1], 1, cell.guidance, cfg.height, cfg.width, 1,
                    cfg.negative_prompt)


def _validate(cfg: SweepConfig) -> None:
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
    div = cfg.metrics.diversity
    if div is not None and (len(div) != 2 or int(div[0]) < 1 or int(div[1]) < 2):
        raise TLCMError(f"diversity {div} needs K >= 1 prompts and S >= 2 seeds", "pass e.g. --diversity 32x4")


def _scoring_identity(cfg: SweepConfig, reference, metrics: list) -> dict:
    """What a cell's scores were measured against: the teacher's reference samples, the data images, the metrics that
    ran and their options. A cell scored without a reference (``--no-reference``) has no ``*_teacher`` numbers, so it
    must not be reused by a run that has one (and the other way round)."""
    options = {k: v for k, v in asdict(cfg.metrics).items() if k != "device"}
    ident = {"reference": reference.teacher_label, "data": cfg.reference.data,
             "metrics": [type(m).__name__ for m in metrics], "options": options}
    return json.loads(json.dumps(ident))  # as a cached row holds it (tuples become lists)


def _file_identity(path: Path) -> str:
    """sha256 of a weights file up to 256 MiB; above that its size and modification time (hashing a full SD UNet on
    every resume would cost seconds)."""
    st = path.stat()
    if st.st_size > 256 * 2**20:
        return f"size {st.st_size}, mtime_ns {st.st_mtime_ns}"
    from tlcm.data.shards import sha256_file

    return sha256_file(path)


def _lora_identity(path: str | None) -> dict | None:
    """The weights a LoRA path stands for: the file, or every ``.safetensors`` of a student folder (checkpoints
    excluded), by relative name. A student re-trained into the same folder changes it."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return {p.name: _file_identity(p)}
    files = sorted(f for f in p.rglob("*.safetensors") if "checkpoints" not in f.relative_to(p).parts)
    return {str(f.relative_to(p)): _file_identity(f) for f in files}


def _weights_identity(spec: ModelSpec) -> dict:
    """What a model's cells were generated with: the base model (as named), the LoRA and stacked LoRAs (their
    weights, see :func:`_lora_identity`) and their scales."""
    ident = {"base": spec.base, "lora": _lora_identity(spec.lora), "lora_weight": spec.lora_weight,
             "extra_loras": [[_lora_identity(p), w] for p, w in spec.extra_loras]}
    return json.loads(json.dumps(ident))  # as a cached row holds it; once per model, not per cell


def _cell_identity(cfg: SweepConfig, spec: ModelSpec, cell: Cell, scoring: dict, weights: dict) -> dict:
    """What a cached cell result must match to be reused: the prompt set, how it was scored (``scoring``, from
    :func:`_scoring_identity`), the model's weights (``weights``, from :func:`_weights_identity`) and, for a saved
    scheduler, its config."""
    ident = {"prompt_set": prompt_set_digest(cfg), "scored_with": scoring, "weights": weights}
    if cell.scheduler.name == "tlcm" or (cell.scheduler.name in ("lcm", "tcd") and _has_saved_scheduler(
            spec.scheduler_dir)):  # lcm/tcd take a student's grid when its folder saved one
        ident["scheduler_config"] = saved_scheduler_config(spec.scheduler_dir)
    return ident


def _describe(row: dict, spec: ModelSpec, sampling: dict) -> None:
    """What the grid says about a cell's model (role, LoRA, whose baseline it is): written on a new row, and renewed
    on a reused one, whose grid may differ (a baseline shared by a student added since)."""
    for key in ("scheduler_from", "baseline_of", "extra_loras", "lora_sampling"):
        row.pop(key, None)
    row.update(role=spec.role, lora=spec.lora)
    if spec.scheduler_from:
        row["scheduler_from"] = spec.scheduler_from
    if spec.baseline_of:
        row["baseline_of"] = list(spec.baseline_of)
    if spec.extra_loras:
        row["extra_loras"] = [[p, w] for p, w in spec.extra_loras]
    if sampling:
        row["lora_sampling"] = sampling


def run_sweep(cfg: SweepConfig, log=print) -> dict:
    """Run every cell (resuming finished ones), score them, and write the report; return the results dict."""
    from tlcm.evaluate import report
    from tlcm.evaluate.baselines import add_ratios, best_training_free
    from tlcm.models import resolve_device

    _validate(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    report.write_json(out / "config.json", config_dict(cfg))

    metrics, notices = build_metrics(cfg.metrics)
    for note in notices:
        log(f"notice: {note}")
    plan = None
    if cfg.metrics.diversity and any(getattr(m, "diversity", False) for m in metrics):
        k, s = (int(v) for v in cfg.metrics.diversity)
        plan = plan_diversity(cfg.prompts, cfg.seeds, k, s)
        log(f"diversity: {len(plan.groups)} prompts x {s} seeds, {plan.num_extra} extra images per cell")
    pipes = PipelineCache(cfg)
    reference = build_reference(cfg, out, log, pipes, plan)
    for m in metrics:
        for note in m.prepare(reference):
            notices.append(note)
            log(f"notice: {note}")
    reference_metrics: dict[str, float] = {}
    for m in metrics:
        reference_metrics.update(m.reference_metrics())
    scoring = _scoring_identity(cfg, reference, metrics)

    rows: list[dict] = []
    cells = cfg.cells()
    by_model: dict[str, list[Cell]] = {}
    for c in cells:
        by_model.setdefault(c.model, []).append(c)
    done = 0
    for model_name, model_cells in by_model.items():
        spec = cfg.model(model_name)
        sampling = sampling_defaults(spec.lora)
        weights = _weights_identity(spec)
        todo = []
        for c in model_cells:
            cached = out / "cells" / f"{c.id}.json"
            if cfg.resume and cached.is_file() and (out / "grids" / f"{c.id}.png").is_file():
                row = json.loads(cached.read_text())
                ident = _cell_identity(cfg, spec, c, scoring, weights)
                if all(row.get(k) == v for k, v in ident.items()):
                    _describe(row, spec, sampling)
                    rows.append(row)
                    done += 1
                    continue
                log(f"{c.id}: the cached result was made with other prompts, another reference or metrics, other "
                    "weights, or another scheduler config; recomputing")
            todo.append(c)
        if not todo:
            continue
        pipe = pipes.get(spec)
        for c in todo:
            scheduler = make_scheduler(c.scheduler, pipes.base_scheduler_config, spec.scheduler_dir,
                                       cfg.timestep_spacing)
            try:  # e.g. a 4-segment MLCD student walks 1..4 steps only: skip the cell, say why
                scheduler.set_timesteps(c.steps)
            except ValueError as err:
                note = f"{c.id} skipped: {err}"
                notices.append(note)
                log(f"notice: {note}")
                continue
            pipe.scheduler = scheduler
            if not pipes.warmed:
                _warm_up(pipe, cfg, c)
                pipes.warmed = True
            row, images, extra = run_cell(pipe, c, cfg, device, plan)
            row.update(_cell_identity(cfg, spec, c, scoring, weights))
            _describe(row, spec, sampling)
            for m in metrics:
                row.update(m.score(images, cfg.prompts, extra))
            report.save_grid(out / "grids" / f"{c.id}.png", images[: cfg.grid_images])
            report.save_thumbs(out / "thumbs" / f"{c.id}.npz", images[:8])
            report.write_json(out / "cells" / f"{c.id}.json", row)
            rows.append(row)
            done += 1
            shown = {k: v for k, v in row.items() if k in report.metric_keys([row])}
            log(f"[{done}/{len(cells)}] {c.id}: nfe {row['nfe']:g}, {row['latency_s'] * 1000:.1f} ms/img, "
                + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    pipes.close()
    order = {c.id: i for i, c in enumerate(cells)}
    rows.sort(key=lambda r: order.get(r["cell"], len(order)))
    best = best_training_free(rows)
    add_ratios(rows, best)
    results = {
        "protocol": cfg.protocol,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": machine_info(device),
        "command": " ".join(["tlcm", *sys.argv[1:]]) if Path(sys.argv[0]).name == "tlcm" else None,
        "num_prompts": len(cfg.prompts),
        "reference": {"teacher": reference.teacher_label, "data": cfg.reference.data, "metrics": reference_metrics},
        "diversity": ({"prompts": len(plan.groups), "seeds_per_prompt": len(plan.groups[0]) if plan.groups else 0,
                       "extra_images_per_cell": plan.num_extra} if plan else None),
        "notices": notices,
        "nfe_note": "nfe = UNet calls per batch x cfg_factor (UNet input rows per image; CFG doubles the batch, "
                    "not the calls)",
        "training_free_best": best,
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
