"""``tlcm distill``: train an LCM, MLCD (TLCM stage 1) or TLCM (stage 2) student from synthetic shards, with the bag
of techniques (DMD, GAN, reward) when configured, or run a chain of such phases."""

from __future__ import annotations

import argparse

NAME = "distill"
HELP = "distil a teacher into a few-step student (recipes lcm, mlcd, tlcm) and export it as a LoRA"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "config layers, later wins: --preset, --config, the flags below, --set key=value\n"
        "examples:\n"
        "  tlcm distill --preset toy-mlcd --teacher toy --data shards/ --output-dir runs/mlcd\n"
        "  tlcm distill --preset toy-tlcm --teacher toy --data shards/ --output-dir runs/tlcm "
        "--set init_lora=runs/mlcd\n"
        "  tlcm distill --preset toy-tlcm-full --data shards/ --output-dir runs/chain "
        "--set stage1.max_steps=400   (a chain: stage 1 -> stage 2 -> reward -> DMD+GAN; re-run to resume)\n"
        "  accelerate launch --num_processes 2 -m tlcm.cli distill ...   (DDP; see docs/distill.md)"
    )
    parser.add_argument("--recipe", choices=["lcm", "mlcd", "tlcm"], help="what to train (default: the preset's)")
    parser.add_argument("--teacher", help="hub id, diffusers folder, or 'toy'")
    parser.add_argument("--data", help="shards folder written by `tlcm synthesize`")
    parser.add_argument("--output-dir", dest="output_dir", help="where checkpoints and the student go")
    parser.add_argument("--preset", help="a shipped preset, e.g. toy-tlcm, sd15-lcm, sdxl-mlcd, or a chain of "
                        "phases: toy-tlcm-full, sd15-tlcm-full, sdxl-tlcm-full (or a chain YAML file)")
    parser.add_argument("--config", help="a YAML file of config keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (repeatable), e.g. --set lora_rank=32")
    parser.add_argument("--resume", help="'latest' or a checkpoint-N folder: continue a run (its settings must match "
                        "the checkpoint's, except max_steps, learning_rate, max_grad_norm, which apply from the "
                        "resumed step, and bookkeeping such as logging/checkpointing/validation; see "
                        "docs/reliability.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the run that --output-dir holds (its checkpoints and outputs) and start anew")
    parser.add_argument("--allow-teacher-mismatch", dest="allow_teacher_mismatch", action="store_true", default=None,
                        help="train on shards made by another teacher, latent size or VAE scaling (deliberate "
                        "cross-training; warned)")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="number of optimiser steps")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve and print the config and the plan, then exit without loading anything")


def run(args: argparse.Namespace) -> int:
    from tlcm.errors import TLCMError
    from tlcm.train.chain import is_chain, run_chain
    from tlcm.train.config import resolve_config, validate_config
    from tlcm.train.loop import distill, plan_text

    flags = {k: getattr(args, k) for k in ("recipe", "teacher", "data", "output_dir", "max_steps", "seed", "device",
                                           "allow_teacher_mismatch")}
    if is_chain(args.preset):
        if args.resume or args.recipe or args.overwrite:
            raise TLCMError("a chain sets each phase's recipe and resumes by itself",
                            "drop --recipe, --resume and --overwrite (re-running the command continues the chain; "
                            "delete the output folder to start it anew)")
        out = run_chain(args.preset, args.config, flags, args.overrides, progress=not args.no_progress,
                        dry_run=args.dry_run)
        if not args.dry_run:
            import os

            if os.environ.get("RANK", "0") == "0":
                print(f"chain finished; final student in {out}")
        return 0
    cfg = resolve_config(args.preset, args.config, flags, args.overrides)
    if args.dry_run:
        validate_config(cfg, need_data=False, need_output=False)
        print(cfg.to_yaml())
        print(plan_text(cfg))
        return 0
    import os

    out = distill(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":
        print(f"student written to {out}")
    return 0
