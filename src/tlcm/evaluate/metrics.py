"""Quality metrics for an evaluation grid, as plugins that either load their weights or step aside with a notice.

Every metric sees the same things: the images of one grid cell (a list of PIL images, or a ``(B, 3, H, W)`` float
tensor in ``[0, 1]``), the prompts they were generated from, and a :class:`Reference` holding the prompt set's *data*
images (real images for the prompts, when there are any) and the *teacher* images (the teacher's own samples with a
reference solver on the same prompts and seeds). A plugin computes its reference statistics once in :meth:`prepare`.

Plugins and what they report:

- :class:`ToyWorldMetrics` (toy world): ``toy_fid_data`` and ``toy_fid_teacher`` (Frechet distance in the features of
  the shipped toy classifier) and ``alignment`` (fraction of prompt attributes the classifier reads back).
- :class:`InceptionFID` (real models): ``fid_data`` and ``fid_teacher`` from the 2048-d pool features of the standard
  TorchScript Inception-v3 (``inception-2015-12-05.pt``, the file clean-fid and StyleGAN2-ADA use). Nothing is
  downloaded: the user passes the file, or it is found in ``$TLCM_CACHE`` / ``~/.cache/tlcm`` / ``~/.cache/clean-fid``.
- Both feature metrics also report k-NN ``precision_*`` / ``recall_*`` against data and teacher and, when the sweep
  plans it, per-prompt ``diversity`` and ``diversity_vs_teacher`` (:mod:`tlcm.evaluate.diversity`); the Inception
  versions carry an ``inception_`` prefix.
- :class:`ClipScore`: ``clip_score``, ``100 * max(cos(image, text), 0)`` averaged (the torchmetrics convention, the
  one papers report), with any transformers ``CLIPModel`` from a local folder or an already-cached hub id.
- :class:`ToyStyleScore` (toy world, ``--style NAME``): ``style_score``, the fraction of images the toy style classifier
  (:mod:`tlcm.toy.style`) reads as drawn in a fine-tune's rendering style.
- :class:`AestheticScore`: ``aesthetic``, the LAION aesthetic predictor (an MLP over L2-normalised CLIP image
  embeddings; ``sac+logos+ava1-l14-linearMSE.pth`` with CLIP ViT-L/14) when its weights are given.

:func:`build_metrics` returns the plugins that could load and one plain-language notice for each that could not; a
metric without weights is never approximated by another network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tlcm.errors import TLCMError
from tlcm.math.frechet import frechet_distance_from_features
from tlcm.math.manifold import knn_precision_recall, per_prompt_diversity

INCEPTION_FILENAME = "inception-2015-12-05.pt"


class MetricUnavailable(Exception):
    """A metric cannot run here (weights or package missing); the message is the notice shown to the user."""


def to_tensor(images) -> torch.Tensor:
    """PIL list or tensor -> ``(B, 3, H, W)`` float32 in ``[0, 1]`` on the CPU."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(x.shape)}")
        return x.clamp(0, 1)
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@dataclass
class Reference:
    """What cells are compared against: the prompt set, its data images and the teacher's reference samples."""

    prompts: list[str]
    data_images: list | None = None
    teacher_images: list | None = None
    teacher_label: str | None = None
    notes: list[str] = field(default_factory=list)
    # per-prompt diversity: index groups into images + extra images (tlcm.evaluate.diversity.plan_diversity), and the
    # teacher's samples for the extra (prompt, seed) pairs
    diversity_groups: tuple[tuple[int, ...], ...] | None = None
    teacher_extra_images: list | None = None


class Metric:
    """A metric plugin. ``names`` lists the keys :meth:`compute` may return."""

    name = "metric"
    names: tuple[str, ...] = ()

    def prepare(self, reference: Reference) -> list[str]:
        """Compute reference statistics; return notices for the parts that cannot be computed."""
        return []

    def compute(self, images, prompts: Sequence[str]) -> dict[str, float]:
        raise NotImplementedError

    def score(self, images, prompts: Sequence[str], extra_images=()) -> dict[str, float]:
        """What the sweep calls: :meth:`compute`, plus what needs the extra diversity images (if the metric can)."""
        return self.compute(images, prompts)

    def reference_metrics(self) -> dict[str, float]:
        """The teacher reference's own scores (e.g. its alignment, recall and diversity), after :meth:`prepare`."""
        return {}


