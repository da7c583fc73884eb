"""The toy world's reward model: a small contrastive image/text model, the stand-in for PickScore.

Architecture: a small CNN image tower (32-48 px RGB -> ``embed_dim``) and a small MLP head over *frozen* MiniLM
sentence embeddings (the toy teacher's text encoder, mean-pooled over tokens); reward = ``exp(logit_scale) *
cos(image, text)``, PickScore's form. Trained with CLIP's symmetric InfoNCE on rendered toy images and their captions;
captions of the same attribute combination count as positives of each other (soft targets), so paraphrases are not
pushed apart. Augmentation: a share of the training images goes through the toy VAE's encode/decode round trip, plus
light blur and noise, so that the model reads VAE-decoded student images as well as rendered ones.

It is **not** the metrics classifier (``tlcm.toy.metrics``), which is the evaluation's yardstick and must never be a
training loss: different architecture and weights, its own initialisation seed (``seed``, 2000 vs 1000) and its own
training images (``data_seed`` 3000, vs the classifier's 1000 and the teacher dataset's 0). The world is a config
field (`world: v4`, resolved by :func:`tlcm.toy.worlds.get_world`), trained at the world's native resolution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tlcm.errors import TLCMError
from tlcm.losses.reward import RewardModel
from tlcm.toy import common

WEIGHTS = "reward.safetensors"
CONFIG = "config.json"


@dataclass
class RewardConfig:
    world: str = "v4"  # toy world (tlcm.toy.worlds): v4 (scenes) or v3 (shapes)
    train_images: int = 8000
    heldout_fraction: float = 0.2  # share from the world's "heldout" split (every combination known, as a real RM)
    eval_images: int = 1000
    vae: str = "toy"  # VAE for the round-trip augmentation: "toy" (the world's shipped teacher's), a folder, or ""
    vae_images: int = 3000  # training images that get a VAE round-trip copy (a random subset; 0: none)
    vae_fraction: float = 0.5  # chance that such an image is shown through its round trip
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    width: int = 16
    embed_dim: int = 64
    text_hidden: int = 256
    max_length: int = 40  # MiniLM tokens (the world's TEXT_MAX_LENGTH: v3 captions have < 20, v4 < 34)
    init_logit_scale: float = 2.659  # log(1 / 0.07), CLIP's initial temperature
    seed: int = 2000  # initialisation and batches; the metrics classifier uses 1000
    data_seed: int = 3000  # training images; the classifier's are drawn with 1000, the teacher dataset with 0
    checkpoint_every: int = 250
    threads: int = 2


def resolve_world(name: str):
    """The toy world module (:func:`tlcm.toy.worlds.get_world`: ``v4``/``scenes`` or ``v3``/``shapes``)."""
    from tlcm.toy.worlds import get_world

    return get_world(name)


# ----------------------------------------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------------------------------------


class ToyRewardNet(nn.Module):
    """Image tower + text head into one embedding space, and a learned logit scale."""

    def __init__(self, width: int = 16, embed_dim: int = 64, text_dim: int = 384, text_hidden: int = 256,
                 init_logit_scale: float = 2.659):
        super().__init__()
        w = width

        def block(i, o, stride):
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.GroupNorm(8 if o % 8 == 0 else 1, o), nn.SiLU())

        self.image_body = nn.Sequential(
            block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1), block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 2),
            nn.AdaptiveAvgPool2d(4),  # keeps a 4x4 layout (positions matter) at any input resolution
        )
        self.image_proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(), nn.Linear(256, embed_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, text_hidden), nn.SiLU(), nn.Linear(text_hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.config = {"width": width, "embed_dim": embed_dim, "text_dim": text_dim, "text_hidden": text_hidden}

    def image_embeds(self, x01: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_body(x01 * 2 - 1)), dim=-1)

    def text_embeds(self, sentence: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(sentence), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=float(np.log(100.0))).exp()  # CLIP's cap on the inverse temperature


@torch.no_grad()
def sentence_embeddings(prompts: Sequence[str], tokenizer, encoder, max_length: int, batch: int = 256,
                        progress: bool = False) -> torch.Tensor:
    """Frozen MiniLM sentence embeddings ``(N, 384)``: token states mean-pooled over the attention mask, then
    L2-normalised (how all-MiniLM-L6-v2 is used as a sentence encoder)."""
    from tqdm.auto import tqdm

    device = next(encoder.parameters()).device
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="encoding captions", disable=not progress):
        tok = tokenizer(list(prompts[i : i + batch]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        mask = tok.attention_mask.to(device)
        states = encoder(input_ids=tok.input_ids.to(device), attention_mask=mask)[0]
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 384)


class ToyReward(RewardModel):
    """The toy reward as a :class:`RewardModel`: ``exp(logit_scale) * cos(image, text)``, differentiable in the
    images (resized to the model's resolution with antialiased bilinear interpolation, as the toy metrics do)."""

    def __init__(self, net: ToyRewardNet, tokenizer, encoder, resolution: int, max_length: int,
                 default_margin: float | None = None, spec: str = "toy"):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resolution = int(resolution)
        self.max_length = int(max_length)
        self.default_margin = default_margin
        self.spec = spec
        self._text_cache: dict[str, torch.Tensor] = {}

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            if len(self._text_cache) > 100_000:  # bounded: a training run's prompt set is far smaller
                self._text_cache.clear()
            emb = sentence_embeddings(todo, self.tokenizer, self.encoder, self.max_length)
            self._text_cache.update({p: e.cpu() for p, e in zip(todo, emb)})
        p = self.net.logit_scale
        sentence = torch.stack([self._text_cache[q] for q in prompts]).to(p.device, p.dtype)
        return self.net.text_embeds(sentence)

    def forward(self, images01: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images01, prompts)
        p = self.net.logit_scale
        x = images01.to(p.device, p.dtype)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear", antialias=True, align_corners=False)
        acc = torch.promote_types(p.dtype, torch.float32)
        cos = (self.net.image_embeds(x).to(acc) * self.text_embeds(prompts).to(acc)).sum(-1)
        return self.net.scale().to(acc) * cos


def load_toy_reward(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ToyReward:
    """A trained toy reward folder (``reward.safetensors`` + ``config.json``); default: the shipped one."""
    from safetensors.torch import load_file

    from tlcm.toy.teacher import load_text_encoder

    if path is None:
        from tlcm.toy import assets_dir

        folder = assets_dir() / "reward"
    else:
        folder = Path(path).expanduser()
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise TLCMError(
            f"no toy reward model in {folder}",
            "train one with `tlcm toy train-reward --out DIR` and use the spec toy:DIR "
            "(or copy DIR/reward.safetensors and DIR/config.json to src/tlcm/toy/assets/reward/ to ship it)",
        )
    cfg = json.loads((folder / CONFIG).read_text())
    net = ToyRewardNet(cfg["width"], cfg["embed_dim"], cfg["text_dim"], cfg["text_hidden"])
    net.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()})
    tokenizer, encoder = load_text_encoder(cfg["max_length"])
    reward = ToyReward(net, tokenizer, encoder, cfg["resolution"], cfg["max_length"], cfg.get("default_margin"),
                       spec="toy" if path is None else f"toy:{path}")
    return reward.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------


