"""Prompt sets for evaluation: a text file, a table column, or MSCOCO caption annotations; a fixed count and seeds.

Formats, chosen by extension:

- ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are ignored.
- ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` (a list of objects) / ``.parquet``: the column ``column`` (default: the
  first of ``text``, ``caption``, ``prompt``).
- COCO annotations (``captions_val2017.json``: a JSON object with ``annotations`` and ``images``): the first caption of
  each image, images sorted by id, so the 5,000 val2017 images give the standard "MSCOCO-2017 5K" prompt set.

Prompts are taken in file order; ``count`` keeps the first ``count`` (an error if the file has fewer). Seeds are
``seed, seed + 1, ...``, one per prompt, so every method sees the same noise for the same prompt.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tlcm.errors import TLCMError

TEXT_COLUMNS = ("text", "caption", "prompt")


def _pick_column(columns, column: str | None, path: Path) -> str:
    columns = list(columns)
    if column is not None:
        if column not in columns:
            raise TLCMError(f"{path} has no column {column!r} (columns: {', '.join(map(str, columns)) or 'none'})",
                            "pass --prompt-column with one of those names")
        return column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise TLCMError(f"{path} has none of the columns {', '.join(TEXT_COLUMNS)}",
                    "pass --prompt-column NAME to say which column holds the prompts")


def coco_captions(data: dict) -> list[str]:
    """First caption per image, images in id order (COCO ``captions_*.json``)."""
    by_image: dict[int, str] = {}
    for ann in sorted(data.get("annotations", []), key=lambda a: a.get("id", 0)):
        by_image.setdefault(int(ann["image_id"]), str(ann["caption"]).strip())
    ids = sorted(int(im["id"]) for im in data.get("images", [])) or sorted(by_image)
    return [by_image[i] for i in ids if i in by_image]


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """All prompts of a prompt file (see the module docstring for formats)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TLCMError(f"prompt file {str(path)!r} does not exist",
                        "pass a .txt file with one prompt per line, or a .csv/.jsonl/.json/.parquet with a text column")
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".prompts", ""):
            rows = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            prompts = [r for r in rows if r and not r.startswith("#")]
        elif suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                col = _pick_column(reader.fieldnames or [], column, path)
                prompts = [str(r[col] or "").strip() for r in reader]
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            col = _pick_column(rows[0].keys() if rows else [], column, path)
            prompts = [str(r.get(col) or "").strip() for r in rows]
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "annotations" in data:
                prompts = coco_captions(data)
            elif isinstance(data, list) and data and isinstance(data[0], str):
                prompts = [s.strip() for s in data]
            elif isinstance(data, list) and data and isinstance(data[0], dict):
                col = _pick_column(data[0].keys(), column, path)
                prompts = [str(r.get(col) or "").strip() for r in data]
            else:
                raise TLCMError(f"{path} is JSON but neither a list of prompts, a list of rows, nor COCO annotations",
                                "use a list of strings, a list of objects with a 'text' field, or captions_*.json")
        elif suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path)
            col = _pick_column(frame.columns, column, path)
            prompts = [str(v).strip() for v in frame[col].tolist()]
        else:
            raise TLCMError(f"unsupported prompt file type {suffix!r} ({path})",
                            "use .txt, .csv, .tsv, .jsonl, .json or .parquet")
    except UnicodeDecodeError as err:
        raise TLCMError(f"{path} is not UTF-8 text", "save the prompt file as UTF-8") from err
    except (json.JSONDecodeError, csv.Error) as err:
        raise TLCMError(f"could not parse {path}: {err}", "fix the file's syntax") from err
    prompts = [p for p in prompts if p]
    if not prompts:
        raise TLCMError(f"{path} holds no prompts", "add at least one non-empty prompt")
    return prompts


def take(prompts: list[str], count: int | None, source: str = "the prompt set") -> list[str]:
    """The first ``count`` prompts; an error when there are fewer (a protocol's count is part of its definition)."""
    if count is None:
        return list(prompts)
    if count < 1:
        raise TLCMError(f"prompt count must be >= 1, got {count}", "pass --num-prompts 1 or more")
    if len(prompts) < count:
        raise TLCMError(f"{source} has {len(prompts)} prompts but {count} were asked for",
                        "pass a smaller --num-prompts or a larger prompt file")
    return list(prompts[:count])


def seeds_for(n: int, seed: int = 0) -> list[int]:
    return [int(seed) + i for i in range(n)]
