"""``tlcm evaluate``: score a teacher and distilled LoRAs over schedulers x steps x guidance."""

from __future__ import annotations

import argparse

NAME = "evaluate"
HELP = ("Evaluate models/LoRAs over a grid of schedulers x steps x guidance: quality metrics, latency, network "
        "evaluations, memory; writes results.json/.csv/.md, PNG grids and plots.")


# The names of tlcm.evaluate.protocols.PROTOCOLS, spelled out so that building the parser imports no torch (a test
# keeps the two in step); an unknown name is refused by that module with the list.
PROTOCOL_NAMES = ("coco2017-5k-sdxl", "toy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (re-running resumes finished cells)")
    p.add_argument("--protocol", metavar="{" + ",".join(PROTOCOL_NAMES) + "}",
                   help="a preset; explicit options override it (default: toy when --model toy)")
    p.add_argument("--model", help="base pipeline: hub id (cached), pipeline folder, or 'toy'")
    p.add_argument("--lora", action="append", metavar="NAME=PATH[@W][+PATH2[@W2]]",
                   help="a distilled model: `tlcm distill` output folder or .safetensors (repeatable); '+' stacks "
                   "LoRAs on one model, e.g. accel_style=runs/lcm+style.safetensors@0.8 (the first one supplies "
                   "the scheduler)")
    g = p.add_argument_group("grid")
    g.add_argument("--schedulers", help="teacher schedulers: ddim,dpmpp,euler,lcm,tcd[:GAMMA] (default ddim,dpmpp,"
                   "euler)")
    g.add_argument("--student-schedulers", help="schedulers for --lora models (default tlcm; also lcm, tcd:G)")
    g.add_argument("--steps", help="step counts, comma-separated (default 1,2,4,8)")
    g.add_argument("--teacher-steps", help="teacher step counts (default: --steps)")
    g.add_argument("--guidance", help="teacher guidance scales (default 7.5; toy 4)")
    g.add_argument("--student-guidance", help="student guidance scales (default: the LoRA's tlcm_sampling.json, "
                   "else 1 = no CFG)")
    g.add_argument("--no-teacher", action="store_true", help="drop the teacher's own solver cells")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="add the undistilled teacher sampled with each student's own scheduler (teacher+NAME-sampler,"
                   " at guidance 1 and the teacher's), the training-free baseline every student is compared with "
                   "(default: on for the toy protocol)")
    g.add_argument("--timestep-spacing", default="trailing", choices=["trailing", "leading", "linspace"],
                   help="timestep spacing of ddim/dpmpp/euler (default trailing: 1 step starts at t=999)")
    pr = p.add_argument_group("prompts")
    pr.add_argument("--prompts", help="prompt file: .txt (one per line), .csv/.tsv/.jsonl/.json/.parquet column, "
                    "or COCO captions_*.json")
    pr.add_argument("--prompt-column", help="column holding prompts (default: text, caption or prompt)")
    pr.add_argument("--num-prompts", type=int, help="use the first N prompts (error if fewer)")
    pr.add_argument("--seed", type=int, help="seed of the first prompt; prompt i uses seed + i")
    pr.add_argument("--toy-split", default="train", choices=["train", "heldout"],
                    help="toy world without --prompts: which caption split")
    pr.add_argument("--negative-prompt")
    r = p.add_argument_group("reference and metrics")
    r.add_argument("--reference-solver", help="teacher reference samples, SCHEDULER:STEPS (default dpmpp:25)")
    r.add_argument("--reference-guidance", type=float, help="guidance of the reference samples")
    r.add_argument("--no-reference", action="store_true", help="skip the teacher reference (no *_teacher metrics)")
    r.add_argument("--reference-images", help="folder of real images for FID against data (e.g. COCO val2017)")
    r.add_argument("--diversity", metavar="KxS", help="per-prompt diversity of K prompts x S seeds, e.g. 32x4 "
                   "(default: 32x4 for the toy protocol; extra images per cell: K x (S-1) at most)")
    r.add_argument("--no-diversity", action="store_true", help="skip per-prompt diversity (no extra images)")
    r.add_argument("--inception-weights", help="TorchScript inception-2015-12-05.pt (clean-fid/StyleGAN2-ADA)")
    r.add_argument("--clip-model", help="CLIPModel folder or cached hub id for CLIP score")
    r.add_argument("--aesthetic-weights", help="LAION aesthetic predictor .pth (e.g. sac+logos+ava1-l14-linearMSE)")
    r.add_argument("--aesthetic-clip", help="CLIP for the aesthetic predictor (default: ViT-L/14 or --clip-model)")
    r.add_argument("--style", help="toy world: also report style_score, the share of images read as drawn in this "
                   "rendering style (e.g. shadow, for `tlcm toy finetune` models)")
    r.add_argument("--style-classifier", help="its classifier (`tlcm toy train-style` folder; default: built once "
                   "for the model's VAE, cached)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--height", type=int)
    rt.add_argument("--width", type=int)
    rt.add_argument("--batch-size", type=int)
    rt.add_argument("--device", default="auto")
    rt.add_argument("--dtype", default="float32")
    rt.add_argument("--no-resume", action="store_true", help="recompute cells that already have results")
    rt.add_argument("--dry-run", action="store_true", help="print the resolved grid and exit")


def run(args: argparse.Namespace) -> int:
    from tlcm.evaluate.protocols import config_from_options
    from tlcm.evaluate.sweep import run_sweep

    opts = vars(args).copy()
    opts["resume"] = not args.no_resume
    cfg = config_from_options(**opts)
    cells = cfg.cells()
    print(f"evaluate: {len(cells)} cells x {len(cfg.prompts)} prompts -> {cfg.out_dir}")
    if args.dry_run:
        for c in cells:
            print(f"  {c.id}")
        if cfg.reference.model:
            print(f"  reference: {cfg.reference.model} {cfg.reference.scheduler} {cfg.reference.steps} steps "
                  f"cfg {cfg.reference.guidance:g}")
        return 0
    from tlcm.runlock import hold

    with hold(cfg.out_dir, what="evaluation", flag="--out"):
        results = run_sweep(cfg)
    from tlcm.evaluate.report import best_training_free_table, sectioned_tables

    print(sectioned_tables(results["cells"]))
    best = best_training_free_table(results)
    if best:
        print("\n" + best)
    for note in results["notices"]:
        print(f"notice: {note}")
    print(f"report: {cfg.out_dir}/results.md")
    return 0
