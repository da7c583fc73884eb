"""``tlcm demo``: the whole pipeline on the shipped toy teacher, from nothing to a report, on a CPU.

Stages, each through the public Python API, each skipped when its output already exists (so an interrupted demo
resumes where it stopped):

1. **synthesize**: the toy teacher turns toy-world captions into latent shards with DPM-Solver++ and CFG
   (:func:`tlcm.data.synthesize.synthesize`); no real image is used.
2. **distill**: an MLCD student (TLCM stage 1, preset ``toy-mlcd``), then the TLCM student (stage 2, preset
   ``toy-tlcm``, initialised from the MLCD LoRA), then the paper's last phases on it, the ``toy-tlcm-full`` chain's:
   preference learning (``toy-tlcm-reward``) and DMD + GAN (``toy-tlcm-dmd``), giving ``tlcm-full``; and an LCM-LoRA
   baseline (preset ``toy-lcm``), all from the same shards (:func:`tlcm.train.loop.distill`).
3. **evaluate**: the students at 1, 2, 4 and 8 steps with their own schedulers against the training-free rows of
   the undistilled teacher: DDIM, DPM-Solver++ and Euler at the same step counts with and without CFG, DDIM at 25
   steps, and the teacher sampled with each student's own scheduler (``teacher+NAME-sampler``, g = 1 and CFG;
   :mod:`tlcm.evaluate.baselines`), on toy-world captions the students never trained on; toy-FID against rendered
   data and against the teacher's DPM-Solver++ 25-step samples, prompt alignment, recall, per-prompt diversity,
   latency, network evaluations, memory (:func:`tlcm.evaluate.sweep.run_sweep`).
4. **report**: ``OUT/report/`` with README.md (the training-free and student tables, each student against the best
   training-free sampler, timings, the commands), overview.png (samples: rows = method, columns = steps), plots,
   results.csv.

With ``workers=2`` (the default on a CPU with two free cores) independent stages run side by side, each on one
thread: a second process evaluates the teacher's training-free rows while MLCD and TLCM train, then trains the
LCM-LoRA and evaluates it, MLCD and TLCM while the main process runs the reward and DMD + GAN phases; the final
evaluation reuses those cells (the sweep resumes finished cells) and adds ``tlcm-full``'s. Every number but the
timings is the same as with ``workers=1``: each cell is computed from its own seeds, in whichever process runs it.

``quick=True`` shrinks every count (records, training steps, evaluation prompts) and keeps the same code path; it is
the CI smoke test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tlcm.errors import TLCMError

LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class DemoConfig:
    out: str = "tlcm-demo"
    teacher: str = "toy"
    # the toy world whose captions and metrics the demo uses; None: the teacher's own (a toy name or a folder whose
    # tlcm_toy.json names it). Required for any other teacher: its images are then measured by that world's metrics.
    world: str | None = None
    device: str = "auto"
    quick: bool = False
    records: int = 512
    synth_steps: int = 25
    guidance: float = 4.0  # diffusers form; the toy presets distil with LCM-form w = 3 (= 4 here)
    mlcd_steps: int = 250
    tlcm_steps: int = 100
    lcm_steps: int = 500  # LCM-LoRA converges slower than MLCD (at 250 its 2-step toy-FID was 442 vs 48)
    # the toy-tlcm-full chain's last phases on the TLCM student: preference learning, then DMD + GAN (0: skip both)
    reward_steps: int = 100
    dmd_steps: int = 100
    distill_batch: int = 16
    baseline_lcm: bool = True
    eval_prompts: int = 256
    eval_steps: tuple[int, ...] = (1, 2, 4, 8)
    teacher_solvers: tuple[str, ...] = ("ddim", "dpmpp", "euler")
    teacher_without_cfg: bool = True  # the teacher's solvers at g = 1 too (training-free rows)
    baselines: bool = True  # the teacher with each student's sampler (tlcm.evaluate.baselines)
    # per-prompt diversity, K prompts x S seeds: K x (S - 1) extra images per cell, +19 % of a 256-prompt cell at 16 x 4
    # (the evaluate toy protocol's 32 x 4 would add 38 % to the demo's evaluation)
    diversity: tuple[int, int] | None = (16, 4)
    # the teacher's own quality row (DDIM, CFG): 25 steps, the issues' reference for "alignment within 0.02 of the
    # teacher"; at 50 steps this one row was about a fifth of the evaluation's network evaluations
    teacher_ceiling_steps: int = 25
    reference_steps: int = 25
    eval_batch_size: int = 64
    seed: int = 0
    # torch CPU threads: 1 by default. On a shared machine more threads than free cores made every stage ~50x
    # slower (OpenMP workers spinning against each other); on an idle one, --threads 2 is at most 2x faster.
    threads: int | None = 1
    # processes running independent stages side by side (see the module docstring); None: 2 on a CPU with at least
    # 2 x threads free cores, else 1. Changes only the timings.
    workers: int | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def chain(self) -> bool:
        """Whether the chain's last phases (reward, DMD + GAN) run: both counts positive (checked together)."""
        return self.reward_steps > 0 and self.dmd_steps > 0


