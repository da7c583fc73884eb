"""Prompt sources for the synthetic engine: text files, JSONL/JSON/CSV/TSV/Parquet columns, HF ``datasets`` folders.

Where real prompt sets come from: your own caption files (one prompt a line), or caption sets you download yourself
(COCO-2017 captions, LAION-Aesthetics or DiffusionDB prompt columns saved as Parquet/JSONL) and point ``--prompts``
at with ``--prompt-column``. The toy world ships its training-split captions (``--prompts toy``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tlcm.errors import TLCMError

# Tried in this order when no column is named.
DEFAULT_COLUMNS = ("prompt", "caption", "text", "captions", "sentence")
_FORMATS = "a .txt file (one prompt a line), .jsonl/.json/.csv/.tsv/.parquet with --prompt-column, or a folder " \
           "saved by datasets' save_to_disk"


@dataclass
class PromptSet:
    """Prompts and their negative prompts (same length), after cleaning and deduplication."""

    prompts: list[str]
    negative_prompts: list[str]
    source: str
    column: str | None = None
    duplicates_removed: int = 0
    empty_removed: int = 0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def sha256(self) -> str:
        """A fingerprint of the (prompt, negative) list: a changed prompt file changes it."""
        h = hashlib.sha256()
        for p, n in zip(self.prompts, self.negative_prompts):
            h.update(json.dumps([p, n]).encode())
        return h.hexdigest()


def default_prompts_path(teacher: str | None = None) -> Path:
    """The training-split captions of the toy world of ``teacher`` (``toy``, ``toy-v3``, a toy pipeline folder;
    default: the default world), shipped by :mod:`tlcm.toy`."""
    try:
        from tlcm.toy import default_prompts_path as toy_prompts
        from tlcm.toy import world_of_model
    except ImportError as err:
        raise TLCMError("the toy world's prompt set is not available in this installation",
                        "pass --prompts FILE with your own prompts") from err
    return Path(toy_prompts(world_of_model(teacher)))


def _pick_column(columns: list[str], column: str | None, source: Path, what: str = "--prompt-column") -> str:
    if column is not None:
        if column not in columns:
            raise TLCMError(f"{source} has no column {column!r}; its columns are {columns}",
                            f"pass {what} with one of {columns}")
        return column
    for c in DEFAULT_COLUMNS:
        if c in columns:
            return c
    raise TLCMError(f"{source} has no prompt column among {list(DEFAULT_COLUMNS)}; its columns are {columns}",
                    f"pass {what} with one of {columns}")


def _read_table(path: Path) -> tuple[list[str], dict[str, list]]:
    """Columns of a JSONL/JSON/CSV/TSV/Parquet file or a ``save_to_disk`` folder, as lists."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            import datasets

            try:
                ds = datasets.load_from_disk(str(path))
            except FileNotFoundError as err:
                raise TLCMError(f"{path} is a folder but not a dataset saved with datasets' save_to_disk",
                                f"pass {_FORMATS}") from err
            if isinstance(ds, datasets.DatasetDict):
                split = "train" if "train" in ds else next(iter(ds))
                ds = ds[split]
            return list(ds.column_names), {c: ds[c] for c in ds.column_names}
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return list(table.column_names), {c: table.column(c).to_pylist() for c in table.column_names}
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                cols = list(reader.fieldnames or [])
            return cols, {c: [r.get(c) for r in rows] for c in cols}
        if suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if suffix == ".json" and text.lstrip().startswith("["):
                rows = json.loads(text)
            else:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise TLCMError(f"{path} must hold one JSON object per record", f"pass {_FORMATS}")
            cols = list(dict.fromkeys(k for r in rows for k in r))
            return cols, {c: [r.get(c) for r in rows] for c in cols}
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise TLCMError(f"cannot parse {path}: {err}", f"pass {_FORMATS}") from err
    except OSError as err:
        raise TLCMError(f"cannot read {path}: {err}", f"pass {_FORMATS}") from err
    raise AssertionError(suffix)


def load_prompts(path: str | Path, *, column: str | None = None, negative_column: str | None = None,
                 negative_prompt: str = "", dedupe: bool = True) -> PromptSet:
    """Read prompts from ``path`` (``"toy"``, ``"toy-v3"``, ``"toy-v4"`` for that toy world's training split).

    Whitespace is trimmed, empty prompts dropped, and with ``dedupe`` exact duplicate (prompt, negative) pairs are
    dropped keeping the first. Negative prompts come from ``negative_column`` when given, else ``negative_prompt``
    for every record. Raises :class:`TLCMError` for a missing file, an unknown column or an empty result.
    """
    if str(path) in ("toy", "toy-v3", "toy-v4"):
        path = default_prompts_path(str(path))
    path = Path(path).expanduser()
    if not path.exists():
        raise TLCMError(f"prompt file {str(path)!r} does not exist", f"pass {_FORMATS}, or 'toy'")
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet"):
        cols, table = _read_table(path)
        col = _pick_column(cols, column, path)
        raw = table[col]
        if negative_column is not None:
            neg_col = _pick_column(cols, negative_column, path, "--negative-column")
            negs = table[neg_col]
        else:
            negs = [negative_prompt] * len(raw)
    else:
        if column is not None or negative_column is not None:
            raise TLCMError(f"{path} is a plain text file, which has no columns",
                            "drop --prompt-column/--negative-column, or pass a .jsonl/.csv/.parquet file")
        try:
            raw = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise TLCMError(f"{path} is not UTF-8 text", f"pass {_FORMATS}") from err
        col = None
        negs = [negative_prompt] * len(raw)

    prompts, negatives, seen = [], [], set()
    empty = dupes = 0
    for p, n in zip(raw, negs):
        if isinstance(p, (list, tuple)):  # caption columns that hold several captions: take the first
            p = p[0] if p else None
        p = "" if p is None else str(p).strip()
        n = "" if n is None else str(n).strip()
        if not p:
            empty += 1
            continue
        if dedupe:
            if (p, n) in seen:
                dupes += 1
                continue
            seen.add((p, n))
        prompts.append(p)
        negatives.append(n)
    if not prompts:
        raise TLCMError(f"{path} holds no prompts" + (f" in column {col!r}" if col else "")
                        + (f" ({empty} empty rows)" if empty else ""),
                        "give at least one non-empty prompt")
    return PromptSet(prompts, negatives, str(path), col, duplicates_removed=dupes, empty_removed=empty)
