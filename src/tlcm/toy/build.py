"""``tlcm toy build``: dataset -> VAE -> teacher -> metrics classifier -> export -> evaluation -> provenance.

Every stage writes into its own folder of the work dir and is skipped when its outputs exist, so an interrupted build
resumes where it stopped (the training stages also resume mid-run from their checkpoints). The evaluation runs on the
exported (fp16-rounded, shipped) form of the teacher and classifier, so the provenance numbers are those of the files
that ship.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.toy import common, shapes
from tlcm.toy.autoencoder import VAEConfig, reconstruct, train_vae
from tlcm.toy.metrics import MetricsConfig, ToyMetrics, train_metrics
from tlcm.toy.teacher import TeacherConfig, sample_pipeline, train_teacher


@dataclass
class BuildConfig:
    seed: int = 0
    images: int = 20000  # training-split images of the dataset
    heldout_images: int = 1000  # held-out-combination images (exported as the imagefolder's "test" split)
    threads: int = 2
    eval_prompts: int = 300  # held-in (training-split) prompts for alignment and toy-FID
    eval_heldout_prompts: int = 100
    eval_steps: int = 50
    guidance_scale: float = 5.0
    prompt_file_lines: int = 2000
    vae: dict = field(default_factory=dict)  # overrides of VAEConfig
    teacher: dict = field(default_factory=dict)  # overrides of TeacherConfig
    metrics: dict = field(default_factory=dict)  # overrides of MetricsConfig


def stage_configs(cfg: BuildConfig, work: Path) -> tuple[VAEConfig, TeacherConfig, MetricsConfig]:
    data = str(work / "dataset")
    vae_cfg = common.config_from_dict(VAEConfig, {"data": data, "seed": cfg.seed, "threads": cfg.threads, **cfg.vae})
    teacher_cfg = common.config_from_dict(
        TeacherConfig,
        {"data": data, "vae": str(work / "vae" / "vae"), "seed": cfg.seed, "threads": cfg.threads, **cfg.teacher},
    )
    metrics_cfg = common.config_from_dict(MetricsConfig, {"threads": cfg.threads, **cfg.metrics})
    return vae_cfg, teacher_cfg, metrics_cfg


ASSETS_PATH = "src/tlcm/toy/assets"  # relative to the repository root


def git_commit() -> str | None:
    """HEAD of the source checkout, with ``+dirty`` when tracked files outside the assets differ from it (then the
    commit alone does not reproduce the build)."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)" + ASSETS_PATH],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = head.stdout.strip()
    return (sha + ("+dirty" if status.stdout.strip() else "")) or None


def _timed(timings: dict, name: str, work: Path, fn):
    t0 = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t0
    if isinstance(result, dict) and "seconds" in result:  # a training stage reports its own time (kept on resume)
        dt = max(dt, float(result["seconds"]))
    if dt > 1.0 or name not in timings:  # a skipped (already done) stage keeps its recorded time
        timings[name] = round(dt, 1)
    common.write_json(work / "timings.json", timings)
    return result


