"""The "shapes" world: procedural 32x32 images of one geometric shape, a caption grammar and its inverse.

Every image is drawn from five attributes (shape, colour, size, position on a 3x3 grid, background colour) plus small
jitter, all from a seeded ``numpy`` generator, so a dataset is a pure function of ``(n, seed, split)`` and unlimited in
size. Captions come from a small grammar with paraphrases; :func:`attributes_from_prompt` parses every paraphrase back.

The official compositional split holds out some (shape, colour) pairs: the ``"train"`` split never shows them, the
``"heldout"`` split shows only them, so a model trained on ``train`` is tested on combinations it never saw.

Datasets export to (and any captioned image folder imports from) the Hugging Face ``imagefolder`` convention: image
files plus a ``metadata.jsonl`` whose rows hold ``file_name`` and ``text``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tlcm.errors import TLCMError

NAME = "shapes"
VERSION = "v3"
RESOLUTION = 32
TEXT_MAX_LENGTH = 24
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
    "cyan": (40, 220, 230),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (120, 120, 120),
    "blue": (25, 45, 120),
}
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
ATTRIBUTES = ("shape", "color", "size", "position", "background")
CLASSES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
SPLITS = ("train", "heldout")

# The official held-out (shape, colour) pairs: one colour per shape, never shown in the training split.
HELDOUT_PAIRS = frozenset({("circle", "green"), ("square", "purple"), ("triangle", "cyan"), ("cross", "red")})

# --- caption grammar: synonyms per attribute value, and templates --------------------------------------------------
SHAPE_WORDS = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle", "wedge"),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "top left": ("top left", "upper left", "top-left"),
    "top center": ("top center", "top middle", "top"),
    "top right": ("top right", "upper right", "top-right"),
    "middle left": ("middle left", "center left", "left"),
    "center": ("center", "middle", "centre"),
    "middle right": ("middle right", "center right", "right"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom center": ("bottom center", "bottom middle", "bottom"),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
}
BACKGROUND_WORDS = {"gray": ("gray", "grey")}
TEMPLATES = (
    "a {size} {color} {shape} in the {pos} on a {bg} background",
    "{pos}: {size} {color} {shape}, {bg} backdrop",
    "a {color} {shape}, {size}, at the {pos}, {bg} background",
    "{bg} background with a {size} {color} {shape} in the {pos}",
    "{size} {color} {shape} {pos} of the image, {bg} background",
)


def _attributes_ok(attrs: dict, split: str) -> bool:
    if attrs["color"] == "blue" and attrs["background"] == "blue":
        return False  # a blue shape on the blue backdrop would be hard to see
    heldout = (attrs["shape"], attrs["color"]) in HELDOUT_PAIRS
    return heldout if split == "heldout" else not heldout


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TLCMError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def sample_attributes(rng: np.random.Generator, split: str = "train") -> dict:
    """Draw one attribute combination of ``split`` (rejection sampling over the uniform product)."""
    _check_split(split)
    while True:
        attrs = {name: CLASSES[name][int(rng.integers(len(CLASSES[name])))] for name in ATTRIBUTES}
        if _attributes_ok(attrs, split):
            return attrs


def caption(attrs: dict, rng: np.random.Generator) -> str:
    """One paraphrase of the caption for ``attrs``, drawn from the grammar."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]

    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    pos = pick(POSITION_WORDS[attrs["position"]])
    if template.startswith("{pos}"):
        pos = pos.replace(" ", "-") if " " in pos else pos
    text = template.format(
        size=pick(SIZE_WORDS[attrs["size"]]),
        color=attrs["color"],
        shape=pick(SHAPE_WORDS[attrs["shape"]]),
        pos=pos,
        bg=pick(BACKGROUND_WORDS.get(attrs["background"], (attrs["background"],))),
    )
    return text


def canonical_caption(attrs: dict) -> str:
    """The first template with canonical words (the form used in reports)."""
    return TEMPLATES[0].format(
        size=attrs["size"], color=attrs["color"], shape=attrs["shape"], pos=attrs["position"], bg=attrs["background"]
    )


# --- parser -----------------------------------------------------------------------------------------------------------
def _phrase_table(words: dict[str, Sequence[str]]) -> list[tuple[str, str]]:
    table = [(re.sub(r"[-\s]+", " ", w), value) for value, ws in words.items() for w in ws]
    return sorted(table, key=lambda t: -len(t[0]))  # longest first: "top center" before "center"


