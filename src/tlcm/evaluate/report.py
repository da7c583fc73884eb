"""Writing an evaluation's outputs: results.json/.csv, a markdown table, PNG grids and metric-vs-steps plots.

Every file is written to a temporary name in its folder and moved into place (``os.replace``), so an interrupted run
never leaves a half-written file that a resumed run would trust.

Layout of an evaluation folder::

    results.json      everything: per-cell rows, notices, reference, machine, protocol
    results.csv       one row per cell
    results.md        the markdown tables (training-free rows, then students; also printed by ``tlcm evaluate``), the
                      best training-free sampler per step count and NFE budget, and each student's ratio to it
    grids/<cell>.png  the first images of each cell
    overview.png      rows = method, columns = steps: the first images of every cell side by side
    plots/<metric>.png metric vs steps, one line per method (model / scheduler / guidance): students solid, the
                      teacher's solvers dotted, baselines (teacher + a student's sampler) dashed, and the best
                      training-free value per step count as a thick grey line
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

# Columns that are bookkeeping, not quality metrics.
INFO_KEYS = ("cell", "model", "role", "scheduler", "steps", "guidance", "unet_calls", "cfg_factor", "nfe",
             "num_images", "latency_s", "images_per_s", "wall_s", "encode_cached_s", "peak_mem_mb", "peak_mem_kind",
             "lora", "scheduler_from", "baseline_of", "diversity_extra_images", "diversity_extra_s", "prompt_set",
             "lora_sampling", "scheduler_config")
CSV_SKIP = ("lora_sampling", "scheduler_config")
# Lower is better for these; higher for the rest.
LOWER_IS_BETTER = ("fid", "toy_fid")
# Ratios to the best training-free sampler (tlcm.evaluate.baselines): derived columns, not metrics of their own.
DERIVED_SUFFIXES = ("_ratio_tf", "_ratio_tf_nfe", "_delta_tf", "_delta_tf_nfe")
# Computed and kept in results.json/.csv, left out of the markdown tables to keep them readable.
MD_HIDDEN_PREFIXES = ("precision_", "inception_precision_")
ROLE_STYLE = {"teacher": ":", "baseline": "--", "student": "-"}
ROLE_TITLE = {"training-free": "Training-free: the undistilled teacher (its solvers, and each student's sampler)",
              "student": "Distilled students"}


def _atomic_bytes(path: Path, data: bytes) -> None:
    from tlcm.data.shards import atomic_write_bytes

    atomic_write_bytes(path, data)


def write_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode("utf-8"))


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def save_png(path: Path, image) -> None:
    _atomic_bytes(path, _png_bytes(image))


def image_grid(images, cols: int | None = None, scale: int = 1, pad: int = 2):
    """Tile PIL images into one image (``cols`` per row; nearest-neighbour upscaling by ``scale``)."""
    from PIL import Image

    images = list(images)
    if not images:
        return Image.new("RGB", (1, 1), "white")
    cols = cols or min(len(images), int(math.ceil(math.sqrt(len(images)))))
    rows = int(math.ceil(len(images) / cols))
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, im in enumerate(images):
        im = im.convert("RGB")
        if scale != 1:
            im = im.resize((w, h), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def _scale_for(images, target: int = 96) -> int:
    w = images[0].size[0] if images else target
    return max(1, target // w)


def save_grid(path: Path, images) -> None:
    images = list(images)
    save_png(path, image_grid(images, scale=_scale_for(images)))


def save_thumbs(path: Path, images) -> None:
    """The first images of a cell, kept (as uint8 arrays) so a resumed run can still draw the overview."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    buf = io.BytesIO()
    np.savez_compressed(buf, images=arr)
    _atomic_bytes(path, buf.getvalue())


def load_thumbs(path: Path):
    from PIL import Image

    with np.load(path) as data:
        return [Image.fromarray(a) for a in data["images"]]


def metric_keys(rows: list[dict]) -> list[str]:
    """Quality-metric columns present in ``rows``, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if (k not in INFO_KEYS and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)
                    and not k.endswith(DERIVED_SUFFIXES)):
                keys.append(k)
    return keys


def derived_keys(rows: list[dict]) -> list[str]:
    """Ratio/delta-to-best-training-free columns present in ``rows``, in first-seen order."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k.endswith(DERIVED_SUFFIXES) and k not in keys]
    return keys


def role_of(row: dict) -> str:
    return row.get("role") or ("student" if row.get("lora") else "teacher")


def method_of(row: dict) -> str:
    return f"{row['model']} / {row['scheduler']} / cfg {row['guidance']:g}"


