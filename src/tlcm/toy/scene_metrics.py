"""The metrics model of the scenes world (v4): a scene classifier with a tiny object detector that checks claims.

A v4 caption makes *claims* (an object matching a query exists; the scene has N objects; its background is C and
plain or shaded), and several objects share one image, so the v3 recipe (one classifier head per attribute of the
single shape) cannot check a caption. This model has:

- an image tower (a small CNN, 48x48 -> a 6x6 feature map, one cell per 8x8 pixels) whose pooled ``features``
  (``feature_dim``) are the toy-FID and precision/recall space, trained through all heads below;
- heads on the pooled features for the scene-level claims: count (1-3), background colour, background style;
- a **cell head** (CenterNet-style): for each cell, the probability that an object's centre lies in it and the
  distributions of that object's shape, colour, size and pattern. An object query ("a large red circle in the top
  left") is confirmed when some cell (inside the named 3x3 region: each region is exactly 2x2 cells) has
  ``p(object) * prod over named attributes p(value) > 1/2``. Binding is exact: attributes are read at one object.

The model is trained on rendered images of both splits (every (shape, colour) pair) with a seed disjoint from the
teacher's data, with light blur and noise so it reads decoded images. Alignment of an image with a prompt is the
fraction of the prompt's claims the model confirms (:meth:`SceneMetricsModel.claim_hits`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlcm.toy import common, scenes

COUNT_VALUES = scenes.COUNTS
BG_VALUES = tuple(scenes.BACKGROUNDS)
STYLE_VALUES = scenes.STYLES


def _block(i: int, o: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())


GRID = 6  # cells per side of the feature map
CELL = scenes.RESOLUTION / GRID
CELL_ATTRIBUTES = {"shape": scenes.SHAPES, "color": tuple(scenes.COLORS), "size": scenes.SIZES,
                   "pattern": scenes.PATTERNS}


def cell_of(x: float, y: float) -> int:
    """Index (row-major, 0..35) of the 8x8-pixel cell holding a point."""
    return min(GRID - 1, int(y // CELL)) * GRID + min(GRID - 1, int(x // CELL))


def region_cells(region: str) -> list[int]:
    """The 2x2 cells that make up one of the 3x3 caption regions."""
    row, col = divmod(scenes.REGIONS.index(region), 3)
    return [(2 * row + dr) * GRID + 2 * col + dc for dr in (0, 1) for dc in (0, 1)]


class SceneClassifier(nn.Module):
    """48x48 RGB -> features; scene heads; a per-cell object head (see the module docstring)."""

    def __init__(self, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, w, 1),
            _block(w, 2 * w, 2),  # 24
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),  # 12
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),  # 6
        )
        c = 4 * w
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(c * GRID * GRID, 256), nn.SiLU(), nn.Linear(256, feature_dim))
        self.heads = nn.ModuleDict({
            "count": nn.Linear(feature_dim, len(COUNT_VALUES)),
            "background": nn.Linear(feature_dim, len(BG_VALUES)),
            "style": nn.Linear(feature_dim, len(STYLE_VALUES)),
        })
        n_cell = 1 + sum(len(v) for v in CELL_ATTRIBUTES.values())
        self.cell_head = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.SiLU(), nn.Conv2d(c, n_cell, 1))
        self.config = {"world": "v4", "width": width, "feature_dim": feature_dim}

    def feature_map(self, x01: torch.Tensor) -> torch.Tensor:
        return self.body(x01 * 2 - 1)

    def features_from_map(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(fmap))

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return self.features_from_map(self.feature_map(x01))

    def scene_logits(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: head(feats) for k, head in self.heads.items()}

    def cell_logits(self, fmap: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per cell (``(B, 36)`` and ``(B, 36, classes)``): object-centre logit and attribute logits."""
        out = self.cell_head(fmap).flatten(2).transpose(1, 2)  # (B, 36, 1 + classes)
        logits = {"object": out[..., 0]}
        i = 1
        for key, values in CELL_ATTRIBUTES.items():
            logits[key] = out[..., i : i + len(values)]
            i += len(values)
        return logits

    @staticmethod
    def match_probability(cells: dict[str, torch.Tensor], image: int, query: dict) -> torch.Tensor:
        """``max`` over allowed cells of ``p(object) * prod p(named value)`` for one query on one image."""
        p = torch.sigmoid(cells["object"][image])
        for key, values in CELL_ATTRIBUTES.items():
            if key in query:
                p = p * torch.softmax(cells[key][image], dim=-1)[:, values.index(query[key])]
        if "region" in query:
            p = p[region_cells(query["region"])]
        return p.max()