def _fd(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    return frechet_distance_from_features(a, b)


class FeatureFID(Metric):
    """For any ``features(images) -> (N, D)`` extractor: Frechet distances against data and teacher features, k-NN
    precision/recall against both (``recall``), and per-prompt diversity (``diversity``; needs the reference's
    ``diversity_groups``), see :mod:`tlcm.evaluate.diversity`."""

    prefix = "fid"
    tag = ""  # prefix of the precision / recall / diversity keys

    def __init__(self, recall: bool = True, diversity: bool = True):
        self._ref: dict[str, torch.Tensor] = {}
        self.recall = recall
        self.diversity = diversity
        self._groups = None
        self._ref_diversity: float | None = None
        self._ref_metrics: dict[str, float] = {}

    @property
    def names(self):
        names = [f"{self.prefix}_data", f"{self.prefix}_teacher"]
        if self.recall:
            names += [f"{self.tag}{pr}_{key}" for key in ("data", "teacher") for pr in ("precision", "recall")]
        if self.diversity:
            names += [f"{self.tag}diversity", f"{self.tag}diversity_vs_teacher"]
        return tuple(names)

    def features(self, images) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, reference: Reference) -> list[str]:
        notices = []
        self._ref = {}
        self._ref_metrics = {}
        self._ref_diversity = None
        for key, imgs in (("data", reference.data_images), ("teacher", reference.teacher_images)):
            if imgs is None or len(imgs) == 0:
                notices.append(f"{self.prefix}_{key} skipped: no {key} reference images")
                continue
            if len(imgs) < 2:
                notices.append(f"{self.prefix}_{key} skipped: a Frechet distance needs at least 2 reference images")
                continue
            self._ref[key] = self.features(imgs)
        self._groups = reference.diversity_groups if self.diversity else None
        teacher = self._ref.get("teacher")
        if teacher is not None:
            if "data" in self._ref:
                self._ref_metrics[f"{self.prefix}_data"] = _fd(teacher, self._ref["data"])
                if self.recall:
                    p, r = knn_precision_recall(self._ref["data"], teacher)
                    self._ref_metrics.update({f"{self.tag}precision_data": p, f"{self.tag}recall_data": r})
            if self._groups:
                extra = reference.teacher_extra_images
                feats = torch.cat([teacher, self.features(extra)]) if extra is not None and len(extra) else teacher
                self._ref_diversity = per_prompt_diversity(feats, self._groups)
                self._ref_metrics[f"{self.tag}diversity"] = self._ref_diversity
        return notices

    def compute(self, images, prompts):
        return self._scores(self.features(images) if len(images) >= 2 else None)

    def _scores(self, feats) -> dict[str, float]:
        out = {}
        if feats is None:
            return out
        for key, ref in self._ref.items():
            out[f"{self.prefix}_{key}"] = _fd(feats, ref)
        if self.recall:
            for key, ref in self._ref.items():
                p, r = knn_precision_recall(ref, feats)
                out[f"{self.tag}precision_{key}"], out[f"{self.tag}recall_{key}"] = p, r
        return out

    def score(self, images, prompts, extra_images=()):
        feats = self.features(images) if len(images) >= 2 else None
        out = self._scores(feats)
        if self._groups and feats is not None:
            all_feats = torch.cat([feats, self.features(extra_images)]) if len(extra_images) else feats
            div = per_prompt_diversity(all_feats, self._groups)
            out[f"{self.tag}diversity"] = div
            if self._ref_diversity:
                out[f"{self.tag}diversity_vs_teacher"] = div / self._ref_diversity
        return out

    def reference_metrics(self) -> dict[str, float]:
        return dict(self._ref_metrics)


