"""Training at the network's speed: the step-cost profile of each recipe, and old-vs-new step times side by side.

``profile``: for each model (the toy teacher; SD1.5- and SDXL-shaped random-weight UNets at a small latent size on
CPU, full size on a GPU), recipe (lcm, mlcd, tlcm stage 2; on the toy also the DMD+GAN and reward phases) and
student (LoRA, full UNet), run ``tlcm.train.loop.distill`` with ``profile_steps`` (:mod:`tlcm.train.profile`):
every network evaluation of a step is replayed alone on the same inputs and timed, and ``step / networks`` is the
whole step over their sum (1.0: the loop adds nothing). The first step is a warm-up and is not profiled. Times are
process CPU time at one torch thread (``--threads``), so a shared machine disturbs them less than wall time.

``compare``: the same ``tlcm distill`` commands (toy teacher, real shards from ``--data`` or synthesized into WORK)
run by the code under test and by ``--base`` (its ``src/`` exported with ``git archive`` into WORK), interleaved,
each twice (``--short`` and ``--long`` steps): CPU s/step = difference of the child's user+system time
over the difference of steps (loading and export cancel), median over ``--repeats``. The exported adapters of equal
commands are compared byte for byte (the changes must not change results where the maths is unchanged).

    python benchmarks/train_efficiency.py profile --models toy --write
    python benchmarks/train_efficiency.py profile --models sd15 --students lora --latent 16 --write
    python benchmarks/train_efficiency.py compare --base 0a54267 --batch 16 --write
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_efficiency.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402
from _stages import synthesized  # noqa: E402

HEADER = ("# Training at the network's speed (issue #14 item 1)\n\n"
          "Written by `benchmarks/train_efficiency.py`; each section names its command, machine and date.\n")

RECIPES = ("lcm", "mlcd", "tlcm")
TOY_PHASES = ("tlcm-dmd", "tlcm-reward")  # the toy presets of the paper's later phases (DMD+GAN, preference)


# ----------------------------------------------------------------------------------------------------- results file


def update_section(name: str, text: str) -> None:
    """Replace (or append) the ``<!-- BEGIN name -->`` section of results/train_efficiency.md."""
    _results.update_section(name, text, RESULTS, HEADER)


def command_line() -> str:
    """This run's command, for the results file."""
    return "python benchmarks/train_efficiency.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def machine() -> str:
    import torch

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}")


# ------------------------------------------------------------------------------------------------------- profile


def _pipeline(model: str, latent: int, device):
    """The teacher pipeline: the toy teacher, or an SD1.5/SDXL-shaped random-weight one at ``latent`` size."""
    import torch

    if model == "toy":
        from tlcm.models import load_pipeline

        pipe = load_pipeline("toy", device="cpu", dtype=torch.float32)
        return pipe, int(pipe.unet.config.sample_size)
    from gpu_full_size import Model

    m = Model(model, device, tiny=False)
    m.unet_config = {**m.unet_config, "sample_size": latent}
    return m.pipeline(m.unet()), latent


def profile_run(model: str, preset: str, student: str, steps: int, latent: int, batch: int | None, work: Path,
                init_lora: Path | None, overrides: list[str], device) -> dict:
    import torch

    from tlcm.train.config import apply_overrides, resolve_config
    from tlcm.train.loop import distill

    pipe, size = _pipeline(model, latent, device)
    cfg = resolve_config(f"{model}-{preset}")
    out = work / f"{model}-{preset}-{student}"
    sets = [f"output_dir={out}", f"max_steps={steps}", f"student={student}", "validation_prompts=[]",
            "checkpointing_steps=0", f"profile_steps={steps - 1}", f"resolution={size * pipe.vae_scale_factor}",
            f"device={device.type}", "teacher=" + ("toy" if model == "toy" else f"random-{model}")]
    if batch:
        sets.append(f"batch_size={batch}")
    if model != "toy":
        sets.append("mixed_precision=" + ("bf16" if device.type == "cuda" else "no"))
    apply_overrides(cfg, sets + overrides)
    if init_lora is not None and student == "lora":
        cfg.init_lora = str(init_lora)
    g = torch.Generator().manual_seed(0)
    n = 2 * cfg.batch_size
    latents = torch.randn(n, int(pipe.unet.config.in_channels), size, size, generator=g)
    prompts = ["a red circle", "a blue square", "a green triangle", "a photo of a cat"]
    records = [{"latents": latents[i], "prompt": prompts[i % 4], "negative_prompt": ""} for i in range(n)]
    distill(cfg, pipe=pipe, dataset_fn=lambda rank, world: records, log_with=None, progress=False, overwrite=True)
    summary = json.loads((out / "train_summary.json").read_text())
    prof = summary["step_profile"]
    return {"model": model, "recipe": preset, "student": student, "batch": cfg.batch_size,
            "latent": size, "step_s": prof["step_s"], "networks_s": prof["networks_s"],
            "ratio": prof["step_over_networks"], "networks": prof["networks"], "clock": prof["clock"],
            "steps": len(prof["profiled_steps"]), "out": str(out)}


