"""Toy-world quality vs steps for every method: the full ``tlcm demo``'s evaluation, as a benchmark table.

Runs (or resumes) ``tlcm demo --out WORK`` — synthesize, distil MLCD / TLCM / LCM-LoRA, evaluate them and the
teacher's DDIM / DPM-Solver++ / Euler at 1, 2, 4, 8 steps (and DDIM at 50) — then writes its table, stage timings
and commands into the ``toy_quality`` section of ``benchmarks/results/evaluate.md``.

    python benchmarks/toy_quality.py --work runs/demo            # full demo (about 20 minutes on 2 cores)
    python benchmarks/toy_quality.py --work runs/demo --write    # and write the results section
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import update_section  # noqa: E402


def section(results: dict, stages: dict, work: str, quick: bool) -> str:
    from tlcm.evaluate.report import markdown_table

    m = results.get("machine", {})
    stages = {k: v for k, v in stages.items() if "re-run" not in k}  # the first run's timings only
    total = sum(v["seconds"] for v in stages.values())
    timing = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in stages.items())
    return "\n".join([
        "## Toy world: quality vs steps, all methods",
        "",
        f"Command: `python benchmarks/toy_quality.py --work {work}{' --quick' if quick else ''} --write` (= `tlcm demo"
        f"{' --quick' if quick else ''} --out {work}`) — {m.get('platform')}, {m.get('cpu_threads')} threads, torch "
        f"{m.get('torch')}, {results.get('created')}.",
        "",
        f"{results.get('num_prompts')} toy captions (seed 10000); `toy_fid_data`: against rendered images of the "
        f"prompts; `toy_fid_teacher`: against {results.get('reference', {}).get('teacher')}; `alignment`: fraction "
        "of prompt attributes the toy classifier reads back. Latency is wall time per image (batch 64) on a shared "
        "machine: compare it within one table only.",
        "",
        markdown_table(results["cells"]),
        "",
        f"Stages: {timing}; total {total:.0f} s.",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="demo folder (resumed if present)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="write the toy_quality section of results/evaluate.md")
    args = p.parse_args(argv)
    import json

    from tlcm.demo import demo_config, run_demo

    results = run_demo(demo_config(args.quick, out=args.work))
    stages = json.loads((Path(args.work) / "stages.json").read_text())
    text = section(results, stages, args.work, args.quick)
    print(text)
    if args.write:
        update_section("toy_quality", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
