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
