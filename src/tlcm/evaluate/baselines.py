"""The honest baseline of a distillation table: the *undistilled* teacher, sampled without any training.

A student is a LoRA plus a few-step sampler (its ``scheduler/scheduler_config.json``: LCM/TCD x0-re-noising,
segments). Part of what it scores may come from the sampler alone. So every student gets a **baseline model**: the
base pipeline with no LoRA, sampled with that student's own scheduler at the student's step counts, at g = 1 (no CFG)
and at the teacher's CFG scales. Students whose saved schedulers resolve to the same config share one baseline
(:func:`baseline_models`). The name says what it is: ``teacher+NAME-sampler`` (NAME = the first student using it).

The **training-free rows** are the teacher's own ODE solvers (with and without CFG) and these baselines. For each
quality metric, :func:`best_training_free` picks the best training-free row

- at each step count (*equal steps*: the issue's bars), and
- within each student's network-evaluation budget (*equal NFE*: rows with ``nfe <= the student's nfe``; CFG costs two
  evaluations per step, so a 2-step student meets the 1-step CFG teacher and the 2-step g = 1 rows),

and :func:`add_ratios` writes each student row's standing against both: ``KEY_ratio_tf`` / ``KEY_ratio_tf_nfe`` =
student / best for lower-is-better metrics (FIDs: below 1 beats every training-free sampler), ``KEY_delta_tf`` /
``KEY_delta_tf_nfe`` = student - best for higher-is-better ones (alignment, CLIP score). Pure functions on result rows,
so a benchmark can recompute them over rows merged from several evaluations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from tlcm.evaluate.sweep import ModelSpec, SchedulerSpec, saved_scheduler_config

# Metrics with a "best": lower is better for the FIDs, higher for the rest. Precision, recall and diversity are not
# ranked (the target is the teacher's value, not an extreme).
LOWER_BETTER = ("toy_fid_teacher", "fid_teacher", "toy_fid_data", "fid_data")
HIGHER_BETTER = ("alignment", "clip_score", "aesthetic")
RANKED = LOWER_BETTER + HIGHER_BETTER
# The metric a table leads with: FID against the teacher's own samples (the distillation target).
PRIMARY = ("toy_fid_teacher", "fid_teacher", "toy_fid_data", "fid_data")
NFE_TOL = 1e-6
SUFFIXES = ("_ratio_tf", "_ratio_tf_nfe", "_delta_tf", "_delta_tf_nfe")


def _identity(student: ModelSpec, sch: SchedulerSpec) -> str:
    """What makes two samplers the same: the resolved saved config for ``tlcm``, the scheduler spec otherwise."""
    if sch.name == "tlcm":
        return "saved:" + json.dumps(saved_scheduler_config(student.scheduler_dir), sort_keys=True)
    return f"named:{sch.slug}"


def baseline_models(students: Sequence[ModelSpec], base: str, teacher_guidance: Sequence[float],
                    taken: Sequence[str] = ()) -> list[ModelSpec]:
    """One training-free ModelSpec per distinct student sampler (see the module docstring).

    ``teacher_guidance``: the teacher's CFG scales; each baseline runs at g = 1 and at each of them. ``taken``: model
    names already in the grid (a baseline name never collides with them).
    """
    guidance = sorted({1.0, *(float(g) for g in teacher_guidance)})
    by_identity: dict[str, ModelSpec] = {}
    names = set(taken) | {s.name for s in students}
    for student in students:
        for sch in student.schedulers:
            key = _identity(student, sch)
            spec = by_identity.get(key)
            if spec is not None:
                if student.name not in spec.baseline_of:
                    spec.baseline_of.append(student.name)
                spec.steps = sorted({*spec.steps, *(int(s) for s in student.steps)})
                continue
            name = f"teacher+{student.name}-sampler" if sch.name == "tlcm" else f"teacher+{sch.slug}"
            unique, i = name, 2
            while unique in names:
                unique, i = f"{name}-{i}", i + 1
            names.add(unique)
            by_identity[key] = ModelSpec(
                unique, base, schedulers=[sch], steps=sorted(int(s) for s in student.steps), guidance=guidance,
                role="baseline", scheduler_from=student.scheduler_dir if sch.name == "tlcm" else None,
                baseline_of=[student.name])
    return list(by_identity.values())


# --- best training-free sampler and the students' ratios -------------------------------------------------------------
def is_training_free(row: dict) -> bool:
    role = row.get("role")
    return role in ("teacher", "baseline") if role else not row.get("lora")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _better(key: str, a: float, b: float) -> bool:
    return a < b if key in LOWER_BETTER else a > b


def _pick(rows: list[dict], key: str) -> dict | None:
    best = None
    for r in rows:
        v = r.get(key)
        if _finite(v) and (best is None or _better(key, v, best[key])):
            best = r
    if best is None:
        return None
    return {"value": best[key], "cell": best["cell"], "method": method_label(best), "steps": best["steps"],
            "nfe": best.get("nfe")}


def method_label(row: dict) -> str:
    return f"{row['model']} / {row['scheduler']} / cfg {row['guidance']:g}"


def nfe_key(nfe: float) -> str:
    return f"{nfe:g}"


def primary_key(rows: Sequence[dict]) -> str | None:
    for key in PRIMARY:
        if any(_finite(r.get(key)) for r in rows):
            return key
    return None


def best_training_free(rows: Sequence[dict]) -> dict:
    """``{"keys", "primary", "by_steps": {steps: {key: best}}, "by_nfe": {budget: {key: best}}}`` (JSON-ready).

    ``by_nfe`` has one entry per NFE budget that a student row uses; each best is ``{"value", "cell", "method",
    "steps", "nfe"}``.
    """
    free = [r for r in rows if is_training_free(r)]
    keys = [k for k in RANKED if any(_finite(r.get(k)) for r in rows)]
    by_steps: dict[str, dict] = {}
    for steps in sorted({int(r["steps"]) for r in free}):
        at = [r for r in free if int(r["steps"]) == steps]
        best = {k: b for k in keys if (b := _pick(at, k)) is not None}
        if best:
            by_steps[str(steps)] = best
    by_nfe: dict[str, dict] = {}
    for budget in sorted({float(r["nfe"]) for r in rows if not is_training_free(r) and _finite(r.get("nfe"))}):
        within = [r for r in free if _finite(r.get("nfe")) and r["nfe"] <= budget + NFE_TOL]
        best = {k: b for k in keys if (b := _pick(within, k)) is not None}
        if best:
            by_nfe[nfe_key(budget)] = best
    return {"keys": keys, "primary": primary_key(rows), "by_steps": by_steps, "by_nfe": by_nfe}


def add_ratios(rows: Sequence[dict], best: dict) -> None:
    """Write ``KEY_ratio_tf[_nfe]`` / ``KEY_delta_tf[_nfe]`` into each student row (see the module docstring)."""
    for r in rows:
        for k in [k for k in r if k.endswith(SUFFIXES)]:
            del r[k]
        if is_training_free(r):
            continue
        for suffix, ref in (("", best["by_steps"].get(str(int(r["steps"])), {})),
                            ("_nfe", best["by_nfe"].get(nfe_key(float(r["nfe"])), {}) if _finite(r.get("nfe"))
                             else {})):
            for key, b in ref.items():
                v = r.get(key)
                if not _finite(v) or not _finite(b["value"]):
                    continue
                if key in LOWER_BETTER:  # undefined (nan) when the best training-free row is at 0
                    r[f"{key}_ratio_tf{suffix}"] = v / b["value"] if b["value"] > 0 else math.nan
                else:
                    r[f"{key}_delta_tf{suffix}"] = v - b["value"]
