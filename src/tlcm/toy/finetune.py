"""Toy fine-tunes: the toy teacher taught a rendering style its captions never name, as a full fine-tune and as a
style LoRA, so that "does an acceleration LoRA distilled from the base keep a fine-tune's or a style LoRA's look?"
can be measured (``benchmarks/transfer_toy.py``, ``docs/universal.md``).

The data is the default scenes world (same scenes, same captions, same distribution) drawn in a style of
``scenes.RENDER_STYLES`` (``shadow``: soft drop shadows): a caption never says "shadow", so only the weights can carry
it, as with a fine-tuned Stable Diffusion checkpoint or an artist-style LoRA. The style leaves every attribute the
captions and the metrics classifier read unchanged (on real images the classifier's alignment is the same with and
without shadows), so alignment stays measurable, and the separate style classifier (:mod:`tlcm.toy.style`) turns
"style kept" into a number.

Both variants start from the same teacher and train with the teacher's own denoising step
(:func:`tlcm.toy.teacher.make_train_step`: caption dropout 10 % so CFG keeps working, offset noise, min-SNR weights):

- ``full/pipeline``: every UNet weight trained (AdamW, warm-up + cosine, EMA), written as a complete diffusers
  ``StableDiffusionPipeline`` folder (the teacher's VAE, tokenizer, text encoder and scheduler) whose
  ``tlcm_toy.json`` names the world, the style and the base teacher;
- ``lora/pytorch_lora_weights.safetensors``: a LoRA (rank ``lora_rank``, alpha = rank) on the UNet's attention and
  feed-forward projections (kohya's default LoRA targets for SD), in diffusers' format, so
  ``pipe.load_lora_weights(OUT/lora)`` and ``tlcm sample --lora OUT/lora`` load it.

``report.json`` holds the losses, the times and the measured result at ``eval_steps`` DDIM steps with CFG on
``eval_prompts`` prompts: style score and alignment of the base teacher, the full fine-tune and base + style LoRA.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.toy import common

MODES = ("full", "lora", "both")
LORA_FILE = "pytorch_lora_weights.safetensors"
# kohya's default targets of an SD LoRA ("LoRA-LierLa"): the linear layers of the transformer blocks
STYLE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")


@dataclass
class FinetuneConfig:
    teacher: str = "toy"  # a toy name (toy, toy-v4) or a toy pipeline folder of the scenes world
    style: str = "shadow"  # one of tlcm.toy.scenes.RENDER_STYLES
    mode: str = "both"  # full | lora | both
    images: int = 4000  # styled training images (captions of the default world)
    data_seed: int = 4000  # the teacher's data uses 0, the metrics classifier 1000, the style classifier 6001
    steps: int = 1000  # per variant: 8 passes over the images at batch 32
    batch_size: int = 32
    lr: float = 2e-4  # full fine-tune: a tenth of the teacher's peak rate (2e-3)
    weight_decay: float = 0.01
    ema_decay: float = 0.99  # full fine-tune (saved weights); the LoRA has none
    lora_lr: float = 1e-3
    lora_rank: int = 8  # alpha = rank (LoRA scale 1), so every loader applies the same scale
    lora_targets: tuple = field(default_factory=lambda: STYLE_LORA_TARGETS)
    warmup_steps: int = 20
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    noise_offset: float = 0.1
    checkpoint_every: int = 100
    eval_prompts: int = 64  # 0: no evaluation
    eval_steps: int = 50
    guidance_scale: float = 4.0  # the toy protocol's teacher guidance (= the toy presets' w 3)
    style_classifier: str = ""  # a `tlcm toy train-style` folder; "": built for the teacher's VAE (cached)
    metrics: str = ""  # metrics classifier folder; "": the shipped one of the teacher's world
    seed: int = 0
    threads: int = 2


def resolve_teacher(teacher: str) -> Path:
    """A toy name or pipeline folder -> the pipeline folder; the teacher must belong to the scenes world (v4)."""
    from tlcm.toy import TEACHER_NAMES, is_toy_name, teacher_path, world_of_model

    folder = teacher_path(world=TEACHER_NAMES[teacher]) if is_toy_name(teacher) else Path(teacher)
    if not (folder / "model_index.json").is_file():
        raise TLCMError(f"{teacher!r} is not a diffusers pipeline folder", "pass 'toy' or a toy pipeline folder")
    world = world_of_model(str(folder))
    if world != "v4":
        raise TLCMError(f"the rendering styles exist in the scenes world (v4); {teacher!r} is a {world} teacher",
                        "fine-tune a v4 teacher ('toy' or a `tlcm toy build` pipeline)")
    return folder


def validate(cfg: FinetuneConfig) -> None:
    from tlcm.toy import scenes

    if cfg.style not in scenes.RENDER_STYLES:
        raise TLCMError(f"unknown style {cfg.style!r}", f"use one of {', '.join(scenes.RENDER_STYLES)}")
    if cfg.mode not in MODES:
        raise TLCMError(f"unknown fine-tune mode {cfg.mode!r}", f"use one of {', '.join(MODES)}")
    for key in ("images", "steps", "batch_size", "lora_rank", "eval_steps", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise TLCMError(f"{key}={getattr(cfg, key)} must be at least 1", f"set {key} to a positive integer")
    if cfg.lr <= 0 or cfg.lora_lr <= 0:
        raise TLCMError("learning rates must be positive", "set lr and lora_lr > 0")


def styled_training_set(n: int, seed: int, style: str) -> tuple[np.ndarray, list[str]]:
    """``n`` records of the default scenes world drawn in ``style``: uint8 images and the world's own captions."""
    from tlcm.toy import scenes

    it = scenes.iter_records(seed, "train", style=style)
    images, captions = [], []
    for _ in range(n):
        img, text, _ = next(it)
        images.append(np.asarray(img, dtype=np.uint8))
        captions.append(text)
    return np.stack(images), captions


