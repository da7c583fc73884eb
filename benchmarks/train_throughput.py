"""Training throughput and peak memory of each recipe (lcm, mlcd, tlcm) on the toy teacher, LoRA vs full student.

Each configuration runs ``tlcm distill`` twice in a fresh process, for ``--short`` and ``--long`` optimiser steps;
the difference of the two wall times over the difference of steps is the time per step with loading, export and
validation cancelled out. Peak memory is the process's resident high-water mark (``peak_rss_mib`` in the run's
``train_summary.json``; ``peak_cuda_mib`` on a GPU). Synthetic shards are made first (``tlcm synthesize``) unless
``--data`` is given. The tlcm (stage 2) LoRA starts from the mlcd LoRA run, as the recipe requires.

    python benchmarks/train_throughput.py --work runs/throughput            # CPU, toy teacher
    python benchmarks/train_throughput.py --work runs/throughput --write    # also write the results file
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section  # noqa: E402

RECIPES = ("lcm", "mlcd", "tlcm")
STUDENTS = ("lora", "full")


def tlcm(*args) -> list[str]:
    return [sys.executable, "-m", "tlcm.cli", *map(str, args)]


def run(cmd: list[str], env: dict) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python"), flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"command failed with exit code {proc.returncode}")


def distill_run(work: Path, data: Path, teacher: str, recipe: str, student: str, steps: int, batch: int,
                env: dict, init: Path | None) -> dict:
    out = work / f"{recipe}-{student}-{steps}"
    if not (out / "train_summary.json").is_file() or not (out / "cpu.json").is_file():
        if out.exists():
            shutil.rmtree(out)
        cmd = tlcm("distill", "--preset", f"toy-{recipe}", "--teacher", teacher, "--data", data, "--output-dir", out,
                   "--max-steps", steps, "--no-progress", "--set", f"student={student}", "--set",
                   f"batch_size={batch}", "--set", f"checkpointing_steps={steps}", "--set", "validation_steps=0")
        if init is not None:
            cmd += ["--set", f"init_lora={init}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run(cmd, env)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        (out / "cpu.json").write_text(json.dumps({"cpu_s": cpu}))
    summary = json.loads((out / "train_summary.json").read_text())
    summary["cpu_s"] = json.loads((out / "cpu.json").read_text())["cpu_s"]
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="work folder (resumable)")
    p.add_argument("--teacher", default="toy")
    p.add_argument("--data", help="existing shards (default: synthesize --records into WORK/data)")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="training batch size (the toy presets' 32)")
    p.add_argument("--short", type=int, default=4)
    p.add_argument("--long", type=int, default=24)
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write its section of benchmarks/results/evaluate.md")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    data = Path(args.data) if args.data else work / "data"
    if not args.data and not (data / "manifest.json").is_file():
        prompts = work / "prompts.txt"
        from tlcm.toy import world_of_model
        from tlcm.toy.worlds import get_world

        prompts.write_text("\n".join(get_world(world_of_model(args.teacher)).prompts(args.records, seed=0)) + "\n")
        run(tlcm("synthesize", "--teacher", args.teacher, "--prompts", prompts, "--out", data, "--num-records",
                 args.records, "--no-dedupe", "--guidance-scale", 4.0, "--no-progress"), env)
    rows = []
    for student in args.students.split(","):
        for recipe in args.recipes.split(","):
            init = None
            if recipe == "tlcm" and student == "lora":
                init = work / f"mlcd-lora-{args.short}"
                if not (init / "train_summary.json").is_file():
                    distill_run(work, data, args.teacher, "mlcd", "lora", args.short, args.batch, env, None)
            a = distill_run(work, data, args.teacher, recipe, student, args.short, args.batch, env, init)
            b = distill_run(work, data, args.teacher, recipe, student, args.long, args.batch, env, init)
            per_step = (b["wall_time_s"] - a["wall_time_s"]) / (b["steps"] - a["steps"])
            cpu_step = (b["cpu_s"] - a["cpu_s"]) / (b["steps"] - a["steps"])
            row = {"recipe": recipe, "student": student, "batch": args.batch, "s_per_step": per_step,
                   "cpu_s_per_step": cpu_step,
                   "samples_per_s": args.batch / cpu_step if cpu_step > 0 else float("nan"),
                   "peak_rss_mib": b["peak_rss_mib"], "peak_cuda_mib": b.get("peak_cuda_mib"),
                   "trainable_M": b["trainable_parameters"] / 1e6}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| recipe | student | trainable params (M) | batch | CPU s / step | samples / CPU s | wall s / step "
             "| peak RSS MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['student']} | {r['trainable_M']:.2f} | {r['batch']} | "
                     f"{r['cpu_s_per_step']:.3f} | {r['samples_per_s']:.1f} | {r['s_per_step']:.3f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        import torch

        cmd = "python benchmarks/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
        update_section("train_throughput",
            "## Training throughput and peak memory (toy teacher)\n\n"
            f"Command: `{cmd.strip()}` — {platform.platform()}, {args.threads} threads, torch {torch.__version__}, "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.\n\n"
            f"CPU s / step = (CPU({args.long} steps) - CPU({args.short} steps)) / {args.long - args.short}, with the "
            "child process's user+system time, so loading, export and validation cancel out and a shared machine "
            "disturbs it less than wall time (wall s / step is the same difference of wall times: noisy when the "
            "machine is shared). Peak RSS of the longer run's process.\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
