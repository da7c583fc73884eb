"""Metrics models of the toy world: an attribute classifier on real shapes images and what it measures.

- ``toy_fid``: Frechet distance between Gaussians of the classifier's penultimate features (the FID analogue).
- ``alignment``: the mean fraction of a prompt's attributes that the classifier reads back from the image generated
  for it (the CLIP-score analogue).
- ``precision_recall``: k-NN manifold precision and recall (Kynkaanniemi et al. 2019) in the same feature space.

The classifier is trained on real images of *all* attribute combinations (both splits), with light noise and blur
augmentation so that it reads decoded VAE images as well as rendered ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlcm.errors import TLCMError
from tlcm.math.frechet import frechet_distance_from_features
from tlcm.math.manifold import knn_precision_recall
from tlcm.toy import common, shapes


class AttributeClassifier(nn.Module):
    """A small CNN: 32x32 RGB -> ``feature_dim`` features -> one linear head per attribute."""

    def __init__(self, width: int = 16, feature_dim: int = 64, classes: dict | None = None):
        super().__init__()
        classes = classes or {k: len(v) for k, v in shapes.CLASSES.items()}
        self.classes = dict(classes)
        w = width

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(
            block(3, w, 1),
            block(w, w, 1),
            block(w, 2 * w, 2),  # 16x16
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),  # 8x8
            block(4 * w, 4 * w, 2),  # 4x4
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(), nn.Linear(256, feature_dim))
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in self.classes.items()})
        self.config = {"width": width, "feature_dim": feature_dim, "classes": self.classes}

    def features(self, x01: torch.Tensor) -> torch.Tensor:
        return F.silu(self.proj(self.body(x01 * 2 - 1)))

    def forward(self, x01: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x01)
        return {k: head(f) for k, head in self.heads.items()}


@dataclass
class MetricsConfig:
    train_images: int = 20000
    eval_images: int = 1000
    heldout_fraction: float = 0.2  # share of held-out-combination images, so every combination is known
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    feature_dim: int = 64
    seed: int = 1000  # distinct from the dataset's seed: the classifier never sees the teacher's training images
    checkpoint_every: int = 250
    threads: int = 2


def _real_arrays(n: int, seed: int, heldout_fraction: float):
    n_held = int(round(n * heldout_fraction))
    recs = shapes.sample_records(n - n_held, seed, "train") + shapes.sample_records(n_held, seed, "heldout")
    images = shapes.images_to_array([r[0] for r in recs])
    labels = {k: np.array([shapes.CLASSES[k].index(r[2][k]) for r in recs]) for k in shapes.ATTRIBUTES}
    return images, labels


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return common.blur_noise_augment(x, g, 0.3, 0.04)


def train_metrics(cfg: MetricsConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the attribute classifier on rendered images; writes ``classifier.safetensors``, ``config.json``,
    ``report.json`` (accuracy per attribute on fresh real images, real-vs-real toy-FID floor). Resumable."""

    out = Path(out_dir)
    if (done := common.finished_report(out, "classifier.safetensors")) is not None:
        return done
    clock = common.begin_run(cfg, out)
    cache = out / "real.npz"
    if cache.is_file():
        with np.load(cache) as z:
            images = z["images"]
            labels = {k: z[k] for k in shapes.ATTRIBUTES}
    else:
        images, labels = _real_arrays(cfg.train_images, cfg.seed, cfg.heldout_fraction)
        np.savez(str(cache) + ".tmp.npz", images=images, **labels)
        Path(str(cache) + ".tmp.npz").replace(cache)
    torch.manual_seed(cfg.seed)
    model = AttributeClassifier(cfg.width, cfg.feature_dim)
    opt, sched, ckpt, start, rng, g = common.one_cycle_optimisation(model, cfg, out, 1e-4)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    y_all = {k: torch.from_numpy(v) for k, v in labels.items()}
    model.train()

    def train_step(step: int) -> float:
        idx = torch.from_numpy(rng.integers(0, len(x_all), cfg.batch_size))
        x = _augment(x_all[idx].float() / 255, g)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[k], y_all[k][idx]) for k in logits)
        common.optimiser_step(loss, opt, sched)
        return loss.item()

    history = common.run_training(
        train_step, start, cfg.steps, ckpt, cfg.checkpoint_every, "train-metrics", progress,
        model=model, opt=opt, sched=sched,
    )
    model.eval()
    common.save_weights_atomic(model.state_dict(), out / "classifier.safetensors")
    common.write_json(out / "config.json", model.config)
    metrics = ToyMetrics(model)
    report = {"train_seconds": round(clock.seconds, 1), **common.loss_summary(history)}
    report.update(evaluate_classifier(metrics, cfg.eval_images, seed=cfg.seed + 1))
    report["seconds"] = round(clock.seconds, 1)
    common.write_json(out / "report.json", report)
    return report


