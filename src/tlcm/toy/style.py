"""The style score: the fraction of images a small, separate classifier reads as drawn in a rendering style.

The fine-tunes of :mod:`tlcm.toy.finetune` learn a look that no caption names (``scenes.RENDER_STYLES``, e.g. soft
drop shadows). Whether an acceleration LoRA keeps that look on a fine-tune, or next to a style LoRA, is then a number:
the style score of its samples against the fine-tune's own at 50 steps.

The classifier is a small CNN (48x48 RGB -> one logit: "drawn in the style") trained on rendered scenes of the default
world, each drawn once plain and once in the style (same scene, same caption: only the style differs, so it cannot
learn anything else). A share of the training images goes through the teacher VAE's encode/decode round trip, with
light blur and noise, so that it reads decoded samples as well as rendered images.

It is **not** the metrics classifier (toy-FID, alignment) and no training loss uses it: its own architecture, weights,
initialisation seed (``seed`` 6000) and images (``data_seed`` 6001; the metrics classifier uses 1000, the teacher data
0, the fine-tune data 4000).

Folders (``style.safetensors`` + ``config.json`` + ``report.json``) come from ``tlcm toy train-style --out DIR`` or,
for the shipped teacher's VAE, are built on first use in ``$TLCM_CACHE`` (one to two minutes on one CPU core):
:func:`load_style_score`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlcm.errors import TLCMError
from tlcm.toy import common

WEIGHTS = "style.safetensors"
CONFIG = "config.json"


@dataclass
class StyleConfig:
    style: str = "shadow"  # one of tlcm.toy.scenes.RENDER_STYLES
    train_images: int = 2000  # scenes; each is shown plain and styled (2x images)
    eval_images: int = 500
    vae: str = "toy"  # VAE for the round-trip augmentation: "toy" (the shipped v4 teacher's), a folder, or ""
    vae_images: int = 2000  # training images (plain and styled alike) that get a VAE round-trip copy
    vae_fraction: float = 0.5  # chance that such an image is shown through its round trip
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 16
    seed: int = 6000  # initialisation and batches
    data_seed: int = 6001  # training scenes; evaluation scenes use data_seed + 1
    checkpoint_every: int = 200
    threads: int = 2


class StyleClassifier(nn.Module):
    """48x48 RGB in [0, 1] -> one logit. Three stride-2 stages, then the global mean and max of the features: the
    style is a local mark anywhere in the image, not a position (with the mean alone, training took several times
    as many steps to start separating the classes)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width

        def block(i: int, o: int, stride: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(block(3, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),  # 24, 12
                                  block(2 * w, 4 * w, 1), block(4 * w, 4 * w, 2), block(4 * w, 4 * w, 1))  # 6
        self.head = nn.Linear(8 * w, 1)
        self.config = {"width": width}

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        f = self.body(x01 * 2 - 1)
        return self.head(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))[:, 0]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The metrics classifier's augmentation (light blur, Gaussian noise): nothing that removes a texture."""
    return common.blur_noise_augment(x, g, 0.2, 0.03)


def _pairs(n: int, seed: int, style: str) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes of the default world, each rendered plain and in ``style``: uint8 images ``(2n, H, W, 3)`` and
    labels (0 plain, 1 styled), plain and styled interleaved."""
    from tlcm.toy import scenes

    images, labels = [], []
    for i in range(n):
        scene, _, _ = scenes.record(seed, "train", i)
        images += [np.asarray(scenes.render_scene(scene)), np.asarray(scenes.render_scene(scene, style=style))]
        labels += [0, 1]
    return np.stack(images), np.array(labels, dtype=np.float32)


def _check_style(style: str) -> None:
    from tlcm.toy import scenes

    if style not in scenes.RENDER_STYLES:
        raise TLCMError(f"unknown rendering style {style!r}", f"use one of {', '.join(scenes.RENDER_STYLES)}")


def _vae_folder(spec: str) -> Path | None:
    """``"toy"`` -> the shipped v4 teacher's VAE; a folder; ``""`` -> none."""
    if not spec:
        return None
    if spec == "toy":
        from tlcm.toy import assets_dir

        folder = assets_dir("v4") / "teacher" / "vae"
        if not (folder / "config.json").is_file():
            raise TLCMError(f"the style classifier reads VAE-decoded samples, but there is no v4 toy VAE in {folder}",
                            "pass the VAE of your teacher (--vae PIPELINE/vae), or build the v4 toy world")
        return folder
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise TLCMError(f"no AutoencoderKL in {folder}", "pass vae: toy, a VAE folder (e.g. PIPELINE/vae), or ''")
    return folder


