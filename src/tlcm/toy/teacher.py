"""The toy teacher: a tiny SD-style ``UNet2DConditionModel`` on 8x8x4 latents, conditioned on frozen MiniLM states.

Same recipe as Stable Diffusion: scaled-linear DDPM schedule (0.00085 to 0.012, 1000 steps), epsilon prediction,
latents = VAE posterior sample x ``scaling_factor``, 10 % of captions replaced by the empty prompt for CFG. The text
states are computed exactly as ``StableDiffusionPipeline.encode_prompt`` computes them at inference (tokenise, pad to
``model_max_length``, BertModel ``last_hidden_state``, no attention mask), once for the whole caption set. Training
uses min-SNR loss weighting (gamma 5) and keeps an EMA of the weights, which is what gets saved.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.toy import common


@dataclass
class TeacherConfig:
    data: str = ""  # imagefolder of captioned images
    vae: str = ""  # folder of the trained AutoencoderKL (``tlcm toy train-vae`` writes OUT/vae)
    resolution: int = 32
    max_images: int = 10000  # first N images of the folder (0: all)
    block_out_channels: tuple = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 2  # diffusers' name; in UNet2DConditionModel it is the number of heads (dims 16, 32)
    max_length: int = common.TEXT_MAX_LENGTH
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    noise_offset: float = 0.1  # std of a per-channel constant added to the training noise (0: off); see train_teacher
    checkpoint_every: int = 100
    world: str = "v3"  # toy world of the sample prompts (the data itself comes from ``data``)
    sample_prompts: int = 32  # prompts of the samples.png grid written at the end (0: none)
    sample_steps: int = 50
    seed: int = 0
    threads: int = 2
    # start from these weights instead of a random init ("toy": the shipped teacher of ``world``; or a UNet folder /
    # pipeline folder): to train a teacher longer, or to compare recipes from one starting point. Its architecture
    # must be the one this config builds (checked, the differences named).
    init_unet: str = ""


def build_unet(cfg: TeacherConfig, latent_channels: int = 4):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    return UNet2DConditionModel(
        sample_size=cfg.resolution // 4,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=384,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=32,
    )


def load_init_unet(unet, cfg: TeacherConfig) -> None:
    """Copy ``cfg.init_unet``'s weights into ``unet`` (built from ``cfg``), refusing a different architecture."""
    from diffusers import UNet2DConditionModel

    src = cfg.init_unet
    if src == "toy":
        from tlcm.toy import teacher_path

        src = str(teacher_path(world=cfg.world))
    folder = Path(src)
    if (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise TLCMError(f"init_unet {src!r} is not a UNet folder", "pass a pipeline folder, its unet/ folder or 'toy'")
    init = UNet2DConditionModel.from_pretrained(str(folder))
    keys = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "down_block_types", "up_block_types", "cross_attention_dim", "attention_head_dim", "norm_num_groups")
    diff = [f"{k}: init {init.config[k]!r} vs config {unet.config[k]!r}" for k in keys
            if tuple(np.atleast_1d(init.config[k])) != tuple(np.atleast_1d(unet.config[k]))]
    if diff:
        raise TLCMError(f"init_unet {src} has another architecture than this teacher config: " + "; ".join(diff),
                        "set the config's architecture to the init's, or drop init_unet")
    unet.load_state_dict({k: v.float() for k, v in init.state_dict().items()})


def load_text_encoder(max_length: int = common.TEXT_MAX_LENGTH):
    """MiniLM tokenizer (``model_max_length`` = ``max_length``) and frozen BertModel, offline from its package."""
    from transformers import BertModel, BertTokenizer

    src = common.minilm_dir()
    tokenizer = BertTokenizer.from_pretrained(str(src), model_max_length=max_length)
    encoder = BertModel.from_pretrained(str(src)).eval().requires_grad_(False)
    return tokenizer, encoder


