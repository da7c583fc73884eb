"""Full-size cost on one GPU: tlcm's own training steps and teacher sampling on SD1.5/SDXL UNets, projected hours.

One command; on one H100/H200 an estimated 3-5 minutes (not yet measured), and a time budget (``--budget-s``) skips
what would not finish within 8:

    python benchmarks/gpu_full_size.py --json OUT/gpu.json --write     # on a CUDA machine
    python benchmarks/gpu_full_size.py --dry-run                       # CPU: configs on the meta device, the plan
    python benchmarks/gpu_full_size.py --smoke --json /tmp/gpu.json    # CPU: the same code on tiny pipelines

Builds SD1.5 and SDXL pipelines from their public configs (embedded below) with random weights, on the GPU:
nothing is downloaded, and cost does not depend on the weights' values. Then, per model:

1. **Stage-1 (MLCD) LoRA steps** through ``tlcm.train.loop.distill`` itself, with the ``*-mlcd`` preset (rank-64 LoRA
   on the release's targets, 8 segments, fixed CFG), bf16 (frozen base in bf16, LoRA in fp32), per-GPU batch of the
   preset (SD1.5 12 at 512 px, SDXL 4 at 1024 px), gradient checkpointing on and off; in-memory random latents. The
   step time is the median gap between consecutive steps (a zero-weight extra loss records a clock), so loading,
   the first (warm-up) step and the export do not count; peak memory is ``torch.cuda.max_memory_allocated``.
2. **Stage-2 (TLCM) steps** the same way with the ``*-tlcm`` preset, starting from the stage-1 LoRA.
3. **Primitives** of the student UNet + LoRA (no-grad forward at B and 2B (CFG), forward+backward at B), the VAE
   decoder forward+backward (batch 1) and a CLIP ViT-H/14 image tower forward+backward (a stand-in for MPS's
   reward model): the paper's MPS (batch 8) and DMD+GAN (batch 4) stages are not in tlcm yet, so their steps are
   *estimated* from these with the formulas in :data:`ESTIMATES`.
4. **Teacher sampling throughput** of ``tlcm synthesize`` (``tlcm.data.synthesize.generate_batch``: DPM-Solver++,
   25 steps, CFG, batch 8, fp16, latents out) in images/s.
5. **4-step latency** of the distilled sampler (``TLCMScheduler``, no CFG, VAE decode; batch 1, fp16).

Projection: GPU-hours of the paper's schedule (METHOD.md: stage 1 12k iterations, stage 2 2k, MPS 500, DMD+GAN 1k,
on 4 GPUs, reading the batches as per GPU) = sum(iterations x step time) x 4 GPUs, next to the paper's 70 A100-hours;
an H100/H200 measurement converts to A100-hours with ``--a100-per-h100`` (an assumption, printed with the result).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section  # noqa: E402

# Public configs: runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/,
# text_encoder*/ config.json), reduced to the keys that differ from the diffusers/transformers defaults.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
# laion/CLIP-ViT-H-14's image tower, the backbone of the MPS reward model (a cost stand-in)
CLIP_H_VISION = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                     patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
PAPER = {"stage1": 12_000, "stage2": 2_000, "mps": 500, "dmd_gan": 1_000, "gpus": 4, "a100_hours": 70.0,
         "mps_batch": 8, "dmd_batch": 4}
MODELS = {
    "sd15": dict(unet=SD15_UNET, resolution=512, sdxl=False, preset="sd15"),
    "sdxl": dict(unet=SDXL_UNET, resolution=1024, sdxl=True, preset="sdxl"),
}
# Steps of the stages tlcm does not implement yet, in primitives measured at the stage's batch b:
#   f(b) no-grad forward, f2(b) CFG forward (2b), fb(b) LoRA forward+backward, vae(1) decoder fwd+bwd at batch 1,
#   clip(b) CLIP-H image tower fwd+bwd. MPS: 3 no-grad steps of a 4-step sample, the last with grad, decode, reward.
#   DMD+GAN (DMD2's rhythm, one update of each part per iteration): generator fb + real score f2 + fake score f,
#   the 4-step "real" sample 4 f, the discriminator (teacher encoder, ~half a UNet) through the generator 0.5 fb,
#   fake-score update fb, discriminator update on real and fake 2 x 0.5 fb.
ESTIMATES = {
    "mps": "3 f(8) + fb(8) + 8 vae(1) + clip(8)",
    "dmd_gan": "5 f(4) + f2(4) + 3.5 fb(4)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_reset(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _oom_types():
    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else (RuntimeError,)


# ------------------------------------------------------------------------------------------------------- building


def build_unet(cfg: dict, device="meta", dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(cfg)
    return unet if str(device) == "meta" or dtype == torch.float32 else unet.to(dtype=dtype)


def lora_targets(unet) -> list[str]:
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in LORA_TARGETS)]


def lora_param_count(unet, rank: int) -> int:
    """Parameters peft's LoRA adds on the targets: Linear r*(in+out); Conv2d r*(in*k*k) + out*r."""
    total, modules = 0, dict(unet.named_modules())
    for name in lora_targets(unet):
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            total += rank * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * rank
    return total


