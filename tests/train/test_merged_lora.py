"""lora_merged: LoRA layers computed through ``W + s B A`` are the adapter's function (values and gradients), follow
the weights as they train, leave the teacher alone, and are merged in a training pass only where that is cheaper."""

from __future__ import annotations

import pytest
import torch

from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.loop import distill

EPS = torch.finfo(torch.float32).eps


def _perturb(params, gen, scale=0.05):
    with torch.no_grad():
        for p in params:  # a non-trivial adapter (B starts at zero)
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _inputs(pipe):
    from tlcm.models import encode_prompts

    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 259]), encode_prompts(pipe, ["a", "b"])


def test_merged_layers_are_the_adapter_function_with_and_without_gradient(tiny_cfg):
    from tlcm.train.merged_lora import install_merged_forward
    from tlcm.train.student import build_networks

    pipes = [tiny_sd15_pipeline(0), tiny_sd15_pipeline(0)]
    # rank 32 on the tiny UNet's 32-64 channels: every layer is merged in the training pass too
    nets = [build_networks(p.unet, tiny_cfg(lora_rank=32, lora_alpha=32)) for p in pipes]
    g = torch.Generator().manual_seed(0)
    _perturb(nets[0].student_parameters(), g)
    with torch.no_grad():
        for a, b in zip(nets[0].student_parameters(), nets[1].student_parameters()):
            b.copy_(a)
    base = {k: v.clone() for k, v in pipes[1].unet.state_dict().items() if "lora_" not in k}
    assert install_merged_forward(pipes[1].unet) > 0
    ref_unet, merged_unet = pipes[0].unet, pipes[1].unet
    z, t, cond = _inputs(pipes[0])
    kwargs = cond.unet_kwargs()

    for _ in range(2):
        outs, grads = [], []
        for unet, n in ((ref_unet, nets[0]), (merged_unet, nets[1])):
            n.drop_grads()
            out = unet(z, t, **kwargs).sample
            (out.square().mean()).backward()
            outs.append(out.detach())
            grads.append(torch.cat([p.grad.flatten() for p in n.student_parameters()]))
        scale = float(outs[0].abs().max())
        # float32: each layer's W x + s B A x and (W + s B A) x differ by a few ulps of their magnitude; some tens
        # of layers compound it
        assert torch.allclose(outs[1], outs[0], rtol=0, atol=1e3 * EPS * scale)
        assert float((grads[1] - grads[0]).norm()) <= 1e3 * EPS * float(grads[0].norm())
        with torch.no_grad():  # the cached no-gradient path, before and after an in-place update of the adapter
            ref = ref_unet(z, t, **kwargs).sample
            merged = merged_unet(z, t, **kwargs).sample
        assert torch.allclose(merged, ref, rtol=0, atol=1e3 * EPS * scale)
        with nets[1].use("teacher"), torch.no_grad():  # adapters off: the base network, whatever is cached
            teacher = merged_unet(z, t, **kwargs).sample
        with nets[0].use("teacher"), torch.no_grad():  # peft's own switch on the unpatched UNet: the same bytes
            assert torch.equal(teacher, ref_unet(z, t, **kwargs).sample)
        assert not torch.allclose(teacher, merged, rtol=0, atol=1e-3 * scale)  # the adapter is in the merged one
        _perturb(nets[0].student_parameters(), g)  # as an optimiser step would: in place, on both
        with torch.no_grad():
            for a, b in zip(nets[0].student_parameters(), nets[1].student_parameters()):
                b.copy_(a)
    after = {k: v for k, v in merged_unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)  # the teacher's weights are never written


def test_a_training_pass_merges_only_the_layers_where_that_is_cheaper():
    from peft import LoraConfig, inject_adapter_in_model

    from tlcm.train.merged_lora import merged_cheaper_with_grad

    net = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.Linear(1280, 1280), torch.nn.Linear(320, 320))
    net = inject_adapter_in_model(LoraConfig(r=16, target_modules=["0", "1", "2"]), net)
    # a toy 3x3 conv at rank 16: fan-in 576, fan-out 64: 576*64 = 36864 > 3*16*(576+64) = 30720, adapter cheaper
    assert not merged_cheaper_with_grad(net[0], "default")
    assert not merged_cheaper_with_grad(net[1], "default")  # SD1.5's widest layers: 1280*1280 >> 3*16*2560
    net = inject_adapter_in_model(LoraConfig(r=64, target_modules=["0", "1", "2"]), torch.nn.Sequential(
        torch.nn.Conv2d(64, 64, 3), torch.nn.Linear(1280, 1280), torch.nn.Linear(320, 320)))
    assert merged_cheaper_with_grad(net[0], "default")  # 36864 < 3*64*640 = 122880
    assert not merged_cheaper_with_grad(net[1], "default")  # 1638400 > 3*64*2560 = 491520
    assert merged_cheaper_with_grad(net[2], "default")  # 102400 < 3*64*640 = 122880


