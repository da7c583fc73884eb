"""The output folder of ``tlcm distill`` (read by ``tlcm sample --lora DIR`` and ``tlcm.lora``)::

    pytorch_lora_weights.safetensors   diffusers-format LoRA (pipe.load_lora_weights(DIR))      [LoRA student]
    adapter/                           peft folder (PeftModel.from_pretrained(unet, DIR/adapter)) [LoRA student]
    unet/                              full UNet (UNet2DConditionModel.from_pretrained)          [full student]
    scheduler/scheduler_config.json    TLCMScheduler config the student was trained for
    tlcm_sampling.json                 {"guidance_scale", "num_inference_steps", "base_model", "recipe"}
    config.yaml                        the resolved training config
    train_summary.json                 wall time, peak memory, steps, final losses
    README.md                          model card

Every file is written to a temporary name and renamed, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tlcm.train.config import DistillConfig
from tlcm.train.recipes import sampling_plan, scheduler_settings
from tlcm.train.student import lora_state_dict, save_peft_adapter

LORA_FILE = "pytorch_lora_weights.safetensors"


def _atomic_text(path: Path, text: str) -> None:
    from tlcm.data.shards import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_dir(final: Path, write) -> None:
    """``write(tmp_dir)`` then swap it in for ``final``."""
    from tlcm.data.shards import apply_umask

    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        write(tmp)
        apply_umask(tmp)  # mkdtemp's 0700 and safetensors' 0600 -> what the user's umask gives
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_diffusers_lora(pipe, unet, out_dir: Path) -> Path:
    """The pipeline's ``save_lora_weights`` on ``get_peft_model_state_dict(unet)`` (keys ``unet.<module>.lora_A``).

    Not passed through ``convert_state_dict_to_diffusers`` as the LCM scripts do: that renames only the attention
    projections to the old ``.lora.down/.lora.up`` names and leaves convolutions as ``lora_A/lora_B``, and diffusers
    (0.42) then loads the file as peft format and silently drops every attention LoRA. The peft names are what
    ``load_lora_weights`` reads natively (tests/train/test_loop.py checks the loaded UNet against the student).

    The adapter's ``LoraConfig`` goes into the file's metadata (``unet_lora_adapter_metadata``, as diffusers' own
    training scripts write it): the weights alone give the rank but not ``lora_alpha``, and without it
    ``load_lora_weights`` assumes ``alpha = rank``, scaling a LoRA trained with another alpha wrongly.
    """
    from tlcm.models import is_sdxl
    from tlcm.train.student import ADAPTER_NAME

    layers = lora_state_dict(unet)
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    if isinstance(metadata.get("target_modules"), (list, set, tuple)):  # a set inside peft: its order varies per run
        metadata["target_modules"] = sorted(metadata["target_modules"])
    if is_sdxl(pipe):
        from diffusers import StableDiffusionXLPipeline as Pipe
    else:
        from diffusers import StableDiffusionPipeline as Pipe

    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".lora."))
    try:
        Pipe.save_lora_weights(str(tmp), unet_lora_layers=layers, safe_serialization=True,
                               unet_lora_adapter_metadata=metadata)
        from tlcm.data.shards import apply_umask
        from tlcm.export import sort_safetensors_metadata

        # two metadata keys (format, lora_adapter_metadata) leave safetensors' HashMap in a varying order: sort them
        sort_safetensors_metadata(tmp / LORA_FILE)
        apply_umask(tmp / LORA_FILE)  # safetensors writes 0600
        os.replace(tmp / LORA_FILE, out_dir / LORA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_FILE


def student_scheduler(cfg: DistillConfig, teacher_scheduler_config):
    """A TLCMScheduler on the teacher's noise schedule with the recipe's sampling settings."""
    from tlcm.scheduler import TLCMScheduler

    sched = TLCMScheduler.from_config(dict(teacher_scheduler_config), original_inference_steps=cfg.num_ddim_timesteps,
                                      timestep_scaling=cfg.timestep_scaling, **scheduler_settings(cfg))
    return sched


def model_card(cfg: DistillConfig, summary: dict, metrics: dict | None = None) -> str:
    kind = "LoRA" if cfg.student == "lora" else "full UNet"
    plan = {n: sampling_plan(cfg, n) for n in (1, 2, 4, 8) if n <= cfg.num_ddim_timesteps}
    lines = [
        f"# {cfg.recipe} student of `{cfg.teacher}` ({kind})",
        "",
        "Distilled with `tlcm distill` without real data: every training latent was generated by the teacher.",
        "",
        "## Use",
        "",
        "```bash",
        f"tlcm sample --model {cfg.teacher} --lora {cfg.output_dir} --prompt \"...\"" if cfg.student == "lora"
        else f"# load {cfg.output_dir}/unet as the pipeline's UNet, scheduler from {cfg.output_dir}/scheduler",
        "```",
        "",
        "```python",
        "from tlcm import TLCMScheduler",
        "pipe.scheduler = TLCMScheduler.from_pretrained(DIR, subfolder='scheduler')",
        "pipe.load_lora_weights(DIR)" if cfg.student == "lora" else "",
        f"pipe(prompt, num_inference_steps={cfg.sampling_steps}, guidance_scale={cfg.sampling_guidance_scale})",
        "```",
        "",
        "## Recipe",
        "",
        f"- recipe `{cfg.recipe}`; segments {cfg.num_segments if cfg.recipe != 'lcm' else 1}; "
        f"skipping grid {cfg.num_ddim_timesteps} DDIM steps; teacher CFG w ~ U[{cfg.w_min}, {cfg.w_max}] (LCM form)",
        *([f"- CFG-preserving: prompt dropout {cfg.prompt_dropout}; sample with guidance_scale "
           f"{cfg.sampling_guidance_scale} and, if wanted, a negative prompt"] if cfg.cfg_preserving else []),
        f"- loss {cfg.loss_type}" + (f" (c = {cfg.huber_c})" if cfg.loss_type == "huber" else "")
        + (f"; extra losses {cfg.extra_losses}" if cfg.extra_losses else ""),
        f"- student: {kind}" + (f" rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, targets "
                                f"{', '.join(cfg.target_modules())}" if cfg.student == "lora" else "")
        + (f"; started from `{cfg.init_lora}`" if cfg.init_lora else ""),
        f"- {summary.get('steps')} steps, batch {cfg.batch_size} x {summary.get('processes', 1)} processes x "
        f"{cfg.gradient_accumulation_steps} accumulation, AdamW lr {cfg.learning_rate}, precision "
        f"{cfg.mixed_precision}",
        f"- data: `{cfg.data or '(in-memory)'}`",
        f"- wall time {summary.get('wall_time_s')} s, peak host memory {summary.get('peak_rss_mib')} MiB",
        "",
        "## Sampling plan",
        "",
        *[f"- {n} steps: {p.mode} at {p.timesteps}" for n, p in plan.items()],
        "",
        "## Measured",
        "",
    ]
    if metrics:
        lines += [f"- {k}: {v}" for k, v in metrics.items()]
    else:
        lines.append("- final training losses: " + ", ".join(f"{k} {v:.4g}" for k, v in
                                                              summary.get("final_losses", {}).items()))
        lines.append("- quality metrics: run `tlcm evaluate` (none measured by the training run itself)")
    lines.append("")
    return "\n".join(lines)


def export_output(cfg: DistillConfig, pipe, unet, networks, output_dir: Path, summary: dict,
                  validation_grid: Path | None = None, metrics: dict | None = None) -> Path:
    """Write the output folder described in the module docstring."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if networks.is_lora:
        save_diffusers_lora(pipe, unet, output_dir)
        _atomic_dir(output_dir / "adapter", lambda tmp: save_peft_adapter(unet, networks.lora_config, tmp))
    else:
        target = networks.target_unet if networks.target_unet is not None and cfg.ema_decay > 0 else unet
        _atomic_dir(output_dir / "unet", lambda tmp: target.save_pretrained(str(tmp), safe_serialization=True))
    sched = student_scheduler(cfg, pipe.scheduler.config)
    _atomic_dir(output_dir / "scheduler", lambda tmp: sched.save_config(str(tmp)))
    sampling = {
        "guidance_scale": cfg.sampling_guidance_scale,
        "num_inference_steps": cfg.sampling_steps,
        "base_model": cfg.teacher,
        "recipe": cfg.recipe,
    }
    if cfg.cfg_preserving:  # samplers run CFG at guidance_scale, and a negative prompt means something
        sampling.update(cfg_preserving=True, negative_prompt=True)
    _atomic_text(output_dir / "tlcm_sampling.json", json.dumps(sampling, indent=2))
    _atomic_text(output_dir / "config.yaml", cfg.to_yaml())
    summary = {**summary, "validation_grid": str(validation_grid) if validation_grid else None}
    _atomic_text(output_dir / "train_summary.json", json.dumps(summary, indent=2))
    _atomic_text(output_dir / "README.md", model_card(cfg, summary, metrics))
    return output_dir
