"""The "scenes" world (toy world v4): 48x48 scenes of one to three objects whose captions name only some of what is
drawn, so that one caption stands for many images, as on LAION.

Why this world exists: in the v3 shapes world a caption fixes shape, colour, size, position and background, so the
image is nearly a function of its caption and the teacher's one-step x0 prediction from pure noise is already close to
a sample; nothing in that world needs distillation. Stable Diffusion's one-step prediction is a blurry average of many
images. Here, too: a caption such as ``"a red circle"`` leaves free how many other objects there are, their shapes,
colours, sizes, patterns and places, the circle's own size, pattern and place, the background colour and its shading.
The free attributes are both coarse (count, positions, colours: the one-step average is a blur) and fine (stripe
phase and orientation, outlines, shading direction: a two-step sample still averages them away).

A scene is drawn from a seeded ``numpy`` generator, so record ``i`` is a pure function of ``(seed, split, i)``:

- background: colour (black, white, gray, blue) and style (plain, or shaded: a linear ramp towards a lighter or
  darker tone in a random direction);
- 1 to 3 objects, each with shape (circle, square, triangle, cross), colour (8), size (small, large), pattern (solid,
  striped at a random angle and phase, outlined; small objects are always solid: a 12 px stripe or outline is below
  what a 12x12x4 latent keeps) and a continuous position (objects barely overlap); its *region* is the 3x3 cell of its
  centre.

A caption names a random subset: zero to two of the objects (each by a random non-empty subset of its shape, colour,
size, pattern and region), maybe the exact object count, maybe the background colour and style. :func:`parse_prompt`
reads every caption of the grammar back into *claims* (count, background, style, object queries); the metrics
classifier checks each claim (:mod:`tlcm.toy.scene_metrics`).

Compositional split: the (shape, colour) pairs of ``HELDOUT_PAIRS`` never appear in a training scene; the held-out
split draws scenes whose first object is such a pair and names its shape and colour.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from tlcm.errors import TLCMError

NAME = "scenes"
VERSION = "v4"
RESOLUTION = 48
SUPERSAMPLE = 4
TEXT_MAX_LENGTH = 40  # MiniLM tokens; the longest caption of the grammar has 33 (tests check it)

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
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (120, 120, 120), "blue": (25, 45, 120)}
STYLES = ("plain", "shaded")
SIZES = ("small", "large")
PATTERNS = ("solid", "striped", "outlined")
REGIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
COUNTS = (1, 2, 3)
SPLITS = ("train", "heldout")
HELDOUT_PAIRS = frozenset({("circle", "green"), ("square", "purple"), ("triangle", "cyan"), ("cross", "red")})

# What an object query may name (a caption names a non-empty subset of one object's values).
OBJECT_ATTRIBUTES = {"shape": SHAPES, "color": tuple(COLORS), "size": SIZES, "pattern": PATTERNS, "region": REGIONS}
# Scene-level classes the classifier predicts directly (and captions may claim).
SCENE_CLASSES = {"count": COUNTS, "background": tuple(BACKGROUNDS), "style": STYLES}
CLAIM_KINDS = ("object", "count", "background", "style")

# geometry, in pixels of a 48x48 image
HALF_SIZE = {"small": 6.0, "large": 9.5}  # half the extent of a shape
STRIPE_PERIOD = 7.0
OUTLINE_WIDTH = 1.5
REGION_MARGIN = 2.0  # a caption names an object's region only when its centre is this far inside the cell

# Rendering styles that no caption names (the fine-tune world of tlcm.toy.finetune; not the "plain"/"shaded"
# background style, which captions do claim). ``None`` renders the default world, byte for byte.
RENDER_STYLES = ("shadow",)
# "shadow": each object casts a soft copy of its silhouette (its outline band if outlined) SHADOW_OFFSET pixels down
# and to the right, blurred by SHADOW_BLUR pixels, that moves what lies below it SHADOW_DARKEN of the way to black, or
# on the black background (where black shows nothing) SHADOW_LIGHTEN of the way to white. Soft, because hard-edged
# shadows read as extra objects: on 400 real scenes they cost the metrics classifier 3 points of alignment (0.969 ->
# 0.936), these ones none (0.972); through the v4 VAE (which never saw shadows) 0.946 -> 0.926.
SHADOW_OFFSET = 3.0
SHADOW_BLUR = 1.5
SHADOW_DARKEN = 0.5
SHADOW_LIGHTEN = 0.3

# --- caption grammar ------------------------------------------------------------------------------------------------
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square", "box"), "triangle": ("triangle", "wedge"),
               "cross": ("cross", "plus sign")}
GENERIC_NOUNS = ("shape", "object")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PATTERN_WORDS = {"solid": ("solid", "filled"), "striped": ("striped",), "outlined": ("outlined", "hollow")}
REGION_PHRASES = {
    "top left": ("in the top left", "in the upper left"),
    "top": ("at the top",),
    "top right": ("in the top right", "in the upper right"),
    "left": ("on the left",),
    "center": ("in the center", "in the middle"),
    "right": ("on the right",),
    "bottom left": ("in the bottom left", "in the lower left"),
    "bottom": ("at the bottom",),
    "bottom right": ("in the bottom right", "in the lower right"),
}
COUNT_WORDS = {1: ("one shape", "a single shape", "one object"), 2: ("two shapes", "two objects"),
               3: ("three shapes", "three objects")}
STYLE_WORDS = {"plain": ("plain",), "shaded": ("shaded", "gradient")}
BACKGROUND_WORDS = {"black": ("black",), "white": ("white",), "gray": ("gray", "grey"), "blue": ("blue",)}

# Probabilities of the caption generator (see :func:`caption`).
P_NAME = {"shape": 0.75, "color": 0.75, "size": 0.3, "pattern": 0.35, "region": 0.3}
P_TWO_MENTIONS = 0.3
P_NO_MENTION = 0.08
P_COUNT = 0.25
P_BACKGROUND = 0.35
P_STYLE = 0.2


# --- scenes -----------------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise TLCMError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def region_of(x: float, y: float) -> tuple[str, float]:
    """The 3x3 cell of a point and how far the point lies inside it (pixels to the nearest inner cell border)."""
    cell = RESOLUTION / 3
    col, row = min(2, int(x // cell)), min(2, int(y // cell))
    inside = []
    if col > 0:
        inside.append(x - col * cell)
    if col < 2:
        inside.append((col + 1) * cell - x)
    if row > 0:
        inside.append(y - row * cell)
    if row < 2:
        inside.append((row + 1) * cell - y)
    return REGIONS[3 * row + col], min(inside)


def _random_object(rng: np.random.Generator, split: str, background: str, first: bool, fixed: dict | None = None):
    fixed = fixed or {}
    for _ in range(1000):
        size = fixed.get("size") or ("large" if fixed.get("pattern", "solid") != "solid" else _pick(rng, SIZES))
        obj = {
            "shape": fixed.get("shape") or _pick(rng, SHAPES),
            "color": fixed.get("color") or _pick(rng, tuple(COLORS)),
            "size": size,
            "pattern": fixed.get("pattern") or (_pick(rng, PATTERNS) if size == "large" else "solid"),
        }
        if obj["size"] == "small" and obj["pattern"] != "solid":
            raise TLCMError(f"no small {obj['pattern']} object exists in the scenes world",
                            "small objects are always solid; ask for a large striped or outlined one")
        pair_held = (obj["shape"], obj["color"]) in HELDOUT_PAIRS
        if obj["color"] == "blue" and background == "blue":
            ok = False  # a blue object on the blue backdrop would be hard to see
        elif split == "train":
            ok = not pair_held
        else:  # held-out scenes: the first object is a held-out pair, the others are not
            ok = pair_held if first else not pair_held
        if ok:
            return obj
        if fixed and all(k in fixed for k in ("shape", "color")) and not ok:
            break
    raise TLCMError(f"no object satisfies {fixed} in split {split!r} on a {background} background",
                    "the held-out (shape, colour) pairs are " + ", ".join(f"{s} {c}" for s, c in HELDOUT_PAIRS))


def _place(rng: np.random.Generator, objects: list[dict], region: str | None = None) -> bool:
    """Give the last object of ``objects`` a centre (inside ``region`` if given) that barely overlaps the others."""
    obj = objects[-1]
    half = HALF_SIZE[obj["size"]] * obj["scale"]
    lo, hi = half + 1.0, RESOLUTION - half - 1.0
    for _ in range(200):
        if region is None:
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        else:
            cell = RESOLUTION / 3
            row, col = divmod(REGIONS.index(region), 3)
            x = rng.uniform(max(lo, col * cell + REGION_MARGIN), min(hi, (col + 1) * cell - REGION_MARGIN))
            y = rng.uniform(max(lo, row * cell + REGION_MARGIN), min(hi, (row + 1) * cell - REGION_MARGIN))
        clear = all(
            math.hypot(x - o["x"], y - o["y"]) >= 1.0 * (half + HALF_SIZE[o["size"]] * o["scale"])
            for o in objects[:-1]
        )
        if clear:
            obj["x"], obj["y"] = float(x), float(y)
            obj["region"], _ = region_of(x, y)
            return True
    return False


def sample_scene(rng: np.random.Generator, split: str = "train") -> dict:
    """One scene of ``split``: background, style, shading direction and a list of 1-3 placed objects."""
    _check_split(split)
    scene = {
        "background": _pick(rng, tuple(BACKGROUNDS)),
        "style": _pick(rng, STYLES),
        "shade_angle": float(rng.uniform(0, 2 * math.pi)),
        "objects": [],
    }
    n = int(_pick(rng, COUNTS))
    for i in range(n):
        obj = _random_object(rng, split, scene["background"], first=i == 0)
        obj.update(scale=float(rng.uniform(0.92, 1.08)), stripe_angle=float(_pick(rng, (0, 45, 90, 135))),
                   stripe_phase=float(rng.uniform(0, 1)), jitter=[int(v) for v in rng.integers(-10, 11, 3)])
        scene["objects"].append(obj)
        if not _place(rng, scene["objects"]):
            scene["objects"].pop()  # no room left: the scene has fewer objects (its count says so)
            if i == 0:
                raise AssertionError("the first object always fits")
    scene["count"] = len(scene["objects"])
    scene["bg_jitter"] = [int(v) for v in rng.integers(-10, 11, 3)]
    return scene


# --- rendering --------------------------------------------------------------------------------------------------------
def _triangle(cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    return [(cx, cy - half), (cx - half, cy + half * 0.85), (cx + half, cy + half * 0.85)]


def _inset_polygon(points: list[tuple[float, float]], d: float) -> list[tuple[float, float]]:
    """A triangle moved inwards by ``d`` on every side: scaled about its incentre by ``(r - d) / r``."""
    (ax, ay), (bx, by), (cx, cy) = points
    a, b, c = math.dist((bx, by), (cx, cy)), math.dist((ax, ay), (cx, cy)), math.dist((ax, ay), (bx, by))
    ix, iy = (a * ax + b * bx + c * cx) / (a + b + c), (a * ay + b * by + c * cy) / (a + b + c)
    area = abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2
    k = max(0.0, 1 - d / (2 * area / (a + b + c)))
    return [(ix + k * (x - ix), iy + k * (y - iy)) for x, y in points]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, inset: float, fill: int):
    if shape == "circle":
        r = half - inset
        if r > 0:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = half * 0.9 - inset
        if h > 0:
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon(_inset_polygon(_triangle(cx, cy, half), inset) if inset else _triangle(cx, cy, half), fill=fill)
    elif shape == "cross":
        w, h = half * 0.36 - inset, half - inset
        if w > 0:
            draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
            draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
    else:
        raise TLCMError(f"unknown shape {shape!r}", f"use one of {', '.join(SHAPES)}")


def _shape_mask(shape: str, cx: float, cy: float, half: float, size: tuple[int, int], outline: float = 0.0):
    """An antialiasing-free 0/255 mask of a shape (filled, or only a band of width ``outline`` inside its edge)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    _draw_shape(draw, shape, cx, cy, half, 0.0, 255)
    if outline:
        _draw_shape(draw, shape, cx, cy, half, outline, 0)
    return mask


