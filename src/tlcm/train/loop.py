"""The distillation loop: one readable accelerate loop for the lcm, mlcd and tlcm recipes.

Stages of :func:`distill` (numbered as in the code):

1. resolve the accelerator (processes, precision, gradient accumulation, TensorBoard) and the teacher pipeline;
2. build the student (LoRA on the teacher UNet, or a full copy) and its target network, optimiser and LR schedule;
3. open the data (shards from ``tlcm synthesize``: latents + prompts, embeddings when stored);
4. resume from the latest checkpoint (weights, optimiser, schedule, EMA; data order by replay; per-step RNG);
5. train: for each step and micro-batch, sample times/noise/guidance from a per-step generator, compute the recipe's
   loss (and any extra losses), back-propagate, clip, step; EMA; log; checkpoint; validate;
6. export the output folder (LoRA / adapter / UNet, scheduler config, sampling defaults, config, model card).

Randomness in a step comes from a generator seeded by ``(seed, step, micro-batch, rank)``, so a resumed run draws
exactly what the uninterrupted one did.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tlcm.errors import TLCMError
from tlcm.losses import (
    ExtraLossContext,
    NoiseSchedule,
    extra_losses_total,
    guidance_scale_embedding,
    lcm_loss,
    mlcd_loss,
    multistep_sample,
    tlcm_loss,
)
from tlcm.models import zero_conditioning, zeros_for_empty_negatives
from tlcm.train.config import DistillConfig, validate_config
from tlcm.train.recipes import edges_of, sample_training_times, sampling_plan, stage2_source_plan
from tlcm.train.student import EMA, Networks, build_networks, lora_state_dict

log = logging.getLogger("tlcm.distill")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LORA_CKPT_FILE = "student_lora.safetensors"

DatasetFn = Callable[[int, int], Iterable[dict]]


# ----------------------------------------------------------------------------------------------------------------
# data and conditioning
# ----------------------------------------------------------------------------------------------------------------


def shards_dataset_fn(cfg: DistillConfig) -> DatasetFn:
    """Open ``cfg.data`` with :func:`tlcm.data.open_shards`: shuffled by ``seed``, split by rank, endless."""

    def make(rank: int, world_size: int):
        try:
            from tlcm.data import open_shards
        except ImportError as err:
            raise TLCMError("tlcm.data is not available in this installation", "reinstall tlcm") from err
        return open_shards(cfg.data, shuffle=True, seed=cfg.seed, rank=rank, world_size=world_size, infinite=True)

    return make


def collate(records: list[dict]) -> dict:
    out = {"latents": torch.stack([torch.as_tensor(r["latents"], dtype=torch.float32) for r in records])}
    out["prompt"] = [str(r.get("prompt", "")) for r in records]
    out["negative_prompt"] = [str(r.get("negative_prompt", "") or "") for r in records]
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        if all(r.get(key) is not None for r in records):
            out[key] = torch.stack([torch.as_tensor(r[key]) for r in records])
    return out


def endless_batches(dataset: Iterable[dict], batch_size: int) -> Iterable[dict]:
    """Group records into batches; restart a finite dataset when it runs out (same order each pass)."""
    while True:
        buf, seen = [], 0
        for record in dataset:
            seen += 1
            buf.append(record)
            if len(buf) == batch_size:
                yield collate(buf)
                buf = []
        if seen == 0:
            raise TLCMError("the training data yielded no records", "check --data (an empty or unreadable shard set)")


class PromptEncoder:
    """Text conditioning with a small LRU cache (toy prompts repeat; the unconditional "" always does)."""

    def __init__(self, pipe, height: int | None, width: int | None, max_items: int = 4096):
        from tlcm.models import is_sdxl

        self.pipe, self.height, self.width = pipe, height, width
        self.sdxl = is_sdxl(pipe)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.max_items = max_items

    def __call__(self, prompts: list[str]):
        from tlcm.models import Conditioning, encode_prompts

        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            enc = encode_prompts(self.pipe, missing, self.height, self.width)
            for i, p in enumerate(missing):
                self.cache[p] = enc.index(slice(i, i + 1))
        for p in prompts:
            self.cache.move_to_end(p)
        out = Conditioning.cat([self.cache[p] for p in prompts])
        while len(self.cache) > self.max_items:
            self.cache.popitem(last=False)
        return out

    def from_embeds(self, embeds: torch.Tensor, pooled: torch.Tensor | None):
        from tlcm.models import Conditioning

        if not self.sdxl:
            return Conditioning(embeds)
        if pooled is None:
            raise TLCMError("SDXL shards store prompt_embeds without pooled_prompt_embeds",
                            "re-synthesize the shards, or drop stored embeddings so prompts are encoded")
        time_ids = self("")  # any encoded prompt carries the right time ids
        return Conditioning(embeds, {"text_embeds": pooled,
                                     "time_ids": time_ids.added_cond_kwargs["time_ids"].repeat(embeds.shape[0], 1)})


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _register_lora_hooks(accelerator, networks: Networks) -> None:
    """Checkpoint only the LoRA (not the frozen base weights) through accelerate's save/load hooks."""
    if not networks.is_lora:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_file(lora_state_dict(accelerator.unwrap_model(model)), os.path.join(output_dir, LORA_CKPT_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            set_peft_model_state_dict(model, load_file(os.path.join(input_dir, LORA_CKPT_FILE)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, run=None) -> Path:
    """``save_state`` into a temporary folder, then an atomic rename; keep the last ``keep`` checkpoints.
    ``training_state.json`` records the step, the run's identity and every file's size and checksum."""
    root = output_dir / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from tlcm.train.identity import write_training_state

        write_training_state(tmp, step, run)  # [identity]
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------


def _step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + rank)


def _make_accelerator(cfg: DistillConfig, output_dir: Path, log_with):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # a second run in one (non-distributed) Python process with another precision: accelerate keeps global
        # state, so start it afresh rather than fail
        if AcceleratorState().mixed_precision != cfg.mixed_precision:
            AcceleratorState._reset_state(reset_partial_state=True)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs"))
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    return Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=project,
        cpu=cpu,
    )


def _unet_fn(unet, cond, timestep_cond=None):
    kwargs = cond.unet_kwargs()

    def fn(z, t):
        return unet(z, t, timestep_cond=timestep_cond, **kwargs, return_dict=False)[0]

    return fn


def _teacher_fn(unet, cond, uncond, guided: bool):
    """``teacher(z, t) -> (cond_out, uncond_out)``, both halves in one batched forward."""
    from tlcm.models import Conditioning

    if not guided:
        c = _unet_fn(unet, cond)
        return lambda z, t: (c(z, t), None)
    both = _unet_fn(unet, Conditioning.cat([cond, uncond]))

    def fn(z, t):
        out = both(torch.cat([z, z]), torch.cat([t, t]))
        return out.chunk(2)

    return fn


def distill(
    cfg: DistillConfig,
    pipe=None,
    dataset_fn: DatasetFn | None = None,
    resume: str | None = None,
    log_with: str | None = "tensorboard",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Run a distillation and write its output folder; return that folder. See the module docstring.

    ``resume`` (``"latest"`` or a checkpoint folder) continues a run, ``overwrite`` discards the run the folder
    holds; without either, a folder holding a run is refused. The folder is locked while the run writes it, and the
    run's identity is checked against the checkpoint's on resume (:mod:`tlcm.train.identity`)."""
    from tlcm.train.identity import open_run

    validate_config(cfg, need_data=dataset_fn is None)
    run = open_run(cfg, resume=resume, overwrite=overwrite, in_memory_data=dataset_fn is not None)
    try:
        return _distill(cfg, pipe, dataset_fn, run, log_with, progress)
    finally:
        run.close()


def _distill(cfg: DistillConfig, pipe, dataset_fn: DatasetFn | None, run, log_with: str | None,
             progress: bool) -> Path:
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    validate_config(cfg, need_data=dataset_fn is None)
    output_dir = Path(cfg.output_dir)
    t_begin = time.time()

    # 1. accelerator and teacher ----------------------------------------------------------------------------------
    accelerator = _make_accelerator(cfg, output_dir, log_with)
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    if pipe is None:
        from tlcm.models import load_pipeline

        pipe = load_pipeline(cfg.teacher, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    run.check_teacher_and_data(pipe, accelerator.num_processes)  # [identity] fingerprint, shards vs teacher
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    if schedule.num_train_timesteps != 1000:
        raise TLCMError(f"the teacher has {schedule.num_train_timesteps} training timesteps; tlcm assumes 1000",
                        "distil a Stable-Diffusion-like teacher (num_train_timesteps = 1000)")
    for module in (pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.to(device)
    text_dtype = weight_dtype if device.type == "cuda" else torch.float32
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype=text_dtype)

    # 2. student, target, optimiser, LR schedule -------------------------------------------------------------------
    networks = build_networks(pipe.unet, cfg, weight_dtype)
    pipe.unet.to(device)
    networks.student.to(device)
    if not networks.is_lora:
        networks.teacher_unet.to(device)
        networks.target_unet.to(device)
    elif weight_dtype != torch.float32:
        for name, p in networks.student.named_parameters():  # frozen base in low precision, LoRA in fp32
            if "lora_" not in name:
                p.data = p.data.to(weight_dtype)
    embed_dim = getattr(networks.student.config, "time_cond_proj_dim", None) if cfg.guidance_embedding else None
    params = networks.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    student, optimizer = accelerator.prepare(networks.student, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if networks.target_unet is not None:
        ema = EMA(networks.target_unet, cfg.ema_decay)
        accelerator.register_for_checkpointing(ema)
    _register_lora_hooks(accelerator, networks)
    raw_student = accelerator.unwrap_model(student)

    # 3. data ---------------------------------------------------------------------------------------------------------
    dataset = (dataset_fn or shards_dataset_fn(cfg))(accelerator.process_index, accelerator.num_processes)
    batches = iter(endless_batches(dataset, cfg.batch_size))
    res = cfg.resolution or None
    encoder = PromptEncoder(pipe, res, res)
    zero_empty = zeros_for_empty_negatives(pipe, cfg.uncond, run.manifest)
    edges = torch.from_numpy(edges_of(cfg))

    # 4. resume -----------------------------------------------------------------------------------------------------
    start_step = 0
    if run.resume_from is not None:
        # [identity] checked, loaded, changed settings applied (learning_rate) and recorded
        start_step = run.restore(accelerator, optimizers=[optimizer], schedulers=[lr_scheduler])
        for _ in range(start_step * cfg.gradient_accumulation_steps):  # replay the data order
            next(batches)
        accelerator.print(f"resumed from {run.resume_from} at step {start_step}")
    run.start(start_step)  # [identity] run.json (identity, status, resume history) and config.yaml
    if log_with:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers("distill", config=hparams)

    # 5. train ------------------------------------------------------------------------------------------------------
    def compute_loss(batch: dict, gen: torch.Generator, step: int):
        x0 = batch["latents"].to(device)
        bsz = x0.shape[0]
        if "prompt_embeds" in batch:
            cond = encoder.from_embeds(batch["prompt_embeds"].to(device), batch.get("pooled_prompt_embeds"))
        else:
            cond = encoder(batch["prompt"])
        if cfg.uncond == "zeros" or (zero_empty and not any(batch["negative_prompt"])):
            # diffusers' LCM scripts ("zeros"), and SDXL's force_zeros_for_empty_prompt as the synthesizer applies it
            uncond = zero_conditioning(cond)
        else:
            uncond = encoder(batch["negative_prompt"])
        cond, uncond = cond.to(device, weight_dtype), uncond.to(device, weight_dtype)
        # 5a. times, noise and guidance for this micro-batch
        times = sample_training_times(cfg, bsz, gen)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        w = (cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(bsz, generator=gen)).to(device)
        guided = cfg.w_max > 0
        t_cond = guidance_scale_embedding(w, embed_dim).to(device, weight_dtype) if embed_dim else None
        # 5b. the networks, as callables over (z, t)
        student_fn = _unet_fn(student, cond, t_cond)
        target_model = networks.target_unet if networks.target_unet is not None else raw_student
        target_fn = _unet_fn(target_model, cond, t_cond)

        def teacher_fn(z, t):
            with torch.no_grad(), networks.teacher_context(raw_student) as unet:
                return _teacher_fn(unet, cond, uncond, guided)(z, t)

        # 5c. the recipe's consistency loss
        with accelerator.autocast():
            if cfg.recipe == "lcm":
                out = lcm_loss(student_fn, target_fn, teacher_fn, x0, noise, times["t_start"].to(device), w,
                               schedule, cfg.skip, cfg.boundary_condition, cfg.loss_type, cfg.huber_c,
                               cfg.sigma_data, cfg.timestep_scaling)
            elif cfg.recipe == "mlcd":
                out = mlcd_loss(student_fn, target_fn, teacher_fn, x0, noise, times["t_start"].to(device), w,
                                schedule, edges.to(device), cfg.skip, cfg.loss_type, cfg.huber_c)
            else:
                if cfg.stage2_source == "student":
                    plan = stage2_source_plan(cfg)
                    start = torch.randn(x0.shape, generator=gen).to(device)
                    x0 = multistep_sample(target_fn, start, plan.timesteps, schedule, plan.mode, plan.boundary)
                out = tlcm_loss(student_fn, target_fn, teacher_fn, x0, noise, times["t_hi"].to(device),
                                times["t_lo"].to(device), w, schedule, cfg.stage2_substeps, "none", cfg.loss_type,
                                cfg.huber_c)
            total, parts = out.loss, {"loss/consistency": float(out.loss.detach())}
            if cfg.extra_losses:
                ctx = ExtraLossContext(student_fn, teacher_fn, schedule, batch, out, step)
                extra, extra_parts = extra_losses_total(cfg.extra_losses, ctx)
                total = total + extra
                parts.update({f"loss/{k}": v for k, v in extra_parts.items()})
        return total, parts

    global_step = start_step
    t_loop = time.time()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc=f"distill {cfg.recipe}", dynamic_ncols=True)
    last_logs: dict[str, float] = {}
    student.train()
    while global_step < cfg.max_steps:
        step_losses, grad_norm = [], None
        for micro in range(cfg.gradient_accumulation_steps):
            batch = next(batches)
            gen = _step_generator(cfg.seed, global_step, micro, accelerator.process_index)
            with accelerator.accumulate(student):
                loss, parts = compute_loss(batch, gen, global_step)
                bad = torch.tensor(0.0 if torch.isfinite(loss.detach()) else 1.0, device=device)
                if float(accelerator.reduce(bad, reduction="sum")) > 0:
                    good = latest_checkpoint(output_dir)
                    raise TLCMError(
                        f"the loss became {float(loss.detach())} at step {global_step + 1}; stopped",
                        f"last good checkpoint: {good or 'none saved yet'}; "
                        + (f"resume from it at a lower learning rate: --resume latest --set "
                           f"learning_rate={cfg.learning_rate / 10:g} (applied on resume)" if good else
                           f"start again with a lower learning rate (--overwrite --set "
                           f"learning_rate={cfg.learning_rate / 10:g})")
                        + (" or mixed_precision=no" if cfg.mixed_precision != "no" else ""))
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(parts)
        lr_scheduler.step()
        if ema is not None:
            ema.update(raw_student)
        global_step += 1
        bar.update(1)

        logs = {k: sum(p[k] for p in step_losses) / len(step_losses) for k in step_losses[0]}
        logs["loss"] = logs["loss/consistency"]
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        last_logs = logs
        if global_step % cfg.logging_steps == 0 or global_step == cfg.max_steps:
            bar.set_postfix(loss=f"{logs['loss']:.4g}", lr=f"{logs['lr']:.2g}")
            if log_with:
                accelerator.log(logs, step=global_step)
        if cfg.checkpointing_steps > 0 and global_step % cfg.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit, run)
        if cfg.validation_steps > 0 and global_step % cfg.validation_steps == 0 and global_step < cfg.max_steps:
            validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, global_step, log_with)
    bar.close()
    loop_s = time.time() - t_loop

    # 6. export -----------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    grid = validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, global_step, log_with)
    if accelerator.is_main_process:
        from tlcm.train.export import export_output

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
        summary = {
            "recipe": cfg.recipe, "steps": global_step, "resumed_from_step": start_step,
            "wall_time_s": round(time.time() - t_begin, 2), "train_loop_s": round(loop_s, 2),
            "s_per_step": round(loop_s / max(1, global_step - start_step), 3), "peak_rss_mib": round(peak, 1),
            "processes": accelerator.num_processes, "final_losses": last_logs,
            "trainable_parameters": sum(p.numel() for p in params),
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        }
        export_output(cfg, pipe, raw_student, networks, output_dir, summary, validation_grid=grid)
        run.finish(global_step)  # [identity]
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


@torch.no_grad()
def validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, step, log_with) -> Path | None:
    """Sample the validation prompts at each of ``validation_num_steps`` and save/log one PNG grid."""
    if not accelerator.is_main_process or not cfg.validation_prompts:
        return None
    import numpy as np
    from PIL import Image

    device = accelerator.device
    cond = encoder(list(cfg.validation_prompts)).to(device, next(pipe.unet.parameters()).dtype)
    net_model = networks.target_unet if networks.target_unet is not None else raw_student
    n = len(cfg.validation_prompts)
    channels = pipe.unet.config.in_channels
    size = (cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    noise = torch.randn((n, channels, size, size), generator=gen).to(device)
    embed_dim = getattr(net_model.config, "time_cond_proj_dim", None) if cfg.guidance_embedding else None
    t_cond = None
    if embed_dim:
        w = torch.full((n,), max(cfg.sampling_guidance_scale - 1.0, 0.0), device=device)
        t_cond = guidance_scale_embedding(w, embed_dim).to(device)
    fn = _unet_fn(net_model, cond, t_cond)
    rows = []
    was_training = net_model.training
    net_model.eval()
    for steps in cfg.validation_num_steps:
        plan = sampling_plan(cfg, steps)
        renoise = [torch.randn(noise.shape, generator=gen).to(device) for _ in plan.timesteps]
        with accelerator.autocast():
            latents = multistep_sample(fn, noise, plan.timesteps, schedule, plan.mode, plan.boundary, renoise)
        vae = pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        rows.append(torch.cat(list(images), dim=1))
    if was_training:
        net_model.train()
    grid = torch.cat(rows, dim=0).numpy()
    out = Path(cfg.output_dir) / "validation"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{step:07d}.png"
    Image.fromarray(np.ascontiguousarray(grid)).save(path)
    if log_with:
        try:
            tracker = accelerator.get_tracker("tensorboard", unwrap=True)
            tracker.add_image(f"validation/steps_{'-'.join(map(str, cfg.validation_num_steps))}", grid, step,
                              dataformats="HWC")
        except (ValueError, AttributeError) as err:  # another tracker: the PNG on disk is the record
            log.debug("no tensorboard image logging: %s", err)
    return path


def plan_text(cfg: DistillConfig) -> str:
    """What a run would do (``--dry-run``), without loading a model or touching the disk."""
    lines = [f"recipe {cfg.recipe}: teacher {cfg.teacher!r}, data {cfg.data!r} -> {cfg.output_dir!r}"]
    student = (f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha} on {', '.join(cfg.target_modules())}"
               if cfg.student == "lora" else f"full UNet, EMA target decay {cfg.ema_decay}")
    lines.append(f"student: {student}" + (f", from {cfg.init_lora}" if cfg.init_lora else ""))
    grid = f"skipping grid {cfg.num_ddim_timesteps} steps (k = {cfg.skip})"
    if cfg.recipe == "lcm":
        lines.append(f"target: teacher DDIM+CFG t -> t-{cfg.skip}, w ~ U[{cfg.w_min}, {cfg.w_max}], "
                     f"boundary {cfg.boundary_condition}, {cfg.loss_type} loss; {grid}")
    elif cfg.recipe == "mlcd":
        lines.append(f"target: {cfg.num_segments} segments, edges {edges_of(cfg).tolist()}, DDIM to the lower edge, "
                     f"w ~ U[{cfg.w_min}, {cfg.w_max}], {cfg.loss_type} loss; {grid}")
    else:
        lines.append(f"target: stage 2, {cfg.stage2_source} samples re-noised, teacher {cfg.stage2_substeps} "
                     f"DDIM+CFG sub-steps across one segment ({cfg.num_segments} segments, {cfg.stage2_times}), "
                     f"x0 consistency, {cfg.loss_type} loss")
    if cfg.extra_losses:
        lines.append(f"extra losses: {cfg.extra_losses}")
    eff = cfg.batch_size * cfg.gradient_accumulation_steps
    lines.append(f"optimisation: {cfg.max_steps} steps x batch {cfg.batch_size} x accumulation "
                 f"{cfg.gradient_accumulation_steps} (= {eff} per process), AdamW lr {cfg.learning_rate} "
                 f"({cfg.lr_scheduler}, warm-up {cfg.lr_warmup_steps}), precision {cfg.mixed_precision}")
    lines.append(f"checkpoints every {cfg.checkpointing_steps} steps (keep {cfg.checkpoints_total_limit}); "
                 f"validation every {cfg.validation_steps or 'end'} at {cfg.validation_num_steps} steps")
    for n in sorted({1, 2, 4, 8, cfg.sampling_steps}):
        if n <= cfg.num_ddim_timesteps:
            p = sampling_plan(cfg, n)
            lines.append(f"sampling {n} steps: {p.mode} at {p.timesteps}")
    return "\n".join(lines)

