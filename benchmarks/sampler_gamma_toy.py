"""How much of a student's quality at 2-8 steps is its sampler's re-noising? The TCD gamma sweep, on two prompt sets.

The TLCM student samples with LCM's x0-re-noising (TCD gamma = 1: every step predicts the clean latent and draws
fresh noise down to the next time). TCD's gamma < 1 keeps part of the current noise. This script evaluates one
student folder with its own scheduler and with ``tcd:GAMMA`` for each gamma, at each step count, on the demo's
evaluation prompts (seed 10000) and on a disjoint calibration set (seed 20000) of the same size, each against the
teacher's DPM-Solver++ 25-step CFG samples of its own prompts, so that a gamma chosen on one set can be checked on
the other (toy-FID on a few hundred prompts is noisy: a choice that holds on both is a finding, one that flips is
noise). Writes the section ``sampler-gamma`` of ``benchmarks/results/evaluate.md``.

    python benchmarks/sampler_gamma_toy.py --student DEMO/students/tlcm --out /tmp/gamma [--gammas 0.2,0.4,0.6,0.8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section  # noqa: E402

SETS = {"evaluation (seed 10000)": 10_000, "calibration (seed 20000)": 20_000}


def sweep_for(student: Path, out: Path, seed: int, n: int, gammas: list[str], steps: list[int]):
    from tlcm.demo import _world, demo_config, sweep_config
    from tlcm.evaluate.prompts import seeds_for
    from tlcm.evaluate.sweep import SchedulerSpec

    cfg = demo_config(False, eval_steps=tuple(steps), baselines=False, eval_prompts=n)
    sc = sweep_config(cfg, out, {"student": student})
    models = []
    for m in sc.models:
        if m.name == "student":
            m.schedulers = [SchedulerSpec.parse("tlcm")] + [SchedulerSpec.parse(f"tcd:{g}") for g in gammas]
            models.append(m)
        elif m.name == "teacher":  # the reference model only: no teacher cells
            m.schedulers, m.steps, m.guidance = [SchedulerSpec.parse("dpmpp")], [], [cfg.guidance]
            models.append(m)
    prompts = _world(cfg).prompts(n, seed=seed, split="train")
    return replace(sc, models=models, prompts=prompts, seeds=seeds_for(n, seed),
                   reference=replace(sc.reference, data=f"toy-records:train:{seed}"),
                   metrics=replace(sc.metrics, diversity=None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", required=True, help="a tlcm distill output folder (its scheduler is the gamma=1 row)")
    p.add_argument("--out", required=True, help="work folder (cells are reused on a re-run)")
    p.add_argument("--gammas", default="0.2,0.4,0.6,0.8")
    p.add_argument("--steps", default="2,4,8")
    p.add_argument("--prompts", type=int, default=256)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from tlcm.evaluate.sweep import run_sweep

    gammas, steps = args.gammas.split(","), [int(s) for s in args.steps.split(",")]
    rows: dict[str, dict] = {}
    for label, seed in SETS.items():
        sc = sweep_for(Path(args.student), Path(args.out) / f"seed{seed}", seed, args.prompts, gammas, steps)
        res = run_sweep(sc, log=print)
        for c in res["cells"]:
            if c.get("role") == "student":
                rows.setdefault(c["scheduler"], {})[(label, c["steps"])] = c
    header = "| sampler | " + " | ".join(f"{s} steps: {'eval' if '10000' in lab else 'calib'}" for s in steps
                                         for lab in SETS) + " |"
    lines = [header, "|---|" + "---:|" * (len(steps) * len(SETS))]
    for sch, cells in rows.items():
        vals = []
        for s in steps:
            for lab in SETS:
                c = cells.get((lab, s))
                vals.append(f"{c['toy_fid_teacher']:.1f} / {c['alignment']:.3f}" if c else "-")
        name = "tlcm (LCM re-noising, gamma 1)" if sch == "tlcm" else sch
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join([
        "## A student's sampler: TCD gamma at 2-8 steps (toy v4)",
        "",
        f"Date {when}; machine: {platform.machine()}, torch threads 1, python {platform.python_version()}.",
        "",
        f"Reproduce: `python benchmarks/sampler_gamma_toy.py {shlex.join(sys.argv[1:])}`. Each cell: toy-FID vs the "
        f"teacher's DPM-Solver++ 25-step CFG-4 samples of the same {args.prompts} prompts / alignment; `eval` = the "
        "demo's evaluation prompts (seed 10000), `calib` = a disjoint set (seed 20000).",
        "",
        *lines,
    ])
    path = update_section("sampler-gamma", body)
    print(body)
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