def _jittered(rgb, jitter) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(rgb, jitter))


def _check_style(style: str | None) -> None:
    if style is not None and style not in RENDER_STYLES:
        raise TLCMError(f"unknown rendering style {style!r}", f"use one of {', '.join(RENDER_STYLES)} (or none)")


def _background(scene: dict, size: int) -> np.ndarray:
    base = np.array(_jittered(BACKGROUNDS[scene["background"]], scene["bg_jitter"]), dtype=np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene["style"] == "shaded":
        # a linear ramp across the image towards a tone 45 % of the way to white (dark colours) or to black (white)
        tone = np.full(3, 255.0 if base.mean() < 128 else 0.0, dtype=np.float32)
        target = base + 0.45 * (tone - base)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        xx, yy = np.meshgrid(coords, coords)
        a = scene["shade_angle"]
        ramp = np.clip((xx * math.cos(a) + yy * math.sin(a)) / math.sqrt(0.5) + 0.5, 0, 1)[..., None]
        img = img * (1 - ramp) + target * ramp
    return img


def _cast_shadow(canvas: Image.Image, scene: dict, obj: dict, s: float) -> None:
    """The "shadow" style (see SHADOW_OFFSET): darkens (on the black background: lightens) what is already drawn."""
    from PIL import ImageFilter

    size = canvas.size[0]
    half = HALF_SIZE[obj["size"]] * obj["scale"] * s
    cx, cy = (obj["x"] + SHADOW_OFFSET) * s, (obj["y"] + SHADOW_OFFSET) * s
    pad = 2 + 3 * SHADOW_BLUR * s
    x0, y0 = int(max(0, math.floor(cx - half - pad))), int(max(0, math.floor(cy - half - pad)))
    x1, y1 = int(min(size, math.ceil(cx + half + pad))), int(min(size, math.ceil(cy + half + pad)))
    outline = OUTLINE_WIDTH * s if obj["pattern"] == "outlined" else 0.0
    mask = _shape_mask(obj["shape"], cx - x0, cy - y0, half, (x1 - x0, y1 - y0), outline)
    mask = mask.filter(ImageFilter.GaussianBlur(SHADOW_BLUR * s))
    below = np.asarray(canvas.crop((x0, y0, x1, y1)), dtype=np.float32)
    if scene["background"] == "black":
        fill = below + SHADOW_LIGHTEN * (255.0 - below)
    else:
        fill = below * (1 - SHADOW_DARKEN)
    canvas.paste(Image.fromarray(fill.round().astype(np.uint8)), (x0, y0), mask)


def render_scene(scene: dict, resolution: int = RESOLUTION, style: str | None = None) -> Image.Image:
    """Draw a scene (supersampled, then box-filtered down: antialiased edges and stripes), in a rendering ``style``
    of :data:`RENDER_STYLES` if given (default: the world's own look)."""
    _check_style(style)
    size = SUPERSAMPLE * resolution
    s = size / RESOLUTION  # drawing units per 48-grid pixel
    canvas = Image.fromarray(_background(scene, size).round().astype(np.uint8))
    for obj in scene["objects"]:
        if style == "shadow":
            _cast_shadow(canvas, scene, obj, s)
        half = HALF_SIZE[obj["size"]] * obj["scale"] * s
        # work in the object's bounding box only
        x0, y0 = int(max(0, math.floor(obj["x"] * s - half - 2))), int(max(0, math.floor(obj["y"] * s - half - 2)))
        x1, y1 = int(min(size, math.ceil(obj["x"] * s + half + 2))), int(min(size, math.ceil(obj["y"] * s + half + 2)))
        box = (x1 - x0, y1 - y0)
        outline = OUTLINE_WIDTH * s if obj["pattern"] == "outlined" else 0.0
        mask = _shape_mask(obj["shape"], obj["x"] * s - x0, obj["y"] * s - y0, half, box, outline)
        color = np.array(_jittered(COLORS[obj["color"]], obj["jitter"]), dtype=np.float32)
        if obj["pattern"] == "striped":
            a = math.radians(obj["stripe_angle"])
            xx, yy = np.meshgrid((np.arange(x0, x1) + 0.5) / s, (np.arange(y0, y1) + 0.5) / s)
            u = (xx * math.cos(a) + yy * math.sin(a)) / STRIPE_PERIOD + obj["stripe_phase"]
            fill = np.where(((u - np.floor(u)) < 0.5)[..., None], color, color * 0.35)
        else:
            fill = np.broadcast_to(color, (box[1], box[0], 3))
        canvas.paste(Image.fromarray(np.ascontiguousarray(fill).round().astype(np.uint8)), (x0, y0), mask)
    return canvas.resize((resolution, resolution), Image.Resampling.BOX)


# --- captions -------------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def mention_text(query: dict, rng: np.random.Generator) -> str:
    """A noun phrase for an object query, e.g. ``a large striped red circle in the top left``."""
    words = []
    if "size" in query:
        words.append(_pick(rng, SIZE_WORDS[query["size"]]))
    if "pattern" in query:
        words.append(_pick(rng, PATTERN_WORDS[query["pattern"]]))
    if "color" in query:
        words.append(query["color"])
    words.append(_pick(rng, SHAPE_WORDS[query["shape"]]) if "shape" in query else _pick(rng, GENERIC_NOUNS))
    text = f"{_article(words[0])} {' '.join(words)}"
    if "region" in query:
        text += " " + _pick(rng, REGION_PHRASES[query["region"]])
    return text


def _object_query(obj: dict, rng: np.random.Generator, must: Sequence[str] = ()) -> dict:
    inside = region_of(obj["x"], obj["y"])[1] >= REGION_MARGIN
    named = {k: obj[k] for k, p in P_NAME.items() if k in must or (rng.random() < p and (k != "region" or inside))}
    if not named:
        key = _pick(rng, ("shape", "color"))
        named[key] = obj[key]
    return named


def caption_claims(scene: dict, rng: np.random.Generator, split: str = "train") -> dict:
    """Choose what a caption of ``scene`` says: ``{"objects": [query, ...], "count", "background", "style"}``."""
    objects = scene["objects"]
    if split == "heldout":
        mentioned = [0] + ([int(rng.integers(1, len(objects)))] if len(objects) > 1 and rng.random() < P_TWO_MENTIONS
                           else [])
    elif rng.random() < P_NO_MENTION:
        mentioned = []
    elif len(objects) > 1 and rng.random() < P_TWO_MENTIONS:
        mentioned = sorted(rng.choice(len(objects), 2, replace=False).tolist())
    else:
        mentioned = [int(rng.integers(len(objects)))]
    queries = [_object_query(objects[i], rng, ("shape", "color") if split == "heldout" and i == 0 else ())
               for i in mentioned]
    if len(queries) == 2:
        # two mentions must not be satisfiable by one object: both name a common attribute with different values
        a, b = queries
        if not any(k in a and k in b and a[k] != b[k] for k in OBJECT_ATTRIBUTES):
            diff = [k for k in ("shape", "color", "size", "pattern") if objects[mentioned[0]][k] !=
                    objects[mentioned[1]][k]]
            if diff:
                k = _pick(rng, diff)
                a[k], b[k] = objects[mentioned[0]][k], objects[mentioned[1]][k]
            else:  # identical but for place: name only one of them
                queries = [a]
    claims = {"objects": queries}
    if rng.random() < P_COUNT or not queries:
        claims["count"] = scene["count"]
    if rng.random() < P_BACKGROUND or (not queries and rng.random() < 0.5):
        claims["background"] = scene["background"]
    if rng.random() < P_STYLE:
        claims["style"] = scene["style"]
    return claims


def claims_text(claims: dict, rng: np.random.Generator) -> str:
    """Words for a set of claims (the inverse of :func:`parse_prompt`)."""
    mentions = [mention_text(q, rng) for q in claims["objects"]]
    body = " and ".join(mentions)
    bg_words = []
    if "style" in claims:
        bg_words.append(_pick(rng, STYLE_WORDS[claims["style"]]))
    if "background" in claims:
        bg_words.append(_pick(rng, BACKGROUND_WORDS[claims["background"]]))
    bg = ""
    if bg_words:
        bg = f"{_article(bg_words[0])} {' '.join(bg_words)} {_pick(rng, ('background', 'backdrop'))}"
    count = _pick(rng, COUNT_WORDS[claims["count"]]) if "count" in claims else ""
    if count and body:
        text = f"{count}: {body}" if rng.random() < 0.5 else f"{count}, including {body}"
    else:
        text = count or body
    if bg:
        if body and not count and rng.random() < 0.3:
            text = f"{bg} with {body}"
        else:
            text = f"{text} on {bg}"
    return text


# --- parser -----------------------------------------------------------------------------------------------------------
def _table(words: dict) -> list[tuple[str, object]]:
    rows = [(w, value) for value, ws in words.items() for w in ws]
    return sorted(rows, key=lambda r: -len(r[0]))


_REGION_TABLE = _table(REGION_PHRASES)
_COUNT_TABLE = _table(COUNT_WORDS)
_SHAPE_TABLE = _table(SHAPE_WORDS)
_SIZE = {w: v for v, ws in SIZE_WORDS.items() for w in ws}
_PATTERN = {w: v for v, ws in PATTERN_WORDS.items() for w in ws}
_STYLE = {w: v for v, ws in STYLE_WORDS.items() for w in ws}
_BG = {w: v for v, ws in BACKGROUND_WORDS.items() for w in ws}
_FILLER = {"a", "an", "the", "of", "them", "one", "shapes", "objects"}


def parse_prompt(prompt: str) -> dict:
    """Read a caption back into claims: ``{"objects": [query, ...]}`` plus optional ``count``, ``background``,
    ``style``. A query maps some of ``shape, color, size, pattern, region`` to values.

    Reads every caption :func:`caption` writes (tests check thousands) and hand-written prompts in the same words,
    e.g. ``"a red circle"``, ``"two shapes on a black background"``. Raises :class:`TLCMError` for a prompt that
    claims nothing this world knows, or uses a word it cannot place.
    """
    if not isinstance(prompt, str):
        raise TLCMError(f"a prompt must be a string, got {type(prompt).__name__}")
    text = " " + re.sub(r"\s+", " ", re.sub(r"[^a-z,:\s]", " ", prompt.lower())) + " "
    claims: dict = {"objects": []}

    def bad(why: str) -> TLCMError:
        return TLCMError(f"cannot read prompt {prompt!r}: {why}",
                         "write e.g. 'a large striped red circle in the top left and a blue shape on a black "
                         "background' (grammar: docs/toy.md)")

    # 1. background: "[style] [colour] background|backdrop"
    m = re.search(r"(?:\bon )?(?:\ban? )?\b((?:[a-z]+ ){0,2})(?:background|backdrop)\b", text)
    if m:
        for w in m.group(1).split():
            if w in _STYLE:
                claims["style"] = _STYLE[w]
            elif w in _BG:
                claims["background"] = _BG[w]
            else:
                raise bad(f"unknown background word {w!r} (colours: {', '.join(BACKGROUNDS)}; styles: plain, shaded)")
        text = text[: m.start()] + " , " + text[m.end():]
        text = re.sub(r"^\s*,\s*with\b", ",", text)
    # 2. count: "two shapes", "a single shape", ...
    for phrase, value in _COUNT_TABLE:
        if re.search(rf"\b{phrase}\b", text):
            claims["count"] = value
            text = re.sub(rf"\b{phrase}\b", " , ", text, count=1)
            break
    text = re.sub(r"\bincluding\b", ",", text)
    # 3. regions and multi-word shape nouns become single marker tokens
    for phrase, value in _REGION_TABLE:
        text = re.sub(rf"\b{phrase}\b", f" @region{REGIONS.index(value)} ", text)
    for phrase, value in _SHAPE_TABLE:
        text = re.sub(rf"\b{phrase}s?\b", f" @shape{SHAPES.index(value)} ", text)
    # 4. object mentions: chunks between separators, adjectives before a noun, a region after it
    for chunk in re.split(r"[,:]|\band\b", text):
        words = chunk.split()
        if not words:
            continue
        query: dict = {}
        noun = False
        for w in words:
            if w.startswith("@region"):
                if not noun:
                    raise bad("a place phrase must follow a shape")
                query["region"] = REGIONS[int(w[7:])]
            elif w.startswith("@shape"):
                if noun:
                    raise bad("two shapes in one phrase: join them with 'and'")
                query["shape"], noun = SHAPES[int(w[6:])], True
            elif w in GENERIC_NOUNS:
                if noun:
                    raise bad("two nouns in one phrase: join them with 'and'")
                noun = True
            elif w in _SIZE:
                query["size"] = _SIZE[w]
            elif w in _PATTERN:
                query["pattern"] = _PATTERN[w]
            elif w in COLORS:
                query["color"] = w
            elif w not in _FILLER:
                raise bad(f"unknown word {w!r}")
        if query and not noun:
            raise bad(f"{' '.join(words)!r} names no shape (add e.g. 'shape')")
        if noun and not query:
            continue  # "a shape": claims nothing beyond existence
        if query:
            claims["objects"].append(query)
    if not claims["objects"] and len(claims) == 1:
        raise bad("it names no object, count or background of the scenes world")
    return claims


def matches(obj: dict, query: dict) -> bool:
    return all(obj[k] == v for k, v in query.items())


def claim_truth(scene: dict, claims: dict) -> dict[str, list[bool]]:
    """Ground truth of each claim on a scene, grouped by kind (used to test captions and the classifier)."""
    out: dict[str, list[bool]] = {"object": [any(matches(o, q) for o in scene["objects"]) for q in claims["objects"]]}
    for kind in ("count", "background", "style"):
        if kind in claims:
            out[kind] = [scene[kind] == claims[kind]]
    return out


# --- records ---------------------------------------------------------------------------------------------------------
def _record_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 4, SPLITS.index(split), int(index)])