@torch.no_grad()
def encode_text(prompts: list[str], tokenizer, encoder, batch: int = 256, progress: bool = False) -> torch.Tensor:
    """Token states exactly as ``StableDiffusionPipeline.encode_prompt`` computes them (float32, ``(N, L, 384)``)."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="encoding captions", disable=not progress):
        ids = tokenizer(
            list(prompts[i : i + batch]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(encoder(ids, attention_mask=None)[0])
    return torch.cat(out)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 200, progress: bool = False):
    """Posterior mean and std of each image (float16 on CPU), for sampling fresh latents every step."""
    from tqdm.auto import tqdm

    means, stds = [], []
    for i in tqdm(range(0, len(images), batch), desc="encoding latents", disable=not progress):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
    return torch.cat(means), torch.cat(stds)


def _snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod[t]
    return a / (1 - a)


def encode_training_set(images: np.ndarray, captions: list[str], vae, max_length: int, progress: bool = False,
                        tokenizer=None, encoder=None) -> dict:
    """Everything the denoising step reads, computed once: VAE posterior mean/std per image (float16), MiniLM states
    per unique caption, each image's caption index, the empty prompt's states (caption dropout), truncation count.
    ``tokenizer``/``encoder``: a pipeline's own (default: MiniLM loaded with ``max_length``)."""
    if tokenizer is None or encoder is None:
        tokenizer, encoder = load_text_encoder(max_length)
    lengths = [len(ids) for ids in tokenizer(captions).input_ids]
    uniq = sorted(set(captions))
    index = {c: i for i, c in enumerate(uniq)}
    states = encode_text(uniq, tokenizer, encoder, progress=progress).half()
    empty = encode_text([""], tokenizer, encoder)[0].half()
    mean, std = encode_latents(vae, images, progress=progress)
    return {
        "mean": mean,
        "std": std,
        "states": states,
        "caption_index": torch.tensor([index[c] for c in captions]),
        "empty": empty,
        "truncated": torch.tensor(sum(n > max_length for n in lengths)),
    }


