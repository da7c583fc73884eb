from __future__ import annotations

import pytest
import torch


class _PoolFeatures(torch.nn.Module):
    """Stands in for the TorchScript Inception: same call signature, [0, 255] input, 12-d pooled colour features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(img / 255.0, 2)
        return x.flatten(1)


@pytest.fixture(scope="session")
def fake_inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(_PoolFeatures()).save(str(path))
    return path


@pytest.fixture()
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# toy prompts\na red circle\n\na blue square\na green cross\na yellow triangle\n")
    return p


def save_student(folder, seed: int, **scheduler_settings):
    """A distilled-student folder for the tiny SD1.5 pipeline: a non-zero LoRA (diffusers format), its TLCMScheduler
    config (the teacher's schedule with ``scheduler_settings``) and ``tlcm_sampling.json``, as `tlcm distill` writes
    them."""
    import json

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tlcm import TLCMScheduler
    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    TLCMScheduler.from_config(pipe.scheduler.config, **scheduler_settings).save_config(str(folder / "scheduler"))
    (folder / "tlcm_sampling.json").write_text(json.dumps({"guidance_scale": 1.0, "num_inference_steps": 2}))
    return folder


@pytest.fixture(scope="session")
def tiny_students(tmp_path_factory):
    """Three students of the tiny SD1.5 teacher: ``a`` and ``b`` share one sampler (different LoRAs), ``c`` has
    another."""
    root = tmp_path_factory.mktemp("students")
    return {
        "a": save_student(root / "a", 11, mode="tcd", gamma=0.2, original_inference_steps=20),
        "b": save_student(root / "b", 12, mode="tcd", gamma=0.2, original_inference_steps=20),
        "c": save_student(root / "c", 13, mode="lcm", original_inference_steps=50),
    }