def _fmt(v, key: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if key == "latency_s":
            return f"{v * 1000:.1f}"
        if key in ("nfe", "unet_calls", "steps") and v == int(v):
            return str(int(v))
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.3f}".rstrip("0").rstrip(".")
    return str(v)


TABLE_INFO = (("model", "model"), ("scheduler", "scheduler"), ("steps", "steps"), ("guidance", "cfg"),
              ("nfe", "NFE"))
TABLE_COST = (("latency_s", "ms/img"), ("images_per_s", "img/s"), ("peak_mem_mb", "peak MB"))


def _ratio_columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The primary FID's ratio to the best training-free sampler, at equal steps and within the NFE budget."""
    from tlcm.evaluate.baselines import primary_key

    key = primary_key(rows)
    if key is None:
        return []
    cols = [(f"{key}_ratio_tf", f"{key} ÷ best TF (steps)"), (f"{key}_ratio_tf_nfe", f"{key} ÷ best TF (NFE)")]
    return [c for c in cols if any(c[0] in r for r in rows)]


def markdown_table(rows: list[dict], columns_from: list[dict] | None = None) -> str:
    """One table of ``rows``; the columns come from ``columns_from`` (default ``rows``), so that tables of a split
    result share their columns."""
    basis = columns_from if columns_from is not None else rows
    keys = [k for k in metric_keys(basis) if not k.startswith(MD_HIDDEN_PREFIXES)]
    cols = [*TABLE_INFO, *((k, k) for k in keys), *_ratio_columns(basis), *TABLE_COST]
    lines = ["| " + " | ".join(title for _, title in cols) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), k) for k, _ in cols) + " |")
    return "\n".join(lines)


def sectioned_tables(rows: list[dict], level: str = "###") -> str:
    """The training-free rows (teacher solvers, then baselines) and the students as two tables with one header."""
    free = [r for r in rows if role_of(r) != "student"]
    students = [r for r in rows if role_of(r) == "student"]
    if not free or not students:
        return markdown_table(rows)
    free.sort(key=lambda r: role_of(r) == "baseline")  # stable: teacher solvers first, then baselines
    return "\n".join([f"{level} {ROLE_TITLE['training-free']}", "", markdown_table(free, rows), "",
                      f"{level} {ROLE_TITLE['student']}", "", markdown_table(students, rows)])


def best_training_free_table(results: dict) -> str:
    """Per step count and per NFE budget: the best training-free row for the primary FID and for alignment (or the
    first higher-is-better metric), and each student's ratio (×) / difference (±) to it. Empty when there are no
    students or no training-free rows."""
    from tlcm.evaluate.baselines import HIGHER_BETTER, nfe_key

    best = results.get("training_free_best") or {}
    students = [r for r in results.get("cells", []) if role_of(r) == "student"]
    fid = best.get("primary")
    high = next((k for k in HIGHER_BETTER if k in best.get("keys", [])), None)
    metrics = [k for k in (fid, high) if k]
    if not students or not metrics:
        return ""
    names = list(dict.fromkeys(r["model"] for r in students))
    several_g = {n: len({r["guidance"] for r in students if r["model"] == n}) > 1 for n in names}

    def fmt_best(b) -> str:
        if b is None:
            return "–"
        plural = "s" if int(b["steps"]) != 1 else ""
        return f"{_fmt(b['value'])} ({b['method']}, {b['steps']} step{plural}, NFE {_fmt(b['nfe'])})"

    def standing(r, suffix) -> str:
        parts = []
        if fid and f"{fid}_ratio_tf{suffix}" in r:
            parts.append(f"×{_fmt(r[f'{fid}_ratio_tf{suffix}'])}")
        if high and f"{high}_delta_tf{suffix}" in r:
            parts.append(f"{r[f'{high}_delta_tf{suffix}']:+.3f}")
        return " / ".join(parts) + (f" (cfg {r['guidance']:g})" if several_g[r["model"]] else "")

    what = " / ".join(x for x in (f"{fid} ÷ best (×)" if fid else "", f"{high} − best (±)" if high else "") if x)
    sections = (("steps", "at equal steps", best.get("by_steps", {}), "", lambda r: str(int(r["steps"]))),
                ("NFE budget", "within each student's NFE budget (training-free rows with NFE <= the student's)",
                 best.get("by_nfe", {}), "_nfe", lambda r: nfe_key(float(r["nfe"]))))
    out = []
    for column, title, table, suffix, key_of in sections:
        keys = [k for k in table if any(key_of(r) == k for r in students)]
        if not keys:
            continue
        out += [f"Best training-free sampler {title}; students: {what}.", "",
                f"| {column} | " + " | ".join(f"best {m}" for m in metrics) + " | " + " | ".join(names) + " |",
                "|---:|" + "---|" * (len(metrics) + len(names))]
        for k in keys:
            cells = [fmt_best(table[k].get(m)) for m in metrics]
            for n in names:
                mine = [standing(r, suffix) for r in students if r["model"] == n and key_of(r) == k]
                cells.append(", ".join(mine) or "–")
            out.append(f"| {k} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return ";".join(map(str, v))
    return v


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = [k for k in INFO_KEYS if k not in CSV_SKIP and any(k in r for r in rows)] + metric_keys(rows) \
        + derived_keys(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in keys})
    write_text(path, buf.getvalue())