class Model:
    """One model's pipeline parts, full size (public configs) or tiny (``tlcm.testing``), random weights."""

    def __init__(self, name: str, device: torch.device, tiny: bool):
        self.name, self.device, self.tiny = name, device, tiny
        self.spec = MODELS[name]
        self.sdxl = self.spec["sdxl"]
        if tiny:
            from tlcm import testing

            comps = (testing.tiny_sdxl_components if self.sdxl else testing.tiny_sd15_components)(0)
            self.unet_config = dict(comps.pop("unet").config)
            self.parts = {k: (v.to(device) if isinstance(v, torch.nn.Module) else v) for k, v in comps.items()
                          if v is not None}
        else:
            self.unet_config = dict(self.spec["unet"])
            self.parts = self._full_parts()
        self.latent = (4, self.unet_config["sample_size"], self.unet_config["sample_size"])

    def _full_parts(self) -> dict:
        from diffusers import AutoencoderKL, DDIMScheduler
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from tlcm.sd_config import STABLE_DIFFUSION_SCHEDULER_CONFIG
        from tlcm.testing import tiny_clip_tokenizer

        with torch.device(self.device):
            vae = AutoencoderKL(**VAE, sample_size=self.spec["resolution"],
                                scaling_factor=0.13025 if self.sdxl else 0.18215)
            te = CLIPTextModel(CLIPTextConfig(**CLIP_L))
            parts = dict(vae=vae, text_encoder=te, tokenizer=tiny_clip_tokenizer(77),
                         scheduler=DDIMScheduler(**STABLE_DIFFUSION_SCHEDULER_CONFIG))
            if self.sdxl:
                parts.update(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
                             tokenizer_2=tiny_clip_tokenizer(77))
        return parts

    def unet(self, dtype=torch.float32):
        """A UNet with the same random weights on every call (seed 0, global RNG left as it was): a stage-2 run's
        teacher must be its stage 1's (``init_lora`` from another teacher is refused)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(0)
            return build_unet(self.unet_config, self.device, dtype)

    def pipeline(self, unet, dtype=torch.float32):
        """A diffusers pipeline over a fresh ``unet`` and this model's (shared) VAE and text encoders in ``dtype``."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        parts = {k: (v.to(dtype=dtype) if isinstance(v, torch.nn.Module) and v.dtype != dtype else v)
                 for k, v in self.parts.items()}
        if self.sdxl:
            pipe = StableDiffusionXLPipeline(unet=unet, **parts)
        else:
            pipe = StableDiffusionPipeline(unet=unet, **parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


# ---------------------------------------------------------------------------------------- tlcm's training loop


CLOCK: list[tuple[int, float]] = []


def _register_clock():
    from tlcm.losses import register_loss, registered_losses

    if "bench_clock" in registered_losses():
        return

    @register_loss("bench_clock")
    def clock(ctx):  # records when each step reaches its loss; contributes exactly zero
        loss = ctx.main.loss
        if loss.device.type == "cuda":
            torch.cuda.synchronize(loss.device)
        CLOCK.append((int(ctx.step), time.perf_counter()))
        return torch.zeros((), device=loss.device)


def distill_step(model: Model, recipe: str, steps: int, checkpointing: bool, workdir: Path, overrides: list[str],
                 init_lora: Path | None = None) -> dict:
    """Run ``tlcm.train.loop.distill`` for ``steps`` steps with the model's ``*-RECIPE`` preset; the median step
    time after the first step, the peak memory, and the output folder (for a stage-2 run's init_lora)."""
    from tlcm.train.config import apply_overrides, resolve_config
    from tlcm.train.loop import distill

    _register_clock()
    cfg = resolve_config(f"{model.spec['preset']}-{recipe}")
    out = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{model.name}-{recipe}-"))
    apply_overrides(cfg, [f"teacher=random-{model.name}", f"output_dir={out}", f"max_steps={steps}",
                          "mixed_precision=bf16", f"gradient_checkpointing={str(checkpointing).lower()}",
                          "validation_prompts=[]", "checkpointing_steps=0",
                          f"device={model.device.type}", "extra_losses.bench_clock=1.0", *overrides])
    if init_lora is not None:
        cfg.init_lora = str(init_lora)
    g = torch.Generator().manual_seed(0)
    n = 2 * cfg.batch_size
    latents = torch.randn(n, *model.latent, generator=g)
    records = [{"latents": latents[i], "prompt": f"a photo of object {i % 7}", "negative_prompt": ""}
               for i in range(n)]
    pipe = model.pipeline(model.unet())
    _peak_reset(model.device)
    CLOCK.clear()
    row = {"model": model.name, "recipe": recipe, "batch": cfg.batch_size, "checkpointing": checkpointing,
           "resolution": model.latent[-1] * pipe.vae_scale_factor}
    try:
        distill(cfg, pipe=pipe, dataset_fn=lambda rank, world: records, log_with=None, progress=False)
    except _oom_types() as err:
        row.update(step_s=None, error=f"out of memory: {str(err).splitlines()[0][:80]}")
        return row
    finally:
        del pipe
        row["peak_gib"] = _peak_gib(model.device)
    summary = json.loads((out / "train_summary.json").read_text())
    ticks = sorted(dict(CLOCK).items())
    gaps = [b[1] - a[1] for a, b in zip(ticks, ticks[1:]) if b[0] == a[0] + 1]
    if gaps:
        row["step_s"], row["timing"] = statistics.median(gaps), f"median of {len(gaps)} step gaps"
    else:  # no clock (the extra-loss hook changed): the loop's own average, first step included
        row["step_s"], row["timing"] = summary["s_per_step"], "train_summary s_per_step (includes the first step)"
    row.update(trainable_M=round(summary["trainable_parameters"] / 1e6, 2), out=str(out))
    return row


# ------------------------------------------------------------------------------------------------------ primitives


def primitives(model: Model, batch: int, rank: int, repeats: int) -> dict:
    """No-grad forward at ``batch`` and ``2 batch`` (CFG), LoRA forward+backward at ``batch``: the student UNet as
    the loop sets it up (LoRA fp32, frozen base bf16, bf16 autocast, gradient checkpointing as the presets)."""
    from tlcm.models import Conditioning
    from tlcm.train.config import DistillConfig
    from tlcm.train.student import build_networks

    device = model.device
    unet = model.unet()
    nets = build_networks(unet, DistillConfig(teacher="x", lora_rank=rank, lora_alpha=rank,
                                              gradient_checkpointing=True), torch.bfloat16)
    for name, p in unet.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    pipe = model.pipeline(unet, torch.bfloat16 if device.type == "cuda" else torch.float32)
    from tlcm.models import encode_prompts

    res = model.latent[-1] * pipe.vae_scale_factor
    cond1 = encode_prompts(pipe, ["a photo"], res, res).to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    out = {}
    for b in sorted({batch, 2 * batch}):
        cond = Conditioning.cat([cond1] * b)
        z = torch.randn(b, *model.latent, generator=g).to(device)
        t = torch.full((b,), 499, device=device)

        def fwd(z=z, t=t, cond=cond):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                unet.eval()
                return unet(z, t, **cond.unet_kwargs()).sample

        out[f"f({b})"] = timed(fwd, device, repeats)
    cond = Conditioning.cat([cond1] * batch)
    z = torch.randn(batch, *model.latent, generator=g).to(device)
    t = torch.full((batch,), 499, device=device)
    params = nets.trainable_parameters()

    def fwd_bwd():
        unet.train()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = unet(z, t, **cond.unet_kwargs()).sample
        y.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    _peak_reset(device)
    out[f"fb({batch})"] = timed(fwd_bwd, device, repeats)
    out[f"fb_peak_gib({batch})"] = _peak_gib(device)
    out[f"f2({batch})"] = out.pop(f"f({2 * batch})")
    return out  # the UNet is freed with this frame


def vae_decoder_fwd_bwd(model: Model, repeats: int) -> float:
    vae = model.parts["vae"]
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(1, *model.latent, generator=g).to(model.device)

    def run():
        z = z0.clone().requires_grad_(True)
        with torch.autocast(model.device.type, dtype=torch.bfloat16):
            x = vae.decode(z / vae.config.scaling_factor).sample
        x.float().mean().backward()

    vae.requires_grad_(False)
    return timed(run, model.device, repeats)


def reward_fwd_bwd(device: torch.device, batch: int, tiny: bool, repeats: int) -> float:
    """A CLIP ViT-H/14 image tower (MPS's backbone), frozen, backward to its input pixels: a reward's cost."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = dict(CLIP_H_VISION)
    if tiny:
        cfg.update(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=28,
                   projection_dim=16)
    with torch.device(device):
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], generator=g).to(device)

    def run():
        x = pixels.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            e = model(pixel_values=x).image_embeds
        e.float().pow(2).sum().backward()

    return timed(run, device, repeats)


# ---------------------------------------------------------------------------------------------- sampling paths


def synthesize_throughput(model: Model, batch: int, steps: int, repeats: int) -> dict:
    """Images/s of ``tlcm synthesize``'s teacher call (DPM-Solver++, CFG, latents out) at ``batch``."""
    from tlcm.data.synthesize import TextEncoder, generate_batch, make_scheduler

    dtype = torch.float16 if model.device.type == "cuda" else torch.float32
    pipe = model.pipeline(model.unet(dtype), dtype)
    pipe.scheduler = make_scheduler(pipe, "dpmpp")
    text = TextEncoder(pipe)
    size = (model.latent[1] * pipe.vae_scale_factor, model.latent[2] * pipe.vae_scale_factor)
    prompts, seeds = [f"a photo of object {i}" for i in range(batch)], list(range(batch))

    def run(n_steps):
        return generate_batch(pipe, prompts, None, seeds, steps=n_steps, guidance_scale=6.0 if model.sdxl else 7.5,
                              latent_shape=model.latent, size=size, text=text)

    run(2)  # warm-up (kernels, the text cache)
    _peak_reset(model.device)
    s = timed(lambda: run(steps), model.device, repeats)
    out = {"batch": batch, "steps": steps, "dtype": str(dtype).removeprefix("torch."), "s_per_batch": s,
           "images_per_s": batch / s,
           "gpu_h_per_100k": 100_000 / (batch / s) / 3600, "peak_gib": _peak_gib(model.device)}
    return out


def sampling_latency(model: Model, steps: int, repeats: int) -> dict:
    """One image with the distilled sampler: ``TLCMScheduler`` at ``steps`` steps, no CFG, VAE decode."""
    from tlcm.scheduler import TLCMScheduler

    dtype = torch.float16 if model.device.type == "cuda" else torch.float32
    pipe = model.pipeline(model.unet(dtype), dtype)
    pipe.scheduler = TLCMScheduler.from_config(pipe.scheduler.config)

    def run():
        return pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    s = timed(run, model.device, repeats)
    res = model.latent[-1] * pipe.vae_scale_factor
    return {"steps": steps, "latency_s": s, "resolution": res}


# ------------------------------------------------------------------------------------------------------ projection


def estimate_steps(prims: dict, vae_s: float, clip_s: float) -> dict:
    """Step times of the stages tlcm does not implement yet, from the primitives (formulas in ESTIMATES)."""
    mb, db = PAPER["mps_batch"], PAPER["dmd_batch"]
    return {
        "mps": 3 * prims[f"f({mb})"] + prims[f"fb({mb})"] + mb * vae_s + clip_s,
        "dmd_gan": 5 * prims[f"f({db})"] + prims[f"f2({db})"] + 3.5 * prims[f"fb({db})"],
    }


def gpu_class(name: str) -> str:
    return "h100" if any(k in name for k in ("H100", "H200", "GH200")) else "a100" if "A100" in name else "other"


def project(steps: dict, a100_per_h100: float, gpu_name: str) -> dict:
    """GPU-hours of the paper's schedule from per-iteration step times (seconds; None = not measured)."""
    parts = {k: (None if steps.get(k) is None else PAPER[k] * steps[k] * PAPER["gpus"] / 3600)
             for k in ("stage1", "stage2", "mps", "dmd_gan")}
    complete = all(v is not None for v in parts.values())
    total = sum(v for v in parts.values() if v is not None)
    kind = gpu_class(gpu_name)
    a100 = total * a100_per_h100 if kind == "h100" else total if kind == "a100" else None
    h100 = total if kind == "h100" else total / a100_per_h100 if kind == "a100" else None
    return {"hours": parts, "measured_gpu_hours": total, "complete": complete, "a100_hours": a100,
            "h100_hours": h100, "paper_a100_hours": PAPER["a100_hours"]}


# ------------------------------------------------------------------------------------------------------ the run


def plan(models: list[str], rank: int) -> list[dict]:
    """What a run measures, from the public configs built on the meta device (no GPU, no memory)."""
    from tlcm.train.config import resolve_config

    rows = []
    for name in models:
        spec = MODELS[name]
        unet = build_unet(spec["unet"])
        s1, s2 = resolve_config(f"{spec['preset']}-mlcd"), resolve_config(f"{spec['preset']}-tlcm")
        rows.append({
            "model": name,
            "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
            "lora_rank": rank, "lora_targets": len(lora_targets(unet)),
            "lora_params_M": round(lora_param_count(unet, rank) / 1e6, 2),
            "resolution": spec["resolution"],
            "stage1": f"{spec['preset']}-mlcd, batch {s1.batch_size}, {s1.num_segments} segments, checkpointing off/on",
            "stage2": f"{spec['preset']}-tlcm, batch {s2.batch_size}, {s2.stage2_sample_steps} sampling + "
                      f"{s2.stage2_substeps} teacher sub-steps",
            "estimated": {"mps": f"{ESTIMATES['mps']} (batch {PAPER['mps_batch']})",
                          "dmd_gan": f"{ESTIMATES['dmd_gan']} (batch {PAPER['dmd_batch']})"},
        })
    return rows


class Budget:
    def __init__(self, seconds: float, start: float | None = None):
        self.t0, self.seconds = time.time() if start is None else start, seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.t0)


