"""``tlcm synthesize``: the teacher turns prompts into a sharded, resumable training set (no real images)."""

from __future__ import annotations

import argparse

from tlcm.errors import TLCMError

NAME = "synthesize"
HELP = ("Generate a data-free training set: the teacher samples latents for a prompt list into checksummed, "
        "resumable shards (or --inspect a shard).")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", help="hub id, local diffusers pipeline folder, or 'toy' (the shipped toy teacher)")
    p.add_argument("--prompts", help="prompt file: .txt (one a line), .jsonl/.json/.csv/.tsv/.parquet, a folder saved "
                   "by datasets' save_to_disk, or 'toy' (the toy world's training captions; default with "
                   "--teacher toy)")
    p.add_argument("--out", help="dataset folder to create or resume")
    p.add_argument("--prompt-column", help="column holding the prompts (default: prompt/caption/text)")
    p.add_argument("--negative-column", help="column holding per-record negative prompts")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every record (default: none)")
    p.add_argument("--no-dedupe", action="store_true", help="keep duplicate prompts")
    p.add_argument("--num-records", type=int, help="records to generate (default: one per prompt; more cycle "
                   "through the prompts with new seeds)")
    p.add_argument("--solver", choices=["dpmpp", "ddim", "euler"], default="dpmpp",
                   help="teacher solver (default: DPM-Solver++ 2M)")
    p.add_argument("--steps", type=int, default=25, help="solver steps (default: 25)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale in diffusers' form (default: 7.5; SDXL 6.0)")
    p.add_argument("--seed", type=int, default=0, help="record i uses seed SEED+i (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="records per teacher call (default: 8)")
    p.add_argument("--records-per-shard", type=int, default=256, help="records per shard (default: 256)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--latent-dtype", default="fp16", help="storage dtype of latents (default: fp16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto; set by accelerate launch)")
    p.add_argument("--save-embeddings", action="store_true",
                   help="also store the prompt's text embeddings (SDXL: and pooled); large")
    p.add_argument("--trajectory", type=_int_list, default=[], metavar="K1,K2,...",
                   help="also store the solver state after these many steps (for solver-target supervision)")
    p.add_argument("--save-images", choices=["png", "jpeg"], help="also write decoded images to OUT/images/")
    p.add_argument("--overwrite", action="store_true", help="discard an existing dataset with another configuration")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and the plan (new, resume, "
                   "nothing to do, refused) without loading the teacher or writing anything")
    p.add_argument("--inspect", metavar="SHARD", help="summarise a shard (or dataset folder), verify its checksum and "
                   "write a grid of decoded samples; ignores the generation flags")
    p.add_argument("--grid", help="with --inspect: where to write the grid PNG (default: DATASET/inspect/SHARD.png)")
    p.add_argument("--max-images", type=int, default=16, help="with --inspect: samples in the grid (0: none)")


def run(args: argparse.Namespace) -> int:
    from tlcm.data.synthesize import SynthesizeConfig, inspect_shard, plan, synthesize

    if args.inspect:
        inspect_shard(args.inspect, grid=args.grid, teacher=args.teacher, max_images=args.max_images,
                      device=args.device)
        return 0
    if args.teacher == "toy" and not args.prompts:
        args.prompts = "toy"  # the toy world's training-split captions
    missing = [f"--{k}" for k in ("teacher", "prompts", "out") if not getattr(args, k)]
    if missing:
        raise TLCMError(f"missing {', '.join(missing)}",
                        "e.g. tlcm synthesize --teacher toy --prompts toy --out data/toy-synth")
    config = SynthesizeConfig(
        teacher=args.teacher, prompts=args.prompts, out=args.out, prompt_column=args.prompt_column,
        negative_column=args.negative_column, negative_prompt=args.negative_prompt, dedupe=not args.no_dedupe,
        num_records=args.num_records, solver=args.solver, steps=args.steps, guidance_scale=args.guidance_scale,
        seed=args.seed, batch_size=args.batch_size, records_per_shard=args.records_per_shard, dtype=args.dtype,
        latent_dtype=args.latent_dtype, device=args.device, save_embeddings=args.save_embeddings,
        trajectory_steps=args.trajectory, save_images=args.save_images, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if args.dry_run:
        import json

        print(json.dumps(plan(config), indent=1))
        return 0
    synthesize(config)
    return 0