def record(seed: int, split: str, index: int) -> tuple[dict, str, dict]:
    """Scene, caption and the caption's claims of record ``index`` (the image is ``render_scene(scene)``)."""
    rng = _record_rng(seed, split, index)
    scene = sample_scene(rng, split)
    claims = caption_claims(scene, rng, split)
    return scene, claims_text(claims, rng), claims


def record_metadata(scene: dict) -> dict:
    """The columns a record adds to an imagefolder's ``metadata.jsonl``: its whole scene description."""
    return {"scene": scene}


def iter_records(seed: int, split: str = "train", start: int = 0,
                 style: str | None = None) -> Iterator[tuple[Image.Image, str, dict]]:
    """Unlimited stream of ``(image, caption, scene)``; record ``i`` depends only on ``(seed, split, i)``. A rendering
    ``style`` changes only the pixels: scenes and captions are those of the default world."""
    _check_split(split)
    _check_style(style)
    i = start
    while True:
        scene, text, _ = record(seed, split, i)
        yield render_scene(scene, style=style), text, scene
        i += 1


def sample_records(n: int, seed: int = 0, split: str = "train",
                   style: str | None = None) -> list[tuple[Image.Image, str, dict]]:
    """``n`` records ``(PIL image, caption, scene)`` of ``split``, deterministic in ``seed``."""
    if n < 0:
        raise TLCMError(f"cannot draw {n} records", "ask for n >= 0")
    it = iter_records(seed, split, style=style)
    return [next(it) for _ in range(n)]


