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
from tlcm.toy.scene_metrics import SceneMetricsConfig, train_scene_metrics
from tlcm.toy.teacher import TeacherConfig, sample_pipeline, train_teacher
from tlcm.toy.worlds import export_imagefolder, get_world, world_version


@dataclass
class BuildConfig:
    world: str = "v4"  # v4 (scenes, the default) or v3 (shapes, kept buildable: `--set world=v3`)
    seed: int = 0
    images: int = 20000  # training-split images of the dataset
    heldout_images: int = 1000  # held-out-combination images (exported as the imagefolder's "test" split)
    threads: int = 2
    eval_prompts: int = 300  # held-in (training-split) prompts for alignment and toy-FID
    eval_heldout_prompts: int = 100
    eval_steps: int = 50
    guidance_scale: float = 5.0
    baseline_prompts: int = 500  # v4: prompts of the "distillation matters" table (0: skip it)
    prompt_file_lines: int = 2000
    vae: dict = field(default_factory=dict)  # overrides of VAEConfig
    teacher: dict = field(default_factory=dict)  # overrides of TeacherConfig
    metrics: dict = field(default_factory=dict)  # overrides of MetricsConfig (v3) / SceneMetricsConfig (v4)


# What each world changes in the stage configs' defaults (a build's own vae/teacher/metrics sections override these).
# v3 is exactly the build that produced the shipped v3 assets.
WORLD_STAGE_DEFAULTS = {
    "v3": {"vae": {}, "teacher": {}, "metrics": {}},
    "v4": {
        # (32, 64, 64): at 2500 steps 30.5 dB and 0.93 alignment of round-tripped real images, against 27.8 dB and
        # 0.89 for v3's (16, 32, 64) (6000 images, 1-thread runs on a shared machine; benchmarks/results/toy.md)
        "vae": {"resolution": 48, "crop": 32, "block_out_channels": (32, 64, 64), "steps": 2000},
        "teacher": {"resolution": 48, "block_out_channels": (32, 64, 64), "max_length": 40, "world": "v4",
                    "steps": 5000, "max_images": 0},
        "metrics": {"steps": 3000},
    },
}