# --- training ---------------------------------------------------------------------------------------------------------
@dataclass
class SceneMetricsConfig:
    train_images: int = 24000
    eval_images: int = 1000
    heldout_fraction: float = 0.2  # share of held-out-split scenes, so every (shape, colour) pair is known
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    feature_dim: int = 128
    seed: int = 1000  # distinct from the dataset's seed: the classifier never sees the teacher's training images
    checkpoint_every: int = 250
    threads: int = 2


def _scene_labels(scene: dict) -> dict[str, np.ndarray]:
    """Training targets of one scene: scene classes, and per cell the object centred there (-100: none)."""
    labels = {
        "count": np.int64(COUNT_VALUES.index(scene["count"])),
        "background": np.int64(BG_VALUES.index(scene["background"])),
        "style": np.int64(STYLE_VALUES.index(scene["style"])),
        "object": np.zeros(GRID * GRID, dtype=np.float32),
    }
    for key in CELL_ATTRIBUTES:
        labels[key] = np.full(GRID * GRID, -100, dtype=np.int64)
    for obj in scene["objects"]:
        cell = cell_of(obj["x"], obj["y"])
        if labels["object"][cell]:
            continue  # two centres in one cell (rare: small objects side by side): the first one is the label
        labels["object"][cell] = 1.0
        for key, values in CELL_ATTRIBUTES.items():
            labels[key][cell] = values.index(obj[key])
    return labels


def _real_scenes(n: int, seed: int, heldout_fraction: float, progress: bool = False):
    from tqdm.auto import tqdm

    n_held = int(round(n * heldout_fraction))
    records = []
    for split, count in (("train", n - n_held), ("heldout", n_held)):
        it = scenes.iter_records(seed, split)
        records += [next(it) for _ in tqdm(range(count), desc=f"rendering {split} scenes", disable=not progress,
                                           mininterval=2)]
    images = np.stack([np.asarray(r[0], dtype=np.uint8) for r in records])
    return images, [r[2] for r in records]


def sample_query(scene: dict, rng: np.random.Generator) -> tuple[dict, bool]:
    """A query for measuring the claim checker on ``scene``, and its ground truth: half are true (a random non-empty
    subset of one object's attributes; a region only when the object sits clearly inside it, as captions do), half
    are a true query with one value changed (hard negatives, labelled by ground truth: the change may still match
    another object)."""
    obj = scene["objects"][int(rng.integers(len(scene["objects"])))]
    keys = [k for k in ("shape", "color", "size", "pattern") if rng.random() < 0.5]
    if scenes.region_of(obj["x"], obj["y"])[1] >= scenes.REGION_MARGIN and rng.random() < 0.3:
        keys.append("region")
    if not keys:
        keys = [str(rng.choice(["shape", "color"]))]
    query = {k: obj[k] for k in keys}
    if rng.random() < 0.5:
        k = keys[int(rng.integers(len(keys)))]
        options = [v for v in scenes.OBJECT_ATTRIBUTES[k] if v != query[k]]
        query[k] = options[int(rng.integers(len(options)))]
    truth = any(scenes.matches(o, query) for o in scene["objects"])
    return query, truth


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return common.blur_noise_augment(x, g, 0.2, 0.03)