def _encoded(cfg: FinetuneConfig, pipe, out: Path, progress: bool) -> dict:
    """The styled data, encoded with the teacher's VAE and text encoder; cached in ``out/data.pt``."""
    from tlcm.toy.teacher import encode_training_set

    key = json.dumps([cfg.style, cfg.images, cfg.data_seed, pipe.tokenizer.model_max_length,
                      float(pipe.vae.config.scaling_factor)])
    cache = out / "data.pt"
    if cache.is_file():
        enc = torch.load(cache, weights_only=True)
        if enc.get("key") == key:
            return enc
    images, captions = styled_training_set(cfg.images, cfg.data_seed, cfg.style)
    enc = encode_training_set(images, captions, pipe.vae, pipe.tokenizer.model_max_length, progress=progress,
                              tokenizer=pipe.tokenizer, encoder=pipe.text_encoder)
    enc["key"] = key
    common.atomic_torch_save(enc, cache)
    return enc


def _lora_targets(unet, targets) -> list[str]:
    names = [n for n, _ in unet.named_modules()]
    found = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not found:
        raise TLCMError(f"none of the LoRA targets {list(targets)} is a layer of the teacher UNet",
                        "set lora_targets to names of its layers, e.g. to_q, to_k, to_v, to_out.0")
    return found


def _train(cfg: FinetuneConfig, unet, enc: dict, folder: Path, lora: bool, progress: bool) -> dict:
    """One variant: the teacher's denoising step on the styled data; returns losses and time."""
    from tlcm.toy.teacher import make_train_step, warmup_cosine

    clock = common.Stopwatch()
    params = [p for p in unet.parameters() if p.requires_grad]
    lr, wd = (cfg.lora_lr, 0.0) if lora else (cfg.lr, cfg.weight_decay)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    ema = None if lora else copy.deepcopy(unet).requires_grad_(False)
    state = {"unet": unet, "opt": opt, "sched": sched, **({} if ema is None else {"ema": ema})}
    ckpt = folder / "checkpoint.pt"
    start = common.load_checkpoint(ckpt, **state)
    rng = np.random.default_rng([cfg.seed, 1 if lora else 0, start])
    unet.train()
    step_fn = make_train_step(unet, enc, cfg, rng, float(enc["scaling"]), opt, sched, ema=ema)
    history = common.run_training(step_fn, start, cfg.steps, ckpt, cfg.checkpoint_every,
                                  f"finetune {'lora' if lora else 'full'} ({cfg.style})", progress, **state)
    unet.eval()
    if ema is not None:
        ema.eval()
    return {"model": ema if ema is not None else unet, "steps": cfg.steps, **common.loss_summary(history),
            "seconds": round(clock.seconds, 1)}


def _write_marker(folder: Path, teacher: Path, cfg: FinetuneConfig, kind: str) -> None:
    from tlcm.toy import MARKER

    marker = json.loads((teacher / MARKER).read_text()) if (teacher / MARKER).is_file() else {}
    common.write_json(folder / MARKER, {**marker, "world": "v4", "style": cfg.style, "finetune": kind,
                                        "base": str(teacher)})


