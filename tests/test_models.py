"""Loading pipelines the way a user does (saved folders, single-file checkpoints), conditioning, and loader errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.models import (
    Conditioning,
    checkpoint_keys,
    default_image_size,
    encode_prompts,
    is_sdxl,
    is_sdxl_checkpoint,
    load_pipeline,
    parse_dtype,
    resolve_device,
    resolve_model_path,
)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kind, cls", [("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")])
def test_load_saved_pipeline_by_path(kind, cls, request):
    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert type(pipe).__name__ == cls
    assert is_sdxl(pipe) == (kind == "sdxl")
    assert default_image_size(pipe) == (32, 32)
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device.type == "cpu"


def test_load_pipeline_in_half_precision(tiny_sd15_dir):
    pipe = load_pipeline(str(tiny_sd15_dir), dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16


def test_encode_prompts_shapes_and_index(tiny_sd15_dir, tiny_sdxl_dir):
    sd = encode_prompts(load_pipeline(str(tiny_sd15_dir)), ["a cat", ""])
    assert sd.encoder_hidden_states.shape == (2, 16, 32) and sd.added_cond_kwargs is None
    xl = encode_prompts(load_pipeline(str(tiny_sdxl_dir)), ["a cat", "a dog", ""])
    assert xl.encoder_hidden_states.shape == (3, 16, 64)
    assert xl.added_cond_kwargs["text_embeds"].shape == (3, 32)
    assert xl.added_cond_kwargs["time_ids"].shape == (3, 6)
    assert xl.added_cond_kwargs["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]
    both = Conditioning.cat([xl.index(slice(0, 1)), xl.index(slice(2, 3))])
    assert torch.equal(both.encoder_hidden_states[1], xl.encoder_hidden_states[2])
    assert set(both.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}


def test_missing_and_invalid_model_paths(tmp_path):
    with pytest.raises(TLCMError, match="does not exist") as info:
        load_pipeline(str(tmp_path / "nowhere"))
    assert info.value.fix and "hub id" in info.value.fix
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(TLCMError, match="without model_index.json"):
        load_pipeline(str(tmp_path / "not-a-pipeline"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(TLCMError, match="is a file but not a checkpoint"):
        load_pipeline(str(tmp_path / "notes.txt"))
    assert resolve_model_path("org/name") == "org/name"


def test_parse_dtype_and_device():
    assert parse_dtype("fp16") is torch.float16 and parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(TLCMError, match="unknown dtype 'int8'"):
        parse_dtype("int8")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(TLCMError, match="CUDA is not available"):
            resolve_device("cuda")


def test_sdxl_detection_from_checkpoint_keys(single_file_checkpoints):
    assert not is_sdxl_checkpoint(checkpoint_keys(single_file_checkpoints["sd15"][0]))
    assert is_sdxl_checkpoint(checkpoint_keys(single_file_checkpoints["sdxl"][0]))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_checkpoint_round_trips(kind, single_file_checkpoints):
    file, config = single_file_checkpoints[kind]  # the same pipeline as one LDM file and as a saved folder
    pipe = load_pipeline(str(file), config=str(config))
    original = load_pipeline(str(config))
    assert type(pipe) is type(original)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for name in names:
        assert _same_weights(getattr(pipe, name), getattr(original, name)), name


def test_cli_samples_from_single_file_like_from_folder(single_file_checkpoints, tmp_path):
    file, config = single_file_checkpoints["sd15"]
    common = ["sample", "--prompt", "a cat", "--steps", "2", "--no-progress"]
    assert main(common + ["--model", str(file), "--config", str(config), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--model", str(config), "--out", str(tmp_path / "b")]) == 0
    a, b = (Image.open(tmp_path / d / "0000_00_seed0.png") for d in "ab")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((tmp_path / "a" / "sample_config.json").read_text())["config"] == str(config)


def test_single_file_without_config_offline_says_pass_config(single_file_checkpoints, capsys):
    file, _ = single_file_checkpoints["sd15"]
    assert main(["sample", "--model", str(file), "--prompt", "x"]) == 2
    # (only what tlcm prints: a logging handler left bound to an earlier test's closed stream may add noise above)
    err = capsys.readouterr().err.split("tlcm sample: error: ")[-1]
    assert err.startswith(f"could not load the single-file checkpoint '{file}'")
    assert "pass --config DIR" in err and "Traceback" not in err


def test_single_file_errors(tmp_path, sd15_lora_file, single_file_checkpoints):
    with pytest.raises(TLCMError, match="not a Stable Diffusion checkpoint") as info:
        load_pipeline(str(sd15_lora_file))
    assert "--lora" in info.value.fix
    (tmp_path / "cfg").mkdir()
    with pytest.raises(TLCMError, match="is not a diffusers pipeline folder"):
        load_pipeline(str(single_file_checkpoints["sd15"][0]), config=str(tmp_path / "cfg"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(TLCMError, match="could not read the checkpoint"):
        load_pipeline(str(broken))
