"""The acceptance properties of a scenes-world (v4) teacher, measured by ``tlcm toy build`` into its provenance.

1. **The teacher is good**: alignment (fraction of caption claims the metrics classifier confirms) at 50 DDIM steps
   with CFG on held-in and held-out prompts (bar 0.9), per claim kind, and k-NN recall against real images (bar 0.9).
2. **The metrics mean something**: toy-FID against data of the teacher next to two floors, real vs real (two
   independent record sets) and the VAE round trip of real images (which must score *below* the teacher: a model on
   these latents can reach it); per-prompt diversity (mean pairwise feature distance among several seeds of one
   prompt) of the teacher and of real images, so a collapsing sampler is caught.
3. **Distillation matters**: every training-free sampler of the undistilled teacher (LCM and TCD x0 re-noising, DDIM,
   DPM-Solver++, Euler; with and without CFG) at 1 and 2 steps scores toy-FID against the teacher's own DPM-Solver++
   25-step samples at least 10x and 5x that of DPM-Solver++ at 8 steps (the bars), and its 1-step samples are blurred
   (a grid is written).

Real images for held-in/held-out prompts are the dataset records whose captions those prompts are, i.e. exact samples
of the world's conditional distribution (no re-rendering approximation).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tlcm.math.manifold import per_prompt_diversity
from tlcm.toy import common, scenes

BASELINE_SCHEDULERS = ("lcm", "tcd", "ddim", "dpmpp", "euler")
BARS = {"alignment": 0.9, "recall": 0.9, "ratio_1_step": 10.0, "ratio_2_step": 5.0}


def _records(n: int, seed: int, split: str):
    recs = scenes.sample_records(n, seed, split)
    return [r[1] for r in recs], common.to_tensor([r[0] for r in recs])


def _scheduler(name: str, base_config):
    from tlcm.evaluate.sweep import SchedulerSpec, make_scheduler

    return make_scheduler(SchedulerSpec.parse(name), base_config, timestep_spacing="trailing")


def evaluate_scenes_teacher(pipe, metrics, n_heldin: int = 300, n_heldout: int = 100, steps: int = 50,
                            guidance_scale: float = 5.0, seed: int = 0, diversity_prompts: int = 32,
                            diversity_seeds: int = 4, out_dir: str | Path | None = None,
                            progress: bool = True) -> dict:
    """Properties 1 and 2 (see the module docstring) for a v4 teacher pipeline and its metrics."""
    from tlcm.toy.autoencoder import reconstruct
    from tlcm.toy.teacher import sample_pipeline

    result: dict = {"steps": steps, "guidance_scale": guidance_scale, "scheduler": "ddim"}
    for split, n in (("train", n_heldin), ("heldout", n_heldout)):
        if n <= 0:
            continue
        key = "heldin" if split == "train" else "heldout"
        prompts, real_a = _records(n, seed + 500, split)
        _, real_b = _records(n, seed + 501, split)
        t0 = time.perf_counter()
        gen = sample_pipeline(pipe, prompts, steps, guidance_scale, seed=seed, scheduler="ddim", progress=progress)
        seconds = time.perf_counter() - t0
        # the VAE floor: real images through the teacher's VAE and back; alignment on the images the prompts describe
        # (real_a), toy-FID on an independent set (real_b) against real_a, like real vs real
        recon_a, recon = reconstruct(pipe.vae, real_a), reconstruct(pipe.vae, real_b)
        precision, recall = metrics.precision_recall(real_a, gen)
        result[key] = {
            "prompts": n,
            "alignment": round(metrics.alignment(gen, prompts), 4),
            "alignment_per_claim": metrics.alignment_per_attribute(gen, prompts),
            # which attribute of the object claims fails (real images next to it: what the classifier can read)
            "object_attributes": metrics.object_attribute_rates(gen, prompts),
            "object_attributes_real": metrics.object_attribute_rates(real_a, prompts),
            "alignment_real": round(metrics.alignment(real_a, prompts), 4),
            "alignment_vae_roundtrip": round(metrics.alignment(recon_a, prompts), 4),
            "toy_fid": round(metrics.toy_fid(gen, real_a), 4),
            "toy_fid_real_vs_real": round(metrics.toy_fid(real_b, real_a), 4),
            "toy_fid_vae_roundtrip": round(metrics.toy_fid(recon, real_a), 4),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "sample_seconds": round(seconds, 1),
        }
        if out_dir is not None:
            common.save_grid(gen[:64], Path(out_dir) / f"samples_{key}.png", nrow=8, scale=3)
            common.atomic_write_text(Path(out_dir) / f"samples_{key}.txt", "\n".join(prompts[:64]) + "\n")
    # per-prompt diversity: teacher vs real images drawn for the same prompts
    prompts = scenes.prompts(diversity_prompts, seed + 502, "train")
    repeated = [p for p in prompts for _ in range(diversity_seeds)]
    gen = torch.cat([sample_pipeline(pipe, prompts, steps, guidance_scale, seed=seed + 1000 * j, scheduler="ddim")
                     for j in range(diversity_seeds)])  # seed-major: reorder to prompt-major below
    gen = gen.view(diversity_seeds, diversity_prompts, *gen.shape[1:]).transpose(0, 1).flatten(0, 1)
    real = common.to_tensor(scenes.render_prompts(repeated, seed=seed + 503))
    groups = [range(i * diversity_seeds, (i + 1) * diversity_seeds) for i in range(diversity_prompts)]
    result["diversity"] = {
        "prompts": diversity_prompts,
        "seeds": diversity_seeds,
        "teacher": round(per_prompt_diversity(metrics.features(gen), groups), 4),
        "real": round(per_prompt_diversity(metrics.features(real), groups), 4),
    }
    result["diversity"]["ratio"] = round(result["diversity"]["teacher"] / result["diversity"]["real"], 4)
    return result


def distillation_matters(pipe, metrics, n_prompts: int = 500, guidance_scale: float = 5.0, seed: int = 0,
                         steps: tuple[int, ...] = (1, 2, 4), reference_steps: int = 25, ceiling_steps: int = 8,
                         out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Property 3 (see the module docstring): a table of every training-free sampler of the undistilled teacher,
    toy-FID against its DPM-Solver++ ``reference_steps`` samples, and the ratios the bars check."""
    from tlcm.toy.teacher import sample_pipeline

    prompts, _ = _records(n_prompts, seed + 600, "train")
    base = dict(pipe.scheduler.config)
    original = pipe.scheduler

    def run(name: str, n_steps: int, g: float) -> torch.Tensor:
        return sample_pipeline(pipe, prompts, n_steps, g, seed=seed, scheduler=_scheduler(name, base))

    reference = run("dpmpp", reference_steps, guidance_scale)
    rows = []

    def score(name: str, n_steps: int, g: float, images: torch.Tensor) -> dict:
        row = {"sampler": name, "steps": n_steps, "guidance": g, "nfe": n_steps * (2 if g > 1 else 1),
               "toy_fid_teacher": round(metrics.toy_fid(images, reference), 3),
               "alignment": round(metrics.alignment(images, prompts), 4)}
        rows.append(row)
        return row

    ceiling = score("dpmpp", ceiling_steps, guidance_scale, run("dpmpp", ceiling_steps, guidance_scale))
    one_step: dict = {}
    for n_steps in steps:
        for name in BASELINE_SCHEDULERS:
            for g in sorted({1.0, float(guidance_scale)}):
                images = run(name, n_steps, g)
                row = score(name, n_steps, g, images)
                if n_steps == 1 and (not one_step or row["toy_fid_teacher"] < one_step["row"]["toy_fid_teacher"]):
                    one_step = {"row": row, "images": images[:16]}
    pipe.scheduler = original
    best = {}
    for n_steps in steps:
        cands = [r for r in rows if r["steps"] == n_steps and r is not ceiling]
        best[n_steps] = min(cands, key=lambda r: r["toy_fid_teacher"])
    denom = max(ceiling["toy_fid_teacher"], 1e-9)
    result = {
        "prompts": n_prompts,
        "reference": f"dpmpp {reference_steps} steps, guidance {guidance_scale:g}",
        "ceiling": ceiling,
        "best": {str(k): v for k, v in best.items()},
        "ratios": {f"{k}_step": round(v["toy_fid_teacher"] / denom, 2) for k, v in best.items()},
        "rows": rows,
    }
    if out_dir is not None and one_step:
        both = torch.stack([reference[:16], one_step["images"]], 1).flatten(0, 1)
        common.save_grid(both, Path(out_dir) / "one_step_vs_reference.png", nrow=8, scale=3)
        r = one_step["row"]
        common.atomic_write_text(
            Path(out_dir) / "one_step_vs_reference.txt",
            f"pairs: left = teacher DPM-Solver++ {reference_steps} steps (g {guidance_scale:g}), right = best 1-step "
            f"training-free sampler ({r['sampler']}, g {r['guidance']:g}, toy-FID vs teacher {r['toy_fid_teacher']})\n"
            + "\n".join(prompts[:16]) + "\n")
    return result