def finetune(cfg: FinetuneConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the fine-tune(s) of ``cfg.mode`` into ``out_dir`` (see the module docstring); returns the report.

    Resumable: each variant checkpoints (``full/checkpoint.pt``, ``lora/checkpoint.pt``) and a finished variant
    (its pipeline folder or LoRA file present) is not trained again."""
    from diffusers import DiffusionPipeline

    from tlcm.train.export import save_diffusers_lora

    validate(cfg)
    teacher = resolve_teacher(cfg.teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common.set_threads(cfg.threads)
    common.write_config(cfg, out / "config.yaml")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update({"teacher": str(teacher), "style": cfg.style})

    pipe = DiffusionPipeline.from_pretrained(str(teacher), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    enc = None

    def data() -> dict:
        nonlocal enc
        if enc is None:
            enc = _encoded(cfg, pipe, out, progress)
            enc["scaling"] = float(pipe.vae.config.scaling_factor)
        return enc

    if cfg.mode in ("full", "both") and not (out / "full" / "pipeline" / "model_index.json").is_file():
        report.pop("evaluation", None)  # measured without this variant
        torch.manual_seed(cfg.seed)
        unet = copy.deepcopy(pipe.unet).requires_grad_(True)
        result = _train(cfg, unet, data(), out / "full", lora=False, progress=progress)
        model = result.pop("model")
        common.save_pretrained_atomic(model, out / "full" / "unet")
        common.assemble_pipeline(out / "full" / "pipeline", out / "full" / "unet", teacher / "vae",
                                 tokenizer_dir=teacher / "tokenizer",
                                 scheduler_config=json.loads((teacher / "scheduler" / "scheduler_config.json")
                                                             .read_text()))
        _write_marker(out / "full" / "pipeline", teacher, cfg, "full")
        report["full"] = result
        common.write_json(report_path, report)
    if cfg.mode in ("lora", "both") and not (out / "lora" / LORA_FILE).is_file():
        from peft import LoraConfig

        report.pop("evaluation", None)
        torch.manual_seed(cfg.seed + 1)
        unet = copy.deepcopy(pipe.unet).requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                    target_modules=_lora_targets(unet, cfg.lora_targets)))
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
        (out / "lora").mkdir(parents=True, exist_ok=True)
        result = _train(cfg, unet, data(), out / "lora", lora=True, progress=progress)
        save_diffusers_lora(pipe, result.pop("model"), out / "lora")
        common.write_json(out / "lora" / "style_lora.json", {"style": cfg.style, "base": str(teacher),
                                                              "rank": cfg.lora_rank, "alpha": cfg.lora_rank,
                                                              "targets": list(cfg.lora_targets)})
        report["lora"] = result
        common.write_json(report_path, report)
    if cfg.eval_prompts > 0 and "evaluation" not in report:
        report["evaluation"] = evaluate_finetunes(cfg, teacher, out, pipe=pipe, progress=progress)
        common.write_json(report_path, report)
    return report


def style_scorer(cfg: FinetuneConfig, teacher: Path):
    from tlcm.toy.style import load_style_score

    if cfg.style_classifier:
        return load_style_score(cfg.style_classifier)
    return load_style_score(style=cfg.style, vae=str(teacher / "vae"))


def evaluate_finetunes(cfg: FinetuneConfig, teacher: Path, out: Path, pipe=None, progress: bool = False) -> dict:
    """Style score and alignment at ``eval_steps`` DDIM steps with CFG of the base teacher, the full fine-tune and
    base + style LoRA (those that exist), on held-in prompts (seed 10000: not the training captions); a sample grid
    (rows: base, full, base + LoRA) in ``out/samples.png``. ``pipe``: the teacher pipeline, if already loaded."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from tlcm.lora import load_loras
    from tlcm.toy import scenes
    from tlcm.toy.metrics import ToyMetrics
    from tlcm.toy.teacher import sample_pipeline

    prompts = scenes.prompts(cfg.eval_prompts, seed=10_000, split="train")
    scorer = style_scorer(cfg, teacher)
    result: dict = {"prompts": len(prompts), "steps": cfg.eval_steps, "guidance_scale": cfg.guidance_scale,
                    "scheduler": "ddim", "style_classifier": cfg.style_classifier or "cached build"}
    try:
        metrics = ToyMetrics.load(cfg.metrics or None, world="v4")
    except TLCMError as err:
        metrics = None
        result["note"] = f"alignment not measured: {err.problem}"
    if pipe is None:
        pipe = DiffusionPipeline.from_pretrained(str(teacher), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base_unet = pipe.unet
    grids, rows = [], []

    def measure(name: str) -> None:
        images = sample_pipeline(pipe, prompts, cfg.eval_steps, cfg.guidance_scale, seed=cfg.seed, progress=progress)
        row = {"style_score": round(scorer.score(images), 4)}
        if metrics is not None:
            row["alignment"] = round(metrics.alignment(images, prompts), 4)
        result[name] = row
        grids.append(images[:16])
        rows.append(name)
        if name != "base" and row["style_score"] < 0.9:
            result.setdefault("warnings", []).append(
                f"{name}: only {row['style_score']:.0%} of its samples show the {cfg.style!r} style; for transfer "
                "measurements the fine-tune should carry it (raise steps or the learning rate)")

    measure("base")
    if (out / "full" / "pipeline" / "model_index.json").is_file():
        pipe.unet = UNet2DConditionModel.from_pretrained(out / "full" / "pipeline" / "unet", torch_dtype=torch.float32)
        measure("full")
        pipe.unet = base_unet
    if (out / "lora" / LORA_FILE).is_file():
        names = load_loras(pipe, [(str(out / "lora"), 1.0)])
        measure("base+lora")
        pipe.delete_adapters(names)
    common.save_grid(torch.cat(grids), out / "samples.png", nrow=16, scale=3)
    common.atomic_write_text(out / "samples.txt", "rows: " + ", ".join(rows) + "\n" + "\n".join(prompts[:16]) + "\n")
    return result
