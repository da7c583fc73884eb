"""A training run's identity, and everything that protects it: lock, refusals, resume policy, checkpoint checks.

``tlcm distill`` calls into this module at a few marked places; the loop itself holds no such logic.

* **Identity** = every config key that changes the trained weights, the teacher's fingerprint, the training data's
  identity (its shards' checksums), the ``init_lora`` adapter's digest and this format's version. It is written to
  ``OUTPUT_DIR/run.json`` and into every checkpoint's ``training_state.json``, so a checkpoint describes itself.
* **Resume** (``--resume``) compares the identity with the checkpoint's and refuses any difference, spelled out as
  ``key: old -> new``. Keys in :data:`FREE_ON_RESUME` never change a weight and may differ; keys in
  :data:`APPLIED_ON_RESUME` change training from the resumed step on and are applied explicitly (the learning rate
  would otherwise come back from the optimizer state). Every difference that is allowed is recorded in
  ``run.json``'s ``resume_history``; nothing passed with ``--set`` is ignored.
* **One run per folder**: the folder is locked while a run writes it (:mod:`tlcm.runlock`), and a new run into a
  folder holding another run (finished or not) is refused unless it resumes or ``--overwrite`` discards the old one.
* **Checkpoints** carry the size (and, below 256 MiB, the sha256) of each of their files; a damaged one is named on
  ``--resume`` together with the checkpoints that could be resumed instead.
* **Data and teacher**: the shards' teacher fingerprint and VAE scaling must match the teacher
  (``--allow-teacher-mismatch`` for deliberate cross-training); their latent channels and size are checked by
  :mod:`tlcm.train.resolution`, with no way around. A run started from another run (``init_lora``) must share its
  teacher (same switch) and, for stage 2 from stage 1, its segments (no switch).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from tlcm.errors import TLCMError

RUN_FILE = "run.json"
TRAINING_STATE = "training_state.json"
RUN_FORMAT = "tlcm-run"
RUN_FORMAT_VERSION = 1  # bump when the same identity would train other weights (loop, seeding, data order)

# Keys that never change a trained weight (bookkeeping, inference defaults, where things go): free to change on
# resume; the new value is used and recorded. ``teacher``, ``data`` and ``init_lora`` are paths: what they point at
# is compared through the teacher fingerprint and the data and adapter digests, so a moved folder still resumes.
FREE_ON_RESUME = (
    "teacher", "data", "init_lora", "output_dir", "device", "logging_steps", "checkpointing_steps",
    "checkpoints_total_limit", "validation_steps", "validation_prompts", "validation_num_steps",
    "sampling_guidance_scale", "sampling_steps", "timestep_grid", "gradient_checkpointing", "allow_teacher_mismatch",
    "profile_steps",
)
# Keys that change training from the resumed step on. The new value is applied and recorded: the learning rates
# (learning_rate: the student's, and the fake score's when fake_learning_rate is 0; fake_learning_rate;
# disc_learning_rate: the discriminator heads') to each part's restored optimiser and as its LR schedule's base;
# max_steps: the schedules' length and the end; max_grad_norm: clipping. Every other key of every part (student,
# fake score, discriminator: ranks, weights, losses, update intervals) decides weights and is compared strictly.
LEARNING_RATE_KEYS = ("learning_rate", "fake_learning_rate", "disc_learning_rate")
APPLIED_ON_RESUME = ("max_steps", *LEARNING_RATE_KEYS, "max_grad_norm")

# Files `--overwrite` removes from an output folder (a run's own outputs; nothing else is touched).
RUN_OUTPUTS = ("checkpoints", "logs", "validation", "adapter", "unet", "scheduler", RUN_FILE, "config.yaml",
               "train_summary.json", "tlcm_sampling.json", "README.md", "pytorch_lora_weights.safetensors")
HASH_LIMIT = 256 * 2**20  # checkpoint files larger than this are checked by size only (hashing costs a read)


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    from tlcm.data.shards import sha256_file

    return sha256_file(path)


# ----------------------------------------------------------------------------------------------------------------
# identity
# ----------------------------------------------------------------------------------------------------------------


def config_identity(cfg) -> dict:
    """The config keys that define the trained weights (all but :data:`FREE_ON_RESUME` / :data:`APPLIED_ON_RESUME`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME and k not in APPLIED_ON_RESUME}


