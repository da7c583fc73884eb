"""The distillation loop: one readable accelerate loop for every recipe and technique.

A run trains one or more **parts** (the student; with distribution matching a fake-score adapter; with the GAN the
discriminator heads), each with its own optimiser, learning rate and schedule, and walks the recipe's **phases** every
step (:func:`tlcm.train.recipes.recipe_phases`; the losses in :mod:`tlcm.train.phases`). Stages of :func:`distill`
(numbered as in the code):

1. resolve the accelerator (processes, precision, TensorBoard), the teacher pipeline and the training size
   (:func:`tlcm.train.resolution.training_image_size`: config, shards and teacher agree);
2. build the networks (:func:`tlcm.train.student.build_networks`, seeded by ``cfg.seed``), shard them under an FSDP
   launch (:mod:`tlcm.train.distributed`; single-part runs only) and build the parts (:func:`build_parts`);
3. open the data (shards from ``tlcm synthesize``: latents + prompts, embeddings / trajectory points when stored);
4. resume from the latest checkpoint (every part's weights, optimiser, schedule, EMA; extra-loss state; data order
   by replay; RNG), after the run's identity was compared with the checkpoint's (:mod:`tlcm.train.identity`);
5. train: each step takes ``gradient_accumulation_steps`` micro-batches and runs each due phase on them
   (:func:`run_phase`: only that part trainable, forward + backward per micro-batch, sync, clip, step, zero every
   optimiser); log; checkpoint; validate;
6. export the output folder (the student alone: LoRA / adapter / UNet, scheduler config, sampling defaults, config,
   model card).

Randomness in a step comes from generators seeded by ``(seed, step, stream, micro-batch, rank)``
(:func:`tlcm.train.phases.step_generator`), so a resumed run draws exactly what the uninterrupted one did.
The run's protection (lock, identity, resume policy, checkpoint checks) lives in :mod:`tlcm.train.identity`; the loop
calls it at the places marked ``[identity]``.
Gradient accumulation is done here, per phase (``no_sync`` on all micro-batches but the last, for a prepared
student), with accelerate's own counter left at 1: its single counter cannot serve several optimisers.
"""

from __future__ import annotations

import contextlib
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
from tlcm.losses import NoiseSchedule, guidance_scale_embedding, multistep_sample
from tlcm.models import zeros_for_empty_negatives
from tlcm.train import distributed
from tlcm.train.config import DistillConfig, validate_config
from tlcm.train.parts import (
    WEIGHT_FILES,
    Part,
    TrainState,
    check_in_sync,
    make_lr_scheduler,
    make_optimizer,
    register_checkpoint_hooks,
)
from tlcm.train.phases import MicroBatch, StepLosses, unet_fn
from tlcm.train.recipes import (
    PhaseSpec,
    edges_of,
    recipe_learning_rates,
    recipe_parts,
    recipe_phases,
    sampling_plan,
)
from tlcm.train.resolution import training_image_size
from tlcm.train.student import ADAPTER_NAME, EMA, FAKE_ADAPTER, Networks, build_networks, lora_state_dict

log = logging.getLogger("tlcm.distill")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LORA_CKPT_FILE = WEIGHT_FILES["student"]

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
    # the record's seed (its initial noise, for the regression pairs) and the guidance it was solved at: only when
    # every record has them (a default would pair latents with noise they were never made from)
    for key, kind in (("seed", int), ("guidance_scale", float)):
        if all(r.get(key) is not None for r in records):
            out[key] = [kind(r[key]) for r in records]
    for key in ("prompt_embeds", "pooled_prompt_embeds", "trajectory", "trajectory_timesteps"):
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


def save_checkpoint(accelerator, output_dir: Path, step: int, keep: int, run=None) -> Path:
    """``save_state`` into a temporary folder, then an atomic rename; keep the last ``keep`` checkpoints.
    ``training_state.json`` records the step, the run's identity and every file's size and checksum (every part's
    files included), so a damaged checkpoint is named on resume."""
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
# parts
# ----------------------------------------------------------------------------------------------------------------


