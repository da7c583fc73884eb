"""The toy VAE: a diffusers ``AutoencoderKL`` with f=4 and 4 latent channels (32x32x3 -> 8x8x4), as in SD but tiny.

Trained with L1 + L2 reconstruction and a small KL term (SD's recipe without the perceptual and GAN terms). After
training, ``scaling_factor`` is set to 1 / std of the latents it produces on training images, as SD does, and stored
in the VAE config, so ``pipeline.vae.config.scaling_factor`` means the same thing as for SD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.toy import common


@dataclass
class VAEConfig:
    data: str = ""  # imagefolder with the training images (``tlcm toy dataset`` writes one)
    resolution: int = 32
    block_out_channels: tuple = (16, 32, 64)  # 3 blocks -> downsampling factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 2000
    batch_size: int = 32
    crop: int = 0  # train on random crop x crop patches (0: whole images)
    lr: float = 1e-3
    warmup_steps: int = 50
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    foreground_weight: float = 10.0  # extra loss weight on pixels away from the image's dominant colour (0: off)
    logvar_init: float = -8.0  # initial posterior log-variance: sampled latents start near the mean
    eval_images: int = 500
    checkpoint_every: int = 100
    seed: int = 0
    threads: int = 2


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.resolution,
        mid_block_add_attention=False,
    )
    # With SD's tiny KL weight the posterior std shrinks anyway, but slowly; starting it small (std = e^(-4)) spares
    # the decoder hundreds of steps of learning through unit-variance latent noise.
    with torch.no_grad():
        vae.quant_conv.bias[cfg.latent_channels :] = cfg.logvar_init
    return vae


def _batches(images: np.ndarray, batch: int, rng: np.random.Generator, crop: int = 0):
    """Random training batches in [-1, 1]; with ``crop``, random ``crop x crop`` patches (the VAE is convolutional,
    without attention, so it trains on patches and runs on whole images, at a fraction of the cost)."""
    h, w = images.shape[1:3]
    while True:
        idx = rng.integers(0, len(images), batch)
        x = images[idx]
        if crop and crop < min(h, w):
            ys = rng.integers(0, (h - crop) // 4 + 1, batch) * 4  # multiples of 4 keep the latent grid aligned
            xs = rng.integers(0, (w - crop) // 4 + 1, batch) * 4
            x = np.stack([im[y : y + crop, xx : xx + crop] for im, y, xx in zip(x, ys, xs)])
        yield torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.2) -> torch.Tensor:
    """Per-pixel loss weights ``(B, 1, H, W)`` with mean 1 per image: ``1 + weight`` where a pixel differs from the
    image's per-channel median (its dominant, background colour) by more than ``threshold`` in [-1, 1] units.

    Why: a shape covers 1-10 % of a toy image, so a plain pixel loss is spent on the flat background and the VAE
    learns colour and outline of small shapes last (it blurred them into same-coloured blobs). SD's VAE gets the same
    emphasis on detail from its perceptual and adversarial losses; this is the cheap, CPU-sized version."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None]
    mask = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)
    w = 1 + weight * mask
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) between image batches in [0, 1]."""
    mse = ((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def reconstruct(vae, x01: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Images in [0, 1] through the VAE (posterior mode) and back, on the VAE's device and dtype; float32 CPU out."""
    out = []
    for i in range(0, len(x01), batch):
        x = x01[i : i + batch].to(vae.device, vae.dtype) * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mode()).sample + 1) / 2).float().cpu())
    return torch.cat(out).clamp(0, 1)


@torch.no_grad()
def latent_std(vae, images: np.ndarray, n: int = 2000, batch: int = 100, seed: int = 0) -> float:
    """Std of sampled latents on ``n`` training images (SD's recipe for ``scaling_factor = 1 / std``)."""
    g = torch.Generator().manual_seed(seed)
    idx = np.random.default_rng(seed).permutation(len(images))[:n]
    lat = []
    for i in range(0, len(idx), batch):
        x = torch.from_numpy(images[idx[i : i + batch]]).permute(0, 3, 1, 2).float() / 127.5 - 1
        lat.append(vae.encode(x).latent_dist.sample(generator=g))
    return float(torch.cat(lat).std())


def train_vae(cfg: VAEConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the toy VAE on ``cfg.data``; writes ``out_dir/vae`` (diffusers folder), ``report.json``, grids.

    Resumable: ``out_dir/checkpoint.pt`` holds model, optimizer and step; a finished run (``report.json`` present)
    is not repeated.
    """
    out = Path(out_dir)
    if (done := common.finished_report(out, "vae/config.json")) is not None:
        return done
    if not cfg.data:
        raise TLCMError("no training images given to the VAE trainer", "pass --data DIR (an imagefolder)")
    clock = common.begin_run(cfg, out)
    images, _ = common.load_image_arrays(cfg.data, cfg.resolution, cache=out / "images.npz")
    n_eval = min(cfg.eval_images, max(1, len(images) // 10))
    eval_images, train_images = images[:n_eval], images[n_eval:] if len(images) > n_eval else images

    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, cfg.warmup_steps))
            * 0.5
            * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))
        ),
    )
    ckpt = out / "checkpoint.pt"
    start = common.load_checkpoint(ckpt, vae=vae, opt=opt, sched=sched)
    rng = np.random.default_rng([cfg.seed, start])
    batches = _batches(train_images, cfg.batch_size, rng, cfg.crop)
    vae.train()

    def train_step(step: int) -> float:
        x = next(batches)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        w = foreground_weights(x, cfg.foreground_weight) if cfg.foreground_weight else 1.0
        l1 = (w * (rec - x).abs()).mean()
        l2 = (w * (rec - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl
        common.optimiser_step(loss, opt, sched, vae.parameters())
        return loss.item()

    history = common.run_training(
        train_step, start, cfg.steps, ckpt, cfg.checkpoint_every, "train-vae", progress, vae=vae, opt=opt, sched=sched
    )
    vae.eval()
    std = latent_std(vae, train_images, seed=cfg.seed)
    vae.register_to_config(scaling_factor=1.0 / std)
    common.save_pretrained_atomic(vae, out / "vae")
    x01 = torch.from_numpy(eval_images).permute(0, 3, 1, 2).float() / 255.0
    rec = reconstruct(vae, x01)
    value = psnr(rec, x01)
    both = torch.stack([x01[:32], rec[:32]], 1).flatten(0, 1)
    common.save_grid(both, out / "reconstructions.png", nrow=16, scale=3)
    report = {
        "psnr_db": round(value, 2),
        "eval_images": int(n_eval),
        "latent_std": std,
        "scaling_factor": 1.0 / std,
        "parameters": sum(p.numel() for p in vae.parameters()),
        **common.loss_summary(history),
        "steps": cfg.steps,
        "seconds": round(clock.seconds, 1),
    }
    common.write_json(out / "report.json", report)
    return report