class ToyWorldMetrics(FeatureFID):
    """Toy-FID against data and teacher, and attribute alignment, from :class:`tlcm.toy.metrics.ToyMetrics`."""

    name = "toy"
    prefix = "toy_fid"

    def __init__(self, toy_metrics=None, recall: bool = True, diversity: bool = True, world: str | None = None,
                 path: str | None = None):
        super().__init__(recall, diversity)
        if toy_metrics is None:
            try:
                from tlcm.toy.metrics import ToyMetrics
            except ImportError as err:
                raise MetricUnavailable("toy metrics skipped: tlcm.toy.metrics is not available in this install") \
                    from err
            try:
                toy_metrics = ToyMetrics.load(path, world=world)
            except TLCMError as err:
                raise MetricUnavailable(f"toy metrics skipped: {err.problem}") from err
        self.toy = toy_metrics

    @property
    def names(self):
        return (*super().names, "alignment")

    def features(self, images) -> torch.Tensor:
        with torch.no_grad():
            return torch.as_tensor(self.toy.features(to_tensor(images))).float()

    def compute(self, images, prompts):
        return {**super().compute(images, prompts), **self._alignment(images, prompts)}

    def score(self, images, prompts, extra_images=()):
        return {**super().score(images, prompts, extra_images), **self._alignment(images, prompts)}

    def prepare(self, reference: Reference) -> list[str]:
        notices = super().prepare(reference)
        if reference.teacher_images is not None and len(reference.teacher_images):
            self._ref_metrics.update(self._alignment(reference.teacher_images, reference.prompts))
        return notices

    def _alignment(self, images, prompts) -> dict[str, float]:
        out = {}
        with torch.no_grad():
            align = self.toy.alignment(to_tensor(images), list(prompts))
        if isinstance(align, dict):  # a per-attribute breakdown: report the mean and each part
            for k, v in align.items():
                out[f"alignment_{k}" if k not in ("mean", "all", "overall") else "alignment"] = float(v)
            if "alignment" not in out and align:
                out["alignment"] = float(np.mean([float(v) for v in align.values()]))
        else:
            out["alignment"] = float(align)
        return out


class ToyStyleScore(Metric):
    """``style_score``: the fraction of a cell's images that the toy style classifier reads as drawn in ``style``
    (a rendering style of the scenes world, see :mod:`tlcm.toy.finetune`). Its own classifier, never a training loss.
    ``classifier``: a ``tlcm toy train-style`` folder; else the one built (once, cached) with ``vae``'s round trips."""

    name = "style"
    names = ("style_score",)

    def __init__(self, style: str, classifier: str | None = None, vae: str | None = None):
        try:
            from tlcm.toy.style import load_style_score
        except ImportError as err:
            raise MetricUnavailable("style score skipped: tlcm.toy.style is not available in this install") from err
        try:
            self.scorer = load_style_score(classifier, style=style, vae=vae or "toy")
        except TLCMError as err:
            raise MetricUnavailable(f"style score skipped: {err.problem} ({err.fix})") from err
        if self.scorer.style != style:
            raise TLCMError(f"the style classifier in {classifier} scores {self.scorer.style!r}, not {style!r}",
                            "pass the classifier of that style, or --style with its name")

    def compute(self, images, prompts):
        return {"style_score": self.scorer.score(to_tensor(images))}


# --- Inception FID ---------------------------------------------------------------------------------------------------
def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("TLCM_CACHE"):
        dirs.append(Path(os.environ["TLCM_CACHE"]))
    home = Path.home() / ".cache"
    dirs += [home / "tlcm", home / "clean-fid", home / "torch" / "hub" / "checkpoints"]
    return dirs


def find_inception_weights(path: str | os.PathLike | None = None) -> Path | None:
    """The TorchScript Inception file: ``path`` (a file or a folder holding it), else the first cache that has it."""
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / INCEPTION_FILENAME
        if not p.is_file():
            raise TLCMError(f"Inception weights {str(path)!r} not found",
                            f"pass the TorchScript file {INCEPTION_FILENAME} (or the folder holding it)")
        return p
    for d in _cache_dirs():
        if (d / INCEPTION_FILENAME).is_file():
            return d / INCEPTION_FILENAME
    return None