def evaluate_classifier(metrics: ToyMetrics, n: int = 2000, seed: int = 1001) -> dict:
    """Accuracy per attribute on fresh real images of each split, alignment of real images with their captions,
    and the real-vs-real toy-FID floor (two renderings of the same prompts) next to real-vs-noise."""
    result = {}
    for split in shapes.SPLITS:
        recs = shapes.sample_records(n, seed, split)
        x = common.to_tensor([r[0] for r in recs])
        pred = metrics.predict(x)
        acc = {k: float(np.mean([shapes.CLASSES[k][int(p)] == r[2][k] for p, r in zip(pred[k], recs)])) for k in pred}
        result[f"accuracy_{split}"] = {k: round(v, 4) for k, v in acc.items()}
        result[f"accuracy_{split}_mean"] = round(float(np.mean(list(acc.values()))), 4)
        result[f"alignment_real_{split}"] = round(metrics.alignment(x, [r[1] for r in recs]), 4)
    prompts = shapes.prompts(n, seed + 1, "train")
    a = common.to_tensor(shapes.render_prompts(prompts, seed=seed + 2))
    b = common.to_tensor(shapes.render_prompts(prompts, seed=seed + 3))
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed))
    result["toy_fid_real_vs_real"] = round(metrics.toy_fid(a, b), 4)
    result["toy_fid_real_vs_noise"] = round(metrics.toy_fid(a, noise), 4)
    return result