# Sized for 2 CPU cores: the full demo in about 20 minutes, the quick one in under 5 (the CI smoke test).
QUICK = dict(records=32, synth_steps=8, mlcd_steps=8, tlcm_steps=4, lcm_steps=8, reward_steps=2, dmd_steps=2,
             distill_batch=8,
             eval_prompts=32, teacher_ceiling_steps=25, reference_steps=10, diversity=(8, 4))


def demo_config(quick: bool = False, **overrides) -> DemoConfig:
    """The full demo's settings, or the quick ones; ``overrides`` (not None) win."""
    cfg = DemoConfig(quick=quick)
    if quick:
        cfg = replace(cfg, **QUICK)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def resolve_workers(cfg: DemoConfig) -> int:
    """``cfg.workers``, or the default: 2 when two single-stage processes each get their own cores (CPU only: on a
    GPU both would queue on one device), else 1."""
    if cfg.workers is not None:
        return int(cfg.workers)
    if cfg.device not in ("auto", "cpu"):
        return 1
    if cfg.device == "auto":
        import torch

        if torch.cuda.is_available():
            return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 2 if cores >= 2 * int(cfg.threads or 1) else 1


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _Stages:
    """Records each stage's wall time in OUT/stages.json; a finished stage keeps the time of the run that did it."""

    def __init__(self, out: Path, log):
        self.path = out / "stages.json"
        self.log = log
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, done: bool, fn):
        if done and name in self.data:
            self.log(f"[demo] {name}: done already ({self.data[name]['seconds']:.0f} s when it ran), skipping")
            return None
        if done:
            self.log(f"[demo] {name}: output present, skipping")
            return None
        self.log(f"[demo] {name} ...")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result = fn()
        seconds = time.perf_counter() - t0
        # CPU seconds (all threads) next to wall time: on a shared machine wall time says little
        self.data[name] = {"seconds": round(seconds, 1), "cpu_seconds": round(_cpu_seconds() - c0, 1),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        from tlcm.evaluate.report import write_json

        write_json(self.path, self.data)
        self.log(f"[demo] {name}: {seconds:.0f} s")
        return result

    def record(self, name: str, timing: dict) -> None:
        """A stage that ran in the side process (its own wall and CPU seconds)."""
        self.data[name] = {**timing, "side": True}
        from tlcm.evaluate.report import write_json

        write_json(self.path, self.data)
        self.log(f"[demo] {name}: {timing['seconds']:.0f} s (side process)")


def _student_done(path: Path) -> bool:
    return (path / LORA_FILE).is_file() and (path / "tlcm_sampling.json").is_file()


def _synthesize(cfg: DemoConfig, data: Path) -> None:
    from tlcm.data.synthesize import SynthesizeConfig, synthesize
    from tlcm.evaluate.report import write_text

    prompt_file = data.parent / "train_prompts.txt"  # toy-world captions, training split, seed cfg.seed
    write_text(prompt_file, "\n".join(_world(cfg).prompts(cfg.records, seed=cfg.seed, split="train")) + "\n")
    synthesize(SynthesizeConfig(
        teacher=cfg.teacher, prompts=str(prompt_file), out=str(data), dedupe=False, num_records=cfg.records,
        solver="dpmpp", steps=cfg.synth_steps, guidance_scale=cfg.guidance, seed=cfg.seed, batch_size=32,
        records_per_shard=256, device=None if cfg.device == "auto" else cfg.device, progress=cfg.progress,
    ))


def _world(cfg: DemoConfig):
    """The toy world of the demo: ``cfg.world`` if set, else the teacher's (``toy``: the default world; ``toy-v3``:
    the v3 shapes world; a toy pipeline folder: its marker). A teacher of no toy world needs ``world`` named."""
    from tlcm.toy import world_of_model
    from tlcm.toy.worlds import get_world, world_version

    if cfg.world is not None:
        return get_world(world_version(cfg.world))
    try:
        return get_world(world_of_model(cfg.teacher))
    except TLCMError as e:
        raise TLCMError(f"the demo needs a toy world's captions and metrics, and {e.problem}",
                        "name the world to measure this teacher with: --world v4 (or v3); or use the shipped toy "
                        "teacher ('toy')") from e


def _distill(cfg: DemoConfig, preset: str, data: Path, out: Path, steps: int, overrides: list[str]) -> None:
    from tlcm.train.config import resolve_config
    from tlcm.train.loop import distill

    flags = {"teacher": cfg.teacher, "data": str(data), "output_dir": str(out), "max_steps": steps,
             "seed": cfg.seed, "device": cfg.device}
    # checkpoints of a few-minute run are not worth their disk; validation images are the evaluation's job
    dcfg = resolve_config(preset, None, flags, [*overrides, f"checkpointing_steps={max(steps, 1)}",
                                                 "validation_steps=0", f"batch_size={cfg.distill_batch}"])
    # a stage killed part-way: continue from its checkpoint, or (none yet) restart it; its settings are this demo's
    from tlcm.train.loop import latest_checkpoint

    resume = "latest" if latest_checkpoint(out) is not None else None
    distill(dcfg, log_with=None, progress=cfg.progress, resume=resume, overwrite=resume is None)


def sweep_config(cfg: DemoConfig, out: Path, students: dict[str, Path]):
    from tlcm.evaluate.baselines import baseline_models
    from tlcm.evaluate.metrics import MetricSpec
    from tlcm.evaluate.prompts import seeds_for
    from tlcm.evaluate.protocols import TOY_EVAL_SEED
    from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SweepConfig, sampling_defaults

    steps = list(cfg.eval_steps)
    guidance = sorted({1.0, cfg.guidance}) if cfg.teacher_without_cfg else [cfg.guidance]
    models = [ModelSpec("teacher", cfg.teacher, schedulers=list(cfg.teacher_solvers), steps=steps,
                        guidance=guidance)]
    if cfg.teacher_ceiling_steps:
        models.append(ModelSpec(f"teacher{cfg.teacher_ceiling_steps}", cfg.teacher, schedulers=["ddim"],
                                steps=[cfg.teacher_ceiling_steps], guidance=[cfg.guidance]))
    student_specs = []
    for name, path in students.items():
        g = float(sampling_defaults(str(path)).get("guidance_scale", 1.0))
        student_specs.append(ModelSpec(name, cfg.teacher, lora=str(path), schedulers=["tlcm"], steps=steps,
                                       guidance=[g]))
    if cfg.baselines:
        models += baseline_models(student_specs, cfg.teacher, [cfg.guidance], taken=[m.name for m in models])
    models += student_specs
    world = _world(cfg)
    prompts = world.prompts(cfg.eval_prompts, seed=TOY_EVAL_SEED, split="train")
    return SweepConfig(
        models=models, prompts=prompts, seeds=seeds_for(len(prompts), TOY_EVAL_SEED), out_dir=str(out),
        batch_size=cfg.eval_batch_size, device=cfg.device,
        reference=ReferenceSpec(model="teacher", scheduler="dpmpp", steps=cfg.reference_steps,
                                guidance=cfg.guidance, data=f"toy-records:train:{TOY_EVAL_SEED}"),
        metrics=MetricSpec(toy=True, toy_world=world.VERSION, fid=False, device="cpu",
                           diversity=tuple(cfg.diversity) if cfg.diversity else None),
        protocol="toy (demo)",
    )


def _all_cells_cached(scfg) -> bool:
    cells = Path(scfg.out_dir) / "cells"
    return all((cells / f"{c.id}.json").is_file() for c in scfg.cells())


def _side_run(cfg: DemoConfig, eval_dir: str, jobs: list, verbose: bool) -> list:
    """The side process: ``jobs`` in turn, each ``(name, spec)``: ``{"kind": "evaluate", "students": {name: dir}}``
    (the sweep restricted to those students and the teacher's rows, into the demo's evaluation folder, whose final
    sweep then reuses the cells) or ``{"kind": "distill", "preset", "out", "steps", "overrides"}``. Returns each
    job's ``(name, timing)``."""
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    from tlcm.evaluate.sweep import run_sweep

    log = (lambda msg: print(f"[side] {msg}", flush=True)) if verbose else (lambda *_: None)
    quiet = replace(cfg, progress=False)  # one progress bar on the terminal: the main process's
    data = Path(cfg.out).expanduser() / "data"
    done = []
    for name, spec in jobs:
        log(f"{name} ...")
        t0, c0 = time.perf_counter(), _cpu_seconds()
        if spec["kind"] == "evaluate":
            run_sweep(sweep_config(cfg, Path(eval_dir), spec["students"]), log=log)
        else:
            _distill(quiet, spec["preset"], data, Path(spec["out"]), int(spec["steps"]), list(spec["overrides"]))
        timing = {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(_cpu_seconds() - c0, 1),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        log(f"{name}: {timing['seconds']:.0f} s")
        done.append((name, timing))
    return done


class _SideLane:
    """At most one batch of stages running in a second process while the main process trains."""

    def __init__(self, cfg: DemoConfig, eval_dir: Path, stages: _Stages, verbose: bool):
        self.cfg, self.eval_dir, self.stages, self.verbose = cfg, eval_dir, stages, verbose
        self.job = None

    def _needed(self, spec: dict) -> bool:
        if spec["kind"] == "evaluate":  # a student trained earlier in the same batch has no folder yet
            return not all(_student_done(Path(d)) for d in spec["students"].values()) or \
                not _all_cells_cached(sweep_config(self.cfg, self.eval_dir, spec["students"]))
        return not _student_done(Path(spec["out"]))

    def start(self, jobs: list) -> None:
        """Run the ``(name, spec)`` jobs of :func:`_side_run` that are not done yet, in turn, beside the main
        process (after the previous batch has finished)."""
        from tlcm.side_process import SideProcess

        self.wait()
        todo = [(name, spec) for name, spec in jobs if self._needed(spec)]  # paths pickle as they are
        if not todo:
            return
        self.stages.log(f"[demo] {', '.join(n for n, _ in todo)} (side process) ...")
        self.job = SideProcess(f"demo side stages ({', '.join(n for n, _ in todo)})", _side_run, self.cfg,
                               str(self.eval_dir), todo, self.verbose)

    def wait(self) -> None:
        if self.job is not None:
            job, self.job = self.job, None
            for name, timing in job.result():
                self.stages.record(name, timing)

    def kill(self) -> None:
        if self.job is not None:
            self.job.kill()
            self.job = None


def check_demo_config(cfg: DemoConfig) -> None:
    """Every count and scale in range, before any stage runs (a bad one must not fail after three trainings)."""
    import math

    if (cfg.reward_steps > 0) != (cfg.dmd_steps > 0) or min(cfg.reward_steps, cfg.dmd_steps) < 0:
        raise TLCMError(f"reward_steps {cfg.reward_steps} and dmd_steps {cfg.dmd_steps}: the chain runs both phases "
                        "or neither", "give both a positive count, or 0 to both (--no-chain)")
    for key in ("records", "synth_steps", "mlcd_steps", "tlcm_steps", "lcm_steps", "distill_batch", "eval_prompts",
                "reference_steps", "eval_batch_size", "teacher_ceiling_steps"):
        if int(getattr(cfg, key)) < 1:
            flag = {"records": "--records", "eval_prompts": "--eval-prompts"}.get(key, key)
            raise TLCMError(f"{flag} {getattr(cfg, key)} is less than 1", f"pass {flag} 1 or more")
    if cfg.threads is not None and cfg.threads < 1:
        raise TLCMError(f"--threads {cfg.threads} is less than 1", "pass --threads 1 or more")
    if cfg.workers is not None and cfg.workers not in (1, 2):
        raise TLCMError(f"--workers {cfg.workers}: the demo runs its stages in 1 or 2 processes",
                        "pass --workers 1 or 2 (or leave it out: 2 on a CPU with two free cores)")
    if not cfg.eval_steps or min(cfg.eval_steps) < 1:
        raise TLCMError(f"eval_steps {list(cfg.eval_steps)} must be step counts of 1 or more", "use e.g. 1,2,4,8")
    if cfg.diversity is not None and min(cfg.diversity) < 1:
        raise TLCMError(f"diversity {cfg.diversity[0]}x{cfg.diversity[1]} needs 1 or more prompts and seeds",
                        "use e.g. 16x4, or no diversity")
    if not math.isfinite(cfg.guidance) or cfg.guidance < 0:
        raise TLCMError(f"guidance {cfg.guidance} is not a finite number >= 0", "use e.g. 4")
    if cfg.distill_batch > cfg.records:
        raise TLCMError(f"the distillation batch ({cfg.distill_batch}) exceeds the {cfg.records} records",
                        f"pass --records {cfg.distill_batch} or more")


def run_demo(cfg: DemoConfig, log=print) -> dict:
    """Run (or resume) the demo; return the evaluation results. See the module docstring.

    With two workers the side process is *spawned*: a script that calls this needs the usual
    ``if __name__ == "__main__":`` guard (as for any multiprocessing code), or ``workers=1``."""
    check_demo_config(cfg)
    _world(cfg)  # a teacher of no known toy world is refused here, before anything is written
    if cfg.threads:
        import torch

        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise TLCMError(f"--out {out} is a file", "pass a folder (created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "demo_config.json"
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress", "device", "threads", "workers")}
    mine = json.loads(json.dumps(mine))  # tuples -> lists, as read back
    if cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        changed = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
        if changed:
            raise TLCMError(f"{out} holds a demo with other settings ({', '.join(changed)})",
                            "pass a new --out, or delete the folder to start over")
    from tlcm.evaluate.report import write_json

    write_json(cfg_file, mine)
    stages = _Stages(out, log)
    t_start = time.perf_counter()

    data = out / "data"
    eval_dir = out / "eval"
    workers = resolve_workers(cfg)
    side = _SideLane(cfg, eval_dir, stages, verbose=log is print) if workers > 1 else None
    students: dict[str, Path] = {}
    root = out / "students"
    mlcd, tlcm_dir, lcm = root / "mlcd", root / "tlcm", root / "lcm"
    reward_dir, full = root / "tlcm-reward", root / "tlcm-full"
    lcm_job = ("distill lcm", {"kind": "distill", "preset": "toy-lcm", "out": lcm, "steps": cfg.lcm_steps,
                               "overrides": []})
    try:
        if side:  # the teacher's rows need no student: evaluate them while MLCD and TLCM train
            side.start([("evaluate teacher", {"kind": "evaluate", "students": {}})])
        stages.run("synthesize", (data / "manifest.json").is_file() and
                   json.loads((data / "manifest.json").read_text()).get("complete", False),
                   lambda: _synthesize(cfg, data))
        stages.run("distill mlcd", _student_done(mlcd),
                   lambda: _distill(cfg, "toy-mlcd", data, mlcd, cfg.mlcd_steps, []))
        stages.run("distill tlcm", _student_done(tlcm_dir),
                   lambda: _distill(cfg, "toy-tlcm", data, tlcm_dir, cfg.tlcm_steps, [f"init_lora={mlcd}"]))
        early = {"tlcm": tlcm_dir, "mlcd": mlcd, **({"lcm": lcm} if cfg.baseline_lcm else {})}
        if side:  # then the LCM-LoRA, and the three students' cells, while the chain's last phases train here
            side.start(([lcm_job] if cfg.baseline_lcm else [])
                       + [(f"evaluate {', '.join(early)}", {"kind": "evaluate", "students": early})])
        if cfg.chain:  # the toy-tlcm-full chain's last phases: preference learning, then DMD + GAN
            stages.run("distill tlcm reward", _student_done(reward_dir),
                       lambda: _distill(cfg, "toy-tlcm-reward", data, reward_dir, cfg.reward_steps,
                                        [f"init_lora={tlcm_dir}"]))
            stages.run("distill tlcm dmd-gan", _student_done(full),
                       lambda: _distill(cfg, "toy-tlcm-dmd", data, full, cfg.dmd_steps, [f"init_lora={reward_dir}"]))
        if cfg.baseline_lcm and not side:
            stages.run("distill lcm", _student_done(lcm),
                       lambda: _distill(cfg, "toy-lcm", data, lcm, cfg.lcm_steps, []))
        if side:
            side.wait()
    except BaseException:
        if side:
            side.kill()
        raise
    students["tlcm"] = tlcm_dir
    if cfg.chain:
        students["tlcm-full"] = full
    students["mlcd"] = mlcd
    if cfg.baseline_lcm:
        students["lcm"] = lcm

    from tlcm.evaluate.sweep import run_sweep

    holder: dict = {}
    # evaluation always runs (finished cells are reused); a re-run must not overwrite the first run's timing
    name = "evaluate" if "evaluate" not in stages.data else "evaluate (re-run)"
    stages.run(name, False, lambda: holder.update(results=run_sweep(sweep_config(cfg, eval_dir, students), log=log)))
    results = holder["results"]
    total = time.perf_counter() - t_start
    write_report(out, cfg, results, stages.data, total)
    return results


def _command_line(cfg: DemoConfig) -> str:
    return "tlcm demo" + (" --quick" if cfg.quick else "") + f" --out {cfg.out}"


def write_report(out: Path, cfg: DemoConfig, results: dict, stages: dict, total_s: float) -> Path:
    """OUT/report/: README.md, overview.png, plots/, results.csv (small files, fit for a repository)."""
    from tlcm.evaluate import report

    rep = out / "report"
    eval_dir = out / "eval"
    (rep / "plots").mkdir(parents=True, exist_ok=True)
    for name in ("overview.png", "results.csv", "results.json"):
        if (eval_dir / name).is_file():
            shutil.copyfile(eval_dir / name, rep / name)
    plots = sorted(p.stem for p in (eval_dir / "plots").glob("*.png"))
    for stem in plots:
        shutil.copyfile(eval_dir / "plots" / f"{stem}.png", rep / "plots" / f"{stem}.png")
    machine = results.get("machine", {})
    timing = "\n".join(f"| {name}{' (side process)' if v.get('side') else ''} | {v['seconds']:.0f} | "
                       f"{_fmt_cpu(v)} |" for name, v in stages.items())
    md = [
        f"# tlcm demo{' (quick)' if cfg.quick else ''}",
        "",
        f"Command: `{_command_line(cfg)}` — {results.get('created')}, {machine.get('platform')}, "
        f"{machine.get('cpu_threads')} CPU threads, torch {machine.get('torch')}.",
        "",
        ("The shipped toy teacher" if cfg.teacher == "toy" else f"The teacher {cfg.teacher}") + " synthesised"
        + f" {cfg.records} latents from toy-world captions "
        f"(DPM-Solver++ {cfg.synth_steps} steps, CFG {cfg.guidance:g}); from them alone an MLCD LoRA "
        f"({cfg.mlcd_steps} steps), the TLCM LoRA (stage 2 from MLCD, {cfg.tlcm_steps} steps)"
        + (f", `tlcm-full` (the TLCM LoRA then the toy-tlcm-full chain's last phases: preference learning "
           f"{cfg.reward_steps} steps, DMD + GAN {cfg.dmd_steps} steps)"
           if cfg.chain else "")
        + (f" and an LCM-LoRA baseline ({cfg.lcm_steps} steps)" if cfg.baseline_lcm else "")
        + f", batch {cfg.distill_batch}"
        + f" were distilled. All are evaluated on {results.get('num_prompts')} held-back captions (seed "
        "10000) against the training-free rows of the undistilled teacher at the same step counts: its own solvers "
        "with and without CFG and, as `teacher+NAME-sampler`, the teacher sampled with student NAME's own scheduler "
        "(no LoRA), the baseline that tells what distillation adds over the sampler.",
        "",
        "Columns: `toy_fid_data` = toy-FID against rendered images of the prompts, `toy_fid_teacher` = toy-FID "
        f"against the teacher's samples ({results.get('reference', {}).get('teacher')}), `alignment` = fraction of "
        "the prompt's attributes the toy classifier reads back (higher is better; FIDs lower is better), "
        "`recall_*` = k-NN manifold recall against the data or the teacher's samples, `diversity` = per-prompt "
        "feature spread over several seeds (`diversity_vs_teacher`: as a share of the teacher's), `÷ best TF` = "
        "the student's toy-FID over the best training-free row's at equal steps / within its network evaluations. "
        f"NFE: {results.get('nfe_note')}.",
        "",
        *report.reference_lines(results),
        "",
        report.sectioned_tables(results["cells"], level="##"),
        "",
        *([report.BEST_NOTE, "", best] if (best := report.best_training_free_table(results)) else []),
        "",
        "![samples: rows = method, columns = steps](overview.png)",
        "",
        *[f"![{p}](plots/{p}.png)" for p in plots],
        "",
        "| stage | wall s | CPU s (all threads) |",
        "|---|---:|---:|",
        timing,
        f"| **total (this run)** | {total_s:.0f} | |",
        "",
    ]
    if any(v.get("side") for v in stages.values()):
        md[-1:-1] = ["", "Stages marked *side process* ran in a second process, each on one thread, at the same time "
                     "as the main process's stages (`--workers 2`); the total is wall time. Only the timings depend "
                     "on it: every cell is computed from its own seeds."]
    md.append("")
    if results.get("notices"):
        md += ["Skipped:", "", *[f"- {n}" for n in results["notices"]], ""]
    report.write_text(rep / "README.md", "\n".join(md))
    return rep


def _fmt_cpu(stage: dict) -> str:
    return f"{stage['cpu_seconds']:.0f}" if stage.get("cpu_seconds") is not None else "–"


def main_table(results: dict) -> str:
    from tlcm.evaluate.report import best_training_free_table, sectioned_tables

    best = best_training_free_table(results)
    return sectioned_tables(results["cells"]) + ("\n\n" + best if best else "")