def measure_model(model: Model, attempt, args, workdir: Path, overrides: list[str]) -> dict:
    """One model's measurements (see the module docstring), each through ``attempt(label, seconds, fn)``."""
    name, tiny, device = model.name, model.tiny, model.device
    res: dict = {"train": []}
    big = 1.0 if tiny else (2.0 if model.sdxl else 1.0)
    for ckpt in (False, True):
        row = attempt(f"{name} stage 1 (mlcd), checkpointing {'on' if ckpt else 'off'}", 30 * big,
                      lambda ckpt=ckpt: distill_step(model, "mlcd", args.train_steps, ckpt, workdir, overrides))
        if row is not None:
            res["train"].append(row)
    best = min((r for r in res["train"] if r.get("step_s") is not None), key=lambda r: r["step_s"], default=None)
    if best is not None:
        row = attempt(f"{name} stage 2 (tlcm)", 60 * big,
                      lambda: distill_step(model, "tlcm", args.train_steps, best["checkpointing"], workdir,
                                           overrides, init_lora=Path(best["out"])))
        if row is not None:
            res["train"].append(row)

    def prims():
        out = {}
        for b in (PAPER["dmd_batch"], PAPER["mps_batch"]):
            out.update(primitives(model, b, 4 if tiny else args.rank, args.repeats))
        out["vae(1)"] = vae_decoder_fwd_bwd(model, args.repeats)
        out[f"clip({PAPER['mps_batch']})"] = reward_fwd_bwd(device, PAPER["mps_batch"], tiny, args.repeats)
        return out

    p = attempt(f"{name} primitives (batch {PAPER['dmd_batch']}, {PAPER['mps_batch']})", 30 * big, prims)
    if p is not None:
        res["primitives"] = p
        res["estimated_step_s"] = estimate_steps(p, p["vae(1)"], p[f"clip({PAPER['mps_batch']})"])
    syn = attempt(f"{name} synthesize throughput", 40 * big,
                  lambda: synthesize_throughput(model, 2 if tiny else 8, 2 if tiny else 25, 1 if tiny else 2))
    if syn is not None:
        res["synthesize"] = syn
    lat = attempt(f"{name} 4-step latency", 15 * big, lambda: sampling_latency(model, 4, args.repeats))
    if lat is not None:
        res["latency"] = lat
    stage1 = [r["step_s"] for r in res["train"] if r["recipe"] == "mlcd" and r.get("step_s") is not None]
    stage2 = [r["step_s"] for r in res["train"] if r["recipe"] == "tlcm" and r.get("step_s") is not None]
    step_times = {"stage1": min(stage1, default=None), "stage2": stage2[0] if stage2 else None,
                  **res.get("estimated_step_s", {"mps": None, "dmd_gan": None})}
    res["projection"] = project(step_times, args.a100_per_h100, args.gpu_name)
    for r in res["train"]:
        r.pop("out", None)
    return res


