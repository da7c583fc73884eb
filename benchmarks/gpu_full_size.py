"""Full-size cost on a GPU: MLCD LoRA training steps of SD1.5 and SDXL, 4-step 1024px SDXL latency, projected hours.

Builds the SD1.5 and SDXL UNets (and VAE / text encoders for the latency run) from their public configs, embedded
below, with random weights: nothing is downloaded, and cost does not depend on the weights' values. Measures, on the
GPU it runs on:

1. One MLCD (TLCM stage 1) LoRA training step at the given per-GPU batch and resolution: student forward with grad,
   teacher forward with CFG (adapters disabled, a doubled batch, no grad), target forward (no grad), backward, AdamW
   step on the LoRA (rank 64 on the release's targets: attention q/k/v/out, proj_in/out, feed-forward, resnet convs,
   down/up-sampler convs, time_emb_proj); base weights in bf16, LoRA in fp32 under bf16 autocast.
2. The primitives (UNet forward without grad at batch B and 2B) to cost TLCM stage 2, whose step is: the student's
   own 4-step sample (4 forwards), 3 teacher sub-steps with CFG (3 doubled forwards), a target forward and a student
   forward/backward.
3. 4-step SDXL latency at 1024x1024, batch 1, no CFG (guidance is distilled): text encoders + 4 UNet calls + VAE
   decode, fp16.

and projects GPU-hours for the paper's schedule (stage 1: 12k iterations, stage 2: 2k, on 4 GPUs; METHOD.md). MPS
and DMD+GAN stages need reward/discriminator models and are not projected. Projections for the other GPU type use
``--a100-per-h100`` (an assumption, printed with the result).

    python benchmarks/gpu_full_size.py --dry-run      # CPU: build configs on the meta device, print shapes and plan
    python benchmarks/gpu_full_size.py                # on a CUDA machine; --write updates the results file

Defaults for per-GPU batch and resolution (our choice where the papers do not say): SD1.5 512px batch 16, SDXL
1024px batch 4; change them with --sd15-batch / --sdxl-batch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import sys
import time
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
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                 projection_dim=1280, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
PAPER_SCHEDULE = {"stage1_iters": 12_000, "stage2_iters": 2_000, "gpus": 4}

MODELS = {
    "sd15": dict(unet=SD15_UNET, resolution=512, batch=16, text_dim=768, text_len=77, sdxl=False),
    "sdxl": dict(unet=SDXL_UNET, resolution=1024, batch=4, text_dim=2048, text_len=77, sdxl=True),
}


def build_unet(cfg: dict, device="meta", dtype=torch.float32):
    from diffusers import UNet2DConditionModel

    ctx = torch.device("meta") if device == "meta" else contextlib.nullcontext()
    with ctx:
        unet = UNet2DConditionModel(**cfg)
    return unet if device == "meta" else unet.to(device=device, dtype=dtype)


def lora_targets(unet) -> list[str]:
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
            name == t or name.endswith("." + t) for t in LORA_TARGETS
        ):
            names.append(name)
    return names


def lora_param_count(unet, rank: int) -> int:
    """Parameters peft's LoRA adds on the targets: Linear r*(in+out); Conv2d r*(in*k*k) + out*r."""
    total = 0
    modules = dict(unet.named_modules())
    for name in lora_targets(unet):
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            k = m.kernel_size[0] * m.kernel_size[1]
            total += rank * m.in_channels * k + m.out_channels * rank
    return total


def plan(models: list[str], batches: dict, rank: int) -> list[dict]:
    rows = []
    for name in models:
        spec = MODELS[name]
        unet = build_unet(spec["unet"])
        res = spec["resolution"]
        rows.append({
            "model": name,
            "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
            "lora_rank": rank,
            "lora_targets": len(lora_targets(unet)),
            "lora_params_M": round(lora_param_count(unet, rank) / 1e6, 2),
            "resolution": res,
            "latent_shape": (batches[name], 4, res // 8, res // 8),
            "text_shape": (batches[name], spec["text_len"], spec["text_dim"]),
            "batch_per_gpu": batches[name],
        })
    return rows


def _conditioning(spec, batch, device, dtype):
    cond = {"encoder_hidden_states": torch.randn(batch, spec["text_len"], spec["text_dim"], device=device,
                                                 dtype=dtype)}
    if spec["sdxl"]:
        res = spec["resolution"]
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, device=device, dtype=dtype),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype).repeat(batch, 1),
        }
    return cond


