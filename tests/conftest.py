"""Shared, session-scoped fixtures: tiny SD1.5-like and SDXL-like pipelines saved with ``save_pretrained`` (loaded back
by path, exactly as a hub id would be), and LoRAs in the formats ``tlcm sample --lora`` reads. Nothing downloads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny models run ~30x faster on one thread than on oversubscribed cores (the test machine is shared).
torch.set_num_threads(int(os.environ.get("TLCM_TEST_THREADS", "1")))

# The modules a LoRA of the official TLCM SDXL release adapts (rank 64 there; rank 4 here).
TLCM_TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
]


def nonzero_lora_config(target_modules=None, r: int = 4, alpha: int = 8):
    """A LoraConfig whose B matrices are random too (``init_lora_weights=False``), so the LoRA changes outputs."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                      target_modules=target_modules or ["to_q", "to_k", "to_v", "to_out.0"])


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("pipes") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("pipes") / "tiny-sdxl")


def _diffusers_lora(kind: str, folder, seed: int = 123):
    """A LoRA on the attention projections of a tiny ``kind`` UNet, saved with diffusers' ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from tlcm.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sd15_pipeline if kind == "sd15" else tiny_sdxl_pipeline)(0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(nonzero_lora_config())
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def sd15_lora_file(tmp_path_factory):
    """``pytorch_lora_weights.safetensors`` (diffusers format) for the tiny SD1.5 UNet."""
    return _diffusers_lora("sd15", tmp_path_factory.mktemp("lora-sd15"))


@pytest.fixture(scope="session")
def sdxl_lora_file(tmp_path_factory):
    """``pytorch_lora_weights.safetensors`` (diffusers format) for the tiny SDXL UNet."""
    return _diffusers_lora("sdxl", tmp_path_factory.mktemp("lora-sdxl"))


@pytest.fixture(scope="session")
def sd15_peft_dir(tmp_path_factory):
    """A peft adapter folder (``PeftModel.save_pretrained``) on the tiny SD1.5 UNet, targeting the modules of the
    official TLCM SDXL LoRA: attention, proj_in/out, feed-forward, resnet convs, samplers and time_emb_proj."""
    from peft import get_peft_model

    from tlcm.testing import tiny_sd15_pipeline

    unet = tiny_sd15_pipeline(0).unet
    torch.manual_seed(7)
    model = get_peft_model(unet, nonzero_lora_config(TLCM_TARGET_MODULES, r=4, alpha=8))
    folder = tmp_path_factory.mktemp("peft") / "tlcm-sd15-adapter"
    model.save_pretrained(str(folder))
    return folder


# --- single-file (original LDM layout) checkpoints ----------------------------------------------------------------
# diffusers ships only the LDM -> diffusers direction (``from_single_file``); this is the inverse for the tiny
# pipelines, so that ``tlcm sample --model x.safetensors --config DIR`` can be tested offline end to end.

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _ldm_unet(unet) -> dict[str, torch.Tensor]:
    sd, cfg, out = unet.state_dict(), unet.config, {}
    per = cfg.layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    for key, value in sd.items():
        parts = key.split(".")
        if ".".join(parts[:-1]) in fixed:
            new = f"{fixed['.'.join(parts[:-1])]}.{parts[-1]}"
        elif parts[0] in ("down_blocks", "up_blocks"):
            i, kind = int(parts[1]), parts[2]
            tail = ".".join(parts[4:])
            if kind == "downsamplers":
                new = f"input_blocks.{per * (i + 1)}.0.op.{parts[-1]}"
            elif kind == "upsamplers":
                has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in sd)
                new = f"output_blocks.{per * i + per - 1}.{2 if has_attn else 1}.conv.{parts[-1]}"
            else:
                j = int(parts[3])
                block = (f"input_blocks.{per * i + j + 1}" if parts[0] == "down_blocks"
                         else f"output_blocks.{per * i + j}")
                if kind == "resnets":
                    for a, b in _RESNET:
                        tail = tail.replace(a, b) if tail.startswith(a + ".") else tail
                    new = f"{block}.0.{tail}"
                else:
                    new = f"{block}.1.{tail}"
        elif parts[0] == "mid_block":
            kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                for a, b in _RESNET:
                    tail = tail.replace(a, b) if tail.startswith(a + ".") else tail
                new = f"middle_block.{2 * j}.{tail}"
            else:
                new = f"middle_block.1.{tail}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def _ldm_vae(vae) -> dict[str, torch.Tensor]:
    out, n_up = {}, len(vae.config.up_block_types)
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            new = (f"{parts[0]}.down.{i}.downsample.conv.{parts[-1]}" if parts[3] == "downsamplers"
                   else f"{parts[0]}.down.{i}.block.{'.'.join(parts[4:])}")
        elif parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            new = (f"{parts[0]}.up.{i}.upsample.conv.{parts[-1]}" if parts[3] == "upsamplers"
                   else f"{parts[0]}.up.{i}.block.{'.'.join(parts[4:])}")
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                tail = ".".join(parts[4:-1])
                new = f"{parts[0]}.mid.attn_1.{attn[tail]}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out[f"first_stage_model.{new.replace('conv_shortcut', 'nin_shortcut')}"] = value
    return out


def _ldm_open_clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    sd, out = encoder.state_dict(), {}
    out[prefix + "positional_embedding"] = sd.pop("text_model.embeddings.position_embedding.weight")
    out[prefix + "token_embedding.weight"] = sd.pop("text_model.embeddings.token_embedding.weight")
    out[prefix + "text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    for n in ("weight", "bias"):
        out[prefix + f"ln_final.{n}"] = sd.pop(f"text_model.final_layer_norm.{n}")
    for i in range(encoder.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for n in ("weight", "bias"):
            out[dst + f"attn.in_proj_{n}"] = torch.cat([sd.pop(src + f"self_attn.{p}_proj.{n}") for p in "qkv"])
            for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                         ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[dst + f"{b}.{n}"] = sd.pop(src + f"{a}.{n}")
    sd.pop("text_model.embeddings.position_ids", None)
    assert not sd, f"unmapped open-clip keys {sorted(sd)}"
    return out


def write_ldm_checkpoint(pipe, path) -> None:
    """Save ``pipe`` (tiny SD1.5 or SDXL) as one original-layout ``.safetensors`` checkpoint."""
    from safetensors.torch import save_file

    state = {**_ldm_unet(pipe.unet), **_ldm_vae(pipe.vae)}
    # transformers >= 5.6 flattens CLIPTextModel's keys; the LDM layout keeps ``text_model.``
    clip = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
            for k, v in pipe.text_encoder.state_dict().items()}
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.items()})
    else:
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()})
        state.update(_ldm_open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def tiny_sdxl_wide_pipeline(seed: int = 0):
    """The tiny SDXL pipeline with a wider second text encoder (48 vs 32), as in real SDXL (1280 vs 768):
    diffusers' single-file loader tells the two encoders apart by width, so equal widths cannot round-trip."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from tlcm.testing import _clip_config, tiny_sdxl_components

    components = tiny_sdxl_components(seed)
    unet_config = dict(components["unet"].config)
    unet_config["cross_attention_dim"] = 32 + 48
    torch.manual_seed(seed)
    components["unet"] = UNet2DConditionModel.from_config(unet_config)
    torch.manual_seed(seed + 3)
    components["text_encoder_2"] = CLIPTextModelWithProjection(_clip_config(hidden=48, projection_dim=32))
    return StableDiffusionXLPipeline(**components)


@pytest.fixture(scope="session")
def single_file_checkpoints(tmp_path_factory):
    """Tiny pipelines as single-file (original LDM layout) checkpoints plus matching config folders:
    ``{"sd15": (file, config_dir), "sdxl": (file, config_dir)}``."""
    from tlcm.testing import tiny_sd15_pipeline

    folder = tmp_path_factory.mktemp("single-file")
    out = {}
    for kind, pipe in (("sd15", tiny_sd15_pipeline(0)), ("sdxl", tiny_sdxl_wide_pipeline(0))):
        pipe.save_pretrained(str(folder / f"{kind}-config"), safe_serialization=True)
        write_ldm_checkpoint(pipe, folder / f"tiny-{kind}.safetensors")
        out[kind] = (folder / f"tiny-{kind}.safetensors", folder / f"{kind}-config")
    return out
