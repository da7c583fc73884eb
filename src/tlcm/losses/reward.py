"""Preference (reward) learning: differentiable rewards on decoded images, and the losses built on them.

A reward model is an ``nn.Module`` called as ``reward(images01, prompts) -> (B,)`` with ``images01`` a float
``(B, 3, H, W)`` batch in [0, 1] of any size and ``prompts`` a list of ``B`` strings. It is frozen, but
differentiable with respect to the images: resizing and normalisation happen inside, with
``F.interpolate(antialias=True)``, and reproduce the model's own preprocessing (``CLIPImageProcessor``) to within the
uint8 rounding that the reference applies (``tests/losses/test_reward.py`` derives and checks that bound).

``load_reward(spec)`` builds one from a spec string; loading is offline only (a local folder, or a hub id already in
the Hugging Face cache), and missing weights are a :class:`TLCMError` that names exactly what to download:

- ``toy`` / ``toy:DIR``: the toy world's contrastive reward (``tlcm toy train-reward``), the stand-in for PickScore;
- ``clip[:ID_OR_DIR][,processor=ID_OR_DIR]``: CLIP score ``100 * cos(image, text)`` (default
  ``openai/clip-vit-large-patch14``);
- ``pickscore[:ID_OR_DIR][,processor=ID_OR_DIR]``: PickScore ``logit_scale.exp() * cos`` (default
  ``yuvalkirstain/PickScore_v1``; tokenizer and preprocessing from the folder itself when it has them, else from
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as PickScore's own example does);
- ``aesthetic:WEIGHTS[,clip=ID_OR_DIR]``: the LAION aesthetic predictor, a head on the L2-normalised CLIP ViT-L/14
  image embedding; both the ``sac+logos+ava1-l14-linearMSE.pth`` MLP layout (``layers.{0,2,4,6,7}``) and the plain
  linear layout (``weight``, ``bias``). It ignores the prompt (``conditional = False``).

Spec options are separated by commas, so paths in a spec cannot contain one.

The losses (``reward_loss``, ``mismatched_prompts``) are pure functions of reward values and prompts; the trainer
decides where they run (the low-noise end, on the decoded student prediction: ``decode_for_reward``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tlcm.errors import TLCMError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
AESTHETIC_URL = (
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
)
SPECS_HELP = "reward specs: toy[:DIR], clip[:ID_OR_DIR], pickscore[:ID_OR_DIR], aesthetic:WEIGHTS.pth[,clip=ID_OR_DIR]"


# ----------------------------------------------------------------------------------------------------------------
# the interface
# ----------------------------------------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A frozen, differentiable ``reward(images01 (B, 3, H, W) in [0, 1], prompts) -> (B,)`` (float32; float64 for
    a float64 model).

    ``conditional``: whether the prompt matters (False for an aesthetic predictor, so a mismatched-prompt hinge is
    meaningless with it). ``default_margin``: a hinge margin in this reward's units when the model knows one (the toy
    reward stores the mean reward of real images with their own captions), else ``None``."""

    spec: str = ""
    conditional: bool = True
    default_margin: float | None = None

    def train(self, mode: bool = True):
        """Always eval mode: a reward model is frozen (no dropout, fixed normalisation statistics)."""
        return super().train(False)

    def check_inputs(self, images01: torch.Tensor, prompts: Sequence[str] | None) -> None:
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"a reward needs images of shape (B, 3, H, W) in [0, 1], got {tuple(images01.shape)}")
        if prompts is not None and len(prompts) != images01.shape[0]:
            raise ValueError(f"{images01.shape[0]} images but {len(prompts)} prompts: pass one prompt per image")


# ----------------------------------------------------------------------------------------------------------------
# differentiable CLIP preprocessing
# ----------------------------------------------------------------------------------------------------------------


_RESAMPLE = {2: "bilinear", 3: "bicubic"}


def _acc(p: torch.Tensor) -> torch.dtype:
    """The dtype scores are computed in: float32, or float64 for a float64 model (fp16/bf16 embeddings upcast)."""
    return torch.promote_types(p.dtype, torch.float32)  # PIL codes used by CLIPImageProcessor configs