def _double(cond):
    out = {"encoder_hidden_states": torch.cat([cond["encoder_hidden_states"]] * 2)}
    if "added_cond_kwargs" in cond:
        out["added_cond_kwargs"] = {k: torch.cat([v] * 2) for k, v in cond["added_cond_kwargs"].items()}
    return out


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_training(name: str, batch: int, rank: int, device, repeats: int) -> dict:
    from peft import LoraConfig

    spec = MODELS[name]
    unet = build_unet(spec["unet"], device, torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_targets(unet), init_lora_weights=True))
    lora = [p for p in unet.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    opt = torch.optim.AdamW(lora, lr=1e-4)
    res = spec["resolution"] // 8
    z = torch.randn(batch, 4, res, res, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    cond = _conditioning(spec, batch, device, torch.bfloat16)
    cond2 = _double(cond)

    def forward(x, c, grad):
        with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            return unet(x, torch.cat([t] * (len(x) // batch)), **c).sample

    def stage1_step():
        student = forward(z, cond, True)
        unet.disable_adapters()
        teacher = forward(torch.cat([z, z]), cond2, False)
        unet.enable_adapters()
        target = forward(z - 0.01 * teacher[:batch].float(), cond, False)
        loss = torch.nn.functional.mse_loss(student.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats(device)
    step = _timed(stage1_step, device, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    f1 = _timed(lambda: forward(z, cond, False), device, repeats)
    f2 = _timed(lambda: forward(torch.cat([z, z]), cond2, False), device, repeats)
    stage2 = 4 * f1 + 3 * f2 + f1 + (step - f2 - f1)  # sampling + teacher sub-steps + target + student fwd/bwd
    return {"model": name, "batch": batch, "stage1_step_s": step, "stage2_step_s_est": stage2, "fwd_s": f1,
            "fwd_cfg_s": f2, "peak_gib": peak}


def measure_sdxl_latency(device, repeats: int, steps: int = 4) -> dict:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    dtype = torch.float16
    spec = MODELS["sdxl"]
    unet = build_unet(SDXL_UNET, device, dtype).eval()
    vae = AutoencoderKL(**VAE).to(device=device, dtype=dtype).eval()
    te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L)).to(device=device, dtype=dtype).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, 49408, (1, 77), device=device)

    @torch.no_grad()
    def generate():
        h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = te2(ids, output_hidden_states=True)
        emb = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {
            "text_embeds": out2.text_embeds,
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype)}}
        z = torch.randn(1, 4, 128, 128, device=device, dtype=dtype)
        for t in torch.linspace(999, 0, steps + 1, device=device)[:-1]:
            eps = unet(z, t.long().reshape(1), **cond).sample
            z = z - 0.1 * eps  # cost only: the arithmetic of a scheduler step is negligible next to the UNet
        return vae.decode(z / 0.13025).sample

    torch.cuda.reset_peak_memory_stats(device)
    latency = _timed(generate, device, repeats)
    return {"model": "sdxl", "steps": steps, "resolution": spec["resolution"], "latency_s": latency,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def project(train: dict, a100_per_h100: float, gpu_name: str) -> dict:
    s = PAPER_SCHEDULE
    hours = (train["stage1_step_s"] * s["stage1_iters"] + train["stage2_step_s_est"] * s["stage2_iters"]) \
        * s["gpus"] / 3600
    is_h100 = "H100" in gpu_name or "H200" in gpu_name
    return {"measured_gpu_hours": hours, "a100_hours": hours * a100_per_h100 if is_h100 else hours,
            "h100_hours": hours if is_h100 else hours / a100_per_h100}


def dry_run_section(rows: list[dict], argv) -> str:
    cmd = "python benchmarks/gpu_full_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["## Full-size cost on a GPU (not yet measured)", "",
             f"Command: `{cmd.strip()}` — {platform.platform()}, torch {torch.__version__}, "
             f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.", "",
             "No GPU was available when this was written: the script has not been run on one, so there are no "
             "step times, memory, latency or projected A100/H100-hours yet. The dry run below checks the public "
             "configs (built on the meta device) and prints what a GPU run measures. Run "
             "`python benchmarks/gpu_full_size.py --write` on a CUDA machine to fill this section.", "",
             "| model | UNet params (M) | LoRA rank | LoRA targets | LoRA params (M) | resolution | latents/GPU |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['unet_params_M']} | {r['lora_rank']} | {r['lora_targets']} | "
                     f"{r['lora_params_M']} | {r['resolution']} | {tuple(r['latent_shape'])} |")
    lines += ["", f"Paper schedule projected: {PAPER_SCHEDULE['stage1_iters']} stage-1 + "
              f"{PAPER_SCHEDULE['stage2_iters']} stage-2 iterations on {PAPER_SCHEDULE['gpus']} GPUs."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU: build configs on the meta device and print the plan")
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--sd15-batch", type=int, default=MODELS["sd15"]["batch"])
    p.add_argument("--sdxl-batch", type=int, default=MODELS["sdxl"]["batch"])
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--a100-per-h100", type=float, default=2.0,
                   help="assumed A100/H100 time ratio for projections (default 2.0: our assumption)")
    p.add_argument("--write", action="store_true", help="write its section of benchmarks/results/evaluate.md")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (use sd15, sdxl)")
    batches = {"sd15": args.sd15_batch, "sdxl": args.sdxl_batch}
    rows = plan(models, batches, args.rank)
    print("plan:")
    for r in rows:
        print("  " + json.dumps(r))
    print(f"  paper schedule: {json.dumps(PAPER_SCHEDULE)}; measure: MLCD LoRA step (bf16 base, fp32 LoRA), "
          "stage-2 step estimate, 4-step 1024px SDXL latency (fp16)")
    if args.dry_run:
        if args.write:
            update_section("gpu_full_size", dry_run_section(rows, argv))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    results = {"gpu": gpu, "date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}", "train": [],
               "a100_per_h100_assumed": args.a100_per_h100}
    for m in models:
        tr = measure_training(m, batches[m], args.rank, device, args.repeats)
        torch.cuda.empty_cache()
        tr.update(project(tr, args.a100_per_h100, gpu))
        results["train"].append(tr)
        print(json.dumps(tr))
    if "sdxl" in models:
        results["latency"] = measure_sdxl_latency(device, args.repeats)
        print(json.dumps(results["latency"]))
    if args.write:
        lines = ["## Full-size cost on a GPU", "",
                 f"Command: `python benchmarks/gpu_full_size.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
                 f" — {gpu}, {platform.platform()}, torch {torch.__version__}, {results['date']}.", "",
                 "| model | batch/GPU | stage-1 step s | stage-2 step s (est.) | peak GiB | GPU-h (4 GPUs, 12k+2k) |"
                 " A100-h | H100-h |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["train"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['stage1_step_s']:.3f} | {r['stage2_step_s_est']:.3f} | "
                         f"{r['peak_gib']:.1f} | {r['measured_gpu_hours']:.1f} | {r['a100_hours']:.1f} | "
                         f"{r['h100_hours']:.1f} |")
        if "latency" in results:
            lat = results["latency"]
            lines += ["", f"4-step SDXL 1024px, batch 1: {lat['latency_s'] * 1000:.0f} ms, peak {lat['peak_gib']:.1f}"
                      " GiB.", ""]
        lines.append(f"A100/H100 ratio assumed: {args.a100_per_h100}.")
        update_section("gpu_full_size", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