def profile_table(rows: list[dict]) -> str:
    lines = ["| model | latent | recipe | student | batch | step s | networks s | step / networks | networks (s) |",
             "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        nets = ", ".join(f"{k} {v:.3f}" for k, v in r["networks"].items())
        lines.append(f"| {r['model']} | {r['latent']}x{r['latent']} | {r['recipe']} | {r['student']} | {r['batch']} | "
                     f"{r['step_s']:.3f} | {r['networks_s']:.3f} | **{r['ratio']:.2f}** | {nets} |")
    return "\n".join(lines)


def cmd_profile(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(args.work or tempfile.mkdtemp(prefix="tlcm-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    overrides = list(args.set)
    for model in args.models.split(","):
        recipes = args.recipes.split(",") + (list(TOY_PHASES) if model == "toy" and args.phases else [])
        for student in args.students.split(","):
            init = None
            for preset in recipes:
                if student == "full" and preset in TOY_PHASES:
                    continue  # the later phases train the LoRA of the earlier ones
                if preset.startswith("tlcm") and student == "lora" and init is None:
                    init = Path(profile_run(model, "mlcd", "lora", 1 + 1, args.latent, args.batch, work / "init",
                                            None, overrides, device)["out"])
                    gc.collect()
                t0 = time.time()
                row = profile_run(model, preset, student, args.steps + 1, args.latent, args.batch, work, init,
                                  overrides, device)
                row["wall_s"] = round(time.time() - t0, 1)
                gc.collect()  # each run builds its own teacher: at SDXL size two alive at once exceed 23 GB
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = profile_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.write:
        cmd = command_line()
        name = "profile-" + "-".join(args.models.split(","))
        update_section(name, f"## Step-cost profile: {args.models}\n\nCommand: `{cmd}` — {machine()}, "
                       f"{args.threads} torch thread(s); clock: {rows[0]['clock'] if rows else '-'}; median over "
                       f"{args.steps} profiled steps after one warm-up step.\n\n" + table + "\n")
    return 0


# ------------------------------------------------------------------------------------------------ lora vs full

LORA_VS_FULL = (
    "Measured on one UNet (a full student's run holds six UNet-sized tensor sets: student, gradients, two AdamW "
    "moments, teacher, EMA target; ~21 GB at SD1.5 in float32, more than this machine has). LoRA step = LoRA fwd+bwd "
    "+ base fwd at 2B (teacher) + LoRA fwd (target) + AdamW on the LoRA; full step = full fwd+bwd + base fwd at 2B + "
    "base fwd (EMA target) + AdamW and EMA over every weight (timed on a 50 M slice and scaled by the count: both are "
    "elementwise). The profile's step / networks says what the loop adds to either.")


def _median_cpu(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def cmd_lora_vs_full(args) -> int:
    """An lcm step of a LoRA and of a full student at SD size, from the networks each must run (``LORA_VS_FULL``
    says which, and why one UNet stands in for a full run)."""
    import torch
    from gpu_full_size import Model

    from tlcm.models import Conditioning, encode_prompts
    from tlcm.train.config import resolve_config
    from tlcm.train.student import build_networks

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    m = Model(args.model, device, tiny=False)
    m.unet_config = {**m.unet_config, "sample_size": args.latent}
    unet = m.unet()
    pipe = m.pipeline(unet)
    size = args.latent * pipe.vae_scale_factor
    b = args.batch
    cond1 = encode_prompts(pipe, ["a photo of a cat"], size, size)
    cond, cond2 = Conditioning.cat([cond1] * b), Conditioning.cat([cond1] * (2 * b))
    g = torch.Generator().manual_seed(0)
    z, z2 = torch.randn(b, 4, args.latent, args.latent, generator=g), torch.randn(2 * b, 4, args.latent, args.latent,
                                                                                    generator=g)
    t, t2 = torch.full((b,), 499), torch.full((2 * b,), 499)
    n_all = sum(p.numel() for p in unet.parameters())
    row = {"model": args.model, "latent": args.latent, "batch": b, "parameters_M": round(n_all / 1e6, 1)}
    with torch.no_grad():
        row["base fwd (2B, teacher)"] = _median_cpu(lambda: unet(z2, t2, **cond2.unet_kwargs()), args.repeats)
        row["base fwd (B, EMA target)"] = _median_cpu(lambda: unet(z, t, **cond.unet_kwargs()), args.repeats)
    unet.requires_grad_(True)

    def fwd_bwd(params):
        def run():
            unet(z, t, **cond.unet_kwargs()).sample.float().pow(2).mean().backward()
            for p in params:
                p.grad = None
        return run

    row["full fwd+bwd"] = _median_cpu(fwd_bwd(list(unet.parameters())), args.repeats)
    # AdamW and EMA over every weight: timed on a slice (elementwise, so linear in the count)
    chunk = min(n_all, 50_000_000)
    w = torch.nn.Parameter(torch.randn(chunk, generator=g))
    w.grad = torch.randn(chunk, generator=g)
    opt = torch.optim.AdamW([w], lr=1e-4)
    row["AdamW (all weights)"] = _median_cpu(opt.step, args.repeats) * n_all / chunk
    ema = torch.randn(chunk, generator=g)
    row["EMA (all weights)"] = _median_cpu(lambda: ema.lerp_(w.detach(), 0.05), args.repeats) * n_all / chunk
    opt = w = ema = None  # free the slice
    unet.requires_grad_(False)
    cfg = resolve_config(f"{args.model}-lcm")
    nets = build_networks(unet, cfg)
    lora = nets.student_parameters()
    row["lora_parameters_M"] = round(sum(p.numel() for p in lora) / 1e6, 1)
    row["LoRA fwd+bwd"] = _median_cpu(fwd_bwd(lora), args.repeats)
    with torch.no_grad():
        row["LoRA fwd (B, target)"] = _median_cpu(lambda: unet(z, t, **cond.unet_kwargs()), args.repeats)
    for p in lora:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(lora, lr=1e-4)
    row["AdamW (LoRA)"] = _median_cpu(opt.step, args.repeats)
    row["lora_step_s"] = (row["LoRA fwd+bwd"] + row["base fwd (2B, teacher)"] + row["LoRA fwd (B, target)"]
                          + row["AdamW (LoRA)"])
    row["full_step_s"] = (row["full fwd+bwd"] + row["base fwd (2B, teacher)"] + row["base fwd (B, EMA target)"]
                          + row["AdamW (all weights)"] + row["EMA (all weights)"])
    row["full_over_lora"] = row["full_step_s"] / row["lora_step_s"]
    print(json.dumps(row, indent=1))
    keys = [k for k in row if k not in ("model", "latent", "batch", "parameters_M", "lora_parameters_M")]
    table = "| quantity | CPU s |\n|---|---:|\n" + "\n".join(
        f"| {k} | {row[k]:.3f} |" for k in keys if isinstance(row[k], float))
    if args.write:
        cmd = command_line()
        update_section(f"lora-vs-full-{args.model}", f"## LoRA vs full student at {args.model} size (lcm step, from "
                       f"its networks)\n\nCommand: `{cmd}` — {machine()}, {args.threads} torch thread(s), process "
                       f"CPU time, median of {args.repeats}. {row['parameters_M']} M UNet parameters, "
                       f"{row['lora_parameters_M']} M LoRA parameters (the {args.model}-lcm preset), batch {b}, "
                       f"{args.latent}x{args.latent} latents. {LORA_VS_FULL}"
                       f"\n\n" + table + "\n")
    return 0


# ------------------------------------------------------------------------------------------------------- compare


def _worktree(base: str, root: Path) -> Path:
    """The base commit's ``src/`` exported into ``root`` (``git archive``: the repository's worktrees untouched)."""
    path = root / f"base-{base[:12]}"
    if not (path / "src" / "tlcm").is_dir():
        tmp = root / f".tmp-base-{base[:12]}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", base, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        os.replace(tmp, path)
    return path


def _run_distill(src: Path, args, recipe: str, steps: int, out: Path, data: Path, init: Path | None,
                 extra: list[str] = ()) -> float:
    """``tlcm distill`` by the code in ``src``; the child's CPU seconds (user + system)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "tlcm.cli", "distill", "--preset", f"toy-{recipe}", "--data", str(data),
           "--output-dir", str(out), "--max-steps", str(steps), "--no-progress", "--set", f"batch_size={args.batch}",
           "--set", "checkpointing_steps=0", "--set", "validation_steps=0", "--set", "validation_prompts=[]",
           *[x for s in [*args.set, *extra] for x in ("--set", s)]]
    if init is not None:
        cmd += ["--set", f"init_lora={init}"]
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def cmd_compare(args) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="tlcm-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    base = subprocess.run(["git", "-C", str(REPO), "rev-parse", args.base], check=True, capture_output=True,
                          text=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True,
                                text=True).stdout.strip())
    codes = {"base": _worktree(base, work), "new": REPO}
    data = Path(args.data) if args.data else work / "data"
    if not synthesized(data)():  # none yet, or a killed synthesize: (re)run it, it resumes
        from tlcm.toy import world_of_model
        from tlcm.toy.worlds import get_world

        prompts = work / "prompts.txt"
        prompts.write_text("\n".join(get_world(world_of_model("toy")).prompts(args.records, seed=0)) + "\n")
        subprocess.run([sys.executable, "-m", "tlcm.cli", "synthesize", "--teacher", "toy", "--prompts", str(prompts),
                        "--out", str(data), "--num-records", str(args.records), "--no-dedupe", "--steps", "8",
                        "--guidance-scale", "4.0", "--no-progress"], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    rows = []
    for recipe in args.recipes.split(","):
        init = None
        if recipe == "tlcm":  # stage 2 starts from a stage-1 LoRA: one, made by the base code, for both
            init = work / "init-mlcd"
            if not (init / "adapter").is_dir():
                _run_distill(codes["base"], args, "mlcd", 2, init, data, None)
        per = {k: [] for k in codes}
        same = True
        for rep in range(args.repeats):
            for name in (codes if rep % 2 == 0 else list(reversed(list(codes)))):  # interleaved, order alternating
                extra = args.new_set if name == "new" else []
                short = _run_distill(codes[name], args, recipe, args.short, work / f"{name}-{recipe}-s", data, init,
                                     extra)
                long = _run_distill(codes[name], args, recipe, args.long, work / f"{name}-{recipe}-l", data, init,
                                    extra)
                per[name].append((long - short) / (args.long - args.short))
            same = same and _adapter_bytes(work / f"base-{recipe}-l") == _adapter_bytes(work / f"new-{recipe}-l")
        row = {"recipe": recipe, "batch": args.batch, "base_s": statistics.median(per["base"]),
               "new_s": statistics.median(per["new"]), "all": per, "adapters_identical": same}
        row["speedup"] = row["base_s"] / row["new_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = ["| recipe | batch | base CPU s/step | new CPU s/step | speedup | exported adapters byte-identical |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "yes" if r["adapters_identical"] else ("no (options change rounding)" if args.new_set else "no")
        lines.append(f"| {r['recipe']} | {r['batch']} | {r['base_s']:.3f} | {r['new_s']:.3f} | "
                     f"**{r['speedup']:.2f}x** | {same} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        cmd = command_line()
        name = "compare" + ("-" + "-".join(args.new_set) if args.new_set else "")
        update_section(name, f"## Old vs new, side by side (toy teacher, batch {args.batch}"
                       f"{', new with ' + ', '.join(args.new_set) if args.new_set else ''})\n\n"
                       f"Command: `{cmd}` — {machine()}, {args.threads} thread(s). Base {base[:10]}, new "
                       f"{head[:10]}{' + uncommitted changes' if dirty else ''}. CPU s/step = (CPU({args.long} steps) "
                       f"- CPU({args.short} steps)) / {args.long - args.short} of the `tlcm distill` child "
                       f"(user + system), median of {args.repeats} interleaved repeats.\n\n" + table + "\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("profile", help="step / networks per model, recipe and student")
    a.add_argument("--models", default="toy", help="comma list of toy, sd15, sdxl")
    a.add_argument("--recipes", default=",".join(RECIPES))
    a.add_argument("--students", default="lora,full")
    a.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                   help="on the toy, also the DMD+GAN and reward phases (toy-tlcm-dmd, toy-tlcm-reward)")
    a.add_argument("--steps", type=int, default=3, help="profiled steps (after one warm-up step)")
    a.add_argument("--batch", type=int, default=0, help="batch size (0: the preset's; the issue asks 1 at SD size)")
    a.add_argument("--latent", type=int, default=16, help="latent size of the SD-shaped UNets (64/128 = full size)")
    a.add_argument("--device", default="cpu")
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (repeatable)")
    a.add_argument("--work")
    a.add_argument("--json")
    a.add_argument("--write", action="store_true", help="write its section of benchmarks/results/train_efficiency.md")
    c = sub.add_parser("compare", help="toy s/step of the base commit and this one, side by side")
    c.add_argument("--base", required=True, help="the commit before the changes (e.g. main's)")
    c.add_argument("--recipes", default=",".join(RECIPES))
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--short", type=int, default=2)
    c.add_argument("--long", type=int, default=6)
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument("--records", type=int, default=64)
    c.add_argument("--data", help="existing toy shards (default: synthesize into WORK/data)")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--set", action="append", default=[], help="extra config override for both (repeatable)")
    c.add_argument("--new-set", action="append", default=[],
                   help="config override for the new code only (an option the base does not know; repeatable)")
    c.add_argument("--work")
    c.add_argument("--write", action="store_true")
    f = sub.add_parser("lora-vs-full", help="an lcm step of a LoRA and a full student at SD size, from its networks")
    f.add_argument("--model", default="sd15")
    f.add_argument("--latent", type=int, default=16)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--repeats", type=int, default=3)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    return {"profile": cmd_profile, "compare": cmd_compare, "lora-vs-full": cmd_lora_vs_full}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