def _adapter_io(unet, adapter: str):
    from peft import set_peft_model_state_dict

    def load(state):
        result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", None) or []
        assert not unexpected, f"adapter {adapter!r}: unexpected keys {unexpected[:3]}"

    return (lambda: lora_state_dict(unet, adapter)), load


def _module_io(module, prefix: str = ""):
    def save():
        return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    def load(state):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})

    return save, load


def build_parts(cfg: DistillConfig, networks: Networks, accelerator,
                sharded: bool = False) -> tuple[dict[str, Part], torch.nn.Module]:
    """The run's parts (:func:`tlcm.train.recipes.recipe_parts`) with their optimisers, schedules and weight I/O;
    returns them and the module the student's gradient-carrying forward goes through (prepared when it is the only
    part). The one place that decides what a checkpoint holds for each part.

    ``sharded``: the networks were sharded by FSDP (:func:`tlcm.train.distributed.shard_networks`, one part only);
    the student then goes unwrapped, and its weights, optimiser and EMA are gathered into checkpoint files."""
    specs = {spec.name: spec for spec in recipe_parts(cfg)}
    single = len(specs) == 1
    parts: dict[str, Part] = {}

    spec = specs["student"]
    params = networks.student_parameters()
    optimizer = make_optimizer(params, spec.learning_rate, cfg)
    scheduler = make_lr_scheduler(optimizer, spec, cfg.max_steps)
    module = networks.student
    assert single or not sharded, "FSDP shards single-part runs only (distributed.refuse_multi_part)"
    if single:  # DDP / FSDP / DeepSpeed own the student's gradient sync and (full UNet) its checkpointed weights
        module, optimizer = distributed.prepare(accelerator, module, optimizer, sharded)
    ema = EMA(networks.target_unet, cfg.ema_decay) if networks.target_unet is not None else None
    state_files = {}
    if sharded:
        save, load, file, state_files = distributed.part_io(module, optimizer, ema, networks.is_lora, ADAPTER_NAME)
    elif networks.is_lora:
        (save, load), file = _adapter_io(networks.student, ADAPTER_NAME), WEIGHT_FILES["student"]
    elif single:
        save = load = file = None
    else:
        (save, load), file = _module_io(networks.student), WEIGHT_FILES["student_full"]
    parts["student"] = Part("student", params, optimizer, scheduler, spec.every, save, load, file, prepared=single,
                            module=module, ema=ema, sharded=sharded, state_files=state_files)

    if "fake" in specs:
        spec = specs["fake"]
        params = networks.fake_parameters()
        adapter_save, adapter_load = _adapter_io(networks.teacher_unet, FAKE_ADAPTER)
        heads_io = _module_io(networks.heads, "heads.") if cfg.gan_weight > 0 and cfg.gan_backbone == "fake" else None
        if heads_io is not None:  # DMD2: the discriminator's heads step with the fake score that carries them
            params = params + networks.head_parameters()

        def save(adapter_save=adapter_save, heads_io=heads_io):
            out = {f"adapter.{k}": v for k, v in adapter_save().items()}
            return {**out, **(heads_io[0]() if heads_io else {})}

        def load(state, adapter_load=adapter_load, heads_io=heads_io):
            adapter_load({k[8:]: v for k, v in state.items() if k.startswith("adapter.")})
            if heads_io:
                heads_io[1](state)

        optimizer = make_optimizer(params, spec.learning_rate, cfg)
        parts["fake"] = Part("fake", params, optimizer, make_lr_scheduler(optimizer, spec, cfg.max_steps), spec.every,
                             save, load, WEIGHT_FILES["fake"])
    if "discriminator" in specs:
        spec = specs["discriminator"]
        params = networks.head_parameters()
        optimizer = make_optimizer(params, spec.learning_rate, cfg)
        save, load = _module_io(networks.heads)
        parts["discriminator"] = Part("discriminator", params, optimizer,
                                      make_lr_scheduler(optimizer, spec, cfg.max_steps), spec.every, save, load,
                                      WEIGHT_FILES["discriminator"])
    return parts, module


