"""Shared by the toy benchmarks that run ``tlcm`` commands as *stages* (distill_toy, ablation_toy, transfer_toy,
negative_prompt_toy): each stage runs once and is skipped when its finished output exists, so an interrupted benchmark
re-run with the same arguments continues where it stopped; its command (as a user would type it), wall time and the
children's peak memory go into the report.
"""

from __future__ import annotations

import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

# ``use_toy_assets``: every tlcm command then runs on a `tlcm toy build` work dir's assets instead of the shipped ones
TOY_ASSETS: str | None = None
_WRAP = ("import pathlib, sys, tlcm.toy as toy; d = pathlib.Path(sys.argv.pop(1)); "
         "toy.assets_dir = lambda world=None: d; from tlcm.cli import main; sys.exit(main(sys.argv[1:]))")


def use_toy_assets(path: str | Path) -> str:
    """Point this process and every later :func:`tlcm_cmd` at the toy assets in ``path``."""
    global TOY_ASSETS
    TOY_ASSETS = str(Path(path).resolve())
    import tlcm.toy

    tlcm.toy.assets_dir = lambda world=None: Path(TOY_ASSETS)
    return TOY_ASSETS


def tlcm_cmd(*args: str) -> list[str]:
    if TOY_ASSETS:
        return [sys.executable, "-c", _WRAP, TOY_ASSETS, *args]
    return [sys.executable, "-m", "tlcm.cli", *args]


def _tlcm_args(cmd: list[str]) -> list[str] | None:
    """The ``tlcm`` arguments of a command built by :func:`tlcm_cmd`, else None."""
    if cmd[:3] == [sys.executable, "-m", "tlcm.cli"]:
        return cmd[3:]
    if cmd[:2] == [sys.executable, "-c"] and len(cmd) > 3 and cmd[2] == _WRAP:
        return cmd[4:]
    return None


def shown(cmd: list[str]) -> str:
    """The command as a user would type it (``tlcm ...``; the --toy-assets wrapper is described once, not repeated)."""
    args = _tlcm_args(cmd)
    return " ".join(shlex.quote(c) for c in cmd) if args is None else "tlcm " + " ".join(shlex.quote(c) for c in args)


def is_done(done) -> bool:
    """``done``: a path, a list of paths (all must exist) or a callable: a stage's finished output."""
    if callable(done):
        return bool(done())
    return all(Path(p).exists() for p in (done if isinstance(done, (list, tuple)) else [done]))


def synthesized(shards: Path):
    """Done-check of a synthesize stage: its manifest is written at the start and marked complete at the end."""
    def check() -> bool:
        path = Path(shards) / "manifest.json"
        return path.is_file() and bool(json.loads(path.read_text()).get("complete"))

    return check


def resume_flag(run_dir: Path) -> list[str]:
    """How to re-run an interrupted distillation stage: ``--resume latest`` when it left checkpoints (distill continues
    it bit-identically); ``--overwrite`` when it was killed before its first checkpoint (distill refuses a folder
    holding another run, and there is nothing to continue); nothing for a new stage, nor for a finished one (its
    output folder has the model card: the stage is skipped and its command is shown as it first ran)."""
    run_dir = Path(run_dir)
    if (run_dir / "README.md").is_file() and (run_dir / "train_summary.json").is_file():
        return []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("checkpoint-*")):
        return ["--resume", "latest"]
    return ["--overwrite"] if run_dir.is_dir() and any(run_dir.iterdir()) else []


def summary_of(run_dir: Path) -> dict:
    path = Path(run_dir) / "train_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Stages:
    """Runs each stage once (skipped when ``done`` exists) and records its command, wall time and peak memory.

    ``in_process``: run ``tlcm`` commands through :func:`tlcm.cli.main` in this process instead of a subprocess (the
    same arguments; saves an interpreter and import start-up per stage, which the tests at tiny sizes need)."""

    def __init__(self, env: dict | None = None, in_process: bool = False, tag: str = "benchmark"):
        self.env = env
        self.in_process = in_process
        self.tag = tag
        self.log: list[dict] = []

    def _enter(self, name: str, command: str, done) -> dict | None:
        entry = {"stage": name, "command": command}
        self.log.append(entry)
        if is_done(done):
            entry["skipped"] = True
            return None
        print(f"[{self.tag}] {name}: {command}", flush=True)
        return entry

    def _finish(self, entry: dict, t0: float, rc: int) -> None:
        entry["wall_s"] = round(time.time() - t0, 1)
        entry["peak_rss_mib_children"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if rc != 0:
            raise SystemExit(f"[{self.tag}] stage {entry['stage']} failed with exit code {rc}")

    def run(self, name: str, cmd: list[str], done) -> dict:
        entry = self._enter(name, shown(cmd), done)
        if entry is None:
            return self.log[-1]
        t0 = time.time()
        args = _tlcm_args(cmd)
        if self.in_process and args is not None:
            from tlcm.cli import main as tlcm_main

            rc = tlcm_main(args)
        else:
            rc = subprocess.run(cmd, env=self.env).returncode
        self._finish(entry, t0, rc)
        return entry

    def run_parallel(self, jobs: list[tuple[str, list[str], object]]) -> None:
        """Independent stages ``(name, cmd, done)`` side by side, one subprocess each (e.g. one torch thread each)."""
        started = []
        for name, cmd, done in jobs:
            entry = self._enter(name, shown(cmd), done)
            if entry is not None:
                started.append((entry, time.time(), subprocess.Popen(cmd, env=self.env)))
        for entry, t0, proc in started:
            self._finish(entry, t0, proc.wait())

    def python(self, name: str, what: str, fn, done) -> dict:
        """A stage that is a Python call of this process; ``what`` describes it in the report."""
        entry = self._enter(name, what, done)
        if entry is None:
            return self.log[-1]
        t0 = time.time()
        fn()
        entry["wall_s"] = round(time.time() - t0, 1)
        return entry

    def markdown(self) -> list[str]:
        """One report line a stage: its command and wall time (or that an earlier run did it)."""
        return [f"- {e['stage']}: `{e['command']}`"
                + (" (done earlier)" if e.get("skipped") else f" ({e['wall_s']} s)" if "wall_s" in e else "")
                for e in self.log]
