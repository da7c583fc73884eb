"""Toy-world ablation of TLCM's bag of techniques (issue #11): what each phase adds, measured side by side.

One run of the whole chain (``tlcm distill --preset toy-tlcm-full``: stage 1 MLCD -> stage 2 -> reward -> DMD+GAN)
gives the shared starting points; every ablation row then continues the chain's stage-2 student for the same number of
steps with one technique switched on, and two rows test the paper's premises for stage 1 (states on the teacher's own
denoising path vs forward-noised final latents; data-free synthetic latents vs the same number of real toy images).
All students and the undistilled teacher's training-free samplers are evaluated in one ``tlcm evaluate`` grid.

Rows (all LoRAs; "from stage 2" = ``init_lora`` = the chain's stage-2 output, same steps as the DMD phase):

=================  ===========================================================================================
``stage1``         chain phase 1: MLCD on forward-noised synthetic latents (the chain's own stage 1)
``stage1-path``    MLCD on states of the teacher's own DDIM path (``state_source=teacher_path``)
``stage1-traj``    MLCD on trajectory points stored by ``tlcm synthesize --trajectory`` (``state_source=trajectory``)
``stage1-real``    MLCD on real toy images through ``tlcm encode-images`` (same record count): not data-free
``consistency``    chain phase 2: stage 2 (inter-segment consistency) from ``stage1``
``cons-more``      consistency only, continued from stage 2 (the control for every row below)
``dmd``            + distribution matching (``gan_weight=0``)
``gan``            + adversarial (``dmd_weight=0``)
``dmd-gan``        + DMD and GAN
``reward``         chain phase 3: + preference learning (the toy reward model, not the metrics classifier)
``all``            chain phase 4: reward then DMD + GAN (the paper's order)
=================  ===========================================================================================

Writes ``benchmarks/results/ablation.md``. Every stage is a ``tlcm`` command, skipped when its output exists, so an
interrupted run continues::

    python benchmarks/ablation_toy.py --out runs/ablation            # full run (see ablation.md for time)
    python benchmarks/ablation_toy.py --out runs/ablation --quick    # a few steps each: pipeline check only
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
from _stages import Stages, resume_flag, summary_of, synthesized, tlcm_cmd  # noqa: E402
from distill_toy import _f, _is_student, _rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ablation.md"
STEPS = (1, 2, 4, 8)
CHAIN_PHASES = {"stage1": "1-stage1", "consistency": "2-stage2", "reward": "3-reward", "all": "4-dmd-gan"}
ROWS = ("stage1", "stage1-path", "stage1-traj", "stage1-real", "consistency", "cons-more", "dmd", "gan", "dmd-gan",
        "reward", "all")


def _distill(stages: Stages, name: str, out: Path, preset: str, data: Path, extra: list[str], quick: list[str]) -> None:
    run = out / name
    cmd = tlcm_cmd("distill", "--preset", preset, "--data", str(data), "--output-dir", str(run), "--no-progress",
                   *extra, *quick, *resume_flag(run))
    stages.run(f"distill {name}", cmd, run / "README.md")


def quality_table(by: dict, best: dict) -> str:
    lines = ["| row | " + " | ".join(f"{s} steps: FID vs teacher / vs data / alignment" for s in STEPS) + " |",
             "|---|" + "---|" * len(STEPS)]
    cells = []
    for s in STEPS:
        b = best.get("by_steps", {}).get(str(s), {}).get("toy_fid_teacher")
        cells.append(f"{_f(b['value'] if b else None)} ({b['method'] if b else '-'})")
    lines.append("| best training-free sampler (FID vs teacher) | " + " | ".join(cells) + " |")
    for name in ROWS:
        row = []
        for s in STEPS:
            r = by.get((name, s))
            row.append("-" if r is None else f"{_f(r.get('toy_fid_teacher'))} / {_f(r.get('toy_fid_data'))} / "
                       f"{_f(r.get('alignment'), 3)}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def extra_table(by: dict, reference: dict) -> str:
    ref_rec, ref_div = reference.get("recall_data"), reference.get("diversity")
    lines = ["| row | steps | FID vs teacher ÷ best training-free | recall vs data (÷ teacher's) | "
             "diversity ÷ teacher's |", "|---|---:|---:|---:|---:|"]
    for name in ROWS:
        for s in STEPS:
            r = by.get((name, s))
            if r is None:
                continue
            rec = r.get("recall_data")
            rec_txt = "-" if rec is None else f"{rec:.3f}" + (f" ({rec / ref_rec:.2f})" if ref_rec else "")
            lines.append(f"| {name} | {s} | {_f(r.get('toy_fid_teacher_ratio_tf'), 3)} | {rec_txt} | "
                         f"{_f(r.get('diversity_vs_teacher'), 3)} |")
    note = (f"Teacher reference (DPM-Solver++ 25 steps, CFG 4): recall vs data {_f(ref_rec, 3)}, diversity "
            f"{_f(ref_div, 3)}, alignment {_f(reference.get('alignment'), 3)}.")
    return "\n".join(lines) + "\n\n" + note


def bar_lines(by: dict, reference: dict) -> list[str]:
    """Issue #11's bars for the best chain (``all``) and the reward phase; compared unrounded."""
    out = []

    def check(label, ok):
        out.append(f"- {label}: {'not measured' if ok is None else '**met**' if ok else '**missed**'}")

    def get(name, s, key):
        r = by.get((name, s))
        return None if r is None or r.get(key) is None else float(r[key])

    def n(v):
        return "-" if v is None else f"{v:.4g}"

    ref_ali, ref_rec = reference.get("alignment"), reference.get("recall_data")
    for s, ratio_bar, ali_tol in ((1, 0.3, 0.05), (2, 0.3, 0.02)):
        ratio, ali = get("all", s, "toy_fid_teacher_ratio_tf"), get("all", s, "alignment")
        check(f"all, {s} step(s): toy-FID vs teacher <= {ratio_bar}x the best training-free sampler (ratio {n(ratio)})",
              None if ratio is None else ratio <= ratio_bar)
        check(f"all, {s} step(s): alignment within {ali_tol} of the teacher at 25 steps ({n(ali)} vs {n(ref_ali)})",
              None if None in (ali, ref_ali) else ali >= ref_ali - ali_tol)
    recs = [get("all", s, "recall_data") for s in STEPS]
    worst = min((r for r in recs if r is not None), default=None)
    check(f"all: recall vs data >= 0.9x the teacher's at every step count (worst {n(worst)} vs {n(ref_rec)})",
          None if None in (worst, ref_rec) else worst >= 0.9 * ref_rec)
    fids = [get("all", s, "toy_fid_teacher") for s in (2, 4, 8)]
    check(f"all: toy-FID vs teacher non-increasing from 2 to 8 steps ({' -> '.join(n(v) for v in fids)})",
          None if None in fids else fids[0] >= fids[1] >= fids[2])
    alis = [get("all", s, "alignment") for s in (2, 4, 8)]
    check(f"all: alignment never below its 2-step value ({' -> '.join(n(v) for v in alis)})",
          None if None in alis else min(alis[1:]) >= alis[0])
    for s in (1, 2):
        a_r, a_c = get("reward", s, "alignment"), get("consistency", s, "alignment")
        f_r, f_c = get("reward", s, "toy_fid_teacher"), get("consistency", s, "toy_fid_teacher")
        check(f"reward phase at {s} step(s): raises alignment ({n(a_c)} -> {n(a_r)}) without raising toy-FID vs "
              f"teacher by more than 10 % ({n(f_c)} -> {n(f_r)})",
              None if None in (a_r, a_c, f_r, f_c) else (a_r > a_c and f_r <= 1.1 * f_c))
    return out