def check_bars(evaluation: dict) -> dict:
    """Which acceptance bars a provenance evaluation meets (``{bar: (value, threshold, met)}``)."""
    out = {}
    for key in ("heldin", "heldout"):
        if key in evaluation:
            v = evaluation[key]["alignment"]
            out[f"alignment_{key}"] = (v, BARS["alignment"], v >= BARS["alignment"])
    if "heldin" in evaluation:
        v = evaluation["heldin"]["recall"]
        out["recall_heldin"] = (v, BARS["recall"], v >= BARS["recall"])
        e = evaluation["heldin"]
        out["vae_floor_below_teacher"] = (e["toy_fid_vae_roundtrip"], e["toy_fid"],
                                          e["toy_fid_vae_roundtrip"] < e["toy_fid"])
    dm = evaluation.get("distillation_matters")
    if dm:
        for n, bar in ((1, BARS["ratio_1_step"]), (2, BARS["ratio_2_step"])):
            v = dm["ratios"].get(f"{n}_step")
            if v is not None:
                out[f"ratio_{n}_step"] = (v, bar, v >= bar)
    return {k: {"value": v, "threshold": t, "met": bool(m)} for k, (v, t, m) in out.items()}


__all__ = ["check_bars", "distillation_matters", "evaluate_scenes_teacher"]