def _direction(key: str) -> str:
    if "diversity" in key:
        return "the teacher's value is the target"
    return "lower is better" if key.startswith(LOWER_IS_BETTER) else "higher is better"


def plot_metric(path: Path, rows: list[dict], key: str, best: dict | None = None) -> bool:
    """Metric vs steps, one line per method (line style by role: see the module docstring), and the best
    training-free value per step count when ``best`` (``results["training_free_best"]``) ranks ``key``;
    ``False`` when no row has the metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    roles: dict[str, str] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            lines.setdefault(method_of(r), []).append((int(r["steps"]), float(v)))
            roles[method_of(r)] = role_of(r)
    if not lines:
        return False
    fig, ax = plt.subplots(figsize=(9.6, 4.4), dpi=100)  # wide: the legend sits to the right of the axes
    # students in strong colours (tab10), the many training-free rows in muted ones (tab20b)
    palettes = {"student": plt.get_cmap("tab10").colors, "free": plt.get_cmap("tab20b").colors}
    used = {"student": 0, "free": 0}
    all_steps = set()
    for name, pts in lines.items():
        pts.sort()
        all_steps.update(s for s, _ in pts)
        group = "student" if roles[name] == "student" else "free"
        color = palettes[group][used[group] % len(palettes[group])]
        used[group] += 1
        style = ("o" + ROLE_STYLE.get(roles[name], "-")) if len(pts) > 1 else "s"
        ax.plot([s for s, _ in pts], [v for _, v in pts], style, label=name, markersize=4, color=color,
                linewidth=1.0 if group == "free" else 1.8)
    values = [v for pts in lines.values() for _, v in pts]
    if key.startswith(LOWER_IS_BETTER) and min(values) > 0 and max(values) > 20 * min(values):
        ax.set_yscale("log")  # FIDs span orders of magnitude between 1-step and 8-step rows
    envelope = sorted((int(s), b[key]["value"]) for s, b in (best or {}).get("by_steps", {}).items() if key in b)
    if len(envelope) > 1:
        ax.plot([s for s, _ in envelope], [v for _, v in envelope], "-", color="grey", alpha=0.35, linewidth=5,
                label="best training-free", zorder=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_steps))
    ax.set_xticklabels([str(s) for s in sorted(all_steps)])
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(key)
    ax.set_title(f"{key} vs steps ({_direction(key)})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())
    return True


def overview_image(out: Path, rows: list[dict], per_cell: int = 4):
    """Rows = methods, columns = step counts; each tile shows the cell's first ``per_cell`` images, labelled.
    Training-free rows come first, labelled in grey with a "training-free" tag; a line separates the students."""
    from PIL import Image, ImageDraw

    rows = sorted(rows, key=lambda r: role_of(r) == "student")  # stable: the grid's order within each group
    methods: dict[str, dict[int, str]] = {}
    roles: dict[str, str] = {}
    for r in rows:
        methods.setdefault(method_of(r), {})[int(r["steps"])] = r["cell"]
        roles[method_of(r)] = role_of(r)
    steps = sorted({int(r["steps"]) for r in rows})
    tiles: dict[str, Image.Image] = {}
    for cells in methods.values():
        for cid in cells.values():
            p = out / "thumbs" / f"{cid}.npz"
            if p.is_file():
                imgs = load_thumbs(p)[:per_cell]
                tiles[cid] = image_grid(imgs, cols=per_cell, scale=_scale_for(imgs, 64), pad=1)
    if not tiles:
        return None
    tw = max(t.size[0] for t in tiles.values())
    th = max(t.size[1] for t in tiles.values())
    label_w, head_h, pad = 230, 18, 6
    canvas = Image.new("RGB", (label_w + len(steps) * (tw + pad) + pad, head_h + len(methods) * (th + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for j, s in enumerate(steps):
        draw.text((label_w + j * (tw + pad) + tw // 2 - 20, 3), f"{s} step{'s' if s > 1 else ''}", fill="black")
    first_student = True
    for i, (name, cells) in enumerate(methods.items()):
        y = head_h + i * (th + pad)
        student = roles[name] == "student"
        if student and first_student and i > 0:
            draw.line((0, y - pad // 2 - 1, canvas.size[0], y - pad // 2 - 1), fill="black", width=2)
        first_student = first_student and not student
        draw.text((4, y + th // 2 - 6), name, fill="black" if student else (90, 90, 90))
        if not student:
            draw.text((4, y + th // 2 + 6), "training-free", fill=(140, 140, 140))
        for j, s in enumerate(steps):
            if s in cells and cells[s] in tiles:
                canvas.paste(tiles[cells[s]], (label_w + j * (tw + pad), y))
    return canvas


def write_report(out: Path, results: dict) -> None:
    """All report files for ``results`` (as returned by :func:`tlcm.evaluate.sweep.run_sweep`)."""
    out = Path(out)
    rows = results["cells"]
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", rows)
    plots = []
    for key in metric_keys(rows) + ["latency_s"]:
        if plot_metric(out / "plots" / f"{key}.png", rows, key, results.get("training_free_best")):
            plots.append(key)
    ov = overview_image(out, rows)
    if ov is not None:
        save_png(out / "overview.png", ov)
    write_text(out / "results.md", render_markdown(results, plots, overview=ov is not None))


BEST_NOTE = ("Training-free (TF) rows are the undistilled teacher: its own solvers, with and without CFG, and "
             "`teacher+NAME-sampler`, the teacher sampled with student NAME's own scheduler (no LoRA). A student's "
             "ratio below 1 beats every training-free sampler at the same steps (or within the same number of "
             "network evaluations); only a ratio well below 1 shows that distillation, not the sampler, does the work.")


def reference_lines(results: dict) -> list[str]:
    """What the ``*_teacher`` / ``*_data`` columns compare with, the teacher reference's own scores, and the
    diversity setting."""
    ref = results.get("reference", {})
    lines = []
    if ref.get("teacher"):
        lines.append(f"`*_teacher` metrics compare with the teacher's samples: {ref['teacher']} (same prompts, "
                     "seeds).")
        if ref.get("metrics"):
            lines.append("The teacher reference itself scores: " + ", ".join(
                f"{k} {_fmt(v, k)}" for k, v in ref["metrics"].items()) + ".")
    if ref.get("data"):
        lines.append(f"`*_data` metrics compare with data images ({ref['data']}).")
    div = results.get("diversity")
    if div:
        lines.append(f"`diversity`: mean pairwise feature distance among {div['seeds_per_prompt']} seeds of each of "
                     f"{div['prompts']} prompts ({div['extra_images_per_cell']} extra images per cell); "
                     "`diversity_vs_teacher` divides by the teacher reference's. `recall_*` / `precision_*`: k-NN "
                     "manifold recall / precision against the teacher's samples or the data (precision in "
                     "results.csv).")
    return [x for line in lines for x in (line, "")][:-1]


def render_markdown(results: dict, plots: list[str], overview: bool = True, link_prefix: str = "") -> str:
    rows = results["cells"]
    md = [f"# Evaluation{' — protocol ' + results['protocol'] if results.get('protocol') else ''}", ""]
    machine = results.get("machine", {})
    md.append(f"{results.get('num_prompts')} prompts; {results.get('created')}; device {machine.get('device')} "
              f"({machine.get('cpu_threads')} threads), torch {machine.get('torch')}.")
    if results.get("command"):
        md += ["", f"Command: `{results['command']}`"]
    md += ["", *reference_lines(results)]
    md += ["", f"NFE: {results.get('nfe_note')}. Latency: wall time per image over the whole cell "
               "(batched), after a warm-up.", "", sectioned_tables(rows), ""]
    best = best_training_free_table(results)
    if best:
        md += ["## Against the best training-free sampler", "", BEST_NOTE, "", best]
    if results.get("notices"):
        md += ["Skipped:", ""] + [f"- {n}" for n in results["notices"]] + [""]
    if overview:
        md += [f"![samples: rows = method, columns = steps]({link_prefix}overview.png)", ""]
    for key in plots:
        md.append(f"![{key} vs steps]({link_prefix}plots/{key}.png)")
    return "\n".join(md) + "\n"
