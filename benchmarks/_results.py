"""Shared by the evaluation benchmarks: each script owns one section of ``benchmarks/results/evaluate.md``.

A section sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; writing it replaces only that section (or
appends it), atomically, so the scripts can run in any order and re-run without touching each other's numbers.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "evaluate.md"
HEADER = ("# Evaluation benchmarks\n\nWritten by the scripts in `benchmarks/` (each owns a section below; every "
          "section names its command, machine and date).\n")


def update_section(name: str, body: str, path: Path = RESULTS, header: str = HEADER) -> Path:
    """Write section ``name`` of ``path`` (a new file starts with ``header``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.is_file() else header
    block = f"<!-- BEGIN {name} -->\n{body.rstrip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