def run(models: list[str], device: torch.device, tiny: bool, args, workdir: Path) -> dict:
    """Every measurement, in order of importance, each skipped when the time budget would not allow it; an
    out-of-memory is recorded as a result, any other failure as an error (the script then exits 1)."""
    budget = Budget(args.budget_s, getattr(args, "t_start", None))  # counted from the script's start
    results: dict = {"models": {}, "skipped": [], "out_of_memory": [], "errors": []}
    overrides = ["lora_rank=4", "lora_alpha=4", "batch_size=2", "stage2_sample_steps=2"] if tiny else []

    def attempt(label: str, need_s: float, fn):
        if budget.left() < need_s:
            results["skipped"].append(f"{label} (time budget: {budget.left():.0f} s left, needs ~{need_s:.0f})")
            print(f"skip {label}: time budget", flush=True)
            return None
        print(f"[{args.budget_s - budget.left():6.1f} s] {label}", flush=True)
        try:
            value = fn()
        except _oom_types() as err:
            results["out_of_memory"].append(f"{label}: {str(err).splitlines()[0][:100]}")
            return None
        except Exception as err:  # keep measuring the rest; reported, and the exit code says so
            traceback.print_exc()
            results["errors"].append(f"{label}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            return None
        finally:
            _peak_reset(device)
        shown = {k: v for k, v in value.items() if k != "out"} if isinstance(value, dict) else value
        print("  " + json.dumps(shown, default=str), flush=True)
        return value

    for name in models:
        results["models"][name] = measure_model(Model(name, device, tiny), attempt, args, workdir, overrides)
        _peak_reset(device)
    return results


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def markdown(results: dict, command: str) -> str:
    lines = ["## Full-size cost on a GPU", "",
             f"Command: `{command}` — {results['gpu']}, {results['platform']}, torch {results['torch']}, "
             f"{results['date']}.", "",
             "Random-weight SD1.5 / SDXL pipelines from their public configs. Training steps run `tlcm.train.loop."
             "distill` itself with the `*-mlcd` / `*-tlcm` presets in bf16 (step = median gap between steps after the "
             "first); MPS and DMD+GAN are not in tlcm yet and are estimated from measured primitives (formulas in "
             "`benchmarks/gpu_full_size.py`, `ESTIMATES`).", "",
             "| model | recipe | batch/GPU | resolution | grad. checkpointing | step s | peak GiB |",
             "|---|---|---:|---:|---|---:|---:|"]
    for name, res in results["models"].items():
        for r in res["train"]:
            step = _fmt(r.get("step_s"), ".3f") if r.get("step_s") is not None else r.get("error", "—")
            lines.append(f"| {name} | {r['recipe']} | {r['batch']} | {r['resolution']} | "
                         f"{'on' if r['checkpointing'] else 'off'} | {step} | {_fmt(r.get('peak_gib'), '.1f')} |")
    lines += ["", "Projected hours of the paper's schedule (stage 1 12k + stage 2 2k + MPS 500 + DMD+GAN 1k "
              "iterations, 4 GPUs, batches per GPU):", "",
              "| model | stage 1 h | stage 2 h | MPS h (est.) | DMD+GAN h (est.) | GPU-h here | A100-h | H100-h | "
              "paper A100-h |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results["models"].items():
        p = res["projection"]
        h = p["hours"]
        lines.append(f"| {name} | {_fmt(h['stage1'], '.1f')} | {_fmt(h['stage2'], '.1f')} | {_fmt(h['mps'], '.1f')} | "
                     f"{_fmt(h['dmd_gan'], '.1f')} | {_fmt(p['measured_gpu_hours'], '.1f')}"
                     f"{'' if p['complete'] else ' (partial)'} | {_fmt(p['a100_hours'], '.1f')} | "
                     f"{_fmt(p['h100_hours'], '.1f')} | {p['paper_a100_hours']:.0f} (SDXL) |")
    lines += ["", "| model | `tlcm synthesize` images/s (DPM++, CFG) | GPU-h per 100k latents | 4-step latency s "
              "(`TLCMScheduler`, batch 1, no CFG, with decode) |", "|---|---:|---:|---:|"]
    for name, res in results["models"].items():
        syn, lat = res.get("synthesize", {}), res.get("latency", {})
        what = f" (batch {syn['batch']}, {syn['steps']} steps, {syn['dtype']})" if syn else ""
        lines.append(f"| {name} | {_fmt(syn.get('images_per_s'))}{what} | {_fmt(syn.get('gpu_h_per_100k'))} | "
                     f"{_fmt(lat.get('latency_s'), '.3f')} |")
    lines += ["", f"A100/H100 time ratio assumed: {results['a100_per_h100_assumed']} (H200 counted as H100). "
              f"Wall time of the whole run: {results['wall_s']:.0f} s."]
    for key, what in (("skipped", "Skipped for the time budget"), ("out_of_memory", "Out of memory"),
                      ("errors", "FAILED")):
        if results.get(key):
            lines.append(f"{what}: " + "; ".join(results[key]) + ".")
    return "\n".join(lines)


def dry_run_section(rows: list[dict], argv) -> str:
    cmd = "python benchmarks/gpu_full_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Full-size cost on a GPU (not yet measured)", "",
             f"Command: `{cmd.strip()}` — {platform.platform()}, torch {torch.__version__}, "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.", "",
             "No GPU was available when this was written: the script has not run on one, so there are no step "
             "times, memory, throughput or projected A100/H100-hours yet. The dry run below checks the public "
             "configs (built on the meta device) and lists what a GPU run measures. Run "
             "`python benchmarks/gpu_full_size.py --write` on a CUDA machine (estimated 3-5 minutes, at most 8) "
             "to fill this section.",
             "", "| model | UNet params (M) | LoRA rank | LoRA targets | LoRA params (M) | resolution | stage 1 | "
             "stage 2 |", "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['unet_params_M']} | {r['lora_rank']} | {r['lora_targets']} | "
                     f"{r['lora_params_M']} | {r['resolution']} | {r['stage1']} | {r['stage2']} |")
    lines += ["", f"Projected: the paper's {PAPER['stage1']} stage-1 + {PAPER['stage2']} stage-2 + {PAPER['mps']} "
              f"MPS + {PAPER['dmd_gan']} DMD+GAN iterations on {PAPER['gpus']} GPUs, against its "
              f"{PAPER['a100_hours']:.0f} A100-hours."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU: build configs on the meta device, print the plan")
    mode.add_argument("--smoke", action="store_true",
                      help="CPU: run every measurement on the tiny test pipelines (checks the code, not the cost)")
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=6, help="optimiser steps per training measurement (default 6)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip measurements that would start after this many seconds (default 420: done within 8 min)")
    p.add_argument("--a100-per-h100", type=float, default=2.0,
                   help="assumed A100/H100 time ratio for the projection (default 2.0: our assumption)")
    p.add_argument("--json", help="write all measurements to this JSON file")
    p.add_argument("--write", action="store_true", help="write its section of benchmarks/results/evaluate.md")
    p.add_argument("--results-md", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help="scratch folder for the training runs' outputs (default: temp)")
    args = p.parse_args(argv)
    args.t_start = time.time()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (use {', '.join(MODELS)})")
    results_md = Path(args.results_md) if args.results_md else None
    if not args.smoke:
        rows = plan(models, args.rank)
        print("plan:")
        for r in rows:
            print("  " + json.dumps(r))
        print(f"  paper schedule: {json.dumps(PAPER)}")
    if args.dry_run:
        if args.write:
            update_section("gpu_full_size", dry_run_section(rows, argv), *([results_md] if results_md else []))
        return 0
    if args.smoke:
        device = torch.device("cpu")
        args.gpu_name = "cpu (smoke: tiny pipelines)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run or --smoke on a CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        args.gpu_name = torch.cuda.get_device_name(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    with (tempfile.TemporaryDirectory(prefix="gpu-bench-") if args.workdir is None
          else contextlib.nullcontext(args.workdir)) as work:
        Path(work).mkdir(parents=True, exist_ok=True)
        results = run(models, device, args.smoke, args, Path(work))
    command = "python benchmarks/gpu_full_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.update(gpu=args.gpu_name, platform=platform.platform(), torch=torch.__version__,
                   date=f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}", wall_s=time.time() - t0,
                   a100_per_h100_assumed=args.a100_per_h100, command=command.strip(), paper=PAPER,
                   estimates=ESTIMATES)
    section = markdown(results, command.strip())
    print(section)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.write:
        update_section("gpu_full_size", section, *([results_md] if results_md else []))
    if results["errors"]:
        print(f"{len(results['errors'])} measurement(s) failed: " + "; ".join(results["errors"]), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