def _check_finite(loss: torch.Tensor, accelerator, cfg: DistillConfig, step: int, phase: str) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss.detach()) else 1.0, device=accelerator.device)
    if float(accelerator.reduce(bad, reduction="sum")) > 0:
        good = latest_checkpoint(cfg.output_dir)
        key = {"fake": "fake_learning_rate", "discriminator": "disc_learning_rate"}.get(phase, "learning_rate")
        lr = (recipe_learning_rates(cfg).get(phase) or cfg.learning_rate) / 10
        raise TLCMError(
            f"the {phase} loss became {float(loss.detach())} at step {step + 1}; stopped",
            f"last good checkpoint: {good or 'none saved yet'}; "
            + (f"resume from it at a lower learning rate: --resume latest --set {key}={lr:g} (applied on resume)"
               if good else f"start again with a lower learning rate (--overwrite --set {key}={lr:g})")
            + (" or mixed_precision=no" if cfg.mixed_precision != "no" else ""))


def run_phase(phase: PhaseSpec, parts: dict[str, Part], micro_batches: list[MicroBatch], losses: StepLosses,
              networks: Networks, accelerator, cfg: DistillConfig, output_dir: Path) -> dict[str, float]:
    """One phase of a step: only ``phase.part`` trainable; forward + backward on every micro-batch (accumulated);
    sync, clip, step the part (and its schedule and EMA); zero every optimiser."""
    part = parts[phase.part]
    networks.set_trainable(part.params)
    compute = getattr(losses, phase.name)
    n = len(micro_batches)
    logs: list[dict[str, float]] = []
    for i, mb in enumerate(micro_batches):
        accumulating = part.prepared and accelerator.num_processes > 1 and i < n - 1
        with accelerator.no_sync(part.module) if accumulating else contextlib.nullcontext():
            with accelerator.autocast():
                loss, terms = compute(mb)
            _check_finite(loss, accelerator, cfg, mb.step, phase.name)
            accelerator.backward(loss / n if n > 1 else loss)
        logs.append(terms)
    for other in parts.values():  # gradient isolation: what did not step received nothing
        if other is not part:
            assert all(p.grad is None for p in other.params), f"phase {phase.name}: part {other.name} got gradients"
    part.sync_gradients(accelerator)
    grad_norm = accelerator.clip_grad_norm_(part.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
    part.optimizer.step()
    part.lr_scheduler.step()
    part.updates += 1
    if part.ema is not None:
        part.ema.update(networks.student)
    for p in parts.values():
        p.optimizer.zero_grad(set_to_none=True)
    out = {k: sum(d[k] for d in logs) / n for k in logs[0]}
    out["lr" if part.name == "student" else f"lr/{part.name}"] = part.lr_scheduler.get_last_lr()[0]
    if grad_norm is not None:
        out["grad_norm" if part.name == "student" else f"grad_norm/{part.name}"] = float(grad_norm)
    return out


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------


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
    with distributed.accelerate_without_fsdp():  # FSDP: tlcm shards the networks itself (train/distributed.py)
        return Accelerator(
            gradient_accumulation_steps=1,  # accumulation is per phase, in run_phase
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=project,
            cpu=cpu,
        )


def _load_reward(cfg: DistillConfig, device, dtype):
    """The frozen reward model (:func:`tlcm.losses.reward.load_reward`) and the hinge margin in its units:
    ``reward_margin``, or when that is 0 the model's own ``default_margin``; ``None`` for the plain loss."""
    from tlcm.losses.reward import load_reward

    reward = load_reward(cfg.reward_model, device, dtype)
    if cfg.reward_kind != "hinge":
        return reward, None
    margin = cfg.reward_margin or reward.default_margin
    if margin is None:
        raise TLCMError(f"reward_kind=hinge needs a margin in the units of {cfg.reward_model!r}, which knows none",
                        "set reward_margin (the TLCM paper: 16 for MPS; a CLIP score is 100 * cos), or "
                        "reward_kind=plain")
    if reward.conditional and cfg.batch_size < 2 and len(set(cfg.validation_prompts)) < 2:
        raise TLCMError("the hinge on a mismatched prompt needs another prompt for each image, but the batch holds "
                        "one and validation_prompts (the pool of other prompts) fewer than two",
                        "raise batch_size, list two or more validation_prompts, or set reward_kind=plain")
    return reward, float(margin)


def _distance_kind(cfg: DistillConfig, device):
    """``cfg.loss_type``, or for ``lpips`` the latent LPIPS (:func:`tlcm.losses.perceptual.load_latent_lpips`), a
    per-sample distance callable that :func:`tlcm.losses.consistency.distance` averages. Kept in float32: the
    consistency targets lie close to the prediction, and low-precision features would round their difference away
    (autocast still runs its convolutions in the mixed precision)."""
    if cfg.loss_type != "lpips":
        return cfg.loss_type
    from tlcm.losses.perceptual import load_latent_lpips

    return load_latent_lpips(cfg.lpips_weights, device, torch.float32)


def _real_batches(cfg: DistillConfig, accelerator) -> Iterable[dict] | None:
    """A second data stream for the GAN's "real" latents (``gan_real: data`` with ``gan_real_data``)."""
    if not (cfg.gan_weight > 0 and cfg.gan_real == "data" and cfg.gan_real_data):
        return None
    from tlcm.data import open_shards

    data = open_shards(cfg.gan_real_data, shuffle=True, seed=cfg.seed + 1, rank=accelerator.process_index,
                       world_size=accelerator.num_processes, infinite=True)
    return iter(endless_batches(data, cfg.batch_size))


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
    from tqdm.auto import tqdm

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
    height, width = training_image_size(cfg, pipe)  # config, shards and teacher agree, or TLCMError naming both
    cfg.resolution = height if height == width else cfg.resolution  # config.yaml records the size trained at
    run.check_teacher_and_data(pipe, accelerator.num_processes)  # [identity] fingerprint, scaling, batch vs data
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

    # 2. networks and parts (student, fake score, discriminator heads), each with its optimiser and LR schedule ------
    networks = build_networks(pipe.unet, cfg, weight_dtype)  # every random init seeded by cfg.seed
    pipe.unet.to(device)
    networks.student.to(device)
    if not networks.is_lora:
        networks.teacher_unet.to(device)
        networks.target_unet.to(device)
    elif weight_dtype != torch.float32:
        for name, p in networks.student.named_parameters():  # frozen base in low precision, adapters in fp32
            if "lora_" not in name:
                p.data = p.data.to(weight_dtype)
    if networks.heads is not None:
        networks.heads.to(device)
    phases = recipe_phases(cfg)
    distributed.refuse_multi_part(accelerator, len(recipe_parts(cfg)))  # several parts: one process or DDP
    sharded = distributed.shard_networks(accelerator, networks, cfg)  # FSDP launches only; before the optimisers
    if sharded and cfg.lora_merged:
        raise TLCMError("lora_merged does not work with FSDP-sharded weights (each rank holds a flat shard, not the "
                        "layer's weight)", "set lora_merged=false")
    parts, student_module = build_parts(cfg, networks, accelerator, sharded)
    networks.set_trainable(parts["student"].params)
    train_state = TrainState(parts)
    accelerator.register_for_checkpointing(train_state)
    register_checkpoint_hooks(accelerator, parts, drop_prepared_models=networks.is_lora and parts["student"].prepared)
    raw_student = networks.student
    reward = reward_margin = None
    if cfg.reward_weight > 0:
        reward, reward_margin = _load_reward(cfg, device, weight_dtype)

    # 3. data ---------------------------------------------------------------------------------------------------------
    dataset = (dataset_fn or shards_dataset_fn(cfg))(accelerator.process_index, accelerator.num_processes)
    batches = iter(endless_batches(dataset, cfg.batch_size))
    real_batches = _real_batches(cfg, accelerator)
    encoder = PromptEncoder(pipe, height, width)  # SDXL time_ids follow the training size
    losses = StepLosses(cfg, networks, student_module, schedule, encoder, device, weight_dtype,
                        accelerator.process_index, train_state.extra_losses, vae=pipe.vae, reward=reward,
                        reward_margin=reward_margin, prompt_pool=sorted(set(cfg.validation_prompts)),
                        distance_kind=_distance_kind(cfg, device),
                        zero_empty_negatives=zeros_for_empty_negatives(pipe, cfg.uncond, run.manifest))

    # 4. resume -----------------------------------------------------------------------------------------------------
    start_step = 0
    if run.resume_from is not None:
        # [identity] checked, loaded, changed settings applied (each part's learning rate) and recorded
        start_step = run.restore(accelerator, {n: (p.optimizer, p.lr_scheduler) for n, p in parts.items()},
                                 recipe_learning_rates(cfg))
        for _ in range(start_step * cfg.gradient_accumulation_steps):  # replay the data order
            next(batches)
            if real_batches is not None:
                next(real_batches)
        accelerator.print(f"resumed from {run.resume_from} at step {start_step}")
    for part in parts.values():  # every process starts from process 0's weights (parts DDP does not broadcast)
        part.broadcast()
    run.start(start_step)  # [identity] run.json (identity, status, resume history) and config.yaml
    if log_with:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}
        accelerator.init_trackers("distill", config=hparams)

    # 5. train: each step walks the due phases over the same micro-batches --------------------------------------
    global_step = start_step
    t_loop = time.time()
    bar = tqdm(total=cfg.max_steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
               desc=f"distill {cfg.recipe}", dynamic_ncols=True)
    last_logs: dict[str, float] = {}
    phase_s: dict[str, float] = {}  # wall time per phase (the cost of each technique)
    for module in {id(m): m for m in (student_module, networks.heads) if m is not None}.values():
        module.train()
    profile = recorder = None
    replay_s = 0.0
    if cfg.profile_steps > 0:  # the step-cost profile (tlcm.train.profile): steps after the first, replayed networks
        from tlcm.train.profile import NetworkRecorder, StepProfile, make_clock

        clock, clock_name = make_clock(device)
        recorder = losses.recorder = NetworkRecorder(networks)
        profile = StepProfile(clock_name)
    while global_step < cfg.max_steps:
        profiled = profile is not None and start_step < global_step <= start_step + cfg.profile_steps
        if profiled:
            recorder.active, t_step = True, clock()
        micro_batches = [MicroBatch(next(batches), global_step, i,
                                    next(real_batches) if real_batches is not None else None)
                         for i in range(cfg.gradient_accumulation_steps)]
        logs: dict[str, float] = {}
        for phase in phases:
            if phase.due(global_step):
                t_phase = time.time()
                logs.update(run_phase(phase, parts, micro_batches, losses, networks, accelerator, cfg, output_dir))
                phase_s[phase.name] = phase_s.get(phase.name, 0.0) + time.time() - t_phase
        if profiled:
            step_s, recorder.active = clock() - t_step, False
            t_replay = time.time()
            profile.add(global_step, step_s, recorder.replay(clock, accelerator.autocast))
            replay_s += time.time() - t_replay
        global_step += 1
        bar.update(1)

        last_logs = {**last_logs, **logs}
        if global_step % cfg.logging_steps == 0 or global_step == cfg.max_steps:
            if "loss" in last_logs:
                bar.set_postfix(loss=f"{last_logs['loss']:.4g}", lr=f"{last_logs['lr']:.2g}")
            if log_with:
                accelerator.log(logs, step=global_step)
        if cfg.checkpointing_steps > 0 and global_step % cfg.checkpointing_steps == 0:
            check_in_sync(accelerator, {n: p for n, p in parts.items() if not p.prepared})
            save_checkpoint(accelerator, output_dir, global_step, cfg.checkpoints_total_limit, run)
        if cfg.validation_steps > 0 and global_step % cfg.validation_steps == 0 and global_step < cfg.max_steps:
            validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, global_step, log_with)
    bar.close()
    loop_s = time.time() - t_loop - replay_s  # the profile's replays are not training time

    # 6. export -----------------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    check_in_sync(accelerator, {n: p for n, p in parts.items() if not p.prepared})
    grid = validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, global_step, log_with)
    export_student, export_networks = raw_student, networks
    if sharded:  # a collective: plain copies of what the export writes, on the main process
        export_student, export_networks = distributed.gather_for_export(networks, cfg, accelerator)
    if accelerator.is_main_process:
        from tlcm.train.export import export_output

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
        summary = {
            "recipe": cfg.recipe, "steps": global_step, "resumed_from_step": start_step,
            "wall_time_s": round(time.time() - t_begin, 2), "train_loop_s": round(loop_s, 2),
            "s_per_step": round(loop_s / max(1, global_step - start_step), 3), "peak_rss_mib": round(peak, 1),
            "processes": accelerator.num_processes, "final_losses": last_logs,
            "trainable_parameters": sum(p.numel() for p in parts["student"].params),
            "parts": {name: {"parameters": sum(p.numel() for p in part.params), "updates": part.updates}
                      for name, part in parts.items()},
            "phase_seconds": {k: round(v, 2) for k, v in phase_s.items()},
            "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        }
        if profile is not None:
            summary["step_profile"] = profile.summary()
        export_output(cfg, pipe, export_student, export_networks, output_dir, summary, validation_grid=grid)
        run.finish(global_step)  # [identity]
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


@torch.no_grad()
def validate(cfg, pipe, raw_student, networks, schedule, encoder, accelerator, step, log_with) -> Path | None:
    """Sample the validation prompts at each of ``validation_num_steps`` and save/log one PNG grid."""
    if not cfg.validation_prompts or not (accelerator.is_main_process or distributed.is_sharded(raw_student)):
        return None  # a sharded forward is a collective: then every rank samples, the main process writes
    import numpy as np
    from PIL import Image

    device = accelerator.device
    cond = encoder(list(cfg.validation_prompts)).to(device, next(pipe.unet.parameters()).dtype)
    net_model = networks.target_unet if networks.target_unet is not None else raw_student
    n = len(cfg.validation_prompts)
    channels = pipe.unet.config.in_channels
    size = (encoder.height // pipe.vae_scale_factor, encoder.width // pipe.vae_scale_factor)  # the training size
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    noise = torch.randn((n, channels, *size), generator=gen).to(device)
    embed_dim = getattr(net_model.config, "time_cond_proj_dim", None) if cfg.guidance_embedding else None
    t_cond = None
    if embed_dim:
        w = torch.full((n,), max(cfg.sampling_guidance_scale - 1.0, 0.0), device=device)
        t_cond = guidance_scale_embedding(w, embed_dim).to(device)
    fn = unet_fn(net_model, cond, t_cond)
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
    if not accelerator.is_main_process:
        return None
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
    if cfg.student == "lora" and cfg.init_lora:
        student = f"the LoRA of {cfg.init_lora} (its rank and target modules), trained further"
    elif cfg.student == "lora":
        student = f"LoRA rank {cfg.lora_rank} alpha {cfg.lora_alpha} on {', '.join(cfg.target_modules())}"
    else:
        student = f"full UNet, EMA target decay {cfg.ema_decay}"
    lines.append(f"student: {student}")
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
    if cfg.recipe != "tlcm" and cfg.state_source != "forward_noise":
        path = cfg.teacher_path_segments or cfg.num_segments
        lines.append("states: " + (f"the teacher's DDIM+CFG walk from noise over {path} segments down to t"
                                   if cfg.state_source == "teacher_path" else
                                   "trajectory points stored in the shards (tlcm synthesize --trajectory)"))
    if cfg.extra_losses:
        lines.append(f"extra losses: {cfg.extra_losses}")
    if cfg.dmd_weight > 0 or cfg.gan_weight > 0:
        lines.append(f"student samples for DMD/GAN: {cfg.student_sample_steps} steps (one count per step, gradient "
                     "through the last step)")
    if cfg.dmd_weight > 0:
        g = f"g = {cfg.dmd_guidance_scale}" if cfg.dmd_guidance_scale > 0 else f"w ~ U[{cfg.w_min}, {cfg.w_max}]"
        lines.append(f"DMD: real score = teacher with CFG ({g}), fake score = LoRA adapter 'fake' "
                     f"(rank {cfg.fake_lora_rank or cfg.lora_rank}), t ~ U[{cfg.dmd_t_min}, {cfg.dmd_t_max}]")
    if cfg.gan_weight > 0:
        real = (f"the student's {cfg.gan_real_steps}-step output" if cfg.gan_real == "student"
                else f"data latents ({cfg.gan_real_data or 'the training shards'})")
        lines.append(f"GAN: {cfg.gan_loss} loss, heads on the {cfg.gan_backbone}'s {cfg.gan_features} features at "
                     f"t ~ U[{cfg.gan_t_min}, {cfg.gan_t_max}]; real = {real}")
    if cfg.regression_weight > 0:
        lines.append(f"regression: the student's 1-step output from each record's initial noise (its seed) vs the "
                     f"record's latent, {cfg.loss_type}, weight {cfg.regression_weight}")
    if cfg.reward_weight > 0:
        form = "-R" if cfg.reward_kind == "plain" else (
            f"hinge, margin {cfg.reward_margin or 'the reward default'}, plus a hinge on a mismatched prompt "
            f"(margin {cfg.reward_mismatch_margin}) when the reward reads the prompt")
        lines.append(f"reward: {cfg.reward_model} ({form}), weight {cfg.reward_weight}, on the decoded output of the "
                     f"student's {cfg.reward_sample_steps}-step walk (gradient through its last step)")
    eff = cfg.batch_size * cfg.gradient_accumulation_steps
    lines.append(f"optimisation: {cfg.max_steps} steps x batch {cfg.batch_size} x accumulation "
                 f"{cfg.gradient_accumulation_steps} (= {eff} per process), precision {cfg.mixed_precision}")
    for spec in recipe_parts(cfg):
        lines.append(f"part {spec.name}: AdamW lr {spec.learning_rate:g} ({spec.lr_scheduler}, warm-up "
                     f"{spec.lr_warmup_steps}), {spec.num_updates(cfg.max_steps)} updates (every {spec.every} "
                     f"step{'s' if spec.every > 1 else ''})")
    for phase in recipe_phases(cfg):
        lines.append(f"phase {phase.name} (trains {phase.part}, every {phase.every}): "
                     + (" + ".join(phase.terms) or "nothing"))
    lines.append(f"checkpoints every {cfg.checkpointing_steps} steps (keep {cfg.checkpoints_total_limit}); "
                 f"validation every {cfg.validation_steps or 'end'} at {cfg.validation_num_steps} steps")
    for n in sorted({1, 2, 4, 8, cfg.sampling_steps}):
        if n <= cfg.num_ddim_timesteps:
            p = sampling_plan(cfg, n)
            lines.append(f"sampling {n} steps: {p.mode} at {p.timesteps}")
    return "\n".join(lines)
