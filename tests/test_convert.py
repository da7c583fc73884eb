"""The name conversions of :mod:`tlcm.convert` on the *real* SD1.5, SD2.1 and SDXL architectures, checked against
diffusers' own inverse conversions (``from_single_file``'s LDM -> diffusers converters and ``load_lora_weights``'
kohya converter). The networks are built on the meta device: full-size layouts, no memory, no weights."""

from __future__ import annotations

import pytest
import torch

from tlcm.convert import (
    LoraWeights,
    UNetLayout,
    kohya_lora,
    kohya_module_name,
    ldm_unet_module,
    unet_to_ldm,
    vae_to_ldm,
)
from tlcm.errors import TLCMError

# the UNet configs of runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1 and stable-diffusion-xl-base-1.0
UNETS = {
    "sd15": dict(attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], layers_per_block=2,
                 sample_size=64, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "sd21": dict(attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                 cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 layers_per_block=2, sample_size=96, up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 use_linear_projection=True),
    "sdxl": dict(addition_embed_type="text_time", addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
                 block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], layers_per_block=2,
                 projection_class_embeddings_input_dim=2816, sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True),
}


def _meta_unet(kind: str):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**UNETS[kind])


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_unet_to_ldm_is_inverted_exactly_by_diffusers_single_file_converter(kind):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = _meta_unet(kind)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    assert all(k.startswith("model.diffusion_model.") for k in ldm) and len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)  # every tensor comes back under its own name


def test_vae_to_ldm_is_inverted_by_diffusers_single_file_converter():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with torch.device("meta"):  # the SD1.x/2.x/SDXL VAE layout
        vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, latent_channels=4)
    state = vae.state_dict()
    ldm = vae_to_ldm(state, vae.config)
    assert "first_stage_model.decoder.up.0.block.2.conv1.weight" in ldm  # LDM numbers the decoder reversed
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)  # 1x1 conv in LDM
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)
    reshaped = {k for k in state if ".attentions.0." in k and k.endswith(".weight") and state[k].ndim == 2}
    assert len(reshaped) == 8 and all(back[k] is state[k] for k in state if k not in reshaped)


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_kohya_names_of_every_layer_load_back_through_diffusers(kind):
    """Every Linear/Conv2d of the UNet (a superset of what any student adapts), named as kohya does, maps back to
    the same module through diffusers' kohya converter (which undoes the sgm block numbering for SDXL)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(kind)
    layout = UNetLayout.from_config(unet.config)
    naming = "sgm" if kind == "sdxl" else "diffusers"
    modules = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    state = {}
    for module in modules:
        name = kohya_module_name(module, naming, layout)
        state.update({f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
                      f"{name}.alpha": torch.tensor(1.0)})
    assert len(state) == 3 * len(modules)  # no two modules share a name
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, unet.config))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.rsplit(".lora_A", 1)[0] for k in peft if ".lora_A" in k} == set(modules)


def test_known_names_from_the_reference_scripts():
    """Spot checks against the tables of diffusers' scripts/convert_diffusers_to_original_{stable_diffusion,sdxl}.py."""
    sd15, sdxl = UNetLayout.from_config(UNETS["sd15"]), UNetLayout.from_config(UNETS["sdxl"])
    assert ldm_unet_module("up_blocks.0.upsamplers.0.conv.weight", sd15) == "output_blocks.2.1.conv.weight"
    assert ldm_unet_module("up_blocks.1.upsamplers.0.conv", sd15) == "output_blocks.5.2.conv"
    assert ldm_unet_module("up_blocks.0.upsamplers.0.conv", sdxl) == "output_blocks.2.2.conv"
    assert ldm_unet_module("down_blocks.2.downsamplers.0.conv.bias", sd15) == "input_blocks.9.0.op.bias"
    assert ldm_unet_module("down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q", sdxl) == \
        "input_blocks.5.1.transformer_blocks.0.attn1.to_q"
    assert ldm_unet_module("up_blocks.1.resnets.2.conv_shortcut", sdxl) == "output_blocks.5.0.skip_connection"
    assert ldm_unet_module("mid_block.resnets.1.time_emb_proj", sd15) == "middle_block.2.emb_layers.1"
    assert ldm_unet_module("mid_block.attentions.0.proj_out", sdxl) == "middle_block.1.proj_out"
    assert ldm_unet_module("add_embedding.linear_2.weight", sdxl) == "label_emb.0.2.weight"
    assert ldm_unet_module("conv_in.weight", sd15) == "input_blocks.0.0.weight"
    assert kohya_module_name("down_blocks.1.attentions.0.proj_in", "sgm", sdxl) == "lora_unet_input_blocks_4_1_proj_in"
    assert kohya_module_name("down_blocks.1.attentions.0.proj_in", "diffusers") == \
        "lora_unet_down_blocks_1_attentions_0_proj_in"


def test_conversion_errors():
    sd15 = UNetLayout.from_config(UNETS["sd15"])
    with pytest.raises(TLCMError, match="time_embedding.cond_proj"):  # LCM's guidance embedding has no LDM slot
        ldm_unet_module("time_embedding.cond_proj.weight", sd15)
    with pytest.raises(TLCMError, match="down blocks hold 2 layers"):
        ldm_unet_module("down_blocks.0.resnets.2.conv1", sd15)
    with pytest.raises(TLCMError, match="varies per block"):
        UNetLayout.from_config({**UNETS["sd15"], "layers_per_block": [1, 2, 2, 2]})
    with pytest.raises(TLCMError, match="not part of the Stable Diffusion UNet family"):
        UNetLayout.from_config({**UNETS["sd15"], "down_block_types": ["SimpleCrossAttnDownBlock2D"]})
    with pytest.raises(ValueError, match="do not form a LoRA"):
        kohya_lora([LoraWeights("conv_in", torch.zeros(4, 3), torch.zeros(5, 3), 4.0)], "diffusers")
    with pytest.raises(ValueError, match="naming must be one of"):
        kohya_module_name("conv_in", "a1111")