def cost_table(out: Path) -> tuple[str, float]:
    lines = ["| run | steps | wall time (s) | s/step | peak memory (MiB) | phase seconds (student / fake / D) |",
             "|---|---:|---:|---:|---:|---|"]
    chain_total = 0.0
    for name in ROWS:
        run = out / ("chain/" + CHAIN_PHASES[name] if name in CHAIN_PHASES else name)
        s = summary_of(run)
        if not s:
            continue
        if name in CHAIN_PHASES:
            chain_total += float(s.get("wall_time_s", 0))
        ph = s.get("phase_seconds") or {}
        phases = " / ".join(str(ph.get(k, "-")) for k in ("student", "fake", "discriminator"))
        lines.append(f"| {name} | {s.get('steps')} | {s.get('wall_time_s')} | {s.get('s_per_step')} | "
                     f"{s.get('peak_rss_mib')} | {phases} |")
    return "\n".join(lines), chain_total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--records", type=int, default=1024, help="synthetic (and real) latents for stage 1")
    ap.add_argument("--num-prompts", type=int, default=1024, help="evaluation prompts")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (pipeline check, no real numbers)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stage1-steps", type=int, default=None,
                    help="stage-1 length of the chain and of the three premise rows (default: the toy-mlcd preset's)")
    ap.add_argument("--phase-steps", type=int, default=None,
                    help="length of the chain's stage-2, reward and DMD+GAN phases and of the one-technique rows "
                         "(default: each preset's; the rows then take the DMD phase's 200)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/results/ablation.md")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    records = 32 if args.quick else args.records
    quick = ["--max-steps", "2", "--set", "checkpointing_steps=0"] if args.quick else []
    stages = Stages(env, tag="ablation_toy")
    synth = ["--teacher", "toy", "--prompts", "toy", "--num-records", str(records), "--solver", "dpmpp", "--steps",
             "25", "--guidance-scale", "4", "--batch-size", "64", "--records-per-shard", str(min(256, records)),
             "--no-progress"]
    shards, traj, real = out / "shards", out / "shards-traj", out / "real"
    stages.run("synthesize", tlcm_cmd("synthesize", *synth, "--out", str(shards)), synthesized(shards))
    stages.run("synthesize with trajectory", tlcm_cmd("synthesize", *synth, "--out", str(traj), "--trajectory",
                                                     "4,8,12,16,20"), synthesized(traj))
    stages.run("real toy images", tlcm_cmd("toy", "dataset", "--out", str(out / "images"), "--n", str(records),
                                          "--heldout", "0", "--seed", "5", "--no-progress"),
              out / "images" / "train" / "metadata.jsonl")
    stages.run("encode real images", tlcm_cmd("encode-images", "--images", str(out / "images" / "train"), "--teacher",
                                             "toy", "--out", str(real), "--records-per-shard",
                                             str(min(256, records))), synthesized(real))
    # the whole chain (its phases are the shared starting points of the ablation rows); --set for --quick
    chain_q = ["--set", "max_steps=2", "--set", "checkpointing_steps=0"] if args.quick else []
    s1 = [] if args.quick or args.stage1_steps is None else ["--set", f"max_steps={args.stage1_steps}"]
    if not args.quick:
        if args.stage1_steps is not None:
            chain_q += ["--set", f"stage1.max_steps={args.stage1_steps}"]
        if args.phase_steps is not None:
            for ph in ("stage2", "reward", "dmd-gan"):
                chain_q += ["--set", f"{ph}.max_steps={args.phase_steps}"]
    stages.run("distill chain (toy-tlcm-full)",
              tlcm_cmd("distill", "--preset", "toy-tlcm-full", "--data", str(shards), "--output-dir",
                       str(out / "chain"), "--no-progress", *chain_q),
              out / "chain" / CHAIN_PHASES["all"] / "README.md")
    # stage-1 premises
    _distill(stages, "stage1-path", out, "toy-mlcd", shards, [*s1, "--set", "state_source=teacher_path"], quick)
    _distill(stages, "stage1-traj", out, "toy-mlcd", traj, [*s1, "--set", "state_source=trajectory"], quick)
    _distill(stages, "stage1-real", out, "toy-mlcd", real, s1, quick)
    # one technique each, from the chain's stage-2 student, as many steps as the DMD phase
    stage2 = out / "chain" / CHAIN_PHASES["consistency"]
    base = ["--set", f"init_lora={stage2}"]
    dmd_steps = [] if args.quick else ["--set", f"max_steps={args.phase_steps or 200}"]
    _distill(stages, "cons-more", out, "toy-tlcm", shards, [*base, *dmd_steps, "--set", "lr_warmup_steps=0"], quick)
    _distill(stages, "dmd", out, "toy-tlcm-dmd", shards, [*base, *dmd_steps, "--set", "gan_weight=0"], quick)
    _distill(stages, "gan", out, "toy-tlcm-dmd", shards, [*base, *dmd_steps, "--set", "dmd_weight=0"], quick)
    _distill(stages, "dmd-gan", out, "toy-tlcm-dmd", shards, [*base, *dmd_steps], quick)

    loras = []
    for name in ROWS:
        path = out / "chain" / CHAIN_PHASES[name] if name in CHAIN_PHASES else out / name
        loras += ["--lora", f"{name}={path}"]
    few = ["--num-prompts", "32" if args.quick else str(args.num_prompts)] + (["--diversity", "8x4"] if args.quick
                                                                              else [])
    eval_dir = out / "eval"
    stages.run("evaluate", tlcm_cmd("evaluate", "--protocol", "toy", "--out", str(eval_dir), "--steps",
                                   ",".join(map(str, STEPS)), "--schedulers", "ddim,dpmpp", *loras, *few),
              eval_dir / "results.json")

    from tlcm.evaluate.baselines import add_ratios, best_training_free

    rows = _rows(eval_dir / "results.json")
    best = best_training_free(rows)
    add_ratios(rows, best)
    reference = (json.loads((eval_dir / "results.json").read_text()).get("reference", {}).get("metrics") or {}
                 if (eval_dir / "results.json").exists() else {})
    by = {(r["model"], int(r["steps"])): r for r in rows if _is_student(r)}
    costs, chain_total = cost_table(out)
    text = "\n".join([
        "# Toy-world ablation: the bag of techniques (issue #11)",
        "",
        f"Date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores visible, torch threads per process {args.threads}, python "
        f"{platform.python_version()}.{' QUICK RUN: pipeline check only, not results.' if args.quick else ''}",
        "",
        f"Reproduce: `python benchmarks/ablation_toy.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}` "
        "(the stages below, each skipped when done). Evaluation: "
        f"{few[1]} toy prompts of the toy protocol; toy-FID against the teacher's DPM-Solver++ 25-step samples and "
        "against the world's own records for those prompts; alignment by the metrics classifier (never a training "
        "loss: the reward phase uses the separate toy reward model).",
        "",
        "## Quality",
        "",
        quality_table(by, best),
        "",
        extra_table(by, reference),
        "",
        "## Bars (issue #11)",
        "",
        *bar_lines(by, reference),
        "",
        "## Cost",
        "",
        costs,
        "",
        f"The whole chain (stage 1 + stage 2 + reward + DMD/GAN) trained in {chain_total / 60:.1f} minutes "
        "(sum of its phases' wall time; bar: under 30 minutes on 2 CPU cores). Wall times include whatever else ran "
        "on the machine; `benchmarks/results/train_efficiency.md` has each recipe's CPU seconds per step.",
        "",
        "## Stages",
        "",
        *stages.markdown(),
        "",
    ])
    print(text)
    if not args.no_write and not args.quick:
        from tlcm.evaluate.report import write_text

        write_text(RESULTS, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
