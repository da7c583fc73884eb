"""Assemble ``benchmarks/RESULTS.md`` from the per-area files in ``benchmarks/results/``.

Each benchmark script writes its own file (``toy.md``, ``synthesize.md``, ``distill.md``, ``evaluate.md``,
``transfer.md``, ``negative_prompt.md``), with the command, machine and date beside every number; this script only
concatenates them, in pipeline order, so no number is ever typed by hand into RESULTS.md.

    python benchmarks/collect_results.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["toy", "synthesize", "distill", "ablation", "train_efficiency", "evaluate", "transfer", "negative_prompt"]
HEADER = """# Benchmark results

Every table below was produced by a script in `benchmarks/`; each section names the exact command, the machine and
the date. Re-run a script, then `python benchmarks/collect_results.py`, to refresh this file. Sections:
{toc}
"""


def _shift_headings(text: str, top_level: int) -> str:
    """Shift every Markdown heading so the file's highest one sits at ``top_level`` (RESULTS.md keeps one title)."""
    levels = [len(line) - len(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")]
    if not levels:
        return text
    shift = top_level - min(levels)
    return "\n".join("#" * shift + line if line.startswith("#") and shift > 0 else line for line in text.splitlines())


def collect(results_dir: Path = HERE / "results", out: Path = HERE / "RESULTS.md") -> Path:
    files = sorted(results_dir.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    if not files:
        raise SystemExit(f"no result files in {results_dir}: run the benchmark scripts first")
    toc = "\n".join(f"- [{p.stem}](results/{p.name})" for p in files)
    parts = [HEADER.format(toc=toc)]
    for p in files:
        body = p.read_text().strip()
        body = _shift_headings(body, top_level=2)
        parts.append(f"<!-- from benchmarks/results/{p.name} -->\n{body}\n")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".RESULTS.md.")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(parts))
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(collect())