def resume_settings(cfg) -> dict:
    """The keys that may differ on resume, with this run's values (compared to produce ``resume_history``)."""
    d = cfg.to_dict()
    return {k: d[k] for k in (*APPLIED_ON_RESUME, *FREE_ON_RESUME) if k in d}


def data_identity(manifest: dict | None) -> str | None:
    """A digest of a complete data set: its record count and every shard's checksums (``None``: in-memory data)."""
    if manifest is None:
        return None
    return _sha256_json([manifest.get("num_records"), manifest.get("shards")])


def adapter_identity(init_lora: str) -> str | None:
    """The digest of the adapter a run starts from (``init_lora``), so that a changed stage-1 run is noticed."""
    if not init_lora:
        return None
    weights = Path(init_lora) / "adapter" / "adapter_model.safetensors"
    return _sha256_file(weights) if weights.is_file() else None


def identity_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every difference between two identities (config keys flattened)."""
    flat_old = {**{k: v for k, v in old.items() if k != "config"}, **old.get("config", {})}
    flat_new = {**{k: v for k, v in new.items() if k != "config"}, **new.get("config", {})}
    keys = list(dict.fromkeys([*flat_new, *flat_old]))
    return [f"{k}: {flat_old.get(k, '(absent)')!r} -> {flat_new.get(k, '(absent)')!r}" for k in keys
            if flat_old.get(k, "(absent)") != flat_new.get(k, "(absent)")]


# ----------------------------------------------------------------------------------------------------------------
# process state (lock agreement under accelerate launch)
# ----------------------------------------------------------------------------------------------------------------


class _OneProcess:
    num_processes, is_main_process = 1, True


def _process_state(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        return _OneProcess()
    from accelerate import PartialState

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _agree(state, fn):
    """``fn()`` on the main process; its result (or its TLCMError) on every process."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = fn()
        except TLCMError as err:
            if state.num_processes <= 1:
                raise
            error = [err.problem, err.fix]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        result, error = broadcast_object_list([result, error], from_process=0)
        if error is not None:
            raise TLCMError(*error)
    return result


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    from tlcm.train.loop import list_checkpoints

    return list_checkpoints(output_dir)


def write_training_state(folder: str | Path, step: int, run: RunGuard | None = None) -> None:
    """``training_state.json`` of a checkpoint: the step, the run's identity and settings, and every file's size
    (and sha256 below :data:`HASH_LIMIT`), written last into the not yet renamed checkpoint folder."""
    from tlcm.data.shards import apply_umask, atomic_write_json

    folder = Path(folder)
    apply_umask(folder)  # accelerate/safetensors write some checkpoint files 0600
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != TRAINING_STATE:
            size = p.stat().st_size
            files[p.relative_to(folder).as_posix()] = {"bytes": size,
                                                       "sha256": _sha256_file(p) if size <= HASH_LIMIT else None}
    state = {"global_step": int(step), "files": files}
    if run is not None:
        state.update(run.checkpoint_record())
    atomic_write_json(folder / TRAINING_STATE, state)


def _others(ckpt: Path) -> str:
    others = [str(p) for _, p in _checkpoints(ckpt.parent.parent) if p != ckpt]
    return (f"resume from an earlier one with --resume {others[-1]}" if others else
            "no other checkpoint exists: start again with --overwrite") + f", or delete {ckpt}"