def export_assets(work: Path, dest: Path, cfg: BuildConfig) -> Path:
    """Write the shippable assets (fp16 UNet/VAE, configs, tokenizer, classifier, prompts) to ``dest``, atomically."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        teacher = tmp / "teacher"
        pipe = work / "teacher" / "pipeline"
        UNet2DConditionModel.from_pretrained(pipe / "unet").half().save_pretrained(teacher / "unet")
        AutoencoderKL.from_pretrained(pipe / "vae").half().save_pretrained(teacher / "vae")
        shutil.copytree(pipe / "scheduler", teacher / "scheduler")
        shutil.copytree(pipe / "tokenizer", teacher / "tokenizer")
        shutil.copyfile(pipe / "model_index.json", teacher / "model_index.json")
        (tmp / "metrics").mkdir()
        state = load_file(str(work / "metrics" / "classifier.safetensors"))
        save_file(
            {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
            tmp / "metrics" / "classifier.safetensors",
        )
        shutil.copyfile(work / "metrics" / "config.json", tmp / "metrics" / "config.json")
        lines = shapes.prompts(cfg.prompt_file_lines, seed=cfg.seed + 7, split="train")
        (tmp / "prompts.txt").write_text("\n".join(lines) + "\n")
        common.replace_dir(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def evaluate_teacher(
    pipeline,
    metrics: ToyMetrics,
    n_heldin: int = 500,
    n_heldout: int = 200,
    steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    scheduler: str = "ddim",
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Alignment and toy-FID (with its real-vs-real floor) of a teacher on held-in and held-out prompts."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline)) if isinstance(pipeline, (str, Path)) else pipeline
    result: dict = {"steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler}
    for split, n in (("train", n_heldin), ("heldout", n_heldout)):
        if n <= 0:
            continue
        key = "heldin" if split == "train" else "heldout"
        prompt_list = shapes.prompts(n, seed=seed + 500, split=split)
        t0 = time.perf_counter()
        gen = sample_pipeline(
            pipe, prompt_list, steps, guidance_scale, seed=seed, scheduler=scheduler, progress=progress
        )
        sample_seconds = time.perf_counter() - t0
        real_a = common.to_tensor(shapes.render_prompts(prompt_list, seed=seed + 1))
        real_b = common.to_tensor(shapes.render_prompts(prompt_list, seed=seed + 2))
        precision, recall = metrics.precision_recall(real_a, gen)
        recon = reconstruct(pipe.vae, real_b)  # the floor for any sampler of these latents
        result[key] = {
            "prompts": n,
            "alignment": round(metrics.alignment(gen, prompt_list), 4),
            "alignment_real": round(metrics.alignment(real_a, prompt_list), 4),
            "toy_fid": round(metrics.toy_fid(gen, real_a), 4),
            "toy_fid_real_vs_real": round(metrics.toy_fid(real_b, real_a), 4),
            "alignment_vae_roundtrip": round(metrics.alignment(recon, prompt_list), 4),
            "toy_fid_vae_roundtrip": round(metrics.toy_fid(recon, real_a), 4),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "alignment_per_attribute": _per_attribute(metrics, gen, prompt_list),
            "sample_seconds": round(sample_seconds, 1),
        }
        if out_dir is not None:
            common.save_grid(gen[:64], Path(out_dir) / f"samples_{key}.png", nrow=8, scale=3)
            common.atomic_write_text(Path(out_dir) / f"samples_{key}.txt", "\n".join(prompt_list[:64]) + "\n")
    return result


def _per_attribute(metrics: ToyMetrics, images, prompt_list) -> dict:
    pred = metrics.predict(images)
    hits: dict[str, list[bool]] = {k: [] for k in shapes.ATTRIBUTES}
    for i, p in enumerate(prompt_list):
        for k, v in shapes.attributes_from_prompt(p).items():
            hits[k].append(shapes.CLASSES[k][int(pred[k][i])] == v)
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items() if v}


def build(
    cfg: BuildConfig,
    work: str | Path,
    ship: str | Path | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict:
    """Run every stage into ``work``; with ``ship``, copy the exported assets there (e.g. ``src/tlcm/toy/assets``)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    common.set_threads(cfg.threads)
    common.write_config(cfg, work / "config.yaml")
    vae_cfg, teacher_cfg, metrics_cfg = stage_configs(cfg, work)
    timings_path = work / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t_all = time.perf_counter()

    def dataset():
        if not (work / "dataset" / "train" / "metadata.jsonl").is_file():
            shapes.export_imagefolder(work / "dataset", cfg.images, cfg.seed, cfg.heldout_images, progress=progress)

    _timed(timings, "dataset", work, dataset)
    vae_report = _timed(timings, "train_vae", work, lambda: train_vae(vae_cfg, work / "vae", progress))
    teacher_report = _timed(
        timings, "train_teacher", work, lambda: train_teacher(teacher_cfg, work / "teacher", progress)
    )
    metrics_report = _timed(
        timings, "train_metrics", work, lambda: train_metrics(metrics_cfg, work / "metrics", progress)
    )
    assets = work / "assets"
    _timed(timings, "export", work, lambda: export_assets(work, assets, cfg))

    def evaluate():
        from tlcm.toy import teacher_path

        path = teacher_path(assets / "teacher")
        metrics = ToyMetrics.load(assets / "metrics")
        return evaluate_teacher(
            path,
            metrics,
            cfg.eval_prompts,
            cfg.eval_heldout_prompts,
            cfg.eval_steps,
            cfg.guidance_scale,
            seed=cfg.seed,
            out_dir=work / "eval",
            progress=progress,
        )

    evaluation = _timed(timings, "evaluate", work, evaluate)
    shutil.copyfile(work / "eval" / "samples_heldin.png", assets / "samples_heldin.png")
    shutil.copyfile(work / "eval" / "samples_heldin.txt", assets / "samples_heldin.txt")
    timings["total_this_run"] = round(time.perf_counter() - t_all, 1)
    timings["total_stages"] = round(sum(v for k, v in timings.items() if not k.startswith("total")), 1)
    common.write_json(work / "timings.json", timings)
    provenance = {
        "command": command or "tlcm toy build",
        "seed": cfg.seed,
        "git_commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "config": common.config_to_dict(cfg),
        "stage_configs": {
            "vae": common.config_to_dict(vae_cfg),
            "teacher": common.config_to_dict(teacher_cfg),
            "metrics": common.config_to_dict(metrics_cfg),
        },
        "timings_seconds": timings,
        "vae": vae_report,
        "teacher": teacher_report,
        "classifier": metrics_report,
        "evaluation": evaluation,
    }
    common.write_json(assets / "PROVENANCE.json", provenance)
    common.atomic_write_text(work / "report.md", report_markdown(provenance))
    common.atomic_write_text(assets / "PROVENANCE.md", report_markdown(provenance))
    if ship is not None:
        ship = Path(ship)
        tmp = Path(tempfile.mkdtemp(dir=ship.parent, prefix=f".{ship.name}."))
        shutil.rmtree(tmp)
        shutil.copytree(assets, tmp)
        common.replace_dir(tmp, ship)
    return provenance


