"""Throughput of `tlcm synthesize` and its overhead over the teacher's raw UNet cost.

    python benchmarks/synthesize_throughput.py --teacher toy --records 64 --batch-size 16 --steps 25 --threads 2

Engine time: wall time of ``tlcm.data.synthesize`` (teacher already loaded, everything else included: prompt
loading, fingerprint, text encoding, scheduler, CFG, sharding, checksums, atomic writes, manifest). UNet cost: the
same number of UNet calls at the same batch sizes (CFG doubles the batch), timed alone on random inputs of the same
shapes: ``sum over batches of steps x t_unet(2 b)``. Overhead = engine / UNet - 1. Engine and UNet timings are
interleaved, ``--repeats`` times, and medians reported, because the benchmark machine may be shared. On a loaded
machine the two separate timings drift apart by 10-20%, so the script also times the UNet calls *inside* the engine's
run (forward hooks): engine time / in-UNet time is the overhead measured under identical load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _unet_cost(pipe, batches: list[int], steps: int, cfg: bool, latent_shape, cond_shape, added):
    """(wall, CPU) seconds for the UNet calls the engine makes: ``steps`` calls per batch, batch doubled by CFG."""
    per_eval, per_cpu = {}, {}
    for b in sorted(set(batches)):
        n = 2 * b if cfg else b
        x = torch.randn(n, *latent_shape, dtype=pipe.unet.dtype)
        e = torch.randn(n, *cond_shape, dtype=pipe.unet.dtype)
        kw = {}
        if added is not None:
            kw["added_cond_kwargs"] = {k: v[:1].repeat(n, *([1] * (v.dim() - 1))) for k, v in added.items()}
        with torch.no_grad():
            pipe.unet(x, 500, encoder_hidden_states=e, **kw)  # warm-up
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(steps):
                pipe.unet(x, 999 - 40 * i, encoder_hidden_states=e, **kw)
            per_eval[b] = (time.perf_counter() - t0) / steps
            per_cpu[b] = (time.process_time() - c0) / steps
    return sum(steps * per_eval[b] for b in batches), sum(steps * per_cpu[b] for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="toy")
    ap.add_argument("--prompts", default=None, help="default: 'toy' for the toy teacher, else generated prompts")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--solver", default="dpmpp")
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--records-per-shard", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from tlcm.data.synthesize import SynthesizeConfig, _latent_spec, synthesize
    from tlcm.models import encode_prompts, load_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="tlcm-bench-"))
    teacher = args.teacher
    if teacher.startswith("tiny-"):
        from tlcm.testing import save_tiny_pipeline

        teacher = str(save_tiny_pipeline(teacher.removeprefix("tiny-"), tmp / "teacher"))
    prompts = args.prompts or ("toy" if teacher == "toy" else None)
    if prompts is None:
        prompts = str(tmp / "prompts.txt")
        Path(prompts).write_text("\n".join(f"a photo of object {i} in scene {i % 7}" for i in range(4096)) + "\n")

    t0 = time.perf_counter()
    pipe = load_pipeline(teacher, device="cpu", dtype="fp32")
    load_s = time.perf_counter() - t0
    latent_shape, size = _latent_spec(pipe)
    cond = encode_prompts(pipe, ["x"], *size)
    cond_shape = tuple(cond.encoder_hidden_states.shape[1:])

    inside = {"wall": 0.0, "cpu": 0.0, "calls": 0}
    starts = []

    def pre(module, args, kwargs):
        starts.append((time.perf_counter(), time.process_time()))

    def post(module, args, kwargs, output):
        w, c = starts.pop()
        inside["wall"] += time.perf_counter() - w
        inside["cpu"] += time.process_time() - c
        inside["calls"] += 1

    # Time spent inside the UNet during the engine's own run: immune to load changes between two measurements.
    pipe.unet.register_forward_pre_hook(pre, with_kwargs=True)
    pipe.unet.register_forward_hook(post, with_kwargs=True)

    def engine(out: Path, n: int) -> float:
        cfg = SynthesizeConfig(teacher=teacher, prompts=prompts, out=str(out), num_records=n, solver=args.solver,
                               steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                               records_per_shard=args.records_per_shard, dtype="fp32", device="cpu", progress=False)
        inside.update(wall=0.0, cpu=0.0, calls=0)
        t, c = time.perf_counter(), time.process_time()
        synthesize(cfg, pipe=pipe)
        return time.perf_counter() - t, time.process_time() - c, dict(inside)

    engine(tmp / "warmup", min(args.batch_size, args.records))
    per = args.records_per_shard
    batches = []
    for lo in range(0, args.records, per):
        hi = min(args.records, lo + per)
        batches += [min(hi, b + args.batch_size) - b for b in range(lo, hi, args.batch_size)]
    cfg_on = args.guidance_scale > 1
    runs = []
    for r in range(args.repeats):
        e, ec, ins = engine(tmp / f"run{r}", args.records)
        u, uc = _unet_cost(pipe, batches, args.steps, cfg_on, latent_shape, cond_shape, cond.added_cond_kwargs)
        runs.append({"engine_s": e, "unet_s": u, "ratio": e / u, "engine_cpu_s": ec, "unet_cpu_s": uc,
                     "cpu_ratio": ec / uc, "in_unet_s": ins["wall"], "in_unet_calls": ins["calls"],
                     "insitu_ratio": e / ins["wall"]})
        print(f"  in-situ: {ins['calls']} UNet calls took {ins['wall']:.2f}s of the engine's {e:.2f}s "
              f"(ratio {e / ins['wall']:.3f})", flush=True)
        print(f"repeat {r}: engine {e:.2f}s (CPU {ec:.2f}s), UNet {u:.2f}s (CPU {uc:.2f}s), wall ratio {e / u:.3f}, "
              f"CPU ratio {ec / uc:.3f}", flush=True)
    keys = ("engine_s", "unet_s", "ratio", "engine_cpu_s", "unet_cpu_s", "cpu_ratio", "insitu_ratio")
    med = {k: statistics.median(x[k] for x in runs) for k in keys}
    result = {
        "teacher": args.teacher, "records": args.records, "batch_size": args.batch_size, "steps": args.steps,
        "solver": args.solver, "guidance_scale": args.guidance_scale, "threads": args.threads,
        "unet_evals": sum(args.steps * (2 * b if cfg_on else b) for b in batches),
        "unet_calls": args.steps * len(batches), "latent_shape": list(latent_shape),
        "records_per_s": args.records / med["engine_s"], "engine_s": med["engine_s"], "unet_s": med["unet_s"],
        "engine_over_unet": med["ratio"], "overhead_pct": 100 * (med["ratio"] - 1),
        "engine_cpu_s": med["engine_cpu_s"], "unet_cpu_s": med["unet_cpu_s"], "cpu_engine_over_unet": med["cpu_ratio"],
        "cpu_overhead_pct": 100 * (med["cpu_ratio"] - 1), "insitu_engine_over_unet": med["insitu_ratio"],
        "insitu_overhead_pct": 100 * (med["insitu_ratio"] - 1), "load_s": load_s, "runs": runs,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                   f"load average {os.getloadavg()[0]:.1f}",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(f"\n{result['records_per_s']:.2f} records/s; engine/UNet = {med['ratio']:.3f} "
          f"(overhead {result['overhead_pct']:.1f}%); CPU-time ratio {med['cpu_ratio']:.3f} "
          f"(overhead {result['cpu_overhead_pct']:.1f}%); in-situ ratio {med['insitu_ratio']:.3f} "
          f"(overhead {result['insitu_overhead_pct']:.1f}%); {math.ceil(args.records / args.batch_size)} batches")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
