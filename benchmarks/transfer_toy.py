"""Does an acceleration LoRA distilled from the *base* toy teacher keep a fine-tune's, or a style LoRA's, look?

The LCM-LoRA claim under test (issue 13): one acceleration LoRA, distilled once from a base model, (i) accelerates
that model's fine-tunes and (ii) combines with style LoRAs, without further training. On the scenes world (v4) with
the ``shadow`` fine-tunes of ``tlcm toy finetune``, for our LCM-LoRA recipe (``toy-lcm``) and our TLCM recipe
(``toy-mlcd`` -> ``toy-tlcm``) side by side, at 1, 2, 4 and 8 steps:

- **style score** (``tlcm.toy.style``: share of samples read as shadowed), **alignment**, and **toy-FID against the
  target's own 50-step samples** (DDIM 50, guidance 4) and against styled data;
- the target itself at 50 steps and its DPM-Solver++ at equal network evaluations (CFG: 2 per step, so N student
  steps meet N/2 solver steps);
- the upper bound: students distilled directly from the fine-tune (and, with ``--direct stylelora``, from the base
  with the style LoRA fused in);
- composition variants (issue item 3): style LoRA scales (inference only) and an acceleration LoRA on layers the
  style LoRA does not touch (resnet convolutions and time embeddings only; one more distillation).

Bars (issue 13), at 4 steps, per recipe and target: style score >= 0.9 x the target's at 50 steps; alignment >= 0.95;
toy-FID vs the target's 50-step samples <= 1.5 x that of the directly distilled student.

Every stage is a ``tlcm`` command (or a short library call) skipped when its output exists, so an interrupted run
continues. Writes ``benchmarks/results/transfer.md``::

    python benchmarks/transfer_toy.py --out runs/transfer-toy                 # full run (long: see docs/universal.md)
    python benchmarks/transfer_toy.py --out /tmp/t --quick --teacher DIR      # pipeline check on any toy pipeline
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
from _stages import Stages, resume_flag, synthesized, tlcm_cmd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "transfer.md"
RECIPES = ("lcm", "tlcm")
GUIDANCE = 4.0  # the teacher's (and the reference's) CFG scale: the toy presets distil at w = 3, i.e. 4 here
BARS = {"style_ratio": 0.9, "alignment": 0.95, "fid_ratio": 1.5}
# --quick (a pipeline check): two steps per training stage, at learning rates high enough that every student and
# fine-tune moves away from its base, so the check sees each model's own samples and numbers
QUICK_DISTILL = ["--max-steps", "2", "--set", "learning_rate=1e-2", "--set", "checkpointing_steps=0", "--set",
                 "validation_num_steps=[1]"]
QUICK_FINETUNE = ["--images", "16", "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--lora-lr", "1e-1",
                  "--eval-prompts", "4", "--eval-steps", "2"]


# --- stages ----------------------------------------------------------------------------------------------------------
def fuse_style_lora(teacher: str, lora: Path, out: Path) -> Path:
    """The base teacher with the style LoRA fused in (scale 1), as a toy pipeline folder: the teacher a student
    "distilled directly from base + style LoRA" is distilled from."""
    from diffusers import DiffusionPipeline

    from tlcm.lora import load_loras
    from tlcm.models import resolve_model_path
    from tlcm.toy import MARKER, common

    src = Path(resolve_model_path(teacher))
    pipe = DiffusionPipeline.from_pretrained(str(src))
    load_loras(pipe, [(str(lora), 1.0)])
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    common.save_pretrained_atomic(pipe.unet, out / "unet")
    common.assemble_pipeline(out / "pipeline", out / "unet", src / "vae", tokenizer_dir=src / "tokenizer",
                             scheduler_config=json.loads((src / "scheduler" / "scheduler_config.json").read_text()))
    marker = json.loads((src / MARKER).read_text()) if (src / MARKER).is_file() else {"world": "v4"}
    common.write_json(out / "pipeline" / MARKER, {**marker, "style_lora_fused": str(lora)})
    return out / "pipeline"


def prompts_file(out: Path) -> Path:
    """The synthesis prompts: 2000 training-split captions of the scenes world, the lines `tlcm toy build` ships as
    the v4 ``prompts.txt`` (seed 7), written here so the benchmark also runs on a build that is not shipped yet."""
    from tlcm.toy import common, scenes

    path = out / "prompts.txt"
    if not path.is_file():
        common.atomic_write_text(path, "\n".join(scenes.prompts(2000, seed=7, split="train")) + "\n")
    return path


def distill_students(stages: Stages, name: str, teacher: str, out: Path, args, quick: list[str]) -> None:
    """Synthesize teacher latents, then the lcm student and the mlcd -> tlcm students, into ``out``."""
    records = "16" if args.quick else str(args.records)
    shards = out / "shards"
    stages.run(f"{name}: synthesize", tlcm_cmd(
        "synthesize", "--teacher", teacher, "--prompts", str(prompts_file(out.parent)), "--out", str(shards),
        "--num-records", records, "--solver", "dpmpp", "--steps", "4" if args.quick else "25",
        "--guidance-scale", f"{GUIDANCE:g}", "--batch-size", "64", "--records-per-shard", "256", "--no-progress"),
        synthesized(shards))
    for recipe, preset in (("lcm", "toy-lcm"), ("mlcd", "toy-mlcd")):
        stages.run(f"{name}: distill {recipe}", tlcm_cmd(
            "distill", "--preset", preset, "--teacher", teacher, "--data", str(shards), "--output-dir",
            str(out / recipe), "--no-progress", *quick, *resume_flag(out / recipe)), out / recipe / "README.md")
    stages.run(f"{name}: distill tlcm", tlcm_cmd(
        "distill", "--preset", "toy-tlcm", "--teacher", teacher, "--data", str(shards), "--output-dir",
        str(out / "tlcm"), "--set", f"init_lora={out / 'mlcd'}", "--no-progress", *quick,
        *resume_flag(out / "tlcm")), out / "tlcm" / "README.md")


# --- sweeps ----------------------------------------------------------------------------------------------------------
def target_sweep(target: str, out: Path, args, students: dict, base_of_target: str, target_lora: Path | None,
                 variants: list):
    """The sweep of one target: its 50-step reference and DPM-Solver++ rows, and every student on it.

    ``students``: row name -> (base, [(lora, weight), ...]) with the acceleration LoRA first."""
    from tlcm.evaluate.metrics import MetricSpec
    from tlcm.evaluate.prompts import seeds_for
    from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SweepConfig
    from tlcm.toy import scenes

    steps = [1, 2] if args.quick else [1, 2, 4, 8]
    n = 8 if args.quick else args.num_prompts
    prompts = scenes.prompts(n, seed=10_000, split="train")
    t_lora = {} if target_lora is None else {"lora": str(target_lora)}
    ref_name = f"{target}-50"
    models = [
        ModelSpec(ref_name, base_of_target, schedulers=["ddim"], steps=[4 if args.quick else 50],
                  guidance=[GUIDANCE], **t_lora),
        ModelSpec(f"{target}-dpmpp", base_of_target, schedulers=["dpmpp"],
                  steps=sorted({max(1, s // 2) for s in steps}), guidance=[GUIDANCE], **t_lora),
    ]
    for name, (base, loras) in students.items():
        (lora, w), extra = loras[0], loras[1:]
        models.append(ModelSpec(name, base, lora=str(lora), lora_weight=w, extra_loras=[(str(p), x) for p, x in extra],
                                schedulers=["tlcm"], steps=steps, guidance=[1.0]))
    for name, (base, loras, v_steps) in variants:
        (lora, w), extra = loras[0], loras[1:]
        models.append(ModelSpec(name, base, lora=str(lora), lora_weight=w, extra_loras=[(str(p), x) for p, x in extra],
                                schedulers=["tlcm"], steps=[s for s in v_steps if s in steps] or steps[-1:],
                                guidance=[1.0]))
    style_vae = str(Path(base_of_target) / "vae") if (Path(base_of_target) / "vae").is_dir() else "toy"
    return SweepConfig(
        models=models, prompts=prompts, seeds=seeds_for(n, 10_000), out_dir=str(out / f"eval-{target}"),
        batch_size=64, reference=ReferenceSpec(model=ref_name, scheduler="ddim", steps=models[0].steps[0],
                                               guidance=GUIDANCE, data=f"toy:v4:{args.style}"),
        metrics=MetricSpec(toy=True, fid=False, toy_world="v4", toy_metrics=args.metrics, style=args.style,
                           style_classifier=args.style_classifier, style_vae=style_vae),
        protocol="transfer-toy",
    )


# --- tables and bars -------------------------------------------------------------------------------------------------
def _cells(results: dict) -> dict:
    return {(r["model"], int(r["steps"])): r for r in results.get("cells", [])}


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(cells: dict, order: list[str], steps: list[int]) -> str:
    """Rows = models, columns = steps; each cell: style score / alignment / toy-FID vs the target's 50 steps."""
    lines = ["| model | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for m in order:
        row = []
        for s in steps:
            r = cells.get((m, s))
            row.append("-" if r is None else
                       f"{_fmt(r.get('style_score'), 2)} / {_fmt(r.get('alignment'))} / "
                       f"{_fmt(r.get('toy_fid_teacher'), 1)}")
        if any(c != "-" for c in row):
            lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def bars(row: dict, ref: dict, direct_row: dict, target: str, direct: str) -> list[dict]:
    """The issue's three bars for one acceleration row (``row``) against its target's 50-step reference (``ref``)
    and a directly distilled student (``direct_row``); ``met`` is ``None`` where a value was not measured."""
    out = []
    s, s_ref = row.get("style_score"), ref.get("style_score")
    out.append({"bar": f"style score >= {BARS['style_ratio']} x {target} at 50 steps", "value": s,
                "threshold": None if s_ref is None else round(BARS["style_ratio"] * s_ref, 4),
                "met": None if s is None or s_ref is None else s >= BARS["style_ratio"] * s_ref})
    a = row.get("alignment")
    out.append({"bar": f"alignment >= {BARS['alignment']}", "value": a, "threshold": BARS["alignment"],
                "met": None if a is None else a >= BARS["alignment"]})
    f, f_dir = row.get("toy_fid_teacher"), direct_row.get("toy_fid_teacher")
    out.append({"bar": f"toy-FID vs own 50 steps <= {BARS['fid_ratio']} x {direct}'s", "value": f,
                "threshold": None if f_dir is None else round(BARS["fid_ratio"] * f_dir, 4),
                "met": None if f is None or f_dir is None else f <= BARS["fid_ratio"] * f_dir})
    return out


def bars_md(rows: list[tuple[str, list[dict]]]) -> str:
    lines = ["| row | bar | value | threshold | met |", "|---|---|---|---|---|"]
    for name, bs in rows:
        for b in bs:
            met = "not measured" if b["met"] is None else ("**yes**" if b["met"] else "**NO**")
            lines.append(f"| {name} | {b['bar']} | {_fmt(b['value'], 4)} | {_fmt(b['threshold'], 4)} | {met} |")
    return "\n".join(lines)


def best_composition(cells: dict, candidates: list[str], ref_style: float | None, steps: int = 4) -> str | None:
    """The composition variant to recommend: the lowest toy-FID vs the target among those that keep the style
    (style score >= 0.9 x the target's) and the alignment bar; ``None`` when none does."""
    ok = []
    for name in candidates:
        r = cells.get((name, steps))
        if not r or r.get("style_score") is None or ref_style is None or r.get("toy_fid_teacher") is None:
            continue
        if r["style_score"] >= BARS["style_ratio"] * ref_style and (r.get("alignment") or 0) >= BARS["alignment"]:
            ok.append((r["toy_fid_teacher"], name))
    return min(ok)[1] if ok else None


# --- main ------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/transfer-toy")
    ap.add_argument("--teacher", default="toy", help="the base teacher: toy (v4) or a v4 toy pipeline folder")
    ap.add_argument("--style", default="shadow")
    ap.add_argument("--metrics", help="toy metrics classifier folder (default: the shipped v4 one)")
    ap.add_argument("--style-classifier", help="`tlcm toy train-style` folder (default: built for the teacher's VAE)")
    ap.add_argument("--records", type=int, default=1024, help="synthetic teacher latents per teacher")
    ap.add_argument("--num-prompts", type=int, default=256, help="evaluation prompts")
    ap.add_argument("--direct", default="finetune", help="teachers to distil directly (upper bound): finetune, "
                    "stylelora (base + style LoRA fused), comma-separated")
    ap.add_argument("--style-scales", default="0.75,1.25,1.5", help="style LoRA scales tried with each acceleration "
                    "LoRA (scale 1 always runs)")
    ap.add_argument("--no-disjoint", action="store_true", help="skip the acceleration LoRA on the layers the style "
                    "LoRA leaves alone (one more lcm distillation)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two steps per training stage, 8 prompts, 1-2 steps: checks "
                    "the pipeline, no results")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/results/transfer.md")
    ap.add_argument("--in-process", action="store_true", help="run the tlcm stages in this process (tests)")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    import torch

    torch.set_num_threads(args.threads)
    stages = Stages(env, in_process=args.in_process, tag="transfer_toy")
    quick = QUICK_DISTILL if args.quick else []
    direct = [d.strip() for d in args.direct.split(",") if d.strip()]
    if set(direct) - {"finetune", "stylelora"}:
        raise SystemExit(f"--direct takes finetune and/or stylelora, got {args.direct!r}")

    # 1. the fine-tunes of the base teacher: full (a pipeline folder) and the style LoRA
    ft = out / "finetune"
    ft_cmd = ["toy", "finetune", "--out", str(ft), "--teacher", args.teacher, "--style", args.style, "--no-progress",
              "--threads", str(args.threads)]
    if args.metrics:
        ft_cmd += ["--metrics", args.metrics]
    if args.style_classifier:
        ft_cmd += ["--style-classifier", args.style_classifier]
    if args.quick:
        ft_cmd += QUICK_FINETUNE
    # done when both variants exist (report.json is written after the first one already)
    stages.run("fine-tune (full + style LoRA)", tlcm_cmd(*ft_cmd),
               [ft / "full" / "pipeline" / "model_index.json", ft / "lora" / "pytorch_lora_weights.safetensors"])
    ft_pipe, style_lora = ft / "full" / "pipeline", ft / "lora"
    from tlcm.models import resolve_model_path

    base = resolve_model_path(args.teacher)

    # 2. acceleration LoRAs from the base; direct students (upper bounds)
    distill_students(stages, "base", base, out / "base", args, quick)
    if not args.no_disjoint:
        stages.run("base: distill lcm on convolutions only", tlcm_cmd(
            "distill", "--preset", "toy-lcm", "--teacher", base, "--data", str(out / "base" / "shards"),
            "--output-dir", str(out / "base" / "lcm-conv"), "--set", "lora_target_modules=[]", "--set",
            "lora_conv=true", "--no-progress", *quick, *resume_flag(out / "base" / "lcm-conv")),
            out / "base" / "lcm-conv" / "README.md")
    if "finetune" in direct:
        distill_students(stages, "finetune", str(ft_pipe), out / "direct-finetune", args, quick)
    fused = out / "base-style" / "pipeline"
    if "stylelora" in direct:
        stages.python("fuse the style LoRA into the base", f"fuse_style_lora({base!r}, {str(style_lora)!r})",
                      lambda: fuse_style_lora(base, style_lora, out / "base-style"), fused / "model_index.json")
        distill_students(stages, "base+style (fused)", str(fused), out / "direct-stylelora", args, quick)

    # 3. the two sweeps
    from tlcm.evaluate.sweep import run_sweep

    results = {}
    scales = [float(s) for s in args.style_scales.split(",") if s.strip()]
    for target in ("finetune", "stylelora"):
        students: dict = {}
        variants: list = []
        if target == "finetune":
            for r in RECIPES:
                students[f"accel-{r}"] = (str(ft_pipe), [(out / "base" / r, 1.0)])
                if "finetune" in direct:
                    students[f"direct-{r}"] = (str(ft_pipe), [(out / "direct-finetune" / r, 1.0)])
            if not args.no_disjoint:
                students["accel-lcm-conv"] = (str(ft_pipe), [(out / "base" / "lcm-conv", 1.0)])
            t_base, t_lora = str(ft_pipe), None
        else:
            for r in RECIPES:
                students[f"accel-{r}+style"] = (base, [(out / "base" / r, 1.0), (style_lora, 1.0)])
                if "stylelora" in direct:
                    students[f"direct-{r}"] = (str(fused), [(out / "direct-stylelora" / r, 1.0)])
                for s in scales:
                    if s != 1.0:
                        variants.append((f"accel-{r}+style@{s:g}", (base, [(out / "base" / r, 1.0),
                                                                            (style_lora, s)], [2, 4])))
            if not args.no_disjoint:
                students["accel-lcm-conv+style"] = (base, [(out / "base" / "lcm-conv", 1.0), (style_lora, 1.0)])
            t_base, t_lora = base, style_lora
        cfg = target_sweep(target, out, args, students, t_base, t_lora, variants)
        done = Path(cfg.out_dir) / "results.json"
        stages.python(f"evaluate on the {target}", f"run_sweep(<{len(cfg.cells())} cells: {target}>)",
                      lambda cfg=cfg: run_sweep(cfg), done)
        results[target] = json.loads(done.read_text())

    write_report(args, argv, out, results, stages, direct)
    return 0


def write_report(args, argv, out: Path, results: dict, stages: Stages, direct: list[str]) -> str:
    steps = [1, 2] if args.quick else [1, 2, 4, 8]
    ref_steps = 4 if args.quick else 50
    at = steps[-1] if args.quick else 4  # the bars' step count
    cells = {t: _cells(r) for t, r in results.items()}
    sections, bar_rows, recommendations = [], [], []
    for target, label in (("finetune", "the full fine-tune"), ("stylelora", "the base + style LoRA")):
        c = cells[target]
        order = [m["name"] for m in json.loads((out / f"eval-{target}" / "config.json").read_text())["models"]]
        ref = c.get((f"{target}-50", ref_steps), {})
        dp = []
        for s in sorted({max(1, s // 2) for s in steps}):
            r = c.get((f"{target}-dpmpp", s), {})
            dp.append(f"{s} steps ({2 * s} evaluations): {_fmt(r.get('style_score'), 2)} / "
                      f"{_fmt(r.get('alignment'))} / {_fmt(r.get('toy_fid_teacher'), 1)}")
        sections += [
            f"## Target: {label}",
            "",
            f"Reference: {label}, DDIM {ref_steps} steps, CFG {GUIDANCE:g}: style score "
            f"{_fmt(ref.get('style_score'), 2)}, alignment {_fmt(ref.get('alignment'))}, toy-FID vs styled data "
            f"{_fmt(ref.get('toy_fid_data'), 1)}. "
            "Its DPM-Solver++ with CFG (style score / alignment / toy-FID vs the reference): " + "; ".join(dp) + ".",
            "",
            "Each cell: style score / alignment / toy-FID vs the reference's samples (same prompts and seeds).",
            "",
            table(c, [m for m in order if not m.endswith(("-50", "-dpmpp"))], steps),
            "",
        ]
        for r in RECIPES:
            accel = f"accel-{r}" if target == "finetune" else f"accel-{r}+style"
            # the upper bound: distilled from this target if that ran, else (the wording) from the fine-tune
            own = (target == "finetune" and "finetune" in direct) or (target == "stylelora" and "stylelora" in direct)
            d_target = target if own else "finetune"
            d_row = cells[d_target].get((f"direct-{r}", at), {})
            bar_rows.append((f"{accel} on {target}", bars(c.get((accel, at), {}), ref, d_row, target,
                                                          f"direct-{r} ({d_target})")))
        if target == "stylelora":
            best = best_composition(c, [m for m in order if m.startswith("accel-")], ref.get("style_score"), at)
            recommendations.append(f"- acceleration LoRA + style LoRA: `{best or 'none'}` (lowest toy-FID at {at} "
                                   "steps among the variants that keep the style bar and the alignment bar)")
    text = "\n".join([
        "# Transfer: an acceleration LoRA from the base toy teacher on a fine-tune and with a style LoRA",
        "",
        f"Date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads}, python {platform.python_version()}."
        + (" QUICK RUN: pipeline check only, not results." if args.quick else ""),
        "",
        f"Reproduce: `python benchmarks/transfer_toy.py {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}`"
        " (stages below, each skipped when already done).",
        "",
        f"Style `{args.style}` (tlcm.toy.scenes.RENDER_STYLES). Students: `lcm` = toy-lcm (our LCM-LoRA recipe), "
        "`tlcm` = toy-mlcd -> toy-tlcm, distilled from the base teacher (`accel-*`) or directly from the target "
        "(`direct-*`, the upper bound); `accel-lcm-conv` is an LCM-LoRA on the resnet convolutions and time "
        "embeddings only, no layer in common with the style LoRA; `+style@S` loads the style LoRA at scale S.",
        "",
        *sections,
        f"## Bars (issue 13, at {at} steps)",
        "",
        bars_md(bar_rows),
        "",
        "## Recommended composition (item 3)",
        "",
        *recommendations,
        "",
        "## Stages",
        "",
        *stages.markdown(),
        "",
    ])
    print(text)
    if not args.no_write:
        from tlcm.evaluate.report import write_text

        write_text(RESULTS, text)
    return text


if __name__ == "__main__":
    sys.exit(main())