def read_training_state(ckpt: Path) -> dict:
    """A checkpoint's ``training_state.json``, its files checked against the recorded sizes and checksums."""
    path = ckpt / TRAINING_STATE
    try:
        state = json.loads(path.read_text())
        step = int(state["global_step"])
    except FileNotFoundError as err:
        raise TLCMError(f"checkpoint {ckpt} is incomplete: {TRAINING_STATE} is missing", _others(ckpt)) from err
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise TLCMError(f"checkpoint {ckpt} is damaged: {path.name} is unreadable ({err})", _others(ckpt)) from err
    for name, rec in (state.get("files") or {}).items():
        p = ckpt / name
        if not p.is_file():
            raise TLCMError(f"checkpoint {ckpt} is damaged: {name} is missing", _others(ckpt))
        if p.stat().st_size != rec.get("bytes"):
            raise TLCMError(f"checkpoint {ckpt} is damaged: {name} has {p.stat().st_size} bytes, "
                            f"{rec.get('bytes')} were written", _others(ckpt))
        if rec.get("sha256") and _sha256_file(p) != rec["sha256"]:
            raise TLCMError(f"checkpoint {ckpt} is damaged: {name} does not match its recorded sha256",
                            _others(ckpt))
    state["global_step"] = step
    return state


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------


def _run_summary(output_dir: Path) -> str | None:
    """What an output folder already holds ('a finished run ...'), or None for no run."""
    run = output_dir / RUN_FILE
    ckpts = _checkpoints(output_dir)
    if run.is_file():
        try:
            info = json.loads(run.read_text())
        except ValueError:
            info = {}
        status = info.get("status", "unfinished")
        where = f", last checkpoint {ckpts[-1][1].name}" if ckpts else ""
        return f"a{'n' if status == 'unfinished' else ''} {status} run (step {info.get('step', '?')}{where})"
    if ckpts:
        return f"an unfinished run (checkpoints up to {ckpts[-1][1].name})"
    if (output_dir / "tlcm_sampling.json").is_file() or (output_dir / "pytorch_lora_weights.safetensors").is_file():
        return "a finished run"
    return None


