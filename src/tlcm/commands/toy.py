"""``tlcm toy``: build the embedded toy world (dataset, VAE, teacher, metrics classifier) on a CPU."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from tlcm.errors import TLCMError

NAME = "toy"
HELP = "Build the toy world: shapes dataset, tiny VAE, tiny SD-like teacher, metrics classifier (CPU, minutes)."


def _common_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the stage's settings (CLI flags override it)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise TLCMError(f"--set {item!r} is not KEY=VALUE", "write e.g. --set teacher.steps=2000")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="toy_command", metavar="STEP")

    p = sub.add_parser("dataset", help="write a toy world's procedural dataset as an HF imagefolder")
    p.add_argument("--out", required=True, help="output folder (train/ and test/ with metadata.jsonl)")
    p.add_argument("--world", help="v4 (scenes, default) or v3 (shapes)")
    p.add_argument("--n", type=int, default=20000, help="training-split images (default 20000)")
    p.add_argument("--heldout", type=int, default=1000, help="held-out-combination images, in test/ (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("train-vae", help="train the f=4 AutoencoderKL on an imagefolder")
    p.add_argument("--data", required=True, help="imagefolder (any captioned images, or `tlcm toy dataset` output)")
    p.add_argument("--out", required=True, help="output folder (vae/, report.json, reconstructions.png)")
    _common_train_args(p)

    p = sub.add_parser("train-teacher", help="train the tiny SD-like UNet teacher on an imagefolder")
    p.add_argument("--data", required=True, help="imagefolder with captions (metadata.jsonl: file_name, text)")
    p.add_argument("--vae", required=True, help="trained VAE folder (train-vae's OUT/vae)")
    p.add_argument("--out", required=True, help="output folder (pipeline/ is a StableDiffusionPipeline folder)")
    _common_train_args(p)

    p = sub.add_parser("train-metrics", help="train the classifier behind toy-FID and alignment")
    p.add_argument("--out", required=True, help="output folder (classifier.safetensors, config.json, report.json)")
    p.add_argument("--world", help="v4 (scenes, default) or v3 (shapes)")
    _common_train_args(p)

    p = sub.add_parser("train-reward", help="train the toy reward model (contrastive image/MiniLM-text, for reward "
                       "learning; not the metrics classifier)")
    p.add_argument("--out", required=True, help="output folder (reward.safetensors, config.json, report.json)")
    p.add_argument("--world", help="v4 (scenes, default) or v3 (shapes)")
    p.add_argument("--images", type=int, dest="train_images", help="training images (default 8000)")
    p.add_argument("--vae", help="VAE for the round-trip augmentation: toy (default), a folder, or '' for none")
    _common_train_args(p)

    p = sub.add_parser("finetune", help="teach the v4 toy teacher a rendering style its captions never name: a full "
                       "fine-tune (pipeline folder) and a style LoRA (diffusers file), with style score and alignment")
    p.add_argument("--out", required=True, help="output folder (full/pipeline, lora/pytorch_lora_weights.safetensors, "
                   "report.json, samples.png)")
    p.add_argument("--teacher", help="toy (default) or a v4 toy pipeline folder")
    p.add_argument("--style", help="rendering style (default shadow)")
    p.add_argument("--mode", choices=["full", "lora", "both"], help="what to train (default both)")
    p.add_argument("--images", type=int, help="styled training images (default 4000)")
    p.add_argument("--lora-rank", type=int, dest="lora_rank", help="style LoRA rank (default 8, alpha = rank)")
    p.add_argument("--lora-lr", type=float, dest="lora_lr", help="style LoRA learning rate (default 1e-3)")
    p.add_argument("--eval-prompts", type=int, dest="eval_prompts", help="prompts of the final evaluation (default "
                   "64; 0: none)")
    p.add_argument("--eval-steps", type=int, dest="eval_steps", help="DDIM steps of the final evaluation (default 50)")
    p.add_argument("--style-classifier", dest="style_classifier", help="a `tlcm toy train-style` folder (default: "
                   "built once for the teacher's VAE, cached)")
    p.add_argument("--metrics", help="metrics classifier folder for alignment (default: the shipped v4 one)")
    _common_train_args(p)

    p = sub.add_parser("train-style", help="train the style classifier behind the style score (plain vs styled "
                       "scenes, with VAE round trips; never a training loss)")
    p.add_argument("--out", required=True, help="output folder (style.safetensors, config.json, report.json)")
    p.add_argument("--style", help="rendering style (default shadow)")
    p.add_argument("--vae", help="VAE for the round-trip augmentation: toy (default: the shipped v4 teacher's), a "
                   "folder (e.g. PIPELINE/vae), or '' for none")
    _common_train_args(p)

    p = sub.add_parser("evaluate", help="alignment and toy-FID of a teacher pipeline folder")
    p.add_argument("--teacher", help="pipeline folder (default: the shipped toy teacher of --world)")
    p.add_argument("--metrics", help="classifier folder (default: the shipped one of the teacher's world)")
    p.add_argument("--world", help="v4 (scenes, default) or v3 (shapes): the shipped teacher to evaluate")
    p.add_argument("--prompts", type=int, default=500, help="held-in prompts (default 500)")
    p.add_argument("--heldout-prompts", type=int, default=200, dest="heldout_prompts")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=5.0, dest="guidance_scale")
    p.add_argument("--scheduler", choices=["ddim", "dpm++"], default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for sample grids and evaluation.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("build", help="all stages: dataset, train-vae, train-teacher, train-metrics, evaluate")
    p.add_argument("--work", required=True, help="work folder (resumable: finished stages are skipped)")
    p.add_argument("--config", help="YAML BuildConfig (keys: seed, images, ..., and vae/teacher/metrics sections)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set teacher.steps=2000")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--world", help="v4 (scenes, default) or v3 (shapes; rebuilds the v3 assets)")
    p.add_argument("--ship", help="also copy the exported assets to this folder (src/tlcm/toy/assets to ship them)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configs and exit")
    p.add_argument("--no-progress", action="store_true")


def _overrides(args) -> dict:
    keys = ("steps", "batch_size", "lr", "seed", "threads")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(args) -> int:
    from tlcm.toy import common

    cmd = args.toy_command
    if cmd is None:
        raise TLCMError("no toy step given", "run `tlcm toy build --work DIR`, or see `tlcm toy --help`")
    progress = not getattr(args, "no_progress", False)
    if cmd == "dataset":
        from tlcm.toy.worlds import export_imagefolder

        if args.n < 1:
            raise TLCMError(f"--n {args.n} is too small", "ask for at least one image")
        if args.heldout < 0:
            raise TLCMError(f"--heldout {args.heldout} is negative", "pass 0 or more held-out images")
        from tlcm.runlock import check_output_folder

        check_output_folder(args.out)
        out = export_imagefolder(args.world, args.out, args.n, args.seed, args.heldout, progress=progress)
        print(f"wrote {args.n} training and {args.heldout} held-out images to {out}")
        return 0
    if cmd == "train-vae":
        from tlcm.toy.autoencoder import VAEConfig, train_vae

        cfg = common.load_config(VAEConfig, args.config, {"data": args.data, **_overrides(args)})
        _print(train_vae(cfg, args.out, progress))
        return 0
    if cmd == "train-teacher":
        from tlcm.toy.teacher import TeacherConfig, train_teacher

        cfg = common.load_config(TeacherConfig, args.config, {"data": args.data, "vae": args.vae, **_overrides(args)})
        _print(train_teacher(cfg, args.out, progress))
        return 0
    if cmd == "train-metrics":
        from tlcm.toy.worlds import world_version

        if world_version(args.world) == "v3":
            from tlcm.toy.metrics import MetricsConfig, train_metrics

            cfg = common.load_config(MetricsConfig, args.config, _overrides(args))
            _print(train_metrics(cfg, args.out, progress))
        else:
            from tlcm.toy.scene_metrics import SceneMetricsConfig, train_scene_metrics

            cfg = common.load_config(SceneMetricsConfig, args.config, _overrides(args))
            _print(train_scene_metrics(cfg, args.out, progress))
        return 0
    if cmd == "train-reward":
        from tlcm.toy.reward import RewardConfig, train_reward

        extra = {k: getattr(args, k) for k in ("world", "train_images", "vae") if getattr(args, k) is not None}
        cfg = common.load_config(RewardConfig, args.config, {**extra, **_overrides(args)})
        _print(train_reward(cfg, args.out, progress))
        return 0
    if cmd == "finetune":
        from tlcm.toy.finetune import FinetuneConfig, finetune

        keys = ("teacher", "style", "mode", "images", "lora_rank", "lora_lr", "eval_prompts", "eval_steps",
                "style_classifier", "metrics")
        extra = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
        cfg = common.load_config(FinetuneConfig, args.config, {**extra, **_overrides(args)})
        _print(finetune(cfg, args.out, progress))
        return 0
    if cmd == "train-style":
        from tlcm.toy.style import StyleConfig, train_style_classifier

        extra = {k: getattr(args, k) for k in ("style", "vae") if getattr(args, k) is not None}
        cfg = common.load_config(StyleConfig, args.config, {**extra, **_overrides(args)})
        _print(train_style_classifier(cfg, args.out, progress))
        return 0
    if cmd == "evaluate":
        from tlcm.toy import teacher_path, world_of_model
        from tlcm.toy.build import evaluate_teacher
        from tlcm.toy.metrics import ToyMetrics

        for flag, value, low in (("--steps", args.steps, 1), ("--prompts", args.prompts, 0),
                                 ("--heldout-prompts", args.heldout_prompts, 0), ("--threads", args.threads, 1)):
            if value < low:
                raise TLCMError(f"{flag} {value} is less than {low}", f"pass {flag} {max(low, 1)} or more")
        if args.prompts + args.heldout_prompts < 1:
            raise TLCMError("--prompts 0 and --heldout-prompts 0 leave nothing to evaluate",
                            "pass --prompts 500 (the default) or more than 0 of either")
        if not math.isfinite(args.guidance_scale) or args.guidance_scale < 0:
            raise TLCMError(f"--guidance-scale {args.guidance_scale} is not a finite number >= 0", "use e.g. 5")
        common.set_threads(args.threads)
        teacher = Path(args.teacher) if args.teacher else teacher_path(world=args.world)
        if not (teacher / "model_index.json").is_file():
            raise TLCMError(f"{teacher} is not a diffusers pipeline folder", "pass a folder with model_index.json")
        world = world_of_model(teacher)
        metrics = ToyMetrics.load(args.metrics, world=world)
        if metrics.world != world:
            raise TLCMError(f"the metrics in {args.metrics} measure toy world {metrics.world}, the teacher is {world}",
                            "pass the metrics folder of the teacher's world (or none: the shipped one)")
        if world == "v3":
            result = evaluate_teacher(teacher, metrics, args.prompts, args.heldout_prompts, args.steps,
                                      args.guidance_scale, seed=args.seed, scheduler=args.scheduler,
                                      out_dir=args.out, progress=progress)
        else:
            from diffusers import DiffusionPipeline

            from tlcm.toy.acceptance import evaluate_scenes_teacher

            pipe = DiffusionPipeline.from_pretrained(str(teacher))
            pipe.set_progress_bar_config(disable=True)
            result = evaluate_scenes_teacher(pipe, metrics, args.prompts, args.heldout_prompts, args.steps,
                                             args.guidance_scale, seed=args.seed, out_dir=args.out,
                                             progress=progress)
        if args.out:
            common.write_json(Path(args.out) / "evaluation.json", result)
        _print(result)
        return 0
    if cmd == "build":
        from tlcm.toy.build import build, load_build_config, stage_configs

        overrides = _parse_set(args.set)
        for k in ("seed", "threads", "world"):
            if getattr(args, k) is not None:
                overrides[k] = getattr(args, k)
        cfg = load_build_config(args.config, overrides)
        if args.dry_run:
            vae_cfg, teacher_cfg, metrics_cfg = stage_configs(cfg, Path(args.work))
            _print(
                {
                    "build": common.config_to_dict(cfg),
                    "vae": common.config_to_dict(vae_cfg),
                    "teacher": common.config_to_dict(teacher_cfg),
                    "metrics": common.config_to_dict(metrics_cfg),
                }
            )
            return 0
        command = "tlcm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
        from tlcm.runlock import hold

        with hold(args.work, what="toy build", flag="--work"):
            provenance = build(cfg, args.work, ship=args.ship, command=command, progress=progress)
        print(Path(args.work) / "report.md")
        print((Path(args.work) / "report.md").read_text())
        return 0 if provenance else 1
    raise TLCMError(f"unknown toy step {cmd!r}", "see `tlcm toy --help`")