def train_style_classifier(cfg: StyleConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the style classifier; writes ``style.safetensors``, ``config.json`` and ``report.json`` (accuracy on
    fresh plain/styled scenes, rendered and through the VAE). Resumable (``checkpoint.pt``); a finished folder is
    returned as it is."""
    from safetensors.torch import save_file

    from tlcm.toy.reward import vae_round_trip

    _check_style(cfg.style)
    out = Path(out_dir)
    if (done := common.finished_report(out, WEIGHTS)) is not None:
        return done
    clock = common.begin_run(cfg, out)
    vae = _vae_folder(cfg.vae)
    images, labels = _pairs(cfg.train_images, cfg.data_seed, cfg.style)
    n_vae = min(cfg.vae_images, len(images)) if vae is not None and cfg.vae_fraction > 0 else 0
    trips = vae_round_trip(images[:n_vae], str(vae), progress=progress) if n_vae else None

    torch.manual_seed(cfg.seed)
    model = StyleClassifier(cfg.width)
    opt, sched, ckpt, start, rng, g = common.one_cycle_optimisation(model, cfg, out, 1e-4)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    x_vae = torch.from_numpy(trips).permute(0, 3, 1, 2) if trips is not None else None
    y_all = torch.from_numpy(labels)
    model.train()

    def train_step(step: int) -> float:
        idx = torch.from_numpy(rng.integers(0, len(x_all), cfg.batch_size))
        x = x_all[idx].float() / 255
        if x_vae is not None:  # images [0, n_vae) have a round-trip copy (pairs stay balanced: plain, styled, ...)
            use = torch.from_numpy(rng.random(len(idx)) < cfg.vae_fraction) & (idx < len(x_vae))
            x[use] = x_vae[idx[use]].float() / 255
        loss = F.binary_cross_entropy_with_logits(model(_augment(x, g)), y_all[idx])
        common.optimiser_step(loss, opt, sched)
        return loss.item()

    history = common.run_training(train_step, start, cfg.steps, ckpt, cfg.checkpoint_every,
                                  f"train-style ({cfg.style})", progress, model=model, opt=opt, sched=sched)
    model.eval()
    tmp = out / f".{WEIGHTS}.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out / WEIGHTS)
    meta = {**model.config, "style": cfg.style, "world": "v4", "vae": str(vae) if vae is not None else ""}
    common.write_json(out / CONFIG, meta)
    scorer = StyleScore(model, cfg.style)
    report = {"train_seconds": round(clock.seconds, 1), **common.loss_summary(history)}
    report.update(evaluate_style_classifier(scorer, cfg.eval_images, cfg.data_seed + 1, str(vae or "")))
    report["seconds"] = round(clock.seconds, 1)
    common.write_json(out / "report.json", report)
    return report


def evaluate_style_classifier(scorer: StyleScore, n: int, seed: int, vae: str = "") -> dict:
    """Style score of fresh plain and styled scenes (rendered, and through ``vae`` if given): the first should be
    near 0, the second near 1."""
    from tlcm.toy.reward import vae_round_trip

    images, labels = _pairs(n, seed, scorer.style)
    sets = {"rendered": images}
    if vae:
        sets["vae"] = vae_round_trip(images, vae)
    out = {}
    for name, arr in sets.items():
        p = scorer.probabilities(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255)
        said = (p > 0.5).numpy()
        out[f"style_score_plain_{name}"] = round(float(said[labels == 0].mean()), 4)
        out[f"style_score_styled_{name}"] = round(float(said[labels == 1].mean()), 4)
        out[f"accuracy_{name}"] = round(float((said == (labels == 1)).mean()), 4)
    return out


class StyleScore:
    """A trained :class:`StyleClassifier` for one rendering style: ``score(images)`` is the fraction read as styled."""

    def __init__(self, model: StyleClassifier, style: str, batch_size: int = 250):
        self.model = model.eval().requires_grad_(False)
        self.style = style
        self.batch_size = batch_size

    @classmethod
    def from_folder(cls, folder: str | Path) -> StyleScore:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise TLCMError(f"no style classifier in {folder}", "train one with `tlcm toy train-style --out DIR`")
        cfg = json.loads((folder / CONFIG).read_text())
        model = StyleClassifier(cfg["width"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
        return cls(model, cfg["style"])

    @torch.no_grad()
    def probabilities(self, images) -> torch.Tensor:
        """``(B,)`` probability that each image is drawn in the style (images resized to 48 px if needed)."""
        from tlcm.toy import scenes

        x = common.to_tensor(images)
        if x.ndim != 4 or x.shape[1] != 3:
            raise TLCMError(f"the style score needs images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (scenes.RESOLUTION, scenes.RESOLUTION):
            x = F.interpolate(x, size=(scenes.RESOLUTION,) * 2, mode="bilinear", antialias=True, align_corners=False)
        out = [torch.sigmoid(self.model(x[i : i + self.batch_size].clamp(0, 1)))
               for i in range(0, len(x), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, images) -> float:
        """Fraction of ``images`` read as drawn in the style."""
        p = self.probabilities(images)
        if len(p) == 0:
            raise TLCMError("the style score of an empty image set is undefined", "pass at least one image")
        return float((p > 0.5).float().mean())


def default_style_folder(style: str = "shadow", vae: str = "toy") -> Path:
    """Where :func:`load_style_score` keeps the classifier built for ``style`` and ``vae``: ``$TLCM_CACHE`` /
    ``toy-style-<style>-<digest of the config and the VAE's files>``."""
    from tlcm import __version__
    from tlcm.toy import _cache_root

    cfg = StyleConfig(style=style, vae=vae)
    folder = _vae_folder(vae)
    digest = common.file_digest(p for p in folder.rglob("*") if p.is_file()) if folder is not None else "novae"
    import hashlib

    key = hashlib.sha256(json.dumps([__version__, asdict(cfg), digest]).encode()).hexdigest()[:12]
    return _cache_root() / f"toy-style-{style}-{key}"


def load_style_score(path: str | os.PathLike | None = None, style: str = "shadow", vae: str = "toy",
                     progress: bool = False) -> StyleScore:
    """A style scorer: from ``path`` (a ``tlcm toy train-style`` folder), or else the one for ``style`` whose
    round-trip augmentation used ``vae`` ("toy": the shipped v4 teacher's), trained into the cache on first use."""
    if path is not None:
        return StyleScore.from_folder(path)
    _check_style(style)
    folder = default_style_folder(style, vae)
    if not (folder / WEIGHTS).is_file():
        import shutil
        import sys
        import tempfile

        print(f"tlcm: training the {style!r} style classifier once into {folder} (a minute or two)", file=sys.stderr)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            cfg = StyleConfig(style=style, vae=vae, threads=max(1, torch.get_num_threads()))
            train_style_classifier(cfg, tmp, progress=progress)
            (tmp / "checkpoint.pt").unlink(missing_ok=True)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not (folder / WEIGHTS).is_file():  # not a concurrent build that finished first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return StyleScore.from_folder(folder)