def make_train_step(unet, enc: dict, cfg, rng: np.random.Generator, scaling: float, opt, sched, ema=None):
    """The denoising training step that the teacher and its fine-tunes share: ``step_fn(step) -> loss``.

    ``cfg`` supplies ``batch_size``, ``caption_dropout``, ``noise_offset``, ``snr_gamma`` and ``ema_decay``; ``unet``
    may carry a LoRA (then only its trainable parameters change). Randomness: batch indices, dropout and times from
    ``rng``, noise from torch's global generator (both restored by the toy checkpoints)."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(common.SD_SCHEDULER_CONFIG)
    acp = noise_sched.alphas_cumprod.float()
    n = len(enc["mean"])
    params = [p for p in unet.parameters() if p.requires_grad]

    def train_step(step: int) -> float:
        # a batch: fresh posterior sample, SD scaling, caption dropout to the empty prompt's states
        idx = torch.from_numpy(rng.integers(0, n, cfg.batch_size))
        mean, std = enc["mean"][idx].float(), enc["std"][idx].float()
        x0 = (mean + std * torch.randn_like(mean)) * scaling
        cond = enc["states"][enc["caption_index"][idx]].float()
        drop = torch.from_numpy(rng.random(cfg.batch_size) < cfg.caption_dropout)
        cond[drop] = enc["empty"].float()
        # forward diffusion at a uniform timestep, epsilon prediction, min-SNR weighted MSE
        t = torch.from_numpy(rng.integers(0, 1000, cfg.batch_size))
        noise = torch.randn_like(x0)
        if cfg.noise_offset:
            # Offset noise (as diffusers' train_text_to_image --noise_offset): SD's schedule keeps ~7 % of the signal
            # at t=999, and on an 8x8 latent the image mean is barely hidden by the noise's own mean, so without
            # this the model reads the background from the noise and ignores the prompt's background colour.
            noise = noise + cfg.noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1)
        zt = noise_sched.add_noise(x0, noise, t)
        eps = unet(zt, t, cond).sample
        snr = _snr(acp, t)
        weight = torch.clamp(snr, max=cfg.snr_gamma) / snr if cfg.snr_gamma else torch.ones_like(snr)
        loss = (weight * ((eps - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        common.optimiser_step(loss, opt, sched, params)
        # EMA (decay warmed up so early averages are not dominated by the random init)
        if ema is not None:
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - decay)
        return loss.item()

    return train_step


def warmup_cosine(warmup_steps: int, steps: int):
    """LR multiplier: linear warm-up, then cosine decay to 0 at ``steps``."""

    def lr_lambda(s: int) -> float:
        return min(1.0, (s + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))

    return lr_lambda


def train_teacher(cfg: TeacherConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the toy teacher; writes ``out_dir/unet`` (EMA weights), ``out_dir/pipeline`` (a complete
    StableDiffusionPipeline folder), ``report.json`` and ``samples.png``. Resumable from ``checkpoint.pt``."""
    from diffusers import AutoencoderKL

    out = Path(out_dir)
    if (done := common.finished_report(out, "pipeline/model_index.json")) is not None:
        return done
    if not cfg.data or not cfg.vae:
        raise TLCMError("the teacher trainer needs --data (imagefolder) and --vae (trained VAE folder)")
    if not (Path(cfg.vae) / "config.json").is_file():
        raise TLCMError(f"no AutoencoderKL in {cfg.vae}", "train one first with `tlcm toy train-vae`")
    clock = common.begin_run(cfg, out)

    # 1. frozen parts: VAE latents and MiniLM states of every caption, computed once and cached
    vae = AutoencoderKL.from_pretrained(cfg.vae).eval().requires_grad_(False)
    scaling = float(vae.config.scaling_factor)
    cache = out / "encoded.pt"
    if cache.is_file():
        enc = torch.load(cache, weights_only=True)
    else:
        images, captions = common.load_image_arrays(
            cfg.data, cfg.resolution, cache=out / "images.npz", limit=cfg.max_images or None
        )
        enc = encode_training_set(images, captions, vae, cfg.max_length, progress=progress)
        common.atomic_torch_save(enc, cache)
    prep_seconds = clock.seconds
    n = len(enc["mean"])

    # 2. model, optimiser, EMA, schedule
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg, latent_channels=enc["mean"].shape[1])
    if cfg.init_unet:
        load_init_unet(unet, cfg)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    ckpt = out / "checkpoint.pt"
    start = common.load_checkpoint(ckpt, unet=unet, ema=ema, opt=opt, sched=sched)
    rng = np.random.default_rng([cfg.seed, start])
    unet.train()
    # 3-5. batches with caption dropout, min-SNR denoising loss, AdamW, EMA (make_train_step)
    train_step = make_train_step(unet, enc, cfg, rng, scaling, opt, sched, ema=ema)

    history = common.run_training(
        train_step, start, cfg.steps, ckpt, cfg.checkpoint_every, "train-teacher", progress,
        unet=unet, ema=ema, opt=opt, sched=sched,
    )
    train_seconds = clock.seconds - prep_seconds

    # 6. save: EMA UNet, then a complete pipeline folder (MiniLM linked from its package)
    ema.eval()
    common.save_pretrained_atomic(ema, out / "unet")
    tokenizer_dir = out / "tokenizer"
    common.write_tokenizer(tokenizer_dir, cfg.max_length)
    common.assemble_pipeline(out / "pipeline", out / "unet", cfg.vae, tokenizer_dir=tokenizer_dir)
    from tlcm.toy import MARKER
    from tlcm.toy.worlds import get_world, world_version

    # the world marker: without it `tlcm toy evaluate` and the toy protocol read the folder as a pre-v4 (v3) teacher
    common.write_json(out / "pipeline" / MARKER, {"world": world_version(cfg.world)})

    if cfg.sample_prompts > 0:
        sample_prompts = get_world(cfg.world).prompts(cfg.sample_prompts, seed=cfg.seed + 99, split="train")
        images = sample_pipeline(out / "pipeline", sample_prompts, steps=cfg.sample_steps, seed=cfg.seed)
        common.save_grid(images, out / "samples.png", nrow=8, scale=3)
        common.atomic_write_text(out / "samples.txt", "\n".join(sample_prompts) + "\n")
    report = {
        "parameters": sum(p.numel() for p in ema.parameters()),
        "images": n,
        "unique_captions": int(len(enc["states"])),
        "truncated_captions": int(enc["truncated"]),
        **common.loss_summary(history),
        "steps": cfg.steps,
        "prep_seconds": round(prep_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(clock.seconds, 1),
    }
    common.write_json(out / "report.json", report)
    return report


@torch.no_grad()
def sample_pipeline(
    pipeline,
    prompt_list: list[str],
    steps: int = 50,
    guidance_scale: float = 5.0,
    seed: int = 0,
    batch: int = 100,
    scheduler="ddim",
    progress: bool = False,
) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] for ``prompt_list`` from a pipeline (object or folder).

    ``scheduler``: ``"ddim"`` or ``"dpm++"`` (built from the pipeline's config, its own timestep spacing), or a
    scheduler instance used as it is."""
    from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
    from tqdm.auto import tqdm

    pipe = DiffusionPipeline.from_pretrained(str(pipeline)) if isinstance(pipeline, (str, Path)) else pipeline
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    elif not isinstance(scheduler, str):
        pipe.scheduler = scheduler
    else:
        raise TLCMError(f"unknown scheduler {scheduler!r}", "use 'ddim', 'dpm++' or pass a scheduler instance")
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in tqdm(range(0, len(prompt_list), batch), desc="sampling", disable=not progress):
        g = torch.Generator().manual_seed(seed + i)
        res = pipe(
            list(prompt_list[i : i + batch]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=g,
            output_type="pt",
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)
