"""Loading LoRAs onto tiny pipelines: diffusers and kohya files, peft adapter folders, tlcm student folders, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.lora import describe_lora, load_loras, parse_lora_arg, read_peft_adapter


def _sd15():
    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def unet_out(unet, cross_dim: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, cross_dim, generator=g)
    return unet(x, torch.tensor([999, 500]), encoder_hidden_states=ctx).sample


def test_parse_lora_arg():
    assert parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_arg("C:/x/y.safetensors") == ("C:/x/y.safetensors", 1.0)
    assert parse_lora_arg("dir:-1") == ("dir", -1.0)


def test_cli_lora_file_changes_output(tiny_sd15_dir, sd15_lora_file, tmp_path):
    """Done criterion: a diffusers-format LoRA saved from a tiny pipeline is loaded by --lora and changes the image."""
    common = ["sample", "--model", str(tiny_sd15_dir), "--prompt", "a cat", "--steps", "2", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "base")]) == 0
    assert main(common + ["--out", str(tmp_path / "lora"), "--lora", str(sd15_lora_file)]) == 0
    assert main(common + ["--out", str(tmp_path / "zero"), "--lora", f"{sd15_lora_file}:0"]) == 0
    base, lora, zero = (Image.open(tmp_path / d / "0000_00_seed0.png") for d in ("base", "lora", "zero"))
    assert np.abs(np.asarray(base, np.int16) - np.asarray(lora, np.int16)).max() > 5
    assert np.abs(np.asarray(base, np.int16) - np.asarray(zero, np.int16)).max() <= 1  # weight 0 = base model
    assert json.loads(lora.text["loras"]) == [[str(sd15_lora_file), 1.0]]


def test_diffusers_file_adapter_equals_merged_and_differs_from_base(sd15_lora_file):
    pipe = _sd15()
    base = unet_out(pipe.unet)
    assert load_loras(pipe, [(str(sd15_lora_file), 1.0)]) == ["pytorch_lora_weights"]
    adapter = unet_out(pipe.unet)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    merged = unet_out(pipe.unet)
    assert (adapter - base).abs().max() > 1e-2
    torch.testing.assert_close(adapter, merged, atol=1e-4, rtol=0)


def test_peft_folder_matches_peft_and_covers_all_targets(sd15_peft_dir):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from tlcm.testing import tiny_sd15_pipeline

    reference = PeftModel.from_pretrained(tiny_sd15_pipeline(0).unet, str(sd15_peft_dir))
    expected = unet_out(reference)
    n_reference = sum(isinstance(m, LoraLayer) for m in reference.modules())

    pipe = _sd15()
    base = unet_out(pipe.unet)
    (name,) = load_loras(pipe, [(str(sd15_peft_dir), 1.0)])
    ours = unet_out(pipe.unet)
    lora_modules = [n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora_modules) == n_reference
    for kind in ("to_q", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "downsamplers.0.conv",
                 "upsamplers.0.conv", "time_emb_proj"):
        assert any(n.endswith(kind) for n in lora_modules), kind
    config = pipe.unet.peft_config[name]
    assert config.r == 4 and config.lora_alpha == 8  # scale alpha/r = 2 kept from adapter_config.json
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    torch.testing.assert_close(unet_out(pipe.unet), ours, atol=1e-4, rtol=0)


def test_read_peft_adapter_strips_wrappers(sd15_peft_dir):
    state, config = read_peft_adapter(sd15_peft_dir)
    assert all(not k.startswith(("base_model.", "unet.")) for k in state)
    assert any(k.endswith("time_emb_proj.lora_A.weight") for k in state)
    assert config["r"] == 4 and "peft_type" not in config and "base_model_name_or_path" not in config


def test_kohya_file_equals_diffusers_file(sd15_lora_file, tmp_path):
    from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file, save_file

    state = load_file(str(sd15_lora_file))
    peft_state = convert_unet_state_dict_to_peft({k: v for k, v in state.items()})
    kohya = convert_state_dict_to_kohya(peft_state)
    assert any(k.startswith("lora_unet_") for k in kohya)
    kohya_file = tmp_path / "style_kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(kohya_file))

    a, b = _sd15(), _sd15()
    load_loras(a, [(str(sd15_lora_file), 1.0)])
    load_loras(b, [(str(kohya_file), 1.0)])
    torch.testing.assert_close(unet_out(b.unet), unet_out(a.unet), atol=1e-5, rtol=0)


def test_several_loras_with_weights_combine(sd15_lora_file, sd15_peft_dir):
    pipe = _sd15()
    names = load_loras(pipe, [(str(sd15_lora_file), 1.0), (str(sd15_peft_dir), 0.5)])
    assert names == ["pytorch_lora_weights", "tlcm_sd15_adapter"]
    both = unet_out(pipe.unet)
    pipe.set_adapters(names, [1.0, 0.0])
    only_file = unet_out(pipe.unet)
    pipe.set_adapters(names, [0.0, 1.0])
    only_peft = unet_out(pipe.unet)
    pipe.set_adapters(names, [0.0, 0.0])
    base = unet_out(pipe.unet)
    # LoRA deltas are additive to first order; with both active the result differs from each alone
    assert (both - only_file).abs().max() > 1e-3 and (both - only_peft).abs().max() > 1e-3
    torch.testing.assert_close(base, unet_out(_sd15().unet), atol=1e-5, rtol=0)


def test_student_folder_with_peft_adapter_only(sd15_peft_dir, tmp_path):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(sd15_peft_dir, student / "adapter")
    (student / "tlcm_sampling.json").write_text(json.dumps({"guidance_scale": 0.0, "num_inference_steps": 3}))
    source = describe_lora(student)
    assert source.kind == "peft" and source.is_student and source.sampling["num_inference_steps"] == 3
    pipe = _sd15()
    base = unet_out(pipe.unet)
    load_loras(pipe, [(str(student), 1.0)])
    assert (unet_out(pipe.unet) - base).abs().max() > 1e-2


def test_lora_for_another_base_model_is_a_clear_cli_error(tiny_sdxl_dir, sd15_lora_file, tmp_path, capsys):
    rc = main(["sample", "--model", str(tiny_sdxl_dir), "--lora", str(sd15_lora_file), "--prompt", "x",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("tlcm sample: error: LoRA ") and str(sd15_lora_file) in err
    assert "trained for a different base model" in err and "size mismatch" in err and "fix:" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_peft_adapter_for_another_base_model(sd15_peft_dir):
    from tlcm.testing import tiny_sdxl_pipeline

    with pytest.raises(TLCMError, match="trained for a different base model") as info:
        load_loras(tiny_sdxl_pipeline(0), [(str(sd15_peft_dir), 1.0)])
    assert str(sd15_peft_dir) in str(info.value)


def test_lora_matching_no_module_is_an_error(tmp_path):
    from safetensors.torch import save_file

    bogus = tmp_path / "other_arch.safetensors"
    save_file({"unet.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 8),
               "unet.blocks.0.attn.qkv.lora_B.weight": torch.zeros(8, 4)}, str(bogus))
    with pytest.raises(TLCMError, match="different base model") as info:
        load_loras(_sd15(), [(str(bogus), 1.0)])
    assert "other_arch.safetensors" in str(info.value)


def test_bad_lora_paths(tmp_path):
    with pytest.raises(TLCMError, match="does not exist"):
        describe_lora(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TLCMError, match="holds neither"):
        describe_lora(tmp_path / "empty")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    with pytest.raises(TLCMError, match="no weights"):
        load_loras(_sd15(), [(str(tmp_path / "peft"), 1.0)])
    assert describe_lora("latent-consistency/lcm-lora-sdv1-5").kind == "hub"


def test_partially_matching_lora_warns(sd15_lora_file, tmp_path):
    from safetensors.torch import load_file, save_file

    from tlcm.lora import adapted_unet_layers

    state = load_file(str(sd15_lora_file))
    n = sum(k.endswith(".lora.down.weight") for k in state)
    state["unet.extra_block.proj.lora.down.weight"] = torch.zeros(4, 8)
    state["unet.extra_block.proj.lora.up.weight"] = torch.zeros(8, 4)
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    pipe, seen = _sd15(), []
    (name,) = load_loras(pipe, [(str(partial), 1.0)], warn=seen.append)
    assert adapted_unet_layers(pipe, name) == n
    assert seen == [f"only {n} of the {n + 1} UNet layers of LoRA {str(partial)!r} exist in this UNet; the rest are "
                    "ignored (was it trained for a different base model?)"]
    seen.clear()
    load_loras(_sd15(), [(str(sd15_lora_file), 1.0)], warn=seen.append)
    assert seen == []  # a fully matching LoRA loads silently