class InceptionFID(FeatureFID):
    """FID with the TorchScript Inception-v3 of clean-fid / StyleGAN2-ADA (``forward(img255, return_features=True)``).

    Images go in as ``[0, 255]`` floats at their own size; the network resizes to 299 inside, as in both projects.
    """

    name = "fid"
    prefix = "fid"
    tag = "inception_"

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, recall: bool = True, diversity: bool = True):
        super().__init__(recall, diversity)
        path = find_inception_weights(weights)
        if path is None:
            raise MetricUnavailable(
                "FID skipped: no Inception weights. Pass --inception-weights PATH to the TorchScript "
                f"{INCEPTION_FILENAME} (clean-fid / StyleGAN2-ADA), or put it in $TLCM_CACHE or ~/.cache/tlcm")
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as err:
            raise TLCMError(f"{path} is not a TorchScript Inception network: {str(err).splitlines()[0]}",
                            f"pass {INCEPTION_FILENAME} as distributed by clean-fid / StyleGAN2-ADA") from err
        self.path = path
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        x = to_tensor(images)
        out = []
        for i in range(0, len(x), self.batch_size):
            batch = (x[i:i + self.batch_size] * 255.0).round().to(self.device)  # uint8 quantisation, as saved PNGs
            out.append(self.net(batch, return_features=True).float().cpu().reshape(len(batch), -1))
        return torch.cat(out)


