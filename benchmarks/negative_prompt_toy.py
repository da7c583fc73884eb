"""Negative prompts and CFG at inference: a CFG-preserving student against a plain one and the teacher (toy v4).

A plain consistency student (``toy-lcm``, ``toy-tlcm``) has the teacher's guidance baked in and never saw the empty
or a negative prompt, so it is sampled without CFG and a negative prompt cannot steer it. A CFG-preserving student
(``toy-lcm-cfg``, ``toy-mlcd-cfg`` -> ``toy-tlcm-cfg``: small teacher guidance plus prompt dropout,
:mod:`tlcm.train.conditioning`) is sampled *with* CFG, so a negative prompt works as on the teacher.

Measure: prompts that leave every object's colour free (captions of the scenes world that name no colour) and the
negative prompt ``a red shape``; the share of samples that show a red object (the metrics classifier's claim checker,
``ToyMetrics.claim_hits``), next to the same share without the negative prompt. Teacher: DDIM 50 steps, guidance 4.
Students at 1, 2, 4, 8 steps: without CFG (guidance 1, their quality without guidance) and with CFG at each
``--guidances`` value with the negative prompt. Also per cell: alignment with the (positive) prompts, toy-FID against
the teacher's 50-step samples without negative prompt and against rendered data, and over-saturation (share of pixel
channels at 0 or 255, mean HSV saturation) next to the teacher's.

Bars (issue 13), at 4 steps: the CFG-preserving student at its recommended guidance (``tlcm_sampling.json``) with the
negative prompt shows the negated attribute at most 5 points more often than the teacher at 50 steps with the same
negative prompt; its guidance-free toy-FID is within 10 % of the plain student's. Writes
``benchmarks/results/negative_prompt.md``::

    python benchmarks/negative_prompt_toy.py --out runs/negprompt-toy
    python benchmarks/negative_prompt_toy.py --out runs/negprompt-toy --shards runs/transfer-toy/base/shards \\
        --plain-from runs/transfer-toy/base          # reuse the transfer benchmark's latents and plain students
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stages import Stages, resume_flag, synthesized, tlcm_cmd  # noqa: E402
from transfer_toy import QUICK_DISTILL, prompts_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "negative_prompt.md"
TEACHER_GUIDANCE = 4.0
BARS = {"suppression_points": 0.05, "fid_ratio": 1.1}


def free_prompts(n: int, attribute: str = "color", seed: int = 20_000) -> list[str]:
    """``n`` distinct captions of the scenes world (train split, seed ``seed``) whose claims never name
    ``attribute``: what a negative prompt naming one value of it can steer."""
    from tlcm.toy import scenes

    out, seen, i = [], set(), 0
    while len(out) < n:
        if i > 200 * n + 1000:
            raise SystemExit(f"found only {len(out)} captions that leave {attribute} free")
        _, text, claims = scenes.record(seed, "train", i)
        i += 1
        if text in seen or any(attribute in q for q in claims["objects"]) or attribute in claims:
            continue
        seen.add(text)
        out.append(text)
    return out


def saturation_stats(x) -> dict:
    """Over-saturation of images ``(B, 3, H, W)`` in [0, 1]: share of channel values at 0 or 255 after 8-bit
    quantisation, and the mean HSV saturation ``(max - min) / max``."""
    import torch

    q = (x.clamp(0, 1) * 255).round()
    clipped = ((q == 0) | (q == 255)).float().mean()
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-8), torch.zeros_like(mx)).mean()
    return {"clipped": round(float(clipped), 4), "saturation": round(float(sat), 4)}


def shows(metrics, images, negative: str) -> list[bool]:
    """Per image: does the classifier confirm the negative prompt's object claim(s)?"""
    hits = metrics.claim_hits(images, [negative] * len(images))
    return [all(h["object"]) if h.get("object") else False for h in hits]