def train_scene_metrics(cfg: SceneMetricsConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the scene classifier; writes ``classifier.safetensors``, ``config.json``, ``report.json``. Resumable."""

    out = Path(out_dir)
    if (done := common.finished_report(out, "classifier.safetensors")) is not None:
        return done
    clock = common.begin_run(cfg, out)
    cache = out / "real.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            images, scene_list = z["images"], json.loads(str(z["scenes"]))
    else:
        images, scene_list = _real_scenes(cfg.train_images, cfg.seed, cfg.heldout_fraction, progress)
        tmp = Path(str(cache) + ".tmp.npz")
        np.savez(tmp, images=images, scenes=np.array(json.dumps(scene_list)))
        tmp.replace(cache)
    labels = [_scene_labels(s) for s in scene_list]
    y = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in labels[0]}
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)

    torch.manual_seed(cfg.seed)
    model = SceneClassifier(cfg.width, cfg.feature_dim)
    opt, sched, ckpt, start, rng, g = common.one_cycle_optimisation(model, cfg, out, 1e-4)
    model.train()

    def train_step(step: int) -> float:
        idx = torch.from_numpy(rng.integers(0, len(x_all), cfg.batch_size))
        x = _augment(x_all[idx].float() / 255, g)
        fmap = model.feature_map(x)
        logits = model.scene_logits(model.features_from_map(fmap))
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in ("count", "background", "style"))
        cells = model.cell_logits(fmap)
        loss = loss + F.binary_cross_entropy_with_logits(cells["object"], y["object"][idx]) * GRID
        for key in CELL_ATTRIBUTES:
            loss = loss + F.cross_entropy(cells[key].flatten(0, 1), y[key][idx].flatten(), ignore_index=-100)
        common.optimiser_step(loss, opt, sched)
        return loss.item()

    history = common.run_training(train_step, start, cfg.steps, ckpt, cfg.checkpoint_every, "train-metrics (v4)",
                                  progress, model=model, opt=opt, sched=sched)
    model.eval()
    common.save_weights_atomic(model.state_dict(), out / "classifier.safetensors")
    common.write_json(out / "config.json", model.config)
    metrics = SceneMetricsModel(model)
    report = {"train_seconds": round(clock.seconds, 1), **common.loss_summary(history)}
    report.update(evaluate_scene_classifier(metrics, cfg.eval_images, seed=cfg.seed + 1))
    report["seconds"] = round(clock.seconds, 1)
    common.write_json(out / "report.json", report)
    return report


# --- using it -----------------------------------------------------------------------------------------------------
class SceneMetricsModel:
    """Claims checked by a trained :class:`SceneClassifier` (what :class:`tlcm.toy.metrics.ToyMetrics` calls)."""

    world = "v4"
    resolution = scenes.RESOLUTION

    def __init__(self, model: SceneClassifier, batch_size: int = 250):
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size

    @classmethod
    def from_folder(cls, folder: Path, cfg: dict) -> SceneMetricsModel:
        from safetensors.torch import load_file

        model = SceneClassifier(cfg["width"], cfg["feature_dim"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / "classifier.safetensors")).items()})
        return cls(model)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.features(x[i : i + self.batch_size])
                          for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def claim_hits(self, x: torch.Tensor, prompts: list[str]) -> list[dict[str, list[bool]]]:
        """Per image, which of its prompt's claims the model confirms, grouped by kind (``object``, ``count``,
        ``background``, ``style``)."""
        parsed = [scenes.parse_prompt(p) for p in prompts]
        out: list[dict[str, list[bool]]] = []
        for i in range(0, len(x), self.batch_size):
            fmap = self.model.feature_map(x[i : i + self.batch_size])
            logits = self.model.scene_logits(self.model.features_from_map(fmap))
            cells = self.model.cell_logits(fmap)
            for j, claims in enumerate(parsed[i : i + self.batch_size]):
                hits = {"object": [bool(self.model.match_probability(cells, j, q) > 0.5) for q in claims["objects"]]}
                for kind, values in (("count", COUNT_VALUES), ("background", BG_VALUES), ("style", STYLE_VALUES)):
                    if kind in claims:
                        hits[kind] = [values[int(logits[kind][j].argmax())] == claims[kind]]
                out.append(hits)
        return out

    @torch.no_grad()
    def object_attribute_hits(self, x: torch.Tensor, prompts: list[str]) -> dict[str, list[bool]]:
        """Each object claim split into one-attribute queries (``a red circle on the left`` -> some object is red,
        some object is a circle, some object is centred on the left), pooled per attribute over all images.

        Why: an object claim fails when any named attribute or their binding fails; this says which attribute a
        model gets wrong (a teacher that draws the right colours in the wrong places scores high on ``color`` and
        near chance on ``region``). Binding is not tested here, so each rate is an upper bound of the claim's."""
        parsed = [scenes.parse_prompt(p) for p in prompts]
        pooled: dict[str, list[bool]] = {k: [] for k in scenes.OBJECT_ATTRIBUTES}
        for i in range(0, len(x), self.batch_size):
            cells = self.model.cell_logits(self.model.feature_map(x[i : i + self.batch_size]))
            for j, claims in enumerate(parsed[i : i + self.batch_size]):
                for query in claims["objects"]:
                    for key, value in query.items():
                        pooled[key].append(bool(self.model.match_probability(cells, j, {key: value}) > 0.5))
        return pooled

    def object_attribute_rates(self, x: torch.Tensor, prompts: list[str]) -> dict[str, dict]:
        """Share of confirmed one-attribute queries per attribute (:meth:`object_attribute_hits`), with the number
        of queries behind each (attributes no prompt names are left out)."""
        hits = self.object_attribute_hits(x, prompts)
        return {k: {"rate": round(float(np.mean(v)), 4), "queries": len(v)} for k, v in hits.items() if v}

    @torch.no_grad()
    def verify(self, x: torch.Tensor, queries: list[dict]) -> torch.Tensor:
        """Whether some object of image ``i`` matches ``queries[i]`` (a bool per image)."""
        cells = self.model.cell_logits(self.model.feature_map(x))
        return torch.stack([self.model.match_probability(cells, i, q) > 0.5 for i, q in enumerate(queries)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scene-level predictions: class index per image for count, background and style."""
        feats = self.features(x)
        logits = self.model.scene_logits(feats)
        return {k: logits[k].argmax(1) for k in ("count", "background", "style")}


def evaluate_scene_classifier(metrics: SceneMetricsModel, n: int = 1000, seed: int = 1001) -> dict:
    """Accuracy on fresh real scenes of each split: scene heads, true caption claims (recall of the verifier) and
    hard-negative queries (its specificity); alignment of real images with their captions; real-vs-real toy-FID."""
    from tlcm.math.frechet import frechet_distance_from_features

    result: dict = {}
    for split in scenes.SPLITS:
        recs = scenes.sample_records(n, seed, split)
        x = common.to_tensor([r[0] for r in recs])
        hits = metrics.claim_hits(x, [r[1] for r in recs])
        by_kind = {kind: [h for hs in hits for h in hs.get(kind, [])] for kind in scenes.CLAIM_KINDS}
        result[f"claims_{split}"] = {k: round(float(np.mean(v)), 4) for k, v in by_kind.items() if v}
        result[f"alignment_real_{split}"] = round(float(np.mean([np.mean([h for v in hs.values() for h in v])
                                                                  for hs in hits if any(hs.values())])), 4)
        pred = metrics.predict(x)
        result[f"accuracy_{split}"] = {
            kind: round(float(np.mean([values[int(p)] == r[2][kind] for p, r in zip(pred[kind], recs)])), 4)
            for kind, values in (("count", COUNT_VALUES), ("background", BG_VALUES), ("style", STYLE_VALUES))
        }
        rng = np.random.default_rng([seed, 3])
        queries = [sample_query(r[2], rng) for r in recs]
        said = metrics.verify(x, [q for q, _ in queries])
        truth = torch.tensor([t for _, t in queries])
        result[f"verifier_accuracy_{split}"] = round(float((said == truth).float().mean()), 4)
    a = common.to_tensor([r[0] for r in scenes.sample_records(n, seed + 1, "train")])
    b = common.to_tensor([r[0] for r in scenes.sample_records(n, seed + 2, "train")])
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed))
    fa, fb = metrics.features(a).double(), metrics.features(b).double()
    result["toy_fid_real_vs_real"] = round(frechet_distance_from_features(fa, fb), 4)
    result["toy_fid_real_vs_noise"] = round(frechet_distance_from_features(fa, metrics.features(noise).double()), 4)
    return result