# --- CLIP score and aesthetic predictor ------------------------------------------------------------------------------
def load_clip(model: str, device: str | torch.device = "cpu"):
    """``(CLIPModel, CLIPProcessor)`` from a local folder or a hub id already in the cache (never downloads)."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as err:  # pragma: no cover - transformers is a dependency
        raise MetricUnavailable("CLIP metrics skipped: transformers is not installed") from err
    local = Path(model).expanduser()
    source = str(local) if local.exists() else model
    try:
        clip = CLIPModel.from_pretrained(source, local_files_only=True).eval().to(device)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MetricUnavailable(
            f"CLIP-based metrics skipped: could not load CLIP {model!r} from a local folder or the HF cache "
            f"({str(err).splitlines()[0][:160]}). Pass --clip-model PATH to a saved CLIPModel folder") from err
    return clip, processor


class _ClipBase(Metric):
    def __init__(self, model: str, device: str | torch.device = "cpu", batch_size: int = 32, clip=None):
        self.clip, self.processor = clip if clip is not None else load_clip(model, device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model_name = model

    @torch.no_grad()
    def image_embeds(self, images) -> torch.Tensor:
        pil = _to_pil(images)
        out = []
        for i in range(0, len(pil), self.batch_size):
            inputs = self.processor(images=pil[i:i + self.batch_size], return_tensors="pt")
            emb = self.clip.get_image_features(pixel_values=inputs["pixel_values"].to(self.device))
            out.append(_pooled(emb).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            inputs = self.processor(text=list(prompts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                    truncation=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            out.append(_pooled(self.clip.get_text_features(**inputs)).float().cpu())
        return torch.cat(out)


def _pooled(out) -> torch.Tensor:
    # transformers 5 may return a model output rather than a tensor from get_*_features.
    if isinstance(out, torch.Tensor):
        return out
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        val = getattr(out, key, None)
        if val is not None:
            return val
    raise TypeError(f"unexpected CLIP features output {type(out).__name__}")


def _to_pil(images) -> list:
    if isinstance(images, torch.Tensor):
        from PIL import Image

        arr = (to_tensor(images).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arr]
    return list(images)


class ClipScore(_ClipBase):
    """``100 * max(cos(image, prompt), 0)``, averaged over the cell."""

    name = "clip"
    names = ("clip_score",)

    def compute(self, images, prompts):
        img = torch.nn.functional.normalize(self.image_embeds(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text_embeds(prompts), dim=-1)
        return {"clip_score": float((100.0 * (img * txt).sum(-1)).clamp(min=0).mean())}


def aesthetic_mlp(in_dim: int) -> torch.nn.Module:
    """The LAION aesthetic predictor v2 head (state-dict keys ``layers.{0,2,4,6,7}``)."""
    nn = torch.nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP()


class AestheticScore(_ClipBase):
    """The LAION aesthetic predictor on L2-normalised CLIP image embeddings (weights from the user)."""

    name = "aesthetic"
    names = ("aesthetic",)

    def __init__(self, weights: str | os.PathLike, model: str, device="cpu", batch_size: int = 32, clip=None):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MetricUnavailable(f"aesthetic score skipped: predictor weights {str(weights)!r} not found")
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if "layers.0.weight" not in state:
            raise TLCMError(f"{path} is not a LAION aesthetic predictor state dict (no 'layers.0.weight')",
                            "pass sac+logos+ava1-l14-linearMSE.pth or a predictor with the same layout")
        super().__init__(model, device, batch_size, clip=clip)
        self.mlp = aesthetic_mlp(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.eval().to(self.device)

    @torch.no_grad()
    def compute(self, images, prompts):
        emb = self.image_embeds(images)
        if emb.shape[1] != self.mlp.layers[0].in_features:
            raise TLCMError(f"the aesthetic predictor expects {self.mlp.layers[0].in_features}-d CLIP embeddings, "
                            f"{self.model_name!r} gives {emb.shape[1]}-d",
                            "pass --aesthetic-clip with the CLIP the predictor was trained on (ViT-L/14)")
        emb = torch.nn.functional.normalize(emb, dim=-1).to(self.device)
        return {"aesthetic": float(self.mlp(emb).mean())}


# --- assembling the metric set ---------------------------------------------------------------------------------------
@dataclass
class MetricSpec:
    """Which metrics to try. ``None`` weights mean: look in the caches, else skip with a notice."""

    toy: bool = False
    toy_world: str | None = None  # which toy world's metrics (v3, v4; None: the default world)
    fid: bool = True
    inception_weights: str | None = None
    clip_model: str | None = None
    aesthetic_weights: str | None = None
    aesthetic_clip: str | None = None
    device: str = "cpu"
    recall: bool = True  # k-NN precision/recall of the feature metrics (toy classifier, Inception)
    diversity: tuple[int, int] | None = None  # (K prompts, S seeds): per-prompt diversity of the feature metrics
    toy_metrics: str | None = None  # a toy metrics classifier folder (None: the world's shipped one)
    style: str | None = None  # toy rendering style for style_score (None: not measured)
    style_classifier: str | None = None  # its classifier folder (None: built for style_vae, cached)
    style_vae: str | None = None  # VAE whose round trips the classifier learns ("toy" or a VAE folder)


def build_metrics(spec: MetricSpec) -> tuple[list[Metric], list[str]]:
    """Instantiate what can run; return ``(metrics, notices)`` with one notice per metric that was skipped."""
    from tlcm.models import resolve_device

    spec = MetricSpec(**{**spec.__dict__, "device": str(resolve_device(spec.device))})
    metrics: list[Metric] = []
    notices: list[str] = []

    def attempt(factory):
        try:
            metrics.append(factory())
        except MetricUnavailable as why:
            notices.append(str(why))

    div = bool(spec.diversity)
    if spec.toy:
        attempt(lambda: ToyWorldMetrics(recall=spec.recall, diversity=div, world=spec.toy_world,
                                        path=spec.toy_metrics))
    if spec.style:
        attempt(lambda: ToyStyleScore(spec.style, spec.style_classifier, spec.style_vae))
    if spec.fid:
        attempt(lambda: InceptionFID(spec.inception_weights, spec.device, recall=spec.recall, diversity=div))
    clip_pair = None
    if spec.clip_model:
        try:
            clip_pair = load_clip(spec.clip_model, spec.device)
            metrics.append(ClipScore(spec.clip_model, spec.device, clip=clip_pair))
        except MetricUnavailable as why:
            notices.append(str(why).replace("CLIP-based metrics", "CLIP score"))
    elif not spec.toy:
        notices.append("CLIP score skipped: no CLIP model given (pass --clip-model PATH_OR_CACHED_HUB_ID)")
    if spec.aesthetic_weights:
        aclip = spec.aesthetic_clip or spec.clip_model
        if not aclip:
            notices.append("aesthetic score skipped: the predictor needs a CLIP model (--aesthetic-clip, ViT-L/14)")
        else:
            same = clip_pair if aclip == spec.clip_model else None
            attempt(lambda: AestheticScore(spec.aesthetic_weights, aclip, spec.device, clip=same))
    elif not spec.toy:
        notices.append("aesthetic score skipped: no predictor weights given (pass --aesthetic-weights PATH)")
    return metrics, notices
