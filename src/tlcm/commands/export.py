"""``tlcm export``: a student as a kohya/webui LoRA, a peft adapter, a fused pipeline or a single-file checkpoint."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = ("Write a student (a `tlcm distill` folder or any LoRA) as a kohya LoRA for ComfyUI/A1111, a peft adapter, a "
        "fused diffusers pipeline or a single-file checkpoint.")

EPILOG = """formats:
  kohya   one .safetensors LoRA (lora_unet_* keys with .alpha) for ComfyUI, A1111/Forge and diffusers
  peft    an adapter folder for PeftModel.from_pretrained(unet, PATH)
  fused   a diffusers pipeline folder with the LoRA merged and the student's scheduler installed;
          with --single-file an original-layout .safetensors checkpoint instead

examples:
  tlcm export runs/tlcm/final --to kohya --out tlcm-sd15.safetensors --dtype float16
  tlcm export runs/tlcm/final --to peft --out tlcm-sd15-adapter/
  tlcm export runs/tlcm/final --to fused --out tlcm-sd15-fused/
  tlcm export runs/tlcm/final --to fused --single-file --out tlcm-sd15.safetensors --dtype float16
"""

# tlcm.export.FORMATS, spelled out so that building the parser imports no torch (a test keeps the two in step)
FORMATS = ("kohya", "peft", "fused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("student", metavar="STUDENT",
                        help="a folder written by `tlcm distill`, a peft adapter folder or a LoRA .safetensors file")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="output file (kohya, --single-file: .safetensors) or folder (peft, fused)")
    parser.add_argument("--model", default=None,
                        help="the base model: hub id, pipeline folder, single-file checkpoint or 'toy' (default: the "
                        "base_model in the student's tlcm_sampling.json)")
    parser.add_argument("--config", metavar="DIR",
                        help="for a single-file --model: a local pipeline folder with the matching component configs")
    parser.add_argument("--single-file", action="store_true",
                        help="with --to fused: one original-layout checkpoint (SD1.x, SDXL) instead of a folder")
    parser.add_argument("--dtype", default="float32",
                        help="dtype of the written weights: float32 (default), float16 or bfloat16")
    parser.add_argument("--scale", type=float, default=1.0, help="with --to fused: the LoRA weight to merge (1.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    parser.add_argument("--device", default="cpu", help="where to load and fuse (default: cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide model-loading progress bars")


def run(args: argparse.Namespace) -> int:
    from tlcm.export import ExportConfig, export

    if args.no_progress:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    out = export(ExportConfig(
        student=args.student, to=args.to, out=args.out, model=args.model, config=args.config,
        single_file=args.single_file, dtype=args.dtype, scale=args.scale, overwrite=args.overwrite,
        device=args.device,
    ))
    kind = "single-file checkpoint" if args.single_file else {"kohya": "kohya LoRA", "peft": "peft adapter folder",
                                                              "fused": "fused pipeline folder"}[args.to]
    print(f"wrote {kind} {out}")
    return 0