_SHAPE_TABLE = _phrase_table({s: (*words, s + "s") for s, words in SHAPE_WORDS.items()})
_SIZE_TABLE = _phrase_table(SIZE_WORDS)
_POSITION_TABLE = _phrase_table(POSITION_WORDS)
_BG_COLOR_WORDS = _phrase_table({bg: (bg, *BACKGROUND_WORDS.get(bg, ())) for bg in BACKGROUNDS})
_COLOR_TABLE = _phrase_table({c: (c,) for c in COLORS})


def _find(text: str, table: list[tuple[str, str]]) -> tuple[str | None, str]:
    """Find the longest phrase of ``table`` in ``text``; return its value and the text with the phrase blanked."""
    found: list[str] = []
    for phrase, value in table:
        pattern = rf"\b{re.escape(phrase)}\b"
        while re.search(pattern, text):
            found.append(value)
            text = re.sub(pattern, " | ", text, count=1)
    values = set(found)
    if len(values) > 1:
        raise TLCMError(
            f"the prompt names several values of one attribute: {sorted(values)}",
            "the toy world draws one shape per image: name one shape, colour, size, position, background",
        )
    return (found[0] if found else None), text


def attributes_from_prompt(prompt: str) -> dict:
    """Parse a shapes caption (any paraphrase of the grammar) back into its attributes.

    Returns the attributes the prompt names (a subset of ``shape, color, size, position, background``; captions from
    the grammar name all five). Raises :class:`TLCMError` when the prompt names none of them, or contradicts itself.
    """
    if not isinstance(prompt, str):
        raise TLCMError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = " " + re.sub(r"[^a-z]+", " ", prompt.lower().replace("-", " ")) + " "
    attrs: dict[str, str] = {}
    # the background colour is the colour word right before "background"/"backdrop"
    bg_match = re.search(r"\b([a-z]+) (?:background|backdrop)\b", text)
    if bg_match:
        bg_word = bg_match.group(1)
        bg = dict(_BG_COLOR_WORDS).get(bg_word)
        if bg is None:
            raise TLCMError(
                f"unknown background colour {bg_word!r} in prompt {prompt!r}",
                f"the toy world's backgrounds are: {', '.join(BACKGROUNDS)}",
            )
        attrs["background"] = bg
        text = text[: bg_match.start()] + " | " + text[bg_match.end() :]
    for name, table in (
        ("shape", _SHAPE_TABLE),
        ("size", _SIZE_TABLE),
        ("position", _POSITION_TABLE),
        ("color", _COLOR_TABLE),
    ):
        value, text = _find(text, table)
        if value is not None:
            attrs[name] = value
    if not attrs:
        raise TLCMError(
            f"cannot read any shapes attribute from prompt {prompt!r}",
            "write e.g. 'a large red circle in the top left on a blue background' (see docs/toy.md for the grammar)",
        )
    return {name: attrs[name] for name in ATTRIBUTES if name in attrs}


# --- rendering --------------------------------------------------------------------------------------------------------
def render(attrs: dict, rng: np.random.Generator, resolution: int = RESOLUTION) -> Image.Image:
    """Draw ``attrs`` with small jitter (position +-1 px, size +-8 %, colour +-10 levels), antialiased."""
    s = SUPERSAMPLE * resolution / 32.0  # drawing scale: supersampled pixels per 32-grid pixel
    jitter_rgb = lambda rgb: tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in rgb)  # noqa: E731
    img = Image.new("RGB", (SUPERSAMPLE * resolution,) * 2, jitter_rgb(BACKGROUNDS[attrs["background"]]))
    draw = ImageDraw.Draw(img)
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    cx = (7 + 9 * col + rng.uniform(-1, 1)) * s
    cy = (7 + 9 * row + rng.uniform(-1, 1)) * s
    half = (6.5 if attrs["size"] == "large" else 3.5) * rng.uniform(0.92, 1.08) * s
    fill = jitter_rgb(COLORS[attrs["color"]])
    shape = attrs["shape"]
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif shape == "square":
        h = half * 0.9
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half * 0.85), (cx + half, cy + half * 0.85)], fill=fill)
    elif shape == "cross":
        w = half * 0.36
        draw.rectangle([cx - half, cy - w, cx + half, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - half, cx + w, cy + half], fill=fill)
    else:
        raise TLCMError(f"unknown shape {shape!r}", f"use one of {', '.join(SHAPES)}")
    return img.resize((resolution, resolution), Image.Resampling.BOX)


def _record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(index)])


def iter_records(seed: int, split: str = "train", start: int = 0) -> Iterator[tuple[Image.Image, str, dict]]:
    """Unlimited stream of ``(image, caption, attributes)``; record ``i`` depends only on ``(seed, split, i)``."""
    _check_split(split)
    i = start
    while True:
        rng = _record_rng(seed, split, i)
        attrs = sample_attributes(rng, split)
        text = caption(attrs, rng)
        yield render(attrs, rng), text, attrs
        i += 1