def _records(world, n: int, seed: int, heldout_fraction: float):
    splits = getattr(world, "SPLITS", ("train",))
    n_held = int(round(n * heldout_fraction)) if "heldout" in splits else 0
    recs = world.sample_records(n - n_held, seed, "train")
    if n_held:
        recs += world.sample_records(n_held, seed, "heldout")
    images = np.stack([np.asarray(r[0].convert("RGB"), dtype=np.uint8) for r in recs])
    captions = [r[1] for r in recs]
    # positives share a key: the attribute combination where a caption names everything (v3); the caption itself
    # where captions leave most of the image free (v4: two scenes whose captions are equal satisfy each other's)
    keys = [r[1] if hasattr(world, "parse_prompt") else json.dumps(r[2], sort_keys=True, default=str) for r in recs]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return images, captions, torch.tensor([index[k] for k in keys]), [r[2] for r in recs]


def _vae_folder(spec: str, world: str | None = None) -> Path | None:
    if not spec:
        return None
    if spec == "toy":
        from tlcm.toy import assets_dir

        folder = assets_dir(world) / "teacher" / "vae"
    else:
        folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise TLCMError(f"no AutoencoderKL in {folder}", "pass vae: toy, a trained VAE folder, or '' to skip it")
    return folder


def vae_round_trip(images: np.ndarray, vae_spec: str, batch: int = 200, progress: bool = False,
                   world: str | None = None) -> np.ndarray | None:
    """uint8 images through the VAE's encode (posterior mode) and decode, as uint8; ``None`` without a VAE."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from tlcm.toy.autoencoder import reconstruct

    folder = _vae_folder(vae_spec, world)
    if folder is None:
        return None
    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval().requires_grad_(False)
    out = []
    for i in tqdm(range(0, len(images), batch), desc="VAE round trip", disable=not progress):
        x = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float() / 255
        out.append((reconstruct(vae, x) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return common.blur_noise_augment(x, g, 0.3, 0.04)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE with soft targets: ``labels`` equal means the same attribute combination (a positive)."""
    logits = scale * img @ txt.T
    pos = (labels[:, None] == labels[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _prepare(cfg: RewardConfig, world, out: Path, progress: bool) -> dict:
    """Training data, computed once and cached in ``out/data.pt``: uint8 images, their VAE round trips, caption
    indices into the frozen sentence embeddings, and attribute-combination labels."""
    from tlcm.toy.teacher import load_text_encoder

    cache = out / "data.pt"
    n_vae = min(cfg.vae_images, cfg.train_images) if cfg.vae and cfg.vae_fraction > 0 else 0
    key = json.dumps([cfg.world, cfg.train_images, cfg.heldout_fraction, cfg.data_seed, cfg.max_length,
                      cfg.vae if n_vae else "", n_vae])
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
        if data.get("key") == key:
            return data
    images, captions, labels, _ = _records(world, cfg.train_images, cfg.data_seed, cfg.heldout_fraction)
    order = np.random.default_rng(cfg.data_seed).permutation(len(images))  # so the VAE subset spans both splits
    images, captions, labels = images[order], [captions[i] for i in order], labels[torch.from_numpy(order)]
    uniq = list(dict.fromkeys(captions))
    index = {c: i for i, c in enumerate(uniq)}
    tokenizer, encoder = load_text_encoder(cfg.max_length)
    data = {
        "images": torch.from_numpy(images),
        "sentences": sentence_embeddings(uniq, tokenizer, encoder, cfg.max_length, progress=progress).half(),
        "caption_index": torch.tensor([index[c] for c in captions]),
        "labels": labels,
        "key": key,
    }
    if n_vae:
        data["vae_images"] = torch.from_numpy(vae_round_trip(images[:n_vae], cfg.vae, progress=progress,
                                                             world=cfg.world))
    common.atomic_torch_save(data, cache)
    return data


def train_reward(cfg: RewardConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the toy reward model; writes ``reward.safetensors`` (fp16), ``config.json``, ``report.json`` and
    ``config.yaml`` to ``out_dir``. Resumable (``checkpoint.pt``, cached data in ``data.pt``)."""

    from tlcm.toy.metrics import MetricsConfig

    out = Path(out_dir)
    if (done := common.finished_report(out, WEIGHTS)) is not None:
        return done
    if cfg.data_seed == MetricsConfig.seed:
        raise TLCMError(f"data_seed {cfg.data_seed} is the metrics classifier's training seed",
                        "the reward must not see the yardstick's images: pick another data_seed")
    if cfg.train_images < 2 or cfg.batch_size < 2 or cfg.steps < 1:
        raise TLCMError("the toy reward needs train_images >= 2, batch_size >= 2 and steps >= 1")
    world = resolve_world(cfg.world)
    clock = common.begin_run(cfg, out)

    # 1. data: images, VAE round trips, frozen sentence embeddings (cached)
    data = _prepare(cfg, world, out, progress)
    prep_seconds = clock.seconds
    n = len(data["images"])
    x_real = data["images"].permute(0, 3, 1, 2)
    x_vae = data["vae_images"].permute(0, 3, 1, 2) if "vae_images" in data else None
    sentences = data["sentences"].float()

    # 2. model and optimiser
    torch.manual_seed(cfg.seed)
    net = ToyRewardNet(cfg.width, cfg.embed_dim, sentences.shape[1], cfg.text_hidden, cfg.init_logit_scale)
    opt, sched, ckpt, start, rng, g = common.one_cycle_optimisation(net, cfg, out, cfg.weight_decay, name="net")
    net.train()

    def train_step(step: int) -> float:
        # 3. a batch: real or VAE-round-tripped images, light augmentation, their captions' embeddings
        idx = torch.from_numpy(rng.choice(n, size=min(cfg.batch_size, n), replace=False))
        x = x_real[idx].float() / 255
        if x_vae is not None:  # images [0, n_vae) have a round-trip copy
            use_vae = torch.from_numpy(rng.random(len(idx)) < cfg.vae_fraction) & (idx < len(x_vae))
            x[use_vae] = x_vae[idx[use_vae]].float() / 255
        x = _augment(x, g)
        txt = net.text_embeds(sentences[data["caption_index"][idx]])
        # 4. symmetric InfoNCE, same-combination captions as positives
        loss = contrastive_loss(net.image_embeds(x), txt, data["labels"][idx], net.scale())
        common.optimiser_step(loss, opt, sched)
        return loss.item()

    history = common.run_training(
        train_step, start, cfg.steps, ckpt, cfg.checkpoint_every, "train-reward", progress,
        net=net, opt=opt, sched=sched,
    )
    train_seconds = clock.seconds - prep_seconds

    # 5. export (fp16, as shipped) and evaluate the exported weights
    net.eval()
    common.save_weights_atomic(net.state_dict(), out / WEIGHTS, half=True)
    model_cfg = {**net.config, "resolution": int(world.RESOLUTION), "max_length": cfg.max_length, "world": cfg.world,
                 "seed": cfg.seed, "data_seed": cfg.data_seed}
    common.write_json(out / CONFIG, model_cfg)
    reward = load_toy_reward(out)
    evaluation = evaluate_reward(reward, world, cfg.eval_images, cfg.data_seed + 1, cfg.heldout_fraction,
                                 cfg.vae)
    model_cfg["default_margin"] = evaluation["reward_vae_mean"] if "reward_vae_mean" in evaluation else (
        evaluation["reward_real_mean"])
    common.write_json(out / CONFIG, model_cfg)
    report = {
        "parameters": sum(p.numel() for p in net.parameters()),
        "weights_bytes": (out / WEIGHTS).stat().st_size,
        "images": n,
        "unique_captions": int(len(sentences)),
        "steps": cfg.steps,
        **common.loss_summary(history),
        "not_the_metrics_classifier": {
            "reward_seed": cfg.seed, "reward_data_seed": cfg.data_seed,
            "metrics_seed": MetricsConfig.seed, "metrics_data_seed": MetricsConfig.seed,
        },
        **evaluation,
        "prep_seconds": round(prep_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(clock.seconds, 1),
    }
    common.write_json(out / "report.json", report)
    return report


@torch.no_grad()
def evaluate_reward(reward: ToyReward, world, n: int = 1000, seed: int = 3001, heldout_fraction: float = 0.2,
                    vae: str = "", batch: int = 64) -> dict:
    """Retrieval on fresh records: image -> caption and caption -> image top-1 within batches of ``batch`` (a hit
    when the best match has the same attribute combination), on rendered images and, with a VAE, on their round
    trips; the mean reward of matched and mismatched (deranged) pairs; and, where the world has a canonical caption,
    how often an image scores its own caption above the same caption with one attribute changed."""
    from tlcm.losses.reward import mismatched_prompts

    images, captions, labels, attrs = _records(world, n, seed, heldout_fraction)
    sets = {"real": images}
    trip = vae_round_trip(images, vae, world=getattr(world, "VERSION", None)) if vae else None
    if trip is not None:
        sets["vae"] = trip
    result: dict = {"eval_images": len(images)}
    g = torch.Generator().manual_seed(seed)
    for name, arr in sets.items():
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
        i2t, t2i, matched, mismatched = [], [], [], []
        for i in range(0, len(x), batch):
            xb, cb, lb = x[i : i + batch], captions[i : i + batch], labels[i : i + batch]
            if len(xb) < 2:
                continue
            img = reward.net.image_embeds(xb)
            txt = reward.text_embeds(cb)
            sim = img @ txt.T
            i2t.append((lb[sim.argmax(1)] == lb).float())
            t2i.append((lb[sim.argmax(0)] == lb).float())
            matched.append(reward(xb, cb))
            mismatched.append(reward(xb, mismatched_prompts(cb, g, pool=captions)))
        result[f"retrieval_i2t_top1_{name}"] = round(float(torch.cat(i2t).mean()), 4)
        result[f"retrieval_t2i_top1_{name}"] = round(float(torch.cat(t2i).mean()), 4)
        result[f"reward_{name}_mean"] = round(float(torch.cat(matched).mean()), 4)
        result[f"reward_{name}_std"] = round(float(torch.cat(matched).std()), 4)
        result[f"reward_{name}_mismatched_mean"] = round(float(torch.cat(mismatched).mean()), 4)
    result["retrieval_batch"] = batch
    if hasattr(world, "canonical_caption") and hasattr(world, "CLASSES"):
        k = min(len(images), 500)  # 5 extra captions per image to embed: a subset is enough
        result["attribute_swap_accuracy"] = _attribute_swap(reward, world, images[:k], attrs[:k], seed)
    return result


def _attribute_swap(reward: ToyReward, world, images: np.ndarray, attrs: list[dict], seed: int) -> dict:
    """Per attribute: the share of images scoring their canonical caption above the canonical caption with that one
    attribute set to another (random) value; held-out combinations are allowed as negatives."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    true = reward(x, [world.canonical_caption(a) for a in attrs])
    out = {}
    for name, values in world.CLASSES.items():
        swapped = []
        for a in attrs:
            others = [v for v in values if v != a[name]]
            swapped.append(world.canonical_caption({**a, name: others[int(rng.integers(len(others)))]}))
        out[name] = round(float((true > reward(x, swapped)).float().mean()), 4)
    return out


__all__ = [
    "RewardConfig",
    "ToyReward",
    "ToyRewardNet",
    "contrastive_loss",
    "evaluate_reward",
    "load_toy_reward",
    "resolve_world",
    "sentence_embeddings",
    "train_reward",
    "vae_round_trip",
]