class RunGuard:
    """One training run's protection; made by :func:`open_run`, used by the loop at its marked places."""

    def __init__(self, cfg, output_dir: Path, state, lock, resume_from: Path | None, in_memory_data: bool):
        self.cfg, self.output_dir, self.state, self.lock = cfg, output_dir, state, lock
        self.resume_from = resume_from
        self.in_memory_data = in_memory_data
        self.identity = {"format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "config": copy.deepcopy(
            config_identity(cfg)), "teacher_fingerprint": None, "data": None,
            "init_lora": adapter_identity(cfg.init_lora)}
        self.settings = copy.deepcopy(resume_settings(cfg))
        self.previous: dict | None = None  # the resumed checkpoint's training_state
        self.history: list[dict] = []
        self.manifest: dict | None = None

    # -- teacher and data ----------------------------------------------------------------------------------------
    def check_teacher_and_data(self, pipe, num_processes: int = 1) -> None:
        """After the teacher is loaded: its fingerprint; the shards' teacher, latent shape and scaling against it;
        the batch against the data set's size; the ``init_lora`` run's teacher and segments; on resume, the rest of
        the identity."""
        from tlcm.data.synthesize import fingerprint_matches, teacher_fingerprint

        cfg = self.cfg
        self.identity["teacher_fingerprint"] = teacher_fingerprint(pipe, torch.float32)
        if not self.in_memory_data and cfg.data:
            from tlcm.data import read_manifest

            self.manifest = read_manifest(cfg.data, require_complete=True)
            self.identity["data"] = data_identity(self.manifest)
            check_data_matches_teacher(self.manifest, pipe, cfg, fingerprint_matches)
            records = int(self.manifest.get("num_records", 0))
            if cfg.batch_size * num_processes > records:
                raise TLCMError(
                    f"batch_size={cfg.batch_size} x {num_processes} process(es) exceeds the {records} records of "
                    f"{cfg.data}: every batch would repeat records",
                    f"lower batch_size (at most {max(1, records // num_processes)}), raise gradient_accumulation_steps "
                    "for a larger effective batch, or synthesize more records")
        check_init_lora_matches(cfg, self.identity["teacher_fingerprint"])
        self._compare_resumed()

    def _compare_resumed(self) -> None:
        if self.previous is None:
            return
        old = self.previous.get("identity")
        if old is None:
            return
        changes = identity_diff(old, self.identity)
        if changes:
            raise TLCMError(
                f"--resume {self.resume_from}: this run differs from the checkpoint's in what decides the weights: "
                + "; ".join(changes),
                "resume with the original settings, or start a new run in another --output-dir (--set init_lora=DIR "
                f"starts from a finished run's LoRA). May change on resume: {', '.join(APPLIED_ON_RESUME)} (applied) "
                "and bookkeeping such as logging_steps, checkpointing_steps, validation_*")

    # -- resume ---------------------------------------------------------------------------------------------------
    def check_resume_config(self) -> None:
        """Before anything is loaded: the checkpoint is intact and its config part of the identity matches."""
        if self.resume_from is None:
            return
        self.previous = read_training_state(self.resume_from)
        old = (self.previous.get("identity") or {}).get("config")
        if old is None:  # a checkpoint of an older tlcm: compare with the run's config.yaml where there is one
            legacy = self._legacy_config()
            if legacy is None:
                print(f"warning: checkpoint {self.resume_from} records no run identity (written by an older tlcm); "
                      "the settings could not be compared", file=sys.stderr)
                return
            old = {k: v for k, v in legacy.items() if k in self.identity["config"]}
        changes = identity_diff({"config": old}, {"config": self.identity["config"]})
        if changes:
            raise TLCMError(
                f"--resume {self.resume_from}: this run differs from the checkpoint's in what decides the weights: "
                + "; ".join(changes),
                "resume with the original settings, or start a new run in another --output-dir (--set init_lora=DIR "
                f"starts from a finished run's LoRA). May change on resume: {', '.join(APPLIED_ON_RESUME)} (applied) "
                "and bookkeeping such as logging_steps, checkpointing_steps, validation_*")

    def _legacy_config(self) -> dict | None:
        import yaml

        path = self.resume_from.parent.parent / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def restore(self, accelerator, parts: dict | None = None, learning_rates: dict | None = None) -> int:
        """Load the checkpoint (all processes), apply the settings that changed, record them; return its step.

        ``parts``: ``{name: (optimizer, lr_scheduler)}`` of every trained part, ``learning_rates``: ``{name: base
        learning rate}`` under this run's config. When a learning-rate key changed, every part whose restored base
        rate differs from its new one gets it (the checkpoint's optimiser state would otherwise bring the old rate
        back)."""
        ckpt = self.resume_from
        try:
            accelerator.load_state(str(ckpt))
        except TLCMError:
            raise
        except Exception as err:  # safetensors, pickle, torch and accelerate each raise their own types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise TLCMError(f"checkpoint {ckpt} could not be loaded ({type(err).__name__}: {first})",
                            _others(ckpt)) from err
        step = int(self.previous["global_step"])
        old = self.previous.get("settings") or {}
        changes = {k: [old[k], v] for k, v in self.settings.items() if k in old and old[k] != v}
        if any(k in changes for k in LEARNING_RATE_KEYS):
            for name, (optimizer, scheduler) in (parts or {}).items():
                lr = (learning_rates or {}).get(name)
                base = getattr(scheduler, "base_lrs", None) or [g["lr"] for g in optimizer.param_groups]
                if lr is not None and any(b != lr for b in base):
                    set_learning_rate([optimizer], [scheduler] if scheduler is not None else [], lr)
        self.history = list(self.previous.get("resume_history") or [])
        self.history.append({"step": step, "checkpoint": ckpt.name, "time": _now(), "host": socket.gethostname(),
                             "num_processes": accelerator.num_processes, "changes": changes})
        if changes:
            accelerator.print("resumed with changed settings: " + "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return step

    # -- files --------------------------------------------------------------------------------------------------
    def checkpoint_record(self) -> dict:
        return {"identity": self.identity, "identity_sha256": _sha256_json(self.identity),
                "settings": self.settings, "resume_history": self.history}

    def _write(self, status: str, step: int) -> None:
        from tlcm.data.shards import atomic_write_bytes, atomic_write_json

        if not self.state.is_main_process:
            return
        atomic_write_json(self.output_dir / RUN_FILE, {
            "format": RUN_FORMAT, "version": RUN_FORMAT_VERSION, "status": status, "step": step,
            "updated": _now(), **self.checkpoint_record(), "command": " ".join(sys.argv)[:1000]})
        atomic_write_bytes(self.output_dir / "config.yaml", self.cfg.to_yaml().encode())

    def start(self, step: int) -> None:
        """Training is about to run (from ``step``): run.json says so, config.yaml holds the resolved config."""
        self._write("unfinished", step)

    def finish(self, step: int) -> None:
        self._write("finished", step)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def set_learning_rate(optimizers, schedulers, lr: float) -> None:
    """Make ``lr`` the base learning rate of restored optimizers and their LR schedules (LambdaLR, which all of
    diffusers' ``get_scheduler`` schedules are), keeping the schedule's position: lr = base x factor(step)."""
    for sched in schedulers:
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is None:
            raise TLCMError(f"learning_rate cannot change on resume with a {type(sched).__name__} schedule",
                            "resume with the original learning_rate")
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, fn in zip(sched.optimizer.param_groups, lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    if not schedulers:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def open_run(cfg, *, resume: str | None = None, overwrite: bool = False, in_memory_data: bool = False) -> RunGuard:
    """Start protecting a run into ``cfg.output_dir``: lock it; with ``resume``, find the checkpoint and compare its
    config before anything is loaded; without, refuse a folder holding another run unless ``overwrite`` (which
    removes that run's outputs, nothing else). Close the guard (``with``/``close``) when the run ends."""
    output_dir = Path(cfg.output_dir).expanduser()
    state = _process_state(cfg)
    from tlcm.runlock import acquire_on_main

    if resume and overwrite:
        raise TLCMError("--resume continues a run and --overwrite discards it", "pass one of them")
    lock = acquire_on_main(output_dir, state, what="training run", flag="--output-dir")
    try:
        def decide():
            if resume:
                from tlcm.train.loop import latest_checkpoint

                ckpt = latest_checkpoint(output_dir) if resume == "latest" else Path(resume).expanduser()
                if ckpt is None or not ckpt.is_dir():
                    raise TLCMError(f"--resume {resume}: no checkpoint found under {output_dir / 'checkpoints'}",
                                    "drop --resume to start fresh, or pass a checkpoint-N folder")
                return str(ckpt)
            existing = _run_summary(output_dir)
            if existing and not overwrite:
                raise TLCMError(f"{output_dir} already holds {existing}",
                                "pass --resume latest to continue it, --overwrite to discard it, or another "
                                "--output-dir")
            if existing:
                for name in RUN_OUTPUTS:
                    p = output_dir / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            return None

        ckpt = _agree(state, decide)
        guard = RunGuard(cfg, output_dir, state, lock, Path(ckpt) if ckpt else None, in_memory_data)
        if guard.resume_from is not None:
            _agree(state, guard.check_resume_config)
            if not state.is_main_process:
                guard.previous = read_training_state(guard.resume_from)
        return guard
    except BaseException:
        if lock is not None:
            lock.release()
        raise


# ----------------------------------------------------------------------------------------------------------------
# data against teacher
# ----------------------------------------------------------------------------------------------------------------


def check_init_lora_matches(cfg, fingerprint: str) -> None:
    """Refuse to start from a run (``init_lora``) of another teacher, and stage 2 from a stage-1 run on other
    segments: the stage-1 student walks its own segment edges, so stage 2 on other edges would learn from samples
    its start was never trained to draw, and still finish. A teacher mismatch is allowed (warned) with
    ``allow_teacher_mismatch``; the segments are not. An adapter without a ``run.json`` (not a tlcm run) is not checked.
    """
    run_file = Path(cfg.init_lora) / RUN_FILE if cfg.init_lora else None
    if run_file is None or not run_file.is_file():
        return
    try:
        ident = json.loads(run_file.read_text()).get("identity") or {}
    except (OSError, ValueError) as e:
        raise TLCMError(f"init_lora {cfg.init_lora!r}: its {RUN_FILE} cannot be read ({e})",
                        "point init_lora at a finished `tlcm distill` output folder") from e
    theirs, mine = ident.get("teacher_fingerprint"), fingerprint
    if theirs and mine and theirs != mine:
        problem = (f"init_lora {cfg.init_lora!r} was distilled from another teacher (fingerprint {theirs}; "
                   f"--teacher {cfg.teacher!r} is {mine})")
        if not cfg.allow_teacher_mismatch:
            raise TLCMError(problem, "start from a run of this teacher, or pass --allow-teacher-mismatch to adapt "
                                     "another teacher's LoRA on purpose")
        print(f"warning: --allow-teacher-mismatch: {problem}", file=sys.stderr)
    old = ident.get("config") or {}
    if cfg.recipe == "tlcm" and old.get("recipe") == "mlcd":
        changed = [f"{k}: stage 1 {old.get(k)!r}, here {getattr(cfg, k)!r}" for k in ("num_segments",
                   "num_ddim_timesteps") if old.get(k) is not None and old.get(k) != getattr(cfg, k)]
        if changed:
            raise TLCMError(f"stage 2 from {cfg.init_lora!r} on other segments than its stage 1: " + "; ".join(changed),
                            "set num_segments and num_ddim_timesteps as in the stage-1 run (--set KEY=VALUE)")


def check_data_matches_teacher(manifest: dict, pipe, cfg, fingerprint_matches) -> None:
    """Refuse shards made by another teacher (fingerprint) or with another VAE scaling, naming each difference;
    ``cfg.allow_teacher_mismatch`` turns them into warnings. The latent channels and size are the training-size
    logic's (:func:`tlcm.train.resolution.training_image_size`), which the loop runs next."""
    teacher = manifest.get("teacher") or {}
    problems = []
    if not teacher.get("fingerprint"):
        print(f"warning: {cfg.data} records no teacher fingerprint; it cannot be checked against --teacher "
              f"{cfg.teacher}", file=sys.stderr)
    elif not fingerprint_matches(pipe, teacher):
        problems.append(f"teacher: the shards were generated by {teacher.get('id')!r} (fingerprint "
                        f"{teacher.get('fingerprint')}), --teacher {cfg.teacher!r} is another model")
    for key in ("scaling_factor", "shift_factor"):
        ours = getattr(pipe.vae.config, key, None)
        theirs = manifest.get(key)
        if theirs is not None and ours is not None and not math.isclose(float(theirs), float(ours), rel_tol=1e-6):
            problems.append(f"VAE {key}: shards {theirs}, teacher {ours}")
    if problems and not cfg.allow_teacher_mismatch:
        raise TLCMError(f"the data in {cfg.data} does not match --teacher {cfg.teacher}: " + "; ".join(problems),
                        "distil with the teacher that made the data, synthesize data with this one, or pass "
                        "--allow-teacher-mismatch for deliberate cross-training")
    for p in problems:
        print(f"warning: --allow-teacher-mismatch: {p}", file=sys.stderr)
