"""``tlcm sample``: few-step images from a model plus LoRAs (an LCM-LoRA, a TLCM student, style LoRAs)."""

from __future__ import annotations

import argparse
import sys

NAME = "sample"
HELP = "Generate images in 1-8 steps from a model and LoRAs; PNGs carry prompt, seed and settings as metadata."

EPILOG = """examples:
  tlcm sample --model toy --prompt "a red circle" --steps 4 --out samples/
  tlcm sample --lora runs/tlcm-sdxl/final --prompts-file prompts.txt --grid      (a student folder: its base model,
                                                                                  scheduler and guidance are used)
  tlcm sample --model stabilityai/stable-diffusion-xl-base-1.0 --lora TLCM_SDXL_LoRA --guidance-scale 0 --steps 3
  tlcm sample --model sd15.safetensors --config ./sd15-pipeline --lora lcm-lora.safetensors --lora style.safetensors:0.8
  tlcm sample --lora runs/tlcm/final --image photo.png --strength 0.5 --prompt "a watercolor painting"   (img2img)
"""


def _lora(text: str) -> tuple[str, float]:
    import math

    from tlcm.lora import parse_lora_arg

    path, weight = parse_lora_arg(text)
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"LoRA weight {weight} in {text!r} is not a finite number")
    return path, weight


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="hub id, diffusers pipeline folder, single .safetensors/.ckpt checkpoint, or 'toy' "
                   "(default: the base_model recorded in a --lora student folder)")
    g.add_argument("--config", metavar="DIR", help="for a single-file --model: a local pipeline folder with the "
                   "matching component configs (needed offline)")
    g.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:WEIGHT]",
                   help="LoRA to apply (repeatable): diffusers/kohya .safetensors, peft adapter folder, tlcm student "
                   "folder or hub id; optional weight after a colon (default 1.0)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    g = parser.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    g.add_argument("--prompts-file", metavar="FILE", help="text file, one prompt per line")
    g.add_argument("--negative-prompt", default=None, help="used only with classifier-free guidance (scale > 1)")
    g = parser.add_argument_group("img2img")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="init image, or a folder of them (repeatable): one image serves every prompt, one prompt "
                   "every image, else images and prompts pair in order")
    g.add_argument("--strength", type=float, default=None,
                   help="how much of the image to re-draw, in (0, 1]: runs the last int(steps x strength) of the "
                   "steps (default 0.8)")
    g = parser.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None,
                   help="sampling steps, 1-8 (more allowed with a warning; default: the student's, else 4)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="0 or 1: no CFG; >1: CFG, or the guidance embedding of a UNet that has one "
                   "(default: the student's, else 1.0)")
    g.add_argument("--gamma", type=float, default=None,
                   help="stochasticity of multistep sampling in [0, 1]: 1 = LCM, 0 = deterministic")
    g.add_argument("--mode", choices=["lcm", "tcd", "segments"], default=None,
                   help="TLCM scheduler mode (default: the student's, else lcm)")
    g.add_argument("--keep-scheduler", action="store_true",
                   help="sample with the pipeline's own scheduler instead of TLCM's (for a teacher)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=1, help="images per forward pass (does not change images)")
    g.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default="samples", metavar="DIR", help="output folder (default: samples)")
    g.add_argument("--grid", action="store_true", help="also write grid.png with all images")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars (sampling and model loading)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings (student defaults filled in) as JSON and exit; loads nothing")


def run(args: argparse.Namespace) -> int:
    from tlcm.sample import SampleConfig, resolve, sample

    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    config = SampleConfig(
        model=args.model, prompts=args.prompt, prompts_file=args.prompts_file, negative_prompt=args.negative_prompt,
        loras=args.lora, steps=args.steps, guidance_scale=args.guidance_scale, gamma=args.gamma, mode=args.mode,
        keep_scheduler=args.keep_scheduler, seed=args.seed, images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size, height=args.height, width=args.width, out=args.out, grid=args.grid,
        device=args.device, dtype=args.dtype, config=args.config, progress=not args.no_progress,
        images=args.image, strength=args.strength,
    )
    if args.dry_run:
        import dataclasses
        import json

        run = resolve(config)
        for note in run.warnings:
            print(f"tlcm sample: warning: {note}", file=sys.stderr)
        print(json.dumps({k: v for k, v in dataclasses.asdict(run).items() if k != "warnings"}, indent=2))
        return 0
    paths = sample(config, warn=lambda text: print(f"tlcm sample: warning: {text}", file=sys.stderr))
    print(f"wrote {len(paths)} image(s) to {config.out}" + (" and grid.png" if config.grid else ""))
    return 0
