"""The discriminator's feature extraction and heads on a tiny UNet; adapter switching keeps the trainable set."""

from __future__ import annotations

import pytest
import torch

from tlcm.testing import tiny_sd15_components
from tlcm.train.discriminator import build_heads, feature_blocks, unet_features


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700]), torch.randn(2, 16, 32, generator=g)


def test_features_are_the_blocks_outputs_and_the_decoder_is_skipped():
    unet = tiny_sd15_components(0)["unet"]
    z, t, e = _inputs()
    blocks = feature_blocks(unet, "down+mid")
    assert blocks == ["down0", "down1", "mid"]
    reference = {}
    hooks = [unet.down_blocks[i].register_forward_hook(
        lambda m, a, o, i=i: reference.__setitem__(f"down{i}", o[0])) for i in range(2)]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, a, o: reference.__setitem__("mid", o)))
    with torch.no_grad():
        unet(z, t, e)
    for h in hooks:
        h.remove()
    ran_decoder = []
    h = unet.up_blocks[0].register_forward_hook(lambda m, a, o: ran_decoder.append(True))
    with torch.no_grad():
        feats = unet_features(unet, z, t, {"encoder_hidden_states": e}, blocks)
    h.remove()
    assert not ran_decoder
    for name, f in zip(blocks, feats):
        torch.testing.assert_close(f, reference[name], rtol=0, atol=0)
    assert [f.shape[1] for f in feats] == [8, 16, 16]


def test_heads_give_one_logit_per_sample_and_pass_gradient_to_the_input():
    unet = tiny_sd15_components(0)["unet"]
    unet.requires_grad_(False)
    heads = build_heads(unet, "down+mid", seed=3)
    assert torch.equal(build_heads(unet, "down+mid", seed=3).heads[0][0].weight, heads.heads[0][0].weight)
    z, t, e = _inputs()
    z.requires_grad_(True)
    logits = heads(unet_features(unet, z, t, {"encoder_hidden_states": e}, heads.blocks))
    assert len(logits) == 3 and all(x.shape == (2,) for x in logits)
    sum(x.sum() for x in logits).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is not None for p in heads.parameters())
    assert build_heads(unet, "mid", seed=0).blocks == ["mid"]


@pytest.mark.parametrize("student", ["lora", "full"])
def test_adapter_switches_keep_the_trainable_set(student, tiny_cfg):
    """peft flips requires_grad on every switch; Networks re-applies the phase's choice after each one."""
    from tlcm.train.student import build_networks

    unet = tiny_sd15_components(0)["unet"]
    nets = build_networks(unet, tiny_cfg(student=student, dmd_weight=1.0, gan_weight=0.1))
    z, t, e = _inputs()
    for trainable in (nets.student_parameters(), nets.fake_parameters(), nets.head_parameters()):
        nets.set_trainable(trainable)
        ids = {id(p) for p in trainable}
        for role in ("teacher", "fake", "student"):
            with nets.use(role) as net:
                assert all(p.requires_grad == (id(p) in ids) for p in nets._all_trainable()), role
                with torch.no_grad():
                    net(z, t, e)
        assert all(p.requires_grad == (id(p) in ids) for p in nets._all_trainable())
    # the three roles compute three different functions; the teacher is the base UNet
    base = tiny_sd15_components(0)["unet"]
    with torch.no_grad():
        for p in nets.fake_parameters():  # make the fake adapter non-trivial
            p.add_(0.05)
        outs = {}
        for role in ("teacher", "fake", "student"):
            with nets.use(role) as net:
                outs[role] = net(z, t, e).sample
        torch.testing.assert_close(outs["teacher"], base(z, t, e).sample, rtol=1e-5, atol=1e-5)
    assert (outs["fake"] - outs["teacher"]).abs().max() > 1e-4
    if student == "lora":  # B starts at zero: the untrained student equals the teacher
        torch.testing.assert_close(outs["student"], outs["teacher"], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_in_the_role_of_the_forward(tiny_cfg):
    """Non-reentrant checkpointing recomputes during backward, after the role context closed: the fake adapter's and
    the frozen teacher's gradients must equal those of an uncheckpointed UNet (and the student's adapter, unused in
    those passes, must receive nothing)."""
    from tlcm.train.student import build_networks

    z, t, e = _inputs()
    results = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        nets = build_networks(tiny_sd15_components(0)["unet"], tiny_cfg(dmd_weight=1.0, gradient_checkpointing=ckpt))
        with torch.no_grad():  # both adapters non-trivial and different, identically in both builds
            g = torch.Generator().manual_seed(1)
            for p in nets.student_parameters() + nets.fake_parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        nets.student.train()
        nets.set_trainable(nets.fake_parameters())  # the fake phase
        with nets.use("fake") as net:
            out = net(z, t, e).sample
        out.pow(2).mean().backward()  # outside the context, as the loop does
        fake_grads = [p.grad.clone() for p in nets.fake_parameters()]
        assert all(p.grad is None for p in nets.student_parameters())
        for p in nets.fake_parameters():
            p.grad = None
        nets.set_trainable(nets.student_parameters())  # the student phase's GAN term through the frozen teacher
        zz = z.clone().requires_grad_(True)
        with nets.use("teacher") as net:
            out = net(zz, t, e).sample
        out.pow(2).mean().backward()
        assert all(p.grad is None for p in nets.student_parameters() + nets.fake_parameters())
        results[ckpt] = (fake_grads, zz.grad.clone())
    for a, b in zip(results[False][0], results[True][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[False][1], results[True][1], rtol=1e-5, atol=1e-7)
