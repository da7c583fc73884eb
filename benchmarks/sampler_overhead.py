"""Sampler overhead: end-to-end pipeline time over the time spent inside the networks, TLCMScheduler vs LCMScheduler.

For each scheduler, batch size and step count the pipeline generates images (no CFG: guidance 1, as a distilled
student is sampled) while forward hooks time every call of the UNet, the VAE decoder and the text encoder(s), and a
wrapper times ``scheduler.step``. Reported per configuration (median of ``--repeats`` runs after a warm-up):

- ``e2e_ms``: wall time of ``pipe(...)``;
- ``nets_ms``: UNet + VAE decode + text encoder time;
- ``overhead``: ``e2e / nets - 1`` (everything that is not a network: pipeline Python, latents set-up, image
  post-processing, and the scheduler);
- ``step_ms``: total time inside ``scheduler.step``; ``step_share``: ``step / nets``, the scheduler's own overhead.

The target is TLCMScheduler within 3% of the networks' time and no slower than diffusers' LCMScheduler.

    python benchmarks/sampler_overhead.py                       # toy teacher, CPU
    python benchmarks/sampler_overhead.py --model PATH --device cuda --height 1024 --width 1024
    python benchmarks/sampler_overhead.py --model sd15-random --height 256 --width 256   # SD1.5-size networks, CPU
    python benchmarks/sampler_overhead.py --write               # also (re)write its section of results/evaluate.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section  # noqa: E402


class NetTimer:
    """Wall time inside module forwards (synchronising CUDA at the edges) and inside ``scheduler.step``."""

    def __init__(self, modules, device):
        self.device = device
        self.total = 0.0
        self.step_total = 0.0
        self._t0 = {}
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, module, args):
        self._sync()
        self._t0[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self._sync()
        self.total += time.perf_counter() - self._t0.pop(id(module))

    def wrap_step(self, scheduler):
        original = scheduler.step

        def timed(*a, **k):
            self._sync()
            t0 = time.perf_counter()
            out = original(*a, **k)
            self._sync()
            self.step_total += time.perf_counter() - t0
            return out

        scheduler.step = timed

    def close(self):
        for h in self._handles:
            h.remove()


def make_scheduler(name: str, config):
    from diffusers import LCMScheduler

    if name == "lcm":
        return LCMScheduler.from_config(config)
    from tlcm import TLCMScheduler

    return TLCMScheduler.from_config(config, mode="lcm")


def measure(pipe, scheduler_name, batch, steps, repeats, height, width, device):
    pipe.scheduler = make_scheduler(scheduler_name, pipe.scheduler.config)
    nets = [pipe.unet, pipe.vae.decoder if hasattr(pipe.vae, "decoder") else pipe.vae]
    nets += [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if m is not None]
    if hasattr(pipe.vae, "post_quant_conv") and pipe.vae.post_quant_conv is not None:
        nets.append(pipe.vae.post_quant_conv)
    prompts = ["a red circle in the top left on a black background"] * batch
    rows = []
    for r in range(repeats + 1):
        timer = NetTimer(nets, device)
        timer.wrap_step(pipe.scheduler)
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=1.0, generator=gens, height=height,
             width=width, output_type="pil")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        e2e = time.perf_counter() - t0
        timer.close()
        del pipe.scheduler.step  # drop the instance wrapper
        if r > 0:  # the first run is the warm-up
            rows.append((e2e, timer.total, timer.step_total))
    e2e = statistics.median(r[0] for r in rows)
    nets_t = statistics.median(r[1] for r in rows)
    step_t = statistics.median(r[2] for r in rows)
    return {"scheduler": scheduler_name, "batch": batch, "steps": steps, "e2e_ms": e2e * 1e3,
            "nets_ms": nets_t * 1e3, "overhead": e2e / nets_t - 1, "step_ms": step_t * 1e3,
            "step_share": step_t / nets_t}


def table(rows) -> str:
    lines = ["| scheduler | batch | steps | end-to-end ms | networks ms | overhead | scheduler.step ms | step / nets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheduler']} | {r['batch']} | {r['steps']} | {r['e2e_ms']:.1f} | {r['nets_ms']:.1f} | "
                     f"{100 * r['overhead']:.1f}% | {r['step_ms']:.2f} | {100 * r['step_share']:.2f}% |")
    return "\n".join(lines)


def random_sd15_pipeline(device):
    """Full-size SD1.5 networks (UNet, VAE, CLIP ViT-L text encoder from their public configs) with random weights:
    the real per-step network cost, offline. The tokenizer is our byte-level test tokenizer (77 tokens), which only
    changes which token ids go in."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from gpu_full_size import CLIP_L, SD15_UNET, VAE, build_unet
    from transformers import CLIPTextConfig, CLIPTextModel

    from tlcm.models import STABLE_DIFFUSION_SCHEDULER_CONFIG
    from tlcm.testing import tiny_clip_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        unet=build_unet(SD15_UNET, device="cpu"),
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        tokenizer=tiny_clip_tokenizer(model_max_length=77),
        scheduler=DDIMScheduler.from_config(STABLE_DIFFUSION_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="toy",
                   help="pipeline (default: the toy teacher); sd15-random: full-size SD1.5 networks, random weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--steps", default="1,4,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write its section of benchmarks/results/evaluate.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tlcm.models import load_pipeline, resolve_device

    device = resolve_device(args.device)
    pipe = random_sd15_pipeline(device) if args.model == "sd15-random" else load_pipeline(args.model, device=device)
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        for steps in [int(s) for s in args.steps.split(",")]:
            for name in ("lcm", "tlcm"):
                rows.append(measure(pipe, name, batch, steps, args.repeats, args.height, args.width, device))
                r = rows[-1]
                print(f"{name:5s} batch {batch:3d} steps {steps}: e2e {r['e2e_ms']:.1f} ms, nets {r['nets_ms']:.1f} "
                      f"ms, overhead {100 * r['overhead']:.1f}%, step {r['step_ms']:.2f} ms", flush=True)
    text = table(rows)
    print(text)
    if args.write:
        cmd = "python benchmarks/sampler_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        if device.type == "cuda":
            machine += f", {torch.cuda.get_device_name(device)}"
        section = "sampler_overhead" if args.model == "toy" else f"sampler_overhead_{args.model}"
        update_section(section,
            f"## Sampler overhead ({args.model})\n\n"
            f"Command: `{cmd.strip()}` — model {args.model}, device {device}; {machine}; "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}. Median of {args.repeats} runs after a warm-up, "
            "guidance 1 (no CFG).\n\n"
            "`overhead` = end-to-end pipeline time / (UNet + VAE decoder + text encoder time) - 1: everything that "
            "is not a network (diffusers' pipeline Python, latents, image post-processing, the scheduler). "
            "`step / nets` isolates the scheduler: time in `scheduler.step` over network time.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
