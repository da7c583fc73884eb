"""Tiny, randomly initialised SD1.5-, SD2.1- and SDXL-like pipelines, built offline.

The same idea as diffusers' ``get_dummy_components``: real diffusers/transformers classes at toy sizes, seeded, so
tests (ours and users') exercise the exact code path of a hub checkpoint without downloading one. The CLIP tokenizer
is built from a byte-level vocabulary written to disk, so it loads through ``CLIPTokenizer.from_pretrained`` too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from tlcm.sd_config import STABLE_DIFFUSION_SCHEDULER_CONFIG as SD_SCHEDULER_CONFIG


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP's reversible byte -> printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
    bs += list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(model_max_length: int = 16, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer over single bytes (no merges): every character is a token, offline and deterministic.

    Written to a folder and read back with ``from_pretrained``, the path a hub tokenizer takes. SD2.x's tokenizer
    pads with ``"!"`` instead of the end-of-text token (``pad_token="!"``).
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        (Path(tmp) / "tokenizer_config.json").write_text(
            json.dumps({"model_max_length": model_max_length, "tokenizer_class": "CLIPTokenizer"})
        )
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token)


def _clip_config(hidden: int = 32, projection_dim: int = 32, vocab_size: int = 514):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def tiny_sd15_components(seed: int = 0, time_cond_proj_dim: int | None = None, prediction_type: str = "epsilon"):
    """Components for a ``StableDiffusionPipeline``: UNet (32x32 images, 16x16 latents), VAE, CLIP, DDIM."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config())
    scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def tiny_sd21_components(seed: int = 0, base: bool = False, time_cond_proj_dim: int | None = None):
    """Components for an SD2.1-like ``StableDiffusionPipeline``, the 768 px v-prediction model at tiny size, or with
    ``base`` the 512 px epsilon one (SD2.1-base).

    What sets SD2.x apart from SD1.5, kept here: an OpenCLIP-style text encoder (a ``CLIPTextModel`` with ``gelu``,
    not CLIP-L's ``quick_gelu``) and a tokenizer padding with ``"!"``; attention with linear projections and a head
    size per block; ``upcast_attention`` (the 768 model's fp16 fix); a DDIM scheduler with ``v_prediction`` (768) or
    a PNDM one with ``epsilon`` (base); a larger default size than SD1.5 (768 vs 512 there: 48 vs 32 px here).
    """
    from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16 if base else 24,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=not base,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config())
    if base:
        scheduler = PNDMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "clip_sample"},
                                  skip_prk_steps=True)
    else:
        scheduler = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(pad_token="!"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )


def tiny_sdxl_components(seed: int = 0, time_cond_proj_dim: int | None = None, prediction_type: str = "epsilon"):
    """Components for a ``StableDiffusionXLPipeline``: two CLIP encoders, ``text_time`` added conditioning."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(),
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
    )


def tiny_sd15_pipeline(seed: int = 0, **kwargs):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_sd15_components(seed, **kwargs), requires_safety_checker=False)


def tiny_sd21_pipeline(seed: int = 0, **kwargs):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**tiny_sd21_components(seed, **kwargs), requires_safety_checker=False)


def tiny_sd21_base_pipeline(seed: int = 0, **kwargs):
    return tiny_sd21_pipeline(seed, base=True, **kwargs)


def tiny_sdxl_pipeline(seed: int = 0, **kwargs):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, **kwargs))


def save_tiny_pipeline(kind: str, path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny ``sd15``, ``sd21`` (v-prediction), ``sd21-base`` or ``sdxl`` pipeline and ``save_pretrained`` it
    to ``path`` (a hub-like folder)."""
    builders = {"sd15": tiny_sd15_pipeline, "sd21": tiny_sd21_pipeline, "sd21-base": tiny_sd21_base_pipeline,
                "sdxl": tiny_sdxl_pipeline}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")
    pipe = builders[kind](seed, **kwargs)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def save_tiny_toy_pipeline(path: str | Path, seed: int = 0) -> Path:
    """A random, untrained scenes-world (v4) toy pipeline folder: 48 px, an f = 4 VAE, the MiniLM text encoder and
    tokenizer (40 tokens) and ``tlcm_toy.json``, so everything that accepts a toy pipeline folder (a `tlcm toy build`
    teacher, a `tlcm toy finetune` output) can be tested in seconds."""
    from diffusers import AutoencoderKL

    from tlcm.toy import MARKER, common, scenes
    from tlcm.toy.teacher import TeacherConfig, build_unet

    path = Path(path)
    parts = Path(tempfile.mkdtemp(prefix=".tiny-toy-parts."))
    torch.manual_seed(seed)
    build_unet(TeacherConfig(resolution=scenes.RESOLUTION, block_out_channels=(32, 32))).save_pretrained(parts / "unet")
    AutoencoderKL(block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=32,
                  sample_size=scenes.RESOLUTION).save_pretrained(parts / "vae")
    common.write_tokenizer(parts / "tokenizer", scenes.TEXT_MAX_LENGTH)
    common.assemble_pipeline(path, parts / "unet", parts / "vae", tokenizer_dir=parts / "tokenizer")
    common.write_json(path / MARKER, {"world": "v4"})
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    return path