def test_merged_is_refused_where_it_cannot_apply(tiny_cfg):
    from tlcm.errors import TLCMError
    from tlcm.train.config import validate_config

    with pytest.raises(TLCMError, match="mixed_precision"):
        validate_config(tiny_cfg(lora_merged=True, mixed_precision="bf16"), need_data=False)


@pytest.mark.parametrize("recipe", ["mlcd", "tlcm"])
def test_merged_run_trains_like_the_adapter_run(recipe, tiny_cfg, dataset_fn, tmp_path):
    """Two optimiser steps with lora_merged land within rounding of the default run (not bit-identical: other
    rounding)."""
    from safetensors.torch import load_file

    distill(tiny_cfg(recipe="mlcd", max_steps=1, lora_rank=32, lora_alpha=32, output_dir=str(tmp_path / "init")),
            pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    runs = {}
    for merged in (False, True):
        cfg = tiny_cfg(recipe=recipe, max_steps=2, init_lora=str(tmp_path / "init"), stage2_sample_steps=2,
                       lora_rank=32, lora_alpha=32, lora_merged=merged, output_dir=str(tmp_path / f"m{merged}"))
        out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
        runs[merged] = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    a, b = runs[False], runs[True]
    assert a.keys() == b.keys()
    init = load_file(str(tmp_path / "init" / "adapter" / "adapter_model.safetensors"))
    moved = sum(float((a[k] - init[k]).abs().sum()) for k in a)
    differ = sum(float((a[k] - b[k]).abs().sum()) for k in a)
    assert moved > 0 and differ < 1e-2 * moved  # rounding-level differences next to two optimiser steps


def test_merged_multi_part_run_trains_like_the_adapter_run(tiny_cfg, dataset_fn, tmp_path):
    """DMD (the fake adapter trains through its own merged layers) + GAN on the fake backbone: the student and the
    fake adapter land within rounding of the default run."""
    from safetensors.torch import load_file

    multi = dict(recipe="mlcd", dmd_weight=1.0, gan_weight=0.1, gan_backbone="fake", student_sample_steps=[1, 2],
                 gan_real_steps=2, max_steps=2, validation_prompts=[], lora_rank=32, lora_alpha=32,
                 checkpointing_steps=2, learning_rate=1e-3, fake_learning_rate=1e-3, disc_learning_rate=1e-3)
    outs = {}
    # lr 1e-12: AdamW moves each weight by about 1e-12 per step, so that run's files are the initial weights
    for name, kw in (("init", dict(learning_rate=1e-12, fake_learning_rate=1e-12, disc_learning_rate=1e-12)),
                     ("adapter", {}), ("merged", dict(lora_merged=True))):
        out = distill(tiny_cfg(output_dir=str(tmp_path / name), **{**multi, **kw}), pipe=tiny_sd15_pipeline(0),
                      dataset_fn=dataset_fn, log_with=None, progress=False)
        outs[name] = {f: load_file(str(out / f)) for f in (
            "adapter/adapter_model.safetensors", "checkpoints/checkpoint-2/fake_lora.safetensors")}
    for f in outs["init"]:
        init, a, b = outs["init"][f], outs["adapter"][f], outs["merged"][f]
        assert a.keys() == b.keys() == init.keys()
        moved = sum(float((a[k] - init[k]).abs().sum()) for k in a)
        differ = sum(float((a[k] - b[k]).abs().sum()) for k in a)
        assert moved > 0 and differ < 1e-2 * moved, f


def test_a_base_layer_with_hooks_keeps_them_in_every_path():
    """Hooks on a base layer (accelerate's device hooks, for one) run only through a module call: a hooked layer
    takes peft's own forward, merged or base-only alike, and still computes the adapter's function."""
    from peft import LoraConfig, inject_adapter_in_model

    from tlcm.train.merged_lora import install_merged_forward, set_base_only

    torch.manual_seed(0)
    net = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"),
                                  torch.nn.Sequential(torch.nn.Linear(8, 8)))
    x = torch.randn(3, 8)
    ref = net(x)
    assert install_merged_forward(net) == 1
    calls = []
    net[0].get_base_layer().register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = net(x)
        set_base_only(net[0], True)
        base = net(x)
        set_base_only(net[0], False)
    assert len(calls) == 2
    assert torch.equal(out, ref.detach())  # peft's own path: the same bytes
    assert torch.equal(base, net[0].get_base_layer()(x))
