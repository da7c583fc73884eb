"""Quiet runs (the two irrelevant third-party log lines, peft's multi-adapter warning) and a LoRA message that names
the right cause when a file mixes key formats."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch


def _layers(targets, seed: int):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    return pipe, get_peft_model_state_dict(pipe.unet)


def test_filters_drop_exactly_the_two_messages():
    import tlcm  # noqa: F401  (installs the filters)

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, dropped, kept in (
        ("transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling "
         "back to `CLIPImageProcessorPil` for backward compatibility.", "some other transformers warning"),
        ("diffusers.pipelines.pipeline_utils", "Expected types for text_encoder: (<class 'CLIPTextModel'>,), got "
         "<class 'transformers.models.bert.modeling_bert.BertModel'>.",
         "Expected types for unet: (<class 'UNet2DConditionModel'>,), got <class 'Something'>."),
    ):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            logger.warning(dropped)
            logger.warning(kept)
        finally:
            logger.removeHandler(handler)
    assert seen == ["some other transformers warning",
                    "Expected types for unet: (<class 'UNet2DConditionModel'>,), got <class 'Something'>."]


def test_loading_the_toy_teacher_prints_no_warning():
    code = "from tlcm.models import load_pipeline; load_pipeline('toy').set_progress_bar_config(disable=True)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stderr
    assert "torchvision" not in err and "Expected types" not in err and "Warning" not in err, err


def test_several_loras_load_without_peft_warning(tmp_path):
    from tlcm.lora import load_loras
    from tlcm.testing import tiny_sd15_pipeline

    files = []
    for i in range(2):
        pipe, layers = _layers(["to_q", "to_k"], seed=i)
        type(pipe).save_lora_weights(str(tmp_path / f"l{i}"), unet_lora_layers=layers, safe_serialization=True)
        files.append(str(tmp_path / f"l{i}" / "pytorch_lora_weights.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = load_loras(tiny_sd15_pipeline(0), [(files[0], 1.0), (files[1], 0.5)], warn=lambda t: None)
    assert len(names) == 2
    assert not [w for w in caught if "peft_config" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")  # peft's own note on it
def test_mixed_key_formats_are_named_as_the_cause(tmp_path):
    from safetensors.torch import save_file

    from tlcm.lora import adapted_unet_layers, load_loras
    from tlcm.testing import tiny_sd15_pipeline

    _, layers = _layers(["to_q", "to_k", "to_v", "to_out.0"], seed=3)
    mixed = {}
    for key, value in layers.items():  # the to_q layers in diffusers' old names, the rest in peft's
        key = "unet." + key
        if ".to_q." in key:
            key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        mixed[key] = value.contiguous()
    path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(path))
    seen = []
    pipe = tiny_sd15_pipeline(0)
    (name,) = load_loras(pipe, [(str(path), 1.0)], warn=seen.append)
    total = sum(k.endswith((".lora.down.weight", ".lora_A.weight")) for k in mixed)
    found = adapted_unet_layers(pipe, name)
    assert found < total  # diffusers really did drop some: the warning is about a real loss
    assert len(seen) == 1 and "mixes key formats" in seen[0] and "different base model" not in seen[0]
    assert f"only {found} of the {total} UNet layers" in seen[0]
