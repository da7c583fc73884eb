"""Pure state-dict conversions from diffusers/peft names to the layouts other clients read. No I/O, no models.

* :func:`ldm_unet_module` / :func:`unet_to_ldm`: a diffusers ``UNet2DConditionModel`` in the original (CompVis LDM /
  Stability sgm) layout, ``model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight``, the
  inverse of diffusers' ``from_single_file`` conversion (and the logic of diffusers'
  ``scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py``, generalised from hard-coded SD1.5/SDXL block
  counts to any ``layers_per_block`` and block list of the SD family).
* :func:`vae_to_ldm`, :func:`clip_to_ldm`, :func:`open_clip_to_ldm`: the other components of a single-file checkpoint.
* :func:`kohya_lora`: LoRA layers as a kohya/A1111/ComfyUI file: ``lora_unet_<module path with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha`` (scale = alpha / rank). SD1.x/2.x files use the *diffusers* module path (what
  kohya's sd-scripts write for SD1.x, since they train the diffusers UNet); SDXL files use the *sgm* path (what
  sd-scripts write for SDXL, which they train on their own sgm UNet). See docs/export.md for who reads what.

Conversions raise :class:`TLCMError` for a weight without an equivalent in the target layout (e.g. an LCM guidance
embedding ``time_embedding.cond_proj``, which the original SD layout has no slot for), never drop it silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tlcm.errors import TLCMError

# diffusers -> LDM names of the modules outside the down/mid/up blocks
UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled-text + size conditioning
    "add_embedding.linear_2": "label_emb.0.2",
}
# diffusers ResnetBlock2D -> LDM ResBlock
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


def _unsupported(name: str, why: str) -> TLCMError:
    return TLCMError(f"UNet weight {name!r} has no place in the original Stable Diffusion layout ({why})",
                     "export this model as a diffusers folder (`tlcm export --to fused` without --single-file)")


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs from a UNet config: resnets per down block, which up blocks hold attentions."""

    layers_per_block: int
    up_has_attention: tuple[bool, ...]

    @staticmethod
    def from_config(config) -> UNetLayout:
        cfg = dict(config)
        lpb = cfg.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise TLCMError(f"layers_per_block={lpb!r} varies per block, which the original SD layout cannot express",
                            "export this model as a diffusers folder")
        for kind, types, allowed in (("down", cfg.get("down_block_types", ()), DOWN_BLOCKS),
                                     ("up", cfg.get("up_block_types", ()), UP_BLOCKS)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise TLCMError(f"{kind} block type {bad[0]!r} is not part of the Stable Diffusion UNet family",
                                "export this model as a diffusers folder")
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
            raise TLCMError(f"mid block type {cfg['mid_block_type']!r} is not part of the Stable Diffusion UNet family",
                            "export this model as a diffusers folder")
        return UNetLayout(lpb, tuple("CrossAttn" in t for t in cfg.get("up_block_types", ())))


def _resnet_tail(name: str, tail: list[str]) -> str:
    if not tail or tail[0] not in UNET_RESNET:
        raise _unsupported(name, f"unknown resnet part {'.'.join(tail)!r}")
    return ".".join([UNET_RESNET[tail[0]], *tail[1:]])


def ldm_unet_module(name: str, layout: UNetLayout) -> str:
    """The LDM/sgm path of diffusers UNet module (or parameter) path ``name``, without ``model.diffusion_model.``.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL), ``mid_block.resnets.1.conv2`` ->
    ``middle_block.2.out_layers.3``. LDM numbers the ``input_blocks`` 0 (conv_in), then per down block its resnets
    (each with its attention at ``.1``) and its downsampler; ``output_blocks`` per up block its
    ``layers_per_block + 1`` resnets, the upsampler sitting after the last one's attention (``.2``) or resnet (``.1``).
    """
    per = layout.layers_per_block + 1
    for prefix, target in UNET_TOP_LEVEL.items():
        if name == prefix or name.startswith(prefix + "."):
            return target + name[len(prefix):]
    parts = name.split(".")
    try:
        if parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                if parts[3:5] != ["0", "conv"]:
                    raise _unsupported(name, "unknown downsampler part")
                return ".".join([f"input_blocks.{per * (i + 1)}.0.op", *parts[5:]])
            j, tail = int(parts[3]), parts[4:]
            if j >= layout.layers_per_block:
                raise _unsupported(name, f"down blocks hold {layout.layers_per_block} layers")
            block = f"input_blocks.{per * i + j + 1}"
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                if parts[3:5] != ["0", "conv"]:
                    raise _unsupported(name, "unknown upsampler part")
                slot = 2 if layout.up_has_attention[i] else 1
                return ".".join([f"output_blocks.{per * i + per - 1}.{slot}.conv", *parts[5:]])
            j, tail = int(parts[3]), parts[4:]
            if j >= per:
                raise _unsupported(name, f"up blocks hold {per} layers")
            block = f"output_blocks.{per * i + j}"
        elif parts[0] == "mid_block":
            kind, j, tail = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                return f"middle_block.{2 * j}." + _resnet_tail(name, tail)
            if kind == "attentions" and j == 0:
                return "middle_block.1." + ".".join(tail)
            raise _unsupported(name, "unknown mid-block part")
        else:
            raise _unsupported(name, "not a part of the SD UNet")
    except (IndexError, ValueError) as err:
        raise _unsupported(name, f"unexpected name ({err})") from err
    if kind == "resnets":
        return f"{block}.0." + _resnet_tail(name, tail)
    if kind == "attentions":
        return f"{block}.1." + ".".join(tail)
    raise _unsupported(name, f"unknown block part {kind!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict under ``model.diffusion_model.*`` LDM names (tensors shared, not copied)."""
    layout = UNetLayout.from_config(unet_config)
    out = {}
    for key, value in state.items():
        new = "model.diffusion_model." + ldm_unet_module(key, layout)
        assert new not in out, f"two UNet weights map to {new}"
        out[new] = value
    return out


# -- VAE ------------------------------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], vae_config) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under ``first_stage_model.*`` LDM names.

    LDM numbers the decoder's up blocks in reverse, calls the shortcut ``nin_shortcut`` and keeps the mid-block
    attention's projections as 1x1 convolutions (diffusers: linear layers), hence the reshape.
    """
    n_up = len(dict(vae_config)["up_block_types"])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        coder = parts[0]
        if coder in ("quant_conv", "post_quant_conv"):
            new = key
        elif coder not in ("encoder", "decoder"):
            raise TLCMError(f"VAE weight {key!r} has no place in the original Stable Diffusion layout",
                            "export this model as a diffusers folder")
        elif parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2]) if parts[1] == "down_blocks" else n_up - 1 - int(parts[2])
            level = "down" if parts[1] == "down_blocks" else "up"
            if parts[3] in ("downsamplers", "upsamplers"):
                new = f"{coder}.{level}.{i}.{'downsample' if level == 'down' else 'upsample'}.conv.{parts[-1]}"
            else:
                new = f"{coder}.{level}.{i}.block.{'.'.join(parts[4:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{coder}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                new = f"{coder}.mid.attn_1.{_VAE_ATTENTION['.'.join(parts[4:-1])]}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


# -- text encoders --------------------------------------------------------------------------------------------------


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 drops CLIPTextModel's ``text_model.`` prefix; checkpoints keep it.
    out = {}
    for key, value in state.items():
        if key == "text_model.embeddings.position_ids" or key == "embeddings.position_ids":
            continue
        out[key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """An OpenAI-CLIP ``CLIPTextModel`` (SD1.x, SDXL's first encoder) under ``prefix`` with HF names kept, as the
    original checkpoints store it (``cond_stage_model.transformer.text_model.*``)."""
    return {prefix + k: v for k, v in _text_model_keys(state).items()}


_OPEN_CLIP = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
              ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def open_clip_to_ldm(state: dict[str, torch.Tensor], prefix: str, num_layers: int) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` (SDXL's OpenCLIP bigG encoder) in open_clip's layout under ``prefix``:
    fused ``attn.in_proj_{weight,bias}`` (q, k, v stacked), ``text_projection`` as a transposed plain tensor."""
    sd = dict(_text_model_keys(state))
    out = {prefix + "positional_embedding": sd.pop("text_model.embeddings.position_embedding.weight"),
           prefix + "token_embedding.weight": sd.pop("text_model.embeddings.token_embedding.weight"),
           prefix + "text_projection": sd.pop("text_projection.weight").T.contiguous()}
    for n in ("weight", "bias"):
        out[prefix + f"ln_final.{n}"] = sd.pop(f"text_model.final_layer_norm.{n}")
    for i in range(num_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for n in ("weight", "bias"):
            out[dst + f"attn.in_proj_{n}"] = torch.cat([sd.pop(src + f"self_attn.{p}_proj.{n}") for p in "qkv"])
            for a, b in _OPEN_CLIP:
                out[dst + f"{b}.{n}"] = sd.pop(src + f"{a}.{n}")
    if sd:
        raise TLCMError(f"text encoder weights {sorted(sd)[:3]} have no place in the open_clip layout",
                        "export this model as a diffusers folder")
    return out


# -- kohya LoRA -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraWeights:
    """One adapted layer: ``W' = W + (alpha / rank) * up @ down`` (convolutions: ``down`` is the k x k conv)."""

    module: str  # diffusers module path in the UNet, e.g. down_blocks.1.attentions.0.proj_in
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)   = peft lora_A
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)    = peft lora_B
    alpha: float  # scale * rank

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


KOHYA_NAMINGS = ("diffusers", "sgm")


def kohya_module_name(module: str, naming: str, layout: UNetLayout | None = None) -> str:
    """``lora_unet_`` + the module path with ``.`` -> ``_``: the diffusers path (``naming="diffusers"``, SD1.x/2.x) or
    the sgm/LDM path (``"sgm"``, SDXL; needs the UNet ``layout``)."""
    if naming not in KOHYA_NAMINGS:
        raise ValueError(f"naming must be one of {KOHYA_NAMINGS}, got {naming!r}")
    if naming == "sgm":
        assert layout is not None, "sgm naming needs the UNet layout"
        module = ldm_unet_module(module, layout)
    return "lora_unet_" + module.replace(".", "_")


def kohya_lora(layers: list[LoraWeights], naming: str, unet_config=None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of ``layers``: ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` (in ``dtype``,
    default: as given) and ``<name>.alpha`` (a float32 scalar, as kohya writes it; loaders read it with ``.item()``)."""
    layout = UNetLayout.from_config(unet_config) if naming == "sgm" else None
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer.down.ndim != layer.up.ndim or layer.up.shape[1] != layer.rank:
            raise ValueError(f"{layer.module}: down {tuple(layer.down.shape)} and up {tuple(layer.up.shape)} do not "
                             "form a LoRA")
        if layer.up.ndim == 4 and tuple(layer.up.shape[2:]) != (1, 1):
            raise ValueError(f"{layer.module}: a conv LoRA's up weight must be 1x1, got {tuple(layer.up.shape)}")
        name = kohya_module_name(layer.module, naming, layout)
        if name + ".alpha" in out:
            raise ValueError(f"two layers map to {name}")
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        out[name + ".lora_down.weight"] = cast(layer.down).contiguous()
        out[name + ".lora_up.weight"] = cast(layer.up).contiguous()
        out[name + ".alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
    return out
