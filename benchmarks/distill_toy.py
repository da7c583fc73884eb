"""Toy-world distillation benchmark: synthesize -> lcm / mlcd / tlcm students (+ a full-UNet cost run) -> evaluate.

Writes ``benchmarks/results/distill.md`` (the table of toy-FID and alignment at 1, 2, 3, 4, 8 steps for the three
students and the teacher's solvers, the bars, wall time and peak memory of each stage, the commands, machine, date).
Every stage is a ``tlcm`` command run as a subprocess and skipped when its output already exists, so an interrupted
benchmark continues where it stopped::

    python benchmarks/distill_toy.py --out runs/distill-toy            # full run (CPU: see distill.md for time)
    python benchmarks/distill_toy.py --out runs/distill-toy --quick    # a few steps each: checks the pipeline only

Needs the toy world (``tlcm.toy``: shipped teacher and metrics).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "distill.md"
STEPS = (1, 2, 3, 4, 8, 50)


TOY_ASSETS: str | None = None  # --toy-assets: use a `tlcm toy build` work dir's assets instead of the shipped ones

_WRAP = ("import pathlib, sys, tlcm.toy as toy; d = pathlib.Path(sys.argv.pop(1)); toy.assets_dir = lambda: d; "
         "from tlcm.cli import main; sys.exit(main(sys.argv[1:]))")


def tlcm_cmd(*args: str) -> list[str]:
    if TOY_ASSETS:
        return [sys.executable, "-c", _WRAP, TOY_ASSETS, *args]
    return [sys.executable, "-m", "tlcm.cli", *args]


def shown(cmd: list[str]) -> str:
    """The command as a user would type it (``tlcm ...``; the --toy-assets wrapper is described once, not repeated)."""
    args = cmd[4:] if cmd[1] == "-c" else cmd[3:]
    return "tlcm " + " ".join(shlex.quote(c) for c in args)


def run_stage(name: str, cmd: list[str], done: Path, log: list[dict], env: dict) -> dict:
    """Run ``cmd`` unless ``done`` exists; record wall time and peak RSS of the child."""
    entry = {"stage": name, "command": shown(cmd)}
    if done.exists():
        entry["skipped"] = True
        log.append(entry)
        return entry
    print(f"[distill_toy] {name}: {entry['command']}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    entry["wall_s"] = round(time.time() - t0, 1)
    import resource

    entry["peak_rss_mib_children"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    if proc.returncode != 0:
        raise SystemExit(f"[distill_toy] stage {name} failed with exit code {proc.returncode}")
    log.append(entry)
    return entry


def resume_flag(run_dir: Path) -> list[str]:
    """``--resume latest`` when an interrupted run left checkpoints (distill continues it bit-identically)."""
    ckpts = run_dir / "checkpoints"
    return ["--resume", "latest"] if ckpts.is_dir() and any(ckpts.glob("checkpoint-*")) else []


def summary_of(run_dir: Path) -> dict:
    path = run_dir / "train_summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _rows(results_path: Path) -> list[dict]:
    if not results_path.exists():
        return []
    data = json.loads(results_path.read_text())
    return data.get("cells", [])


def _metric(row: dict, *names: str):
    for n in names:
        for key in (n, f"metrics.{n}"):
            if key in row and row[key] is not None:
                return row[key]
        if isinstance(row.get("metrics"), dict) and row["metrics"].get(n) is not None:
            return row["metrics"][n]
    return None


def table(rows: list[dict]) -> tuple[str, dict]:
    """Markdown table method x steps of toy-FID (vs data) / alignment, and a lookup for the bars."""
    by: dict[tuple[str, int], dict] = {}
    for r in rows:
        model = r.get("model", "")
        sched = str(r.get("scheduler", "")).lower()
        sched = "dpmpp" if "dpm" in sched else sched
        method = model if model in ("lcm", "mlcd", "tlcm") else f"teacher-{sched}"
        steps = int(r.get("steps", 0))
        by[(method, steps)] = r
    methods = sorted({m for m, _ in by}, key=lambda m: (m.startswith("teacher"), m))
    lines = ["| method | " + " | ".join(f"{s} steps" for s in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]
    look: dict[tuple[str, int], tuple] = {}
    for m in methods:
        cells = []
        for s in STEPS:
            r = by.get((m, s))
            if r is None:
                cells.append("-")
                continue
            fid = _metric(r, "toy_fid_data", "toy_fid")
            ali = _metric(r, "alignment")
            look[(m, s)] = (fid, ali)
            cells.append(f"{fid:.2f} / {ali:.3f}" if fid is not None and ali is not None else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines), look


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/distill-toy")
    ap.add_argument("--records", type=int, default=512, help="synthetic teacher latents for lcm/mlcd")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (pipeline check, no real numbers)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1 is fastest when shared)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/results/distill.md")
    ap.add_argument("--num-prompts", type=int, default=256, help="evaluation prompts (the toy protocol's 256)")
    ap.add_argument("--schedulers", default="ddim,dpmpp,euler", help="teacher solvers to compare with")
    ap.add_argument("--toy-assets", help="assets folder of a `tlcm toy build` work dir (default: the shipped ones)")
    args = ap.parse_args()
    global TOY_ASSETS
    if args.toy_assets:
        TOY_ASSETS = str(Path(args.toy_assets).resolve())
        import tlcm.toy

        tlcm.toy.assets_dir = lambda: Path(TOY_ASSETS)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    from tlcm.toy import default_prompts_path

    q = ["--max-steps", "3", "--set", "checkpointing_steps=0"] if args.quick else []
    records = 64 if args.quick else args.records
    log: list[dict] = []
    shards = out / "shards"
    run_stage("synthesize", tlcm_cmd("synthesize", "--teacher", "toy", "--prompts", str(default_prompts_path()),
                                     "--out", str(shards), "--num-records", str(records), "--solver", "dpmpp",
                                     "--steps", "25", "--guidance-scale", "4", "--batch-size", "64",
                                     "--records-per-shard", "256", "--no-progress"),
              shards / "manifest.json", log, env)
    # lcm and mlcd are independent: run them side by side (one thread each)
    pending = []
    for recipe in ("lcm", "mlcd"):
        cmd = tlcm_cmd("distill", "--preset", f"toy-{recipe}", "--data", str(shards), "--output-dir",
                       str(out / recipe), "--no-progress", *q, *resume_flag(out / recipe))
        entry = {"stage": f"distill-{recipe}", "command": shown(cmd)}
        log.append(entry)
        if not (out / recipe / "README.md").exists():
            print(f"[distill_toy] {entry['stage']}: {entry['command']}", flush=True)
            pending.append((entry, subprocess.Popen(cmd, env=env)))
    for entry, proc in pending:
        if proc.wait() != 0:
            raise SystemExit(f"[distill_toy] stage {entry['stage']} failed with exit code {proc.returncode}")
    run_stage("distill-tlcm", tlcm_cmd("distill", "--preset", "toy-tlcm", "--data", str(shards), "--output-dir",
                                       str(out / "tlcm"), "--set", f"init_lora={out / 'mlcd'}", "--no-progress", *q,
                                       *resume_flag(out / "tlcm")),
              out / "tlcm" / "README.md", log, env)
    full_steps = "3" if args.quick else "20"
    run_stage("distill-lcm-full (cost only)", tlcm_cmd("distill", "--preset", "toy-lcm", "--data", str(shards),
                                                       "--output-dir", str(out / "lcm-full"), "--set", "student=full",
                                                       "--set", "learning_rate=1e-4", "--max-steps", full_steps,
                                                       "--set", "checkpointing_steps=0", "--no-progress"),
              out / "lcm-full" / "README.md", log, env)
    few = ["--num-prompts", "32" if args.quick else str(args.num_prompts)]
    eval_dir = out / "eval"
    run_stage("evaluate", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_dir), "--no-reference",
                                   "--lora", f"lcm={out / 'lcm'}", "--lora", f"tlcm={out / 'tlcm'}",
                                   "--steps", "1,2,3,4,8", "--schedulers", args.schedulers, *few),
              eval_dir / "results.json", log, env)
    eval_mlcd = out / "eval-mlcd"  # a 4-segment MLCD student walks at most 4 steps (edge to edge)
    run_stage("evaluate-mlcd", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_mlcd), "--no-teacher",
                                        "--no-reference", "--lora", f"mlcd={out / 'mlcd'}", "--steps", "1,2,3,4",
                                        *few),
              eval_mlcd / "results.json", log, env)
    eval_ref = out / "eval-teacher50"
    run_stage("evaluate-teacher-50", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_ref),
                                              "--no-reference", "--schedulers", "dpmpp", "--steps", "50", *few),
              eval_ref / "results.json", log, env)

    rows = _rows(eval_dir / "results.json") + _rows(eval_mlcd / "results.json") + _rows(eval_ref / "results.json")
    md_table, look = table(rows)
    bars = []

    def check(label, ok):
        bars.append(f"- {label}: {'**met**' if ok else '**missed**' if ok is not None else 'not measured'}")

    def get(m, s, i):
        v = look.get((m, s))
        return None if v is None or v[i] is None else round(float(v[i]), 3)

    # the bar: equal network evaluations (the teacher's CFG costs 2 per step, so N student steps meet N/2
    # teacher steps); then the stricter equal-steps comparison
    for s in (2, 4, 8):
        t_fid, t_ali = get("tlcm", s, 0), get("tlcm", s, 1)
        d_fid, d_ali = get("teacher-dpmpp", s // 2, 0), get("teacher-dpmpp", s // 2, 1)
        ok = None if None in (t_fid, t_ali, d_fid, d_ali) else (t_fid < d_fid and t_ali > d_ali)
        check(f"tlcm ({s} steps) beats teacher DPM-Solver++ at the same {s} network evaluations ({s // 2} CFG steps; "
              f"toy-FID {t_fid} vs {d_fid}, alignment {t_ali} vs {d_ali})", ok)
    for s in (2, 4, 8):
        t_fid, t_ali = get("tlcm", s, 0), get("tlcm", s, 1)
        d_fid, d_ali = get("teacher-dpmpp", s, 0), get("teacher-dpmpp", s, 1)
        ok = None if None in (t_fid, t_ali, d_fid, d_ali) else (t_fid < d_fid and t_ali > d_ali)
        check(f"stricter: tlcm beats teacher DPM-Solver++ at equal steps, {s} (twice the teacher's evaluations; "
              f"toy-FID {t_fid} vs {d_fid}, alignment {t_ali} vs {d_ali})", ok)
    l_fid, l_ali, t_fid, t_ali = get("lcm", 2, 0), get("lcm", 2, 1), get("tlcm", 2, 0), get("tlcm", 2, 1)
    check(f"tlcm beats lcm at 2 steps (toy-FID {t_fid} vs {l_fid}, alignment {t_ali} vs {l_ali})",
          None if None in (l_fid, l_ali, t_fid, t_ali) else (t_fid < l_fid and t_ali > l_ali))
    ref_fid = get("teacher-dpmpp", 50, 0)
    t4 = get("tlcm", 4, 0)
    check(f"tlcm 4-step toy-FID within 1.3x of the teacher's 50-step toy-FID ({t4} vs {ref_fid})",
          None if None in (t4, ref_fid) else t4 <= 1.3 * ref_fid)

    # measured metrics into each student's model card
    from tlcm.evaluate.report import write_text
    from tlcm.train.config import resolve_config
    from tlcm.train.export import model_card

    for name in ("lcm", "mlcd", "tlcm"):
        run = out / name
        if not (run / "config.yaml").exists():
            continue
        label = f"toy-FID vs data / alignment, {few[1]} toy prompts"
        metrics = {f"{s} steps ({label})": f"{v[0]:.3f} / {v[1]:.3f}"
                   for (m, s), v in sorted(look.items()) if m == name and None not in v}
        if metrics:
            card = model_card(resolve_config(config_file=str(run / "config.yaml")), summary_of(run), metrics)
            write_text(run / "README.md", card)

    costs = ["| stage | wall time (s) | peak memory (MiB) | notes |", "|---|---|---|---|"]
    for e in log:
        name = e["stage"]
        run = {"distill-lcm": "lcm", "distill-mlcd": "mlcd", "distill-tlcm": "tlcm",
               "distill-lcm-full (cost only)": "lcm-full"}.get(name)
        s = summary_of(out / run) if run else {}
        wall = s.get("wall_time_s", e.get("wall_s", "(earlier run)"))
        mem = s.get("peak_rss_mib", e.get("peak_rss_mib_children", "-"))
        note = (f"{s.get('steps')} steps, {s.get('trainable_parameters')} trainable parameters, "
                f"{s.get('s_per_step')} s/step in the loop" if s else "")
        costs.append(f"| {name} | {wall} | {mem} | {note} |")
    text = "\n".join([
        "# Toy-world distillation: lcm / mlcd / tlcm students vs the teacher's solvers",
        "",
        f"Date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores visible, torch threads per process {args.threads}, python "
        f"{platform.python_version()}.{' QUICK RUN: pipeline check only, not results.' if args.quick else ''}",
        "",
        f"Reproduce: `python benchmarks/distill_toy.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
        "(stages below, each skipped when already done).",
        "",
        "## Quality (toy-FID vs data, lower is better / alignment, higher is better)",
        "",
        md_table,
        "",
        "Teacher rows sample with CFG (guidance 4), two network evaluations per step; students sample without CFG,",
        "one per step. The issue's bars compare at equal network evaluations (student N steps vs teacher N/2",
        "steps); the equal-steps rows below give the teacher twice the student's evaluations. MLCD (4 segments)",
        "walks edge to edge and has no 8-step schedule.",
        "",
        "## Bars",
        "",
        *bars,
        "",
        "## Cost",
        "",
        *costs,
        "",
        "## Commands",
        "",
        *([f"(run with `--toy-assets {TOY_ASSETS}`: each command ran as `python -c '<point tlcm.toy.assets_dir at "
           f"that folder>; tlcm.cli.main(...)'`, i.e. on that toy build instead of the shipped assets)", ""]
          if TOY_ASSETS else []),
        *[f"- {e['stage']}: `{e['command']}`" for e in log],
        "",
    ])
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_text(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
