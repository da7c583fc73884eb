"""The discriminator: a diffusion UNet's encoder/mid-block features at a re-noised latent, plus small trainable heads.

As in DMD2 and Hyper-SD, the backbone is the teacher itself (frozen; only the heads train) or the fake-score model
(its adapter trains with the heads, DMD2): it already knows what a latent at time ``t`` should look like. Each head is
``conv3x3 -> GroupNorm -> SiLU -> conv1x1 -> 1 channel``, averaged over space to one logit per sample (DMD2's head
strides down to 1x1; the toy world's 4x4 features are too small for that, a spatial mean works at every size).

Features are read with forward hooks on ``down_blocks[i]`` and ``mid_block``; the forward stops right after the mid
block (the decoder half would be wasted work), by raising a private exception from the mid-block hook.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def feature_blocks(unet, which: str) -> list[str]:
    """Block names the heads read: ``down0 .. down{n-1}`` and ``mid`` (``which="down+mid"``), or ``mid`` alone."""
    if which == "mid":
        return ["mid"]
    return [f"down{i}" for i in range(len(unet.down_blocks))] + ["mid"]


def feature_channels(unet, blocks: list[str]) -> list[int]:
    chans = list(unet.config.block_out_channels)
    return [chans[-1] if b == "mid" else chans[int(b[4:])] for b in blocks]


def _groups(channels: int, max_groups: int = 32) -> int:
    return math.gcd(channels, max_groups)


class DiscriminatorHeads(nn.Module):
    """One small conv head per feature map; ``forward(features) -> [logits (B,) per head]``."""

    def __init__(self, channels: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, c, kernel_size=3, padding=1),
                nn.GroupNorm(_groups(c), c),
                nn.SiLU(),
                nn.Conv2d(c, 1, kernel_size=1),
            )
            for c in channels
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        assert len(features) == len(self.heads), (len(features), len(self.heads))
        dtype = self.heads[0][0].weight.dtype
        return [head(f.to(dtype)).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, features)]


def build_heads(unet, which: str, seed: int) -> DiscriminatorHeads:
    """Heads for ``unet``'s feature blocks, initialised from ``(seed, "discriminator-heads")`` (independent of the
    global RNG, :func:`tlcm.train.seeding.seeded_rng`)."""
    from tlcm.train.seeding import seeded_rng

    blocks = feature_blocks(unet, which)
    with seeded_rng(seed, "discriminator-heads"):
        heads = DiscriminatorHeads(feature_channels(unet, blocks))
    heads.blocks = blocks
    return heads


class _StopForward(Exception):
    pass


def unet_features(unet, z: torch.Tensor, t: torch.Tensor, unet_kwargs: dict, blocks: list[str]) -> list[torch.Tensor]:
    """The outputs of the named blocks of ``unet(z, t, **unet_kwargs)``, in the order of ``blocks``; differentiable.

    Down blocks return ``(hidden_states, skip_states)``: the hidden states are taken. The UNet stops after its mid
    block.
    """
    got: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args, output):
            got[name] = output[0] if isinstance(output, tuple) else output
            if name == "mid":
                raise _StopForward

        return hook

    handles = [unet.mid_block.register_forward_hook(grab("mid"))]
    handles += [unet.down_blocks[int(b[4:])].register_forward_hook(grab(b)) for b in blocks if b != "mid"]
    try:
        unet(z, t, **unet_kwargs, return_dict=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [b for b in blocks if b not in got]
    assert not missing, f"blocks {missing} produced no output"
    return [got[b] for b in blocks]


__all__ = ["DiscriminatorHeads", "build_heads", "feature_blocks", "feature_channels", "unet_features"]