def stage_configs(cfg: BuildConfig, work: Path):
    """The VAE, teacher and metrics configs of a build: world defaults, then the build's own sections."""
    from tlcm.toy.worlds import world_version

    world = world_version(cfg.world)
    defaults = WORLD_STAGE_DEFAULTS[world]
    data = str(work / "dataset")
    vae_cfg = common.config_from_dict(
        VAEConfig, {"data": data, "seed": cfg.seed, "threads": cfg.threads, **defaults["vae"], **cfg.vae})
    teacher_cfg = common.config_from_dict(
        TeacherConfig,
        {"data": data, "vae": str(work / "vae" / "vae"), "seed": cfg.seed, "threads": cfg.threads,
         **defaults["teacher"], **cfg.teacher},
    )
    metrics_cls = SceneMetricsConfig if world == "v4" else MetricsConfig
    metrics_cfg = common.config_from_dict(metrics_cls, {"threads": cfg.threads, **defaults["metrics"], **cfg.metrics})
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
        lines = get_world(cfg.world).prompts(cfg.prompt_file_lines, seed=cfg.seed + 7, split="train")
        common.write_json(teacher / "tlcm_toy.json", {"world": world_version(cfg.world)})
        (tmp / "prompts.txt").write_text("\n".join(lines) + "\n")
        from tlcm.data.shards import apply_umask

        apply_umask(tmp)  # shippable files get the user's modes, not mkdtemp's 0700 / safetensors' 0600
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
            export_imagefolder(cfg.world, work / "dataset", cfg.images, cfg.seed, cfg.heldout_images, progress=progress)

    _timed(timings, "dataset", work, dataset)
    vae_report = _timed(timings, "train_vae", work, lambda: train_vae(vae_cfg, work / "vae", progress))
    teacher_report = _timed(
        timings, "train_teacher", work, lambda: train_teacher(teacher_cfg, work / "teacher", progress)
    )
    metrics_report = _timed(
        timings, "train_metrics", work,
        lambda: (train_scene_metrics if isinstance(metrics_cfg, SceneMetricsConfig) else train_metrics)(
            metrics_cfg, work / "metrics", progress),
    )
    assets = work / "assets"
    _timed(timings, "export", work, lambda: export_assets(work, assets, cfg))

    def evaluate():
        from diffusers import DiffusionPipeline

        from tlcm.toy import teacher_path

        path = teacher_path(assets / "teacher")
        metrics = ToyMetrics.load(assets / "metrics")
        if world_version(cfg.world) == "v3":
            return evaluate_teacher(path, metrics, cfg.eval_prompts, cfg.eval_heldout_prompts, cfg.eval_steps,
                                    cfg.guidance_scale, seed=cfg.seed, out_dir=work / "eval", progress=progress)
        from tlcm.toy.acceptance import check_bars, distillation_matters, evaluate_scenes_teacher

        pipe = DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        result = evaluate_scenes_teacher(pipe, metrics, cfg.eval_prompts, cfg.eval_heldout_prompts, cfg.eval_steps,
                                         cfg.guidance_scale, seed=cfg.seed, out_dir=work / "eval", progress=progress)
        if cfg.baseline_prompts:
            result["distillation_matters"] = distillation_matters(
                pipe, metrics, cfg.baseline_prompts, cfg.guidance_scale, seed=cfg.seed, out_dir=work / "eval",
                progress=progress)
        result["bars"] = check_bars(result)
        return result

    evaluation = _timed(timings, "evaluate", work, evaluate)
    for name in ("samples_heldin.png", "samples_heldin.txt", "one_step_vs_reference.png", "one_step_vs_reference.txt"):
        if (work / "eval" / name).is_file():
            shutil.copyfile(work / "eval" / name, assets / name)
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
        *_classifier_lines(p["classifier"]),
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
            per = ev[key].get("alignment_per_attribute") or ev[key].get("alignment_per_claim")
            kind = "attribute" if "alignment_per_attribute" in ev[key] else "claim kind"
            lines.append(f"\n{key} alignment per {kind}: {per}")
            if "object_attributes" in ev[key]:
                gen, real = ev[key]["object_attributes"], ev[key].get("object_attributes_real", {})
                split = ", ".join(f"{a} {r['rate']} ({real.get(a, {}).get('rate', '-')})" for a, r in gen.items())
                lines.append(f"\n{key} object claims split into one-attribute queries (real images in brackets): "
                             f"{split}")
    if "diversity" in ev:
        d = ev["diversity"]
        lines += ["", f"Per-prompt diversity (mean pairwise feature distance among {d['seeds']} seeds of each of "
                  f"{d['prompts']} prompts): teacher {d['teacher']}, real images {d['real']} (ratio {d['ratio']})."]
    dm = ev.get("distillation_matters")
    if dm:
        lines += ["", f"## Distillation matters ({dm['prompts']} prompts; toy-FID against the teacher's "
                  f"{dm['reference']})",
                  "", "Every training-free sampler of the undistilled teacher (NFE counts both CFG branches):", "",
                  "| sampler | steps | guidance | NFE | toy-FID vs teacher | alignment |", "|---|---|---|---|---|---|"]
        for r in dm["rows"]:
            lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['nfe']} | {r['toy_fid_teacher']} | "
                         f"{r['alignment']} |")
        c = dm["ceiling"]
        lines += ["", f"Best per step count vs DPM-Solver++ at {c['steps']} steps ({c['toy_fid_teacher']}): "
                  + ", ".join(f"{k}: {v}x" for k, v in dm["ratios"].items())
                  + ". One-step samples next to the reference: `one_step_vs_reference.png`."]
    if "bars" in ev:
        lines += ["", "## Acceptance bars", "", "| bar | value | threshold | met |", "|---|---|---|---|"]
        lines += [f"| {k} | {b['value']} | {b['threshold']} | {'yes' if b['met'] else 'NO'} |"
                  for k, b in ev["bars"].items()]
    return "\n".join(lines) + "\n"


def _classifier_lines(c: dict) -> list[str]:
    if "accuracy_train_mean" in c:  # v3: one head per attribute
        return [f"- classifier accuracy on fresh real images: held-in combinations {c['accuracy_train_mean']}, "
                f"held-out combinations {c['accuracy_heldout_mean']} (per attribute: {c['accuracy_train']})"]
    return [f"- classifier on fresh real scenes: scene heads {c['accuracy_train']} (held-out split "
            f"{c['accuracy_heldout']}); query verifier accuracy {c['verifier_accuracy_train']} / "
            f"{c['verifier_accuracy_heldout']}; caption claims confirmed {c['claims_train']} / {c['claims_heldout']}"]


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