def prompts(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """``n`` captions of ``split`` (those of :func:`sample_records` with the same arguments)."""
    _check_split(split)
    return [record(seed, split, i)[1] for i in range(n)]


def scene_for_claims(claims: dict, rng: np.random.Generator) -> dict:
    """A scene that satisfies ``claims``: named attributes as claimed, every free one drawn as in the dataset.

    Used for real images of free-form prompts (toy-FID against data). For captions of the dataset itself, the
    records with those captions are exact samples of the conditional distribution; this constructive sampler is an
    approximation of it (it does not weigh scenes by how likely they are to be described by the caption)."""
    wants_blue = any(q.get("color") == "blue" for q in claims["objects"])
    if wants_blue and claims.get("background") == "blue":
        raise TLCMError("the prompt asks for a blue object on the blue background, which the scenes world never draws",
                        "choose another colour or background")
    backgrounds = tuple(b for b in BACKGROUNDS if not (wants_blue and b == "blue"))
    scene = {
        "background": claims.get("background") or _pick(rng, backgrounds),
        "style": claims.get("style") or _pick(rng, STYLES),
        "shade_angle": float(rng.uniform(0, 2 * math.pi)),
        "objects": [],
        "bg_jitter": [int(v) for v in rng.integers(-10, 11, 3)],
    }
    queries = list(claims["objects"])
    lo = max(1, len(queries))
    n = claims.get("count") or int(_pick(rng, [c for c in COUNTS if c >= lo]))
    if n < len(queries):
        raise TLCMError(f"the prompt claims {n} objects but describes {len(queries)}", "make them agree")
    for i in range(n):
        fixed = queries[i] if i < len(queries) else {}
        split = "heldout" if i < len(queries) and (fixed.get("shape"), fixed.get("color")) in HELDOUT_PAIRS \
            else "train"
        obj = _random_object(rng, split, scene["background"], first=True, fixed=fixed)
        obj.update(scale=float(rng.uniform(0.92, 1.08)), stripe_angle=float(_pick(rng, (0, 45, 90, 135))),
                   stripe_phase=float(rng.uniform(0, 1)), jitter=[int(v) for v in rng.integers(-10, 11, 3)])
        scene["objects"].append(obj)
        if not _place(rng, scene["objects"], fixed.get("region")):
            if i < len(queries) or "count" in claims:
                scene["objects"].pop()
                return scene_for_claims(claims, rng)  # start over with fresh draws
            scene["objects"].pop()
    scene["count"] = len(scene["objects"])
    return scene


def render_prompts(prompt_list: Sequence[str], seed: int = 0, resolution: int = RESOLUTION,
                   style: str | None = None) -> list[Image.Image]:
    """Real images for prompts: each prompt is parsed and a scene satisfying it is drawn (free attributes random)."""
    _check_style(style)
    images = []
    for i, p in enumerate(prompt_list):
        rng = np.random.default_rng([int(seed), 7, i])
        images.append(render_scene(scene_for_claims(parse_prompt(p), rng), resolution, style=style))
    return images