def cell_id(model: str, steps: int, guidance: float, negative: bool) -> str:
    return f"{model}__s{steps}__g{guidance:g}__{'neg' if negative else 'none'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/negprompt-toy")
    ap.add_argument("--teacher", default="toy", help="toy (v4) or a v4 toy pipeline folder")
    ap.add_argument("--metrics", help="toy metrics classifier folder (default: the shipped v4 one)")
    ap.add_argument("--shards", help="synthetic teacher latents to reuse (default: synthesize --records)")
    ap.add_argument("--plain-from", help="a folder holding plain students lcm/ (and tlcm/) to reuse, e.g. the "
                    "transfer benchmark's OUT/base")
    ap.add_argument("--records", type=int, default=1024)
    ap.add_argument("--recipes", default="lcm,tlcm", help="lcm and/or tlcm")
    ap.add_argument("--negative", default="a red shape", help="the negative prompt (a claim the classifier checks)")
    ap.add_argument("--attribute", default="color", help="the attribute the prompts leave free")
    ap.add_argument("--guidances", default="1.5,2,2.5,3", help="student CFG scales tried with the negative prompt")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two steps per training stage, 8 prompts, 1-2 steps: checks "
                    "the pipeline, no results")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/results/negative_prompt.md")
    ap.add_argument("--in-process", action="store_true", help="run the tlcm stages in this process (tests)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages({**os.environ, "OMP_NUM_THREADS": str(args.threads)}, in_process=args.in_process,
                    tag="negative_prompt_toy")
    quick = QUICK_DISTILL if args.quick else []
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    from tlcm.models import resolve_model_path

    teacher = resolve_model_path(args.teacher)

    # 1. latents and students
    shards = Path(args.shards) if args.shards else out / "shards"
    if not args.shards:
        stages.run("synthesize", tlcm_cmd(
            "synthesize", "--teacher", teacher, "--prompts", str(prompts_file(out)), "--out", str(shards),
            "--num-records", "16" if args.quick else str(args.records), "--solver", "dpmpp",
            "--steps", "4" if args.quick else "25", "--guidance-scale", f"{TEACHER_GUIDANCE:g}", "--batch-size", "64",
            "--no-progress"), synthesized(shards))
    students = {}
    for kind, suffix in (("plain", ""), ("cfg", "-cfg")):
        root = Path(args.plain_from) if kind == "plain" and args.plain_from else out / kind
        for r in recipes:
            if r == "lcm":
                plan = [("lcm", f"toy-lcm{suffix}", [])]
            else:
                plan = [("mlcd", f"toy-mlcd{suffix}", []),
                        ("tlcm", f"toy-tlcm{suffix}", ["--set", f"init_lora={root / 'mlcd'}"])]
            for name, preset, extra in plan:
                stages.run(f"distill {kind} {name}", tlcm_cmd(
                    "distill", "--preset", preset, "--teacher", teacher, "--data", str(shards), "--output-dir",
                    str(root / name), "--no-progress", *extra, *quick, *resume_flag(root / name)),
                    root / name / "README.md")
            students[f"{kind}-{r}"] = root / r

    # 2. cells
    from tlcm.toy import common, scenes
    from tlcm.toy.metrics import ToyMetrics

    metrics = ToyMetrics.load(args.metrics, world="v4")
    n = 8 if args.quick else args.num_prompts
    prompts = free_prompts(n, args.attribute)
    seeds = [30_000 + i for i in range(n)]
    steps = [1, 2] if args.quick else [1, 2, 4, 8]
    guidances = [float(g) for g in args.guidances.split(",") if g.strip()]
    data = common.to_tensor(scenes.render_prompts(prompts, seed=30_000))
    cells_dir = out / "cells"
    cells_dir.mkdir(exist_ok=True)
    results: dict[str, dict] = {}
    reference = None

    def run(pipe, model: str, s: int, g: float, negative: bool) -> dict:
        nonlocal reference
        cid = cell_id(model, s, g, negative)
        path = cells_dir / f"{cid}.json"
        if path.is_file():
            results[cid] = json.loads(path.read_text())
            return results[cid]
        from tlcm.sample import generate

        t0 = time.perf_counter()
        images = common.to_tensor(generate(pipe, prompts, num_inference_steps=s, guidance_scale=g, seeds=seeds,
                                           batch_size=64, negative_prompt=args.negative if negative else None))
        row = {"model": model, "steps": s, "guidance": g, "negative": negative,
               "seconds": round(time.perf_counter() - t0, 2),
               "negated_shown": round(float(sum(shows(metrics, images, args.negative)) / n), 4),
               "alignment": round(metrics.alignment(images, prompts), 4),
               "toy_fid_data": round(metrics.toy_fid(images, data), 3), **saturation_stats(images)}
        if reference is not None:
            row["toy_fid_teacher"] = round(metrics.toy_fid(images, reference), 3)
        common.write_json(path, row)
        if s in (4, steps[-1]):
            common.save_grid(images[:16], out / "grids" / f"{cid}.png", nrow=16, scale=3)
        results[cid] = row
        return row

    from diffusers import DDIMScheduler

    from tlcm.models import load_pipeline
    from tlcm.sample import load_student

    pipe = load_pipeline(teacher)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    t_steps = 4 if args.quick else 50
    ref_file = out / "reference.npz"
    if ref_file.is_file():
        import numpy as np

        with np.load(ref_file) as z:
            reference = torch.from_numpy(z["images"])
    else:
        from tlcm.sample import generate

        reference = common.to_tensor(generate(pipe, prompts, num_inference_steps=t_steps,
                                              guidance_scale=TEACHER_GUIDANCE, seeds=[s + 1_000_000 for s in seeds],
                                              batch_size=64))
        import numpy as np

        np.savez(ref_file, images=reference.numpy())
    for negative in (False, True):
        run(pipe, "teacher", t_steps, TEACHER_GUIDANCE, negative)
    recommended = {}
    for name, folder in students.items():
        spipe = load_pipeline(teacher)
        spipe.set_progress_bar_config(disable=True)
        defaults = load_student(spipe, str(folder))
        recommended[name] = float(defaults.get("guidance_scale", 1.0))
        for s in steps:
            run(spipe, name, s, 1.0, False)
            for g in sorted(set(guidances) | ({recommended[name]} if recommended[name] > 1 else set())):
                run(spipe, name, s, g, True)
            if recommended[name] > 1:
                run(spipe, name, s, recommended[name], False)
        del spipe
    write_report(args, argv, results, recommended, steps, t_steps, stages)
    return 0