def sample_records(n: int, seed: int = 0, split: str = "train") -> list[tuple[Image.Image, str, dict]]:
    """``n`` records ``(PIL image, caption, attributes)`` of ``split``, deterministic in ``seed``."""
    if n < 0:
        raise TLCMError(f"cannot draw {n} records", "ask for n >= 0")
    it = iter_records(seed, split)
    return [next(it) for _ in range(n)]


def prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` captions of ``split`` (the captions of :func:`sample_records` with the same arguments, without images)."""
    _check_split(split)
    out = []
    for i in range(n):
        rng = _record_rng(seed, split, i)
        out.append(caption(sample_attributes(rng, split), rng))
    return out


def render_prompts(prompt_list: Sequence[str], seed: int = 0, resolution: int = RESOLUTION) -> list[Image.Image]:
    """Real images for prompts: each prompt is parsed and drawn (unnamed attributes drawn at random)."""
    images = []
    for i, p in enumerate(prompt_list):
        rng = np.random.default_rng([int(seed), 7, i])
        attrs = attributes_from_prompt(p)
        full = {name: attrs.get(name) or CLASSES[name][int(rng.integers(len(CLASSES[name])))] for name in ATTRIBUTES}
        images.append(render(full, rng, resolution))
    return images


# --- imagefolder export / import --------------------------------------------------------------------------------------
_TEXT_COLUMNS = ("text", "caption", "prompt")
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def record_metadata(attrs: dict) -> dict:
    """The columns a record adds to an imagefolder's ``metadata.jsonl``: its five attributes."""
    return dict(attrs)


def export_imagefolder(out_dir: str | os.PathLike, n: int, seed: int = 0, n_heldout: int = 0, progress: bool = False):
    """The shapes world as an imagefolder (:func:`tlcm.toy.worlds.export_imagefolder`)."""
    import sys

    from tlcm.toy.worlds import export_imagefolder as export

    return export(sys.modules[__name__], out_dir, n, seed, n_heldout, progress)


def load_imagefolder(path: str | os.PathLike, split: str | None = None) -> list[tuple[Path, str]]:
    """Read ``(image path, caption)`` pairs from an imagefolder (a folder with ``metadata.jsonl``).

    ``path`` may be the split folder itself, or a dataset root whose ``split`` subfolder (default ``train``, or the
    root itself if it has a metadata file) holds the metadata. The caption column is the first of ``text``,
    ``caption``, ``prompt`` present.
    """
    root = Path(path)
    if not root.is_dir():
        raise TLCMError(f"no such image folder: {root}", "pass a folder with images and a metadata.jsonl")
    candidates = [root / split] if split else [root, root / "train"]
    folder = next((c for c in candidates if (c / "metadata.jsonl").is_file()), None)
    if folder is None:
        raise TLCMError(
            f"no metadata.jsonl in {', '.join(str(c) for c in candidates)}",
            "write one JSON object per line with 'file_name' and 'text' (HF imagefolder convention), "
            "or create the toy dataset with `tlcm toy dataset`",
        )
    pairs = []
    with open(folder / "metadata.jsonl") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TLCMError(f"{folder / 'metadata.jsonl'} line {lineno} is not JSON: {err}") from None
            col = next((c for c in _TEXT_COLUMNS if c in row), None)
            if "file_name" not in row or col is None:
                raise TLCMError(
                    f"{folder / 'metadata.jsonl'} line {lineno} lacks 'file_name' or a caption column",
                    f"each row needs 'file_name' and one of {', '.join(_TEXT_COLUMNS)}",
                )
            img_path = folder / row["file_name"]
            if img_path.suffix.lower() not in _IMAGE_EXTS or not img_path.is_file():
                raise TLCMError(f"image {img_path} (line {lineno}) is missing or not an image", "fix metadata.jsonl")
            pairs.append((img_path, str(row[col])))
    if not pairs:
        raise TLCMError(f"{folder / 'metadata.jsonl'} lists no images", "add at least one image with a caption")
    return pairs


def load_image(path: str | os.PathLike, resolution: int = RESOLUTION) -> Image.Image:
    """Open an image as RGB, centre-crop it square and resize it to ``resolution``."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = min(w, h)
    img = img.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img


def images_to_array(images: Sequence[Image.Image]) -> np.ndarray:
    """Stack PIL images into a ``uint8 (N, H, W, 3)`` array."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