class ClipPreprocess(nn.Module):
    """``CLIPImageProcessor`` as a differentiable module on float images in [0, 1].

    The reference (transformers' PIL backend) resizes uint8 images with PIL: antialiased bicubic (Keys' a = -0.5),
    first along the width, then the height, storing uint8 (so clipping to [0, 255]) after each pass; then
    centre-crops at ``((H - h) // 2, (W - w) // 2)``, rescales by 1/255 and normalises. ``F.interpolate(...,
    antialias=True)`` is the same kernel in float; we resize in the same two passes and clamp after each, and leave out
    only the uint8 rounding (not differentiable), which bounds the difference (see the tests)."""

    def __init__(
        self,
        size: dict,
        crop_size: dict | None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        resample: int = 3,
        do_resize: bool = True,
        do_center_crop: bool = True,
        do_normalize: bool = True,
    ):
        super().__init__()
        if resample not in _RESAMPLE:
            raise TLCMError(
                f"unsupported resampling {resample} in the image processor config",
                "only bicubic (3) and bilinear (2) have a differentiable equivalent here",
            )
        self.size = dict(size)
        self.crop_size = dict(crop_size) if crop_size else None
        self.mode = _RESAMPLE[resample]
        self.do_resize, self.do_center_crop, self.do_normalize = do_resize, do_center_crop, do_normalize
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)  # python floats: exact

    @classmethod
    def from_config(cls, config: dict | None, image_size: int) -> ClipPreprocess:
        """From a ``preprocessor_config.json`` dict; ``None`` gives CLIP's defaults at the model's ``image_size``."""
        c = dict(config or {})
        size = c.get("size", {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = c.get("crop_size", {"height": image_size, "width": image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            size,
            crop,
            c.get("image_mean", OPENAI_CLIP_MEAN),
            c.get("image_std", OPENAI_CLIP_STD),
            int(c.get("resample", 3)),
            bool(c.get("do_resize", True)),
            bool(c.get("do_center_crop", True)),
            bool(c.get("do_normalize", True)),
        )

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The resized ``(H, W)`` exactly as transformers computes it (``int(short_target * long / short)``)."""
        if "shortest_edge" in self.size:
            s = int(self.size["shortest_edge"])
            if h <= w:
                return s, int(s * w / h)
            return int(s * h / w), s
        return int(self.size["height"]), int(self.size["width"])

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01.to(torch.promote_types(x01.dtype, torch.float32))
        if self.do_resize:
            h, w = x.shape[-2:]
            th, tw = self.output_size(h, w)
            if tw != w:  # PIL: horizontal pass first, stored as uint8 (clipped)
                x = F.interpolate(x, size=(h, tw), mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
            if th != h:
                x = F.interpolate(x, size=(th, tw), mode=self.mode, antialias=True, align_corners=False).clamp(0, 1)
        if self.do_center_crop and self.crop_size:
            ch, cw = int(self.crop_size["height"]), int(self.crop_size["width"])
            h, w = x.shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"images of {h}x{w} after resizing are smaller than the {ch}x{cw} crop")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top : top + ch, left : left + cw]
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x


# ----------------------------------------------------------------------------------------------------------------
# CLIP-architecture rewards
# ----------------------------------------------------------------------------------------------------------------


class ClipReward(RewardModel):
    """CLIP score (``scale="cos100"``: ``100 * cos``) or PickScore (``scale="logit_scale"``: ``exp(logit_scale) *
    cos``) between the image and text embeddings of a transformers ``CLIPModel``."""

    def __init__(self, model, tokenizer, preprocess: ClipPreprocess, scale: str = "cos100", spec: str = ""):
        super().__init__()
        if scale not in ("cos100", "logit_scale"):
            raise ValueError(f"unknown CLIP reward scale {scale!r}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.scale = scale
        self.spec = spec
        pos = int(model.config.text_config.max_position_embeddings)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", pos) or pos), pos)

    def image_embeds(self, images01: torch.Tensor) -> torch.Tensor:
        p = self.model.visual_projection.weight
        pixels = self.preprocess(images01.to(p.device)).to(p.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).to(_acc(p)), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        device = self.model.text_projection.weight.device
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device))
        return F.normalize(self.model.text_projection(out.pooler_output).to(_acc(self.model.text_projection.weight)),
                           dim=-1)

    def forward(self, images01: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images01, prompts)
        cos = (self.image_embeds(images01) * self.text_embeds(prompts)).sum(-1)
        scale = 100.0 if self.scale == "cos100" else self.model.logit_scale.detach().to(cos.dtype).exp()
        return scale * cos


def aesthetic_head(state: dict[str, torch.Tensor], source: str) -> nn.Sequential:
    """The LAION aesthetic head from its state dict: the MLP of ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.i``
    Linear layers with no activation between them, dropout inactive) or one ``nn.Linear`` (``weight``, ``bias``)."""
    keys = set(state)
    if keys == {"weight", "bias"}:
        w = state["weight"]
        layers = [(w, state["bias"])]
    else:
        idx = sorted({int(k.split(".")[1]) for k in keys if k.startswith("layers.") and k.endswith(".weight")})
        expected = {f"layers.{i}.{n}" for i in idx for n in ("weight", "bias")}
        if not idx or keys != expected:
            raise TLCMError(
                f"{source} is not a LAION aesthetic predictor: keys {sorted(keys)[:8]}",
                "expected the MLP layout of sac+logos+ava1-l14-linearMSE.pth (layers.0/2/4/6/7.weight and .bias) "
                f"or a linear head (weight, bias); download: {AESTHETIC_URL}",
            )
        layers = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in idx]
    modules = []
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or b.shape != (w.shape[0],) or (i and w.shape[1] != layers[i - 1][0].shape[0]):
            raise TLCMError(f"{source}: layer {i} has inconsistent shapes {tuple(w.shape)}, {tuple(b.shape)}")
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w.float())
        lin.bias.data.copy_(b.float())
        modules.append(lin)
    if layers[-1][0].shape[0] != 1:
        raise TLCMError(f"{source}: the head must end in one output, got {layers[-1][0].shape[0]}")
    return nn.Sequential(*modules)


class AestheticReward(RewardModel):
    """LAION aesthetic score: ``head(normalize(CLIP image embedding))``; the prompt is ignored."""

    conditional = False

    def __init__(self, model, preprocess: ClipPreprocess, head: nn.Sequential, spec: str = ""):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.head = head.eval().requires_grad_(False)
        self.spec = spec

    def forward(self, images01: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        self.check_inputs(images01, prompts)
        p = self.model.visual_projection.weight
        pixels = self.preprocess(images01.to(p.device)).to(p.dtype)
        emb = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        emb = F.normalize(emb.to(_acc(p)), dim=-1)
        return self.head(emb.to(self.head[0].weight.dtype)).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------


def _download_hint(name: str) -> str:
    return (
        f"`hf download {name}` (older huggingface_hub: `huggingface-cli download {name}`) while online, "
        "or pass a local folder holding it"
    )


def _local_file(name: str, filename: str) -> Path | None:
    """``filename`` of a local folder or of a hub repo in the HF cache; ``None`` when it is not there."""
    if Path(name).expanduser().is_dir():
        p = Path(name).expanduser() / filename
        return p if p.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, filename)
    except Exception:  # an invalid repo id: not in the cache
        return None
    return Path(found) if isinstance(found, str) else None


def _load_clip_model(name: str, dtype: torch.dtype, what: str):
    from transformers import CLIPModel

    if not Path(name).expanduser().is_dir() and _local_file(name, "config.json") is None:
        raise TLCMError(f"{what}: no CLIP model {name!r} in a local folder or the Hugging Face cache",
                        _download_hint(name))
    try:
        model = CLIPModel.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name,
                                          local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise TLCMError(f"{what}: cannot load a CLIPModel from {name!r} ({e})", _download_hint(name)) from e
    return model


def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_processor_parts(names: Sequence[str], what: str):
    """Tokenizer and preprocessor config (``None``: CLIP's defaults) from the first of ``names`` with a tokenizer."""
    errors = []
    for name in names:
        # transformers 5 builds an *empty* CLIPTokenizer from a folder without vocabulary files: check for them first
        if not any(_local_file(name, f) for f in ("tokenizer.json", "vocab.json")):
            errors.append(f"{name}: no tokenizer.json or vocab.json")
            continue
        try:
            tok = _load_tokenizer(name)
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{name}: {type(e).__name__}")
            continue
        cfg_file = _local_file(name, "preprocessor_config.json")
        return tok, (json.loads(cfg_file.read_text()) if cfg_file else None)
    raise TLCMError(
        f"{what}: no tokenizer in {', '.join(names)} ({'; '.join(errors)})",
        _download_hint(names[-1]),
    )


def _parse_spec(spec: str) -> tuple[str, str | None, dict[str, str]]:
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    parts = [p.strip() for p in rest.split(",")] if rest else []
    target = parts[0] if parts and "=" not in parts[0] else None
    options = {}
    for p in parts[1 if target is not None else 0 :]:
        if "=" not in p:
            raise TLCMError(f"reward spec {spec!r}: option {p!r} is not KEY=VALUE", SPECS_HELP)
        k, v = p.split("=", 1)
        options[k.strip()] = v.strip()
    return kind, target, options


def load_reward(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RewardModel:
    """A frozen reward model from ``spec`` (see the module docstring), on ``device`` in ``dtype``, offline."""
    kind, target, options = _parse_spec(spec)
    allowed = {"toy": set(), "clip": {"processor"}, "pickscore": {"processor"}, "aesthetic": {"clip"}}
    if kind not in allowed:
        raise TLCMError(f"unknown reward {kind!r} in spec {spec!r}", SPECS_HELP)
    unknown = set(options) - allowed[kind]
    if unknown:
        raise TLCMError(f"reward spec {spec!r}: unknown options {sorted(unknown)}", SPECS_HELP)
    if kind == "toy":
        from tlcm.toy.reward import load_toy_reward

        model = load_toy_reward(target, device, dtype)
    elif kind in ("clip", "pickscore"):
        name = target or (CLIP_L14 if kind == "clip" else PICKSCORE)
        what = "CLIP score" if kind == "clip" else "PickScore"
        clip = _load_clip_model(name, dtype, what)
        sources = [options["processor"]] if "processor" in options else (
            [name] if kind == "clip" else [name, PICKSCORE_PROCESSOR]
        )
        tok, pcfg = _load_processor_parts(sources, what)
        pre = ClipPreprocess.from_config(pcfg, int(clip.config.vision_config.image_size))
        model = ClipReward(clip, tok, pre, "cos100" if kind == "clip" else "logit_scale")
    else:
        if not target:
            raise TLCMError(f"reward spec {spec!r} names no aesthetic weights",
                            f"write aesthetic:PATH.pth; download the weights from {AESTHETIC_URL}")
        path = Path(target).expanduser()
        if not path.is_file():
            raise TLCMError(f"no aesthetic predictor weights at {path}", f"download them: wget {AESTHETIC_URL}")
        state = _read_head_state(path)
        name = options.get("clip", CLIP_L14)
        clip = _load_clip_model(name, dtype, "aesthetic predictor")
        head = aesthetic_head(state, str(path))
        if head[0].in_features != int(clip.config.projection_dim):
            raise TLCMError(
                f"the aesthetic head takes {head[0].in_features}-d embeddings but {name} gives "
                f"{clip.config.projection_dim}-d ones",
                f"use the CLIP it was trained on (ViT-L/14: clip={CLIP_L14})",
            )
        pcfg_file = _local_file(name, "preprocessor_config.json")  # absent: CLIP's defaults at the model's size
        pcfg = json.loads(pcfg_file.read_text()) if pcfg_file else None
        pre = ClipPreprocess.from_config(pcfg, int(clip.config.vision_config.image_size))
        model = AestheticReward(clip, pre, head.to(torch.promote_types(dtype, torch.float32)))
    model.spec = spec
    return model.to(device).eval().requires_grad_(False)


def _read_head_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TLCMError(f"cannot read {path} as a torch state dict ({type(e).__name__}: {e})",
                        f"download the LAION weights from {AESTHETIC_URL}") from e
    if not isinstance(state, dict):
        raise TLCMError(f"{path} does not hold a state dict", f"download the LAION weights from {AESTHETIC_URL}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# ----------------------------------------------------------------------------------------------------------------
# decoding and losses
# ----------------------------------------------------------------------------------------------------------------


def decode_for_reward(vae, latents: torch.Tensor, straight_through: bool = True) -> torch.Tensor:
    """Differentiable VAE decode of UNet-space latents to float32 images in [0, 1].

    Undoes the pipeline's latent scaling exactly as diffusers' pipelines do before ``vae.decode``: ``latents *
    latents_std / scaling_factor + latents_mean`` when the VAE config has per-channel statistics (some SDXL-family
    VAEs), else ``latents / scaling_factor + shift_factor`` (``shift_factor`` is 0 for SD1.5/SDXL).

    Clamping to [0, 1]: the forward value is the hard clamp, i.e. exactly the image the pipeline returns and the
    evaluation scores. With ``straight_through`` (default) its backward is the identity, so a pixel the decoder pushes
    out of range still receives the reward's gradient and can be pulled back in; a hard clamp's zero gradient there
    would leave saturated pixels stuck. A soft clamp (tanh, sigmoid) would change the image the reward sees."""
    cfg = vae.config
    z = latents.to(vae.dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (z.ndim - 2)
        mean_t = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
        std_t = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
        z = z * std_t / cfg.scaling_factor + mean_t
    else:
        z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    x01 = vae.decode(z).sample.float() / 2 + 0.5
    clamped = x01.clamp(0, 1)
    return x01 + (clamped - x01).detach() if straight_through else clamped


def reward_loss(
    r: torch.Tensor,
    r_mismatch: torch.Tensor | None = None,
    kind: str = "plain",
    margin: float | None = None,
    mismatch_margin: float = 0.0,
) -> torch.Tensor:
    """The preference loss from rewards ``r`` (B,) of images with their own prompts.

    - ``"plain"``: ``-mean(r)`` (maximise the reward; ``r_mismatch`` must be ``None``).
    - ``"hinge"`` (TLCM with MPS): ``mean(relu(margin - r))``, which stops pushing once an image scores ``margin``
      (so the student is not driven into reward hacking), plus, when ``r_mismatch`` (B,) is given -- the rewards of
      the same images with a *mismatched* prompt -- ``mean(relu(r_mismatch - r + mismatch_margin))``: the image must
      score at least ``mismatch_margin`` higher with its own prompt than with another one. **(our choice of the second
      hinge's form; the paper states only "a hinge on a mismatched prompt")**. ``margin`` is in the reward's units
      (the paper: 16 for MPS); ``RewardModel.default_margin`` offers one when known.
    """
    if r.ndim != 1:
        raise ValueError(f"rewards must be (B,), got {tuple(r.shape)}")
    r = r.float()
    if kind == "plain":
        if r_mismatch is not None:
            raise ValueError("the plain reward loss takes no mismatched rewards; use kind='hinge' for that term")
        return -r.mean()
    if kind != "hinge":
        raise ValueError(f"unknown reward loss {kind!r}; expected 'plain' or 'hinge'")
    if margin is None:
        raise ValueError("the hinge reward loss needs a margin in the reward's units (the TLCM paper: 16 for MPS)")
    loss = F.relu(margin - r).mean()
    if r_mismatch is not None:
        if r_mismatch.shape != r.shape:
            raise ValueError(f"r_mismatch {tuple(r_mismatch.shape)} must match r {tuple(r.shape)}")
        loss = loss + F.relu(r_mismatch.float() - r + mismatch_margin).mean()
    return loss


def mismatched_prompts(
    prompts: Sequence[str], generator: torch.Generator, pool: Sequence[str] | None = None
) -> list[str]:
    """A deterministic derangement of the batch's prompts: entry ``i`` is another prompt of the batch whose *text*
    differs from ``prompts[i]`` (duplicates in the batch are never paired with each other).

    Construction: shuffle the indices with ``generator``, group equal texts together (groups in order of first
    appearance in the shuffled order), and give each position of that order the prompt ``m`` places further round,
    ``m`` = the largest group's size. A group of size ``s <= m`` cannot reach itself when ``s + m <= n``, which holds
    whenever no text fills more than half the batch. Otherwise (e.g. a batch of one) prompts come from ``pool``
    (each a random pool entry of different text), and without a usable pool it is a :class:`TLCMError`."""
    prompts = list(prompts)
    n = len(prompts)
    if n == 0:
        return []
    order = torch.randperm(n, generator=generator).tolist()
    groups: dict[str, list[int]] = {}
    for i in order:
        groups.setdefault(prompts[i], []).append(i)
    m = max(len(g) for g in groups.values())
    if 2 * m <= n:
        flat = [i for g in groups.values() for i in g]
        out = [""] * n
        for pos, i in enumerate(flat):
            out[i] = prompts[flat[(pos + m) % n]]
        return out
    candidates = [p for p in (pool or [])]
    out = []
    for p in prompts:
        choices = [q for q in candidates if q != p]
        if not choices:
            raise TLCMError(
                f"cannot pick a mismatched prompt for {p!r}: the batch has too few distinct prompts "
                f"({len(groups)} distinct of {n}) and no pool of other prompts was given",
                "use a larger batch, or pass pool= (e.g. the run's prompt list) to mismatched_prompts",
            )
        out.append(choices[int(torch.randint(len(choices), (1,), generator=generator))])
    return out


__all__ = [
    "AestheticReward",
    "ClipPreprocess",
    "ClipReward",
    "RewardModel",
    "aesthetic_head",
    "decode_for_reward",
    "load_reward",
    "mismatched_prompts",
    "reward_loss",
]