def _fmt(v, d=3):
    return "-" if v is None else f"{v:.{d}f}"


def write_report(args, argv, results: dict, recommended: dict, steps: list[int], t_steps: int, stages) -> str:
    at = 4 if 4 in steps else steps[-1]
    t_none = results.get(cell_id("teacher", t_steps, TEACHER_GUIDANCE, False), {})
    t_neg = results.get(cell_id("teacher", t_steps, TEACHER_GUIDANCE, True), {})
    lines = ["| model | steps | guidance | negative prompt | shows the negated value | alignment | toy-FID vs teacher "
             "| toy-FID vs data | clipped | saturation |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r["model"] != "teacher", r["model"], r["steps"], r["guidance"],
                                                      r["negative"])):
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance']:g} | {'yes' if r['negative'] else 'no'} | "
                     f"{_fmt(r['negated_shown'])} | {_fmt(r['alignment'])} | {_fmt(r.get('toy_fid_teacher'), 1)} | "
                     f"{_fmt(r['toy_fid_data'], 1)} | {_fmt(r['clipped'])} | {_fmt(r['saturation'])} |")
    bars = []
    for name, g in recommended.items():
        if not name.startswith("cfg-"):
            continue
        plain = name.replace("cfg-", "plain-")
        c_neg = results.get(cell_id(name, at, g, True), {})
        shown, limit = c_neg.get("negated_shown"), t_neg.get("negated_shown")
        ok = None if shown is None or limit is None else shown <= limit + BARS["suppression_points"]
        bars.append(f"- {name} at {at} steps, guidance {g:g}, negative prompt: shows it in {_fmt(shown)} of samples vs "
                    f"the teacher's {_fmt(limit)} at {t_steps} steps (bar: at most +{BARS['suppression_points']}): "
                    + ("not measured" if ok is None else "**met**" if ok else "**missed**"))
        f_c = results.get(cell_id(name, at, 1.0, False), {}).get("toy_fid_teacher")
        f_p = results.get(cell_id(plain, at, 1.0, False), {}).get("toy_fid_teacher")
        ok = None if f_c is None or f_p is None else f_c <= BARS["fid_ratio"] * f_p
        bars.append(f"- {name} without guidance at {at} steps: toy-FID {_fmt(f_c, 1)} vs {plain}'s {_fmt(f_p, 1)} "
                    f"(bar: at most {BARS['fid_ratio']}x): "
                    + ("not measured" if ok is None else "**met**" if ok else "**missed**"))
    text = "\n".join([
        "# Negative prompts: CFG-preserving students vs plain students and the teacher (toy v4)",
        "",
        f"Date {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads}." + (" QUICK RUN: pipeline check only, not "
                                                                        "results." if args.quick else ""),
        "",
        "Reproduce: `python benchmarks/negative_prompt_toy.py "
        + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])) + "`",
        "",
        f"{args.num_prompts if not args.quick else 8} captions that name no {args.attribute}; negative prompt "
        f"`{args.negative}`. Without it the teacher ({t_steps} DDIM steps, guidance {TEACHER_GUIDANCE:g}) shows the "
        f"negated value in {_fmt(t_none.get('negated_shown'))} of its samples, with it in "
        f"{_fmt(t_neg.get('negated_shown'))}. Teacher over-saturation: clipped {_fmt(t_none.get('clipped'))}, "
        f"saturation {_fmt(t_none.get('saturation'))}. toy-FID vs teacher: against the teacher's samples without "
        "negative prompt (other seeds). Recommended guidance of each student (its tlcm_sampling.json): "
        + ", ".join(f"{k} {v:g}" for k, v in recommended.items()) + ".",
        "",
        *lines,
        "",
        "## Bars (issue 13)",
        "",
        *bars,
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
