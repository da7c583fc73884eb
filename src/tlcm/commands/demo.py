"""``tlcm demo``: synthesize -> distill -> evaluate on the shipped toy teacher, and write a report."""

from __future__ import annotations

import argparse

NAME = "demo"
HELP = ("Run the whole pipeline on the shipped toy teacher (CPU): synthesize latents, distil TLCM (and MLCD, "
        "LCM-LoRA), evaluate 1/2/4/8 steps against the teacher's solvers, write OUT/report/. Resumable.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="tlcm-demo", help="work and report folder (default ./tlcm-demo); re-running "
                   "resumes it")
    p.add_argument("--quick", action="store_true", help="smaller everything, same code path (< 5 min on 2 cores)")
    p.add_argument("--teacher", help="teacher pipeline (default: the shipped toy teacher, 'toy')")
    p.add_argument("--world", help="toy world whose captions and metrics the demo uses (v3, v4; default: the "
                   "teacher's own; required for a teacher that is not a toy build)")
    p.add_argument("--device", help="auto (default), cpu or cuda")
    p.add_argument("--records", type=int, help="synthetic records (default 512; quick 32)")
    p.add_argument("--eval-prompts", type=int, dest="eval_prompts", help="evaluation prompts (default 256; quick 32)")
    p.add_argument("--no-lcm", action="store_true", help="skip the LCM-LoRA baseline")
    p.add_argument("--no-chain", action="store_true", help="skip the chain's last phases on the TLCM student "
                   "(preference learning, then DMD + GAN: the tlcm-full row)")
    p.add_argument("--no-baselines", action="store_true", help="skip the undistilled teacher sampled with each "
                   "student's scheduler (teacher+NAME-sampler rows; faster, but nothing then shows what distillation "
                   "adds over the sampler)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1: robust on shared machines; 2 on an "
                   "idle 2-core machine is faster)")
    p.add_argument("--workers", type=int, choices=(1, 2), help="processes running independent stages side by "
                   "side: the teacher's evaluation while the students train (default 2 on a CPU with two free cores, "
                   "else 1; only the timings change)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from tlcm.demo import demo_config, main_table, run_demo

    cfg = demo_config(args.quick, out=args.out, teacher=args.teacher, world=args.world, device=args.device,
                      records=args.records,
                      eval_prompts=args.eval_prompts, baseline_lcm=False if args.no_lcm else None,
                      reward_steps=0 if args.no_chain else None, dmd_steps=0 if args.no_chain else None,
                      baselines=False if args.no_baselines else None,
                      threads=args.threads, workers=args.workers, progress=False if args.no_progress else None)
    from tlcm.runlock import hold

    with hold(cfg.out, what="demo", flag="--out"):
        results = run_demo(cfg)
    print(main_table(results))
    for note in results["notices"]:
        print(f"notice: {note}")
    print(f"report: {cfg.out}/report/README.md")
    return 0