class ToyMetrics:
    """A toy world's FID / alignment / precision-recall, all from its metrics classifier.

    Serves both worlds: v3 (``shapes``, :class:`AttributeClassifier`: alignment = fraction of the five attributes read
    back) and v4 (``scenes``, :class:`tlcm.toy.scene_metrics.SceneClassifier`: alignment = fraction of the caption's
    claims confirmed). ``world`` says which; images are resized to the world's resolution.
    """

    def __init__(self, model, batch_size: int = 500):
        from tlcm.toy.scene_metrics import SceneMetricsModel

        if isinstance(model, SceneMetricsModel):
            self.scene, self.model = model, model.model
            self.world, self.resolution = "v4", model.resolution
        else:
            self.scene, self.model = None, model.eval().requires_grad_(False)
            self.world, self.resolution = "v3", shapes.RESOLUTION
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path | None = None, world: str | None = None) -> ToyMetrics:
        """Load a classifier folder (``config.json`` + ``classifier.safetensors``); default: the shipped one of
        ``world`` (default: the default world)."""
        from safetensors.torch import load_file

        if path is None:
            from tlcm.toy import assets_dir

            path = assets_dir(world) / "metrics"
        folder = Path(path)
        if not (folder / "classifier.safetensors").is_file() or not (folder / "config.json").is_file():
            raise TLCMError(
                f"no toy metrics classifier in {folder}",
                "train one with `tlcm toy train-metrics --out DIR` and pass DIR, or reinstall tlcm for the shipped one",
            )
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("world") == "v4":
            from tlcm.toy.scene_metrics import SceneMetricsModel

            return cls(SceneMetricsModel.from_folder(folder, cfg))
        model = AttributeClassifier(cfg["width"], cfg["feature_dim"], cfg["classes"])
        state = {k: v.float() for k, v in load_file(str(folder / "classifier.safetensors")).items()}
        model.load_state_dict(state)
        return cls(model)

    @classmethod
    def for_model(cls, model: str | Path | None) -> ToyMetrics:
        """The shipped metrics of the world a toy teacher belongs to: ``"toy"``, ``"toy-v3"``, or a pipeline folder
        assembled by :func:`tlcm.toy.teacher_path` / ``tlcm toy build`` (its ``tlcm_toy.json`` names the world)."""
        from tlcm.toy import world_of_model

        return cls.load(world=world_of_model(model))

    def _batches(self, images):
        x = common.to_tensor(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise TLCMError(f"toy metrics need images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        for i in range(0, len(x), self.batch_size):
            yield x[i : i + self.batch_size].clamp(0, 1)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Penultimate features ``(B, D)``."""
        return torch.cat([self.model.features(x) for x in self._batches(images)])

    @torch.no_grad()
    def predict(self, images) -> dict[str, torch.Tensor]:
        """Attribute name -> predicted class index ``(B,)``: the five attributes (v3, names in
        ``tlcm.toy.shapes.CLASSES``) or count, background and style (v4)."""
        if self.scene is not None:
            preds = [self.scene.predict(x) for x in self._batches(images)]
            return {k: torch.cat([p[k] for p in preds]) for k in preds[0]}
        outs = [self.model(x) for x in self._batches(images)]
        return {k: torch.cat([o[k] for o in outs]).argmax(1) for k in self.model.classes}

    def claim_hits(self, images, prompts: list[str]) -> list[dict[str, list[bool]]]:
        """Per image, the prompt's claims the classifier confirms, grouped by kind (v4 claim kinds; v3 attributes)."""
        x = self._images_for(images, prompts)
        if self.scene is not None:
            return self.scene.claim_hits(x, list(prompts))
        pred = self.predict(x)
        out = []
        for i, p in enumerate(prompts):
            attrs = shapes.attributes_from_prompt(p)
            out.append({k: [shapes.CLASSES[k][int(pred[k][i])] == v] for k, v in attrs.items()})
        return out

    def object_attribute_rates(self, images, prompts: list[str]) -> dict[str, dict]:
        """v4: each object claim split into one-attribute queries, the confirmed share per attribute
        (:meth:`tlcm.toy.scene_metrics.SceneMetricsModel.object_attribute_hits`). v3 has no object claims: its
        :meth:`alignment_per_attribute` is already per attribute."""
        if self.scene is None:
            raise TLCMError("one-attribute object queries exist only in the scenes world (v4)",
                            "for a v3 model use alignment_per_attribute, which is per attribute already")
        return self.scene.object_attribute_rates(self._images_for(images, prompts), list(prompts))

    def _images_for(self, images, prompts: list[str]) -> torch.Tensor:
        """The images as one tensor, refusing a prompt list of another length."""
        x = torch.cat(list(self._batches(images)))
        if len(prompts) != len(x):
            raise TLCMError(f"{len(x)} images but {len(prompts)} prompts", "pass one prompt per image")
        return x

    def alignment_per_image(self, images, prompts: list[str]) -> torch.Tensor:
        scores = []
        for hits in self.claim_hits(images, prompts):
            flat = [h for v in hits.values() for h in v]
            scores.append(float(np.mean(flat)) if flat else 1.0)  # a prompt that claims nothing is never wrong
        return torch.tensor(scores)

    def alignment(self, images, prompts: list[str]) -> float:
        """Mean fraction of the claims each prompt makes (v3: the attributes it names) that the classifier confirms
        on the image generated for it."""
        return float(self.alignment_per_image(images, prompts).mean())

    def alignment_per_attribute(self, images, prompts: list[str]) -> dict[str, float]:
        """Fraction of confirmed claims of each kind over all images (v3: per attribute; v4: object, count,
        background, style)."""
        pooled: dict[str, list[bool]] = {}
        for hits in self.claim_hits(images, prompts):
            for k, v in hits.items():
                pooled.setdefault(k, []).extend(v)
        return {k: round(float(np.mean(v)), 4) for k, v in pooled.items() if v}

    def toy_fid(self, images_a, images_b) -> float:
        """Frechet distance between the classifier-feature Gaussians of two image sets."""
        return frechet_distance_from_features(self.features(images_a).double(), self.features(images_b).double())

    def precision_recall(self, images_real, images_fake, k: int = 5) -> tuple[float, float]:
        """Improved precision/recall (k-NN manifolds) in feature space."""
        return knn_precision_recall(self.features(images_real), self.features(images_fake), k)