def report_markdown(p: dict) -> str:
    ev = p["evaluation"]
    lines = [
        "# Toy world build report",
        "",
        f"- command: `{p['command']}`",
        f"- seed: {p['seed']}, git commit: {p['git_commit']}, date: {p['date_utc']}",
        f"- machine: {p['machine']['processor']}, {p['machine']['cpu_count']} CPUs, "
        f"torch threads {p['machine']['torch_threads']}, torch {p['machine']['torch']}",
        "",
        "## Stage timings (seconds)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in p["timings_seconds"].items()],
        "",
        "## Models",
        "",
        f"- VAE: {p['vae']['parameters']:,} parameters, reconstruction PSNR {p['vae']['psnr_db']} dB on "
        f"{p['vae']['eval_images']} images, scaling_factor {p['vae']['scaling_factor']:.4f}",
        f"- teacher UNet: {p['teacher']['parameters']:,} parameters, {p['teacher']['steps']} steps, "
        f"loss {p['teacher']['first_loss']:.4f} -> {p['teacher']['final_loss']:.4f}",
        f"- classifier accuracy on fresh real images: held-in combinations {p['classifier']['accuracy_train_mean']}, "
        f"held-out combinations {p['classifier']['accuracy_heldout_mean']} "
        f"(per attribute: {p['classifier']['accuracy_train']})",
        f"- toy-FID floor (real vs real, {p['classifier'].get('toy_fid_real_vs_real')}) vs real vs noise "
        f"({p['classifier'].get('toy_fid_real_vs_noise')})",
        "",
        f"## Teacher quality ({ev['scheduler']}, {ev['steps']} steps, guidance {ev['guidance_scale']})",
        "",
        "Floors: real images score `alignment of real images` and `toy-FID real vs real`; the same real images "
        "through the teacher's VAE and back score the `VAE round-trip` columns, the best any sampler on its "
        "latents can reach.",
        "",
        "| prompts | n | alignment | alignment of real images | alignment VAE round-trip | toy-FID | "
        "toy-FID real vs real | toy-FID VAE round-trip | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("heldin", "heldout"):
        if key in ev:
            e = ev[key]
            lines.append(
                f"| {key} | {e['prompts']} | {e['alignment']} | {e['alignment_real']} | "
                f"{e.get('alignment_vae_roundtrip', '-')} | {e['toy_fid']} | {e['toy_fid_real_vs_real']} | "
                f"{e.get('toy_fid_vae_roundtrip', '-')} | {e['precision']} | {e['recall']} |"
            )
    for key in ("heldin", "heldout"):
        if key in ev:
            lines.append(f"\n{key} alignment per attribute: {ev[key]['alignment_per_attribute']}")
    return "\n".join(lines) + "\n"


def load_build_config(path: str | None, overrides: dict) -> BuildConfig:
    cfg = common.load_config(BuildConfig, path, {})
    for key, value in overrides.items():
        if "." in key:
            section, sub = key.split(".", 1)
            if section not in ("vae", "teacher", "metrics"):
                raise TLCMError(f"unknown config section {section!r}", "use vae.KEY, teacher.KEY or metrics.KEY")
            getattr(cfg, section)[sub] = value
        elif hasattr(cfg, key):
            setattr(cfg, key, value)
        else:
            raise TLCMError(f"unknown build setting {key!r}", "see `tlcm toy build --help`")
    return cfg
