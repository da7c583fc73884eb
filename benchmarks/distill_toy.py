"""Toy-world distillation benchmark: synthesize -> lcm / mlcd / tlcm students (+ a full-UNet cost run) -> evaluate.

Writes ``benchmarks/results/distill.md``: toy-FID against the teacher's samples and alignment at 1, 2, 3, 4, 8 steps
for the three students and every training-free row of the undistilled teacher (its solvers with and without CFG, and
the teacher sampled with each student's own scheduler, ``teacher+NAME-sampler``), each student's ratio to the best
training-free sampler at equal steps and within its network evaluations, recall and per-prompt diversity against the
teacher's, the bars (issue #10's compare with the best training-free sampler), wall time and peak memory of each
stage, the commands, machine, date.
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _stages  # noqa: E402
from _stages import Stages, resume_flag, summary_of, tlcm_cmd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "distill.md"
STEPS = (1, 2, 3, 4, 8, 50)


def _rows(results_path: Path) -> list[dict]:
    if not results_path.exists():
        return []
    data = json.loads(results_path.read_text())
    return data.get("cells", [])


def _is_student(row: dict) -> bool:
    return row.get("role") == "student" or (not row.get("role") and bool(row.get("lora")))


def method_of(row: dict) -> str:
    """Students by name; training-free rows as model / scheduler / cfg (one sampler at two CFG scales is two rows)."""
    if _is_student(row):
        return row["model"]
    return f"{row['model']} / {row['scheduler']} / cfg {row['guidance']:g}"


def _f(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pair(r: dict | None) -> str:
    return "-" if r is None else f"{_f(r.get('toy_fid_teacher'))} / {_f(r.get('alignment'), 3)}"


def table(rows: list[dict], best: dict) -> tuple[str, dict]:
    """Markdown table method x steps of toy-FID vs teacher / alignment (training-free rows, the best training-free
    value per step count, then the students), and a lookup ``(method, steps) -> row`` for the bars."""
    by: dict[tuple[str, int], dict] = {(method_of(r), int(r["steps"])): r for r in rows}
    students = list(dict.fromkeys(method_of(r) for r in rows if _is_student(r)))
    free = [m for m in dict.fromkeys(method_of(r) for r in rows) if m not in students]
    free.sort(key=lambda m: "+" in m)  # the teacher's solvers, then the baselines (stable)
    lines = ["| method | " + " | ".join(f"{s} steps" for s in STEPS) + " |", "|---|" + "---|" * len(STEPS)]
    for m in free:
        lines.append(f"| {m} | " + " | ".join(_pair(by.get((m, s))) for s in STEPS) + " |")
    cells = []
    for s in STEPS:
        b = best.get("by_steps", {}).get(str(s), {})
        fid, ali = b.get("toy_fid_teacher"), b.get("alignment")
        cells.append(f"{_f(fid['value'] if fid else None)} / {_f(ali['value'] if ali else None, 3)}"
                     if fid or ali else "-")
    lines.append("| **best training-free** | " + " | ".join(cells) + " |")
    for m in students:
        lines.append(f"| **{m}** | " + " | ".join(_pair(by.get((m, s))) for s in STEPS) + " |")
    return "\n".join(lines), by


def student_table(rows: list[dict], reference: dict) -> str:
    """Per student and step count: ratios to the best training-free sampler, recall and diversity vs the teacher."""
    ref_recall, ref_div = reference.get("recall_data"), reference.get("diversity")
    lines = ["| student | steps | NFE | toy-FID vs teacher | ÷ best TF, equal steps | ÷ best TF, equal NFE | "
             "alignment − best TF | recall vs data (÷ teacher's) | diversity ÷ teacher's |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not _is_student(r):
            continue
        rec = r.get("recall_data")
        rec_txt = "–" if rec is None else f"{rec:.3f}" + (f" ({rec / ref_recall:.2f})" if ref_recall else "")
        lines.append(f"| {r['model']} | {r['steps']} | {r['nfe']:g} | {_f(r.get('toy_fid_teacher'))} | "
                     f"{_f(r.get('toy_fid_teacher_ratio_tf'), 3)} | {_f(r.get('toy_fid_teacher_ratio_tf_nfe'), 3)} | "
                     f"{_f(r.get('alignment_delta_tf'), 3)} | {rec_txt} | {_f(r.get('diversity_vs_teacher'), 3)} |")
    note = (f"The teacher reference (DPM-Solver++ 25 steps, CFG 4) scores recall vs data {_f(ref_recall, 3)}, "
            f"per-prompt diversity {_f(ref_div, 3)}, alignment {_f(reference.get('alignment'), 3)}.")
    return "\n".join(lines) + "\n\n" + note


def bar_lines(by: dict, best: dict, reference: dict) -> list[str]:
    """The bars of issue #10 (against the best training-free sampler; alignment and recall against the teacher
    reference) and the earlier ones, each met / missed / not measured. Compared unrounded, shown to 4 digits."""
    bars = []

    def check(label, ok):
        bars.append(f"- {label}: {'not measured' if ok is None else '**met**' if ok else '**missed**'}")

    def get(m, s, key):
        r = by.get((m, s))
        return None if r is None or r.get(key) is None else float(r[key])

    def n(v):
        return "–" if v is None else f"{v:.4g}"

    def best_at(table_key, at):
        b = best.get(table_key, {}).get(at, {}).get("toy_fid_teacher")
        return "–" if b is None else f"{b['value']:.4g}, {b['method']}"

    # issue #10: the distilled student must beat the best training-free sampler of the undistilled teacher, by 2x
    for s in (2, 4):
        fid = get("tlcm", s, "toy_fid_teacher")
        ratio, ratio_nfe = get("tlcm", s, "toy_fid_teacher_ratio_tf"), get("tlcm", s, "toy_fid_teacher_ratio_tf_nfe")
        check(f"tlcm at {s} steps: toy-FID vs teacher <= 0.5x the best training-free sampler at {s} steps "
              f"({n(fid)} vs {best_at('by_steps', str(s))}; ratio {n(ratio)})", None if ratio is None else ratio <= 0.5)
        nfe = get("tlcm", s, "nfe")
        check(f"tlcm at {s} steps: toy-FID vs teacher <= 0.5x the best training-free sampler within its "
              f"{n(nfe)} network evaluations ({n(fid)} vs {best_at('by_nfe', f'{nfe:g}') if nfe else '–'}; ratio "
              f"{n(ratio_nfe)})", None if ratio_nfe is None else ratio_nfe <= 0.5)
        ali, ref_ali = get("tlcm", s, "alignment"), reference.get("alignment")
        check(f"tlcm at {s} steps: alignment within 0.02 of the teacher at 25 steps ({n(ali)} vs {n(ref_ali)})",
              None if None in (ali, ref_ali) else ali >= ref_ali - 0.02)
        rec, ref_rec = get("tlcm", s, "recall_data"), reference.get("recall_data")
        check(f"tlcm at {s} steps: recall vs data >= 0.9x the teacher's ({n(rec)} vs {n(ref_rec)})",
              None if None in (rec, ref_rec) else rec >= 0.9 * ref_rec)
    l_fid, l_ali = get("lcm", 2, "toy_fid_teacher"), get("lcm", 2, "alignment")
    t_fid, t_ali = get("tlcm", 2, "toy_fid_teacher"), get("tlcm", 2, "alignment")
    check(f"tlcm beats lcm at 2 steps (toy-FID vs teacher {n(t_fid)} vs {n(l_fid)}, alignment {n(t_ali)} vs "
          f"{n(l_ali)})", None if None in (l_fid, l_ali, t_fid, t_ali) else (t_fid < l_fid and t_ali > l_ali))
    ref_fid, t4 = get("teacher / dpmpp / cfg 4", 50, "toy_fid_data"), get("tlcm", 4, "toy_fid_data")
    check(f"tlcm 4-step toy-FID vs data within 1.3x of the teacher's 50-step toy-FID vs data ({n(t4)} vs "
          f"{n(ref_fid)})", None if None in (t4, ref_fid) else t4 <= 1.3 * ref_fid)
    return bars


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
    if args.toy_assets:
        _stages.use_toy_assets(args.toy_assets)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    from tlcm.toy import default_prompts_path

    q = ["--max-steps", "3", "--set", "checkpointing_steps=0"] if args.quick else []
    records = 64 if args.quick else args.records
    stages = Stages(env, tag="distill_toy")
    shards = out / "shards"
    stages.run("synthesize", tlcm_cmd("synthesize", "--teacher", "toy", "--prompts", str(default_prompts_path()),
                                     "--out", str(shards), "--num-records", str(records), "--solver", "dpmpp",
                                     "--steps", "25", "--guidance-scale", "4", "--batch-size", "64",
                                     "--records-per-shard", "256", "--no-progress"),
               _stages.synthesized(shards))
    # lcm and mlcd are independent: run them side by side (one thread each)
    stages.run_parallel([(f"distill-{recipe}", tlcm_cmd("distill", "--preset", f"toy-{recipe}", "--data", str(shards),
                                                        "--output-dir", str(out / recipe), "--no-progress", *q,
                                                        *resume_flag(out / recipe)), out / recipe / "README.md")
                         for recipe in ("lcm", "mlcd")])
    stages.run("distill-tlcm", tlcm_cmd("distill", "--preset", "toy-tlcm", "--data", str(shards), "--output-dir",
                                       str(out / "tlcm"), "--set", f"init_lora={out / 'mlcd'}", "--no-progress", *q,
                                       *resume_flag(out / "tlcm")),
               out / "tlcm" / "README.md")
    full_steps = "3" if args.quick else "20"
    stages.run("distill-lcm-full (cost only)", tlcm_cmd("distill", "--preset", "toy-lcm", "--data", str(shards),
                                                       "--output-dir", str(out / "lcm-full"), "--set", "student=full",
                                                       "--set", "learning_rate=1e-4", "--max-steps", full_steps,
                                                       "--set", "checkpointing_steps=0", "--no-progress",
                                                       *resume_flag(out / "lcm-full")),
               out / "lcm-full" / "README.md")
    few = ["--num-prompts", "32" if args.quick else str(args.num_prompts)]
    if args.quick:
        few += ["--diversity", "8x4"]  # the protocol's 32 prompts x 4 seeds would triple a 32-prompt cell
    eval_dir = out / "eval"
    # one grid: the teacher's solvers (g = 1 and 4), each student, and the teacher with each student's sampler (the
    # toy protocol adds those baselines); a 4-segment MLCD student walks at most 4 steps, its 8-step cell is skipped
    stages.run("evaluate", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_dir),
                                   "--lora", f"lcm={out / 'lcm'}", "--lora", f"mlcd={out / 'mlcd'}",
                                   "--lora", f"tlcm={out / 'tlcm'}", "--steps", "1,2,3,4,8",
                                   "--schedulers", args.schedulers, *few),
               eval_dir / "results.json")
    eval_ref = out / "eval-teacher50"
    stages.run("evaluate-teacher-50", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_ref),
                                              "--no-reference", "--schedulers", "dpmpp", "--steps", "50",
                                              "--guidance", "4", *few),
               eval_ref / "results.json")

    from tlcm.evaluate.baselines import add_ratios, best_training_free

    rows = _rows(eval_dir / "results.json") + _rows(eval_ref / "results.json")
    best = best_training_free(rows)
    add_ratios(rows, best)
    reference = (json.loads((eval_dir / "results.json").read_text()).get("reference", {}).get("metrics") or {}
                 if (eval_dir / "results.json").exists() else {})
    md_table, by = table(rows, best)
    bars = bar_lines(by, best, reference)

    # measured metrics into each student's model card
    from tlcm.evaluate.report import write_text
    from tlcm.train.config import resolve_config
    from tlcm.train.export import model_card

    for name in ("lcm", "mlcd", "tlcm"):
        run = out / name
        if not (run / "config.yaml").exists():
            continue
        label = f"toy-FID vs the teacher's samples / alignment, {few[1]} toy prompts"
        metrics = {f"{s} steps ({label})": f"{r['toy_fid_teacher']:.3f} / {r['alignment']:.3f}"
                   for (m, s), r in sorted(by.items()) if m == name
                   and None not in (r.get("toy_fid_teacher"), r.get("alignment"))}
        if metrics:
            card = model_card(resolve_config(config_file=str(run / "config.yaml")), summary_of(run), metrics)
            write_text(run / "README.md", card)

    costs = ["| stage | wall time (s) | peak memory (MiB) | notes |", "|---|---|---|---|"]
    for e in stages.log:
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
        "# Toy-world distillation: lcm / mlcd / tlcm students vs the undistilled teacher",
        "",
        f"Date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores visible, torch threads per process {args.threads}, python "
        f"{platform.python_version()}.{' QUICK RUN: pipeline check only, not results.' if args.quick else ''}",
        "",
        f"Reproduce: `python benchmarks/distill_toy.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
        "(stages below, each skipped when already done).",
        "",
        "## Quality (toy-FID vs the teacher's samples, lower is better / alignment, higher is better)",
        "",
        md_table,
        "",
        "Training-free rows are the undistilled teacher: its solvers with and without CFG (CFG costs two network",
        "evaluations per step) and `teacher+NAME-sampler`, the teacher sampled with student NAME's own scheduler",
        "(no LoRA) at g = 1 and 4. **best training-free** is the best of them at each step count, per metric.",
        "Students sample without CFG. MLCD (4 segments) walks edge to edge and has no 8-step schedule.",
        "",
        "## Students against the best training-free sampler",
        "",
        student_table(rows, reference),
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
        *([f"(run with `--toy-assets {_stages.TOY_ASSETS}`: each command ran as `python -c '<point "
           "tlcm.toy.assets_dir at that folder>; tlcm.cli.main(...)'`, i.e. on that toy build instead of the shipped "
           "assets)", ""]
          if _stages.TOY_ASSETS else []),
        *stages.markdown(),
        "",
    ])
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        write_text(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
