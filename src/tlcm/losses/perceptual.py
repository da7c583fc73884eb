"""Latent LPIPS: a perceptual distance measured directly on diffusion latents (no VAE decode).

The TLCM paper measures its consistency losses with the latent LPIPS of Diffusion2GAN (Kang et al., ECCV 2024): a
VGG-16 (with batch norm) whose first convolution takes the 4 latent channels, trained on ImageNet latents, with
LPIPS's linear heads calibrated on BAPPS latents. We rebuild that architecture so that its released weights load
unchanged (``mingukkang/elatentlpips``, files ``sd15_latest_vgg16_tuned.pth`` / ``sdxl_...`` on the Hugging Face repo
``Mingguksky/elatentlpips``):

* trunk ``net``: the five VGG-16-BN stages ``slice1..slice5`` (module indices 0..43 of torchvision's
  ``vgg16_bn().features``), input convolution ``4 -> 64``; the first three max-pools are removed (latents are already
  8x downsampled), the last two are kept, so the five feature maps are at 1, 1, 1, 1/2 and 1/4 of the latent size;
* heads ``lin0..lin4``: LPIPS's ``NetLinLayer`` (dropout, then a bias-free 1x1 convolution to one channel) whose
  weights are non-negative.

The distance between latents ``a`` and ``b`` is LPIPS's formula::

    d(a, b) = sum_l  mean_{h,w}  sum_c  w_{l,c} * (phi_l(a) / |phi_l(a)|_c  -  phi_l(b) / |phi_l(b)|_c)^2

with ``|.|_c`` the channel-wise L2 norm at each position (plus 1e-10). ``a`` and ``b`` are latents in the UNet's
space (VAE latents times ``scaling_factor``), what the consistency losses compare. E-LatentLPIPS's random
augmentations and its added L1 term are training tricks of that paper, not part of the distance; ``l1_weight`` adds the
L1 term when wanted.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tlcm.errors import TLCMError

VGG16_CHANNELS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)
# torchvision's vgg16_bn().features: (conv, bn, relu) per conv, a max-pool closing every stage. The latent variant
# replaces the first three pools by identities; these are the module indices where each stage starts.
STAGE_STARTS = (0, 7, 14, 24, 34, 44)
KEPT_POOLS = (False, False, False, True, True)
WEIGHTS_HELP = (
    "latent LPIPS weights are the E-LatentLPIPS release: `hf download Mingguksky/elatentlpips "
    "elatentlpips_ckpt/sd15_latest_vgg16_tuned.pth` (SD1.5/2.1 latents; sdxl_latest_vgg16_tuned.pth for SDXL), or a "
    "safetensors/pth state dict of the same layout (keys net.slice1.0.weight ... net.slice5.*, lin0.model.1.weight ... "
    "lin4.model.1.weight)"
)


def _stage(first_index: int, c_in: int, c_out: int, n_convs: int, pool: bool) -> nn.Sequential:
    """One VGG-16-BN stage with torchvision's module indices, so state-dict keys match the released weights."""
    stage = nn.Sequential()
    i, c = first_index, c_in
    for _ in range(n_convs):
        stage.add_module(str(i), nn.Conv2d(c, c_out, 3, padding=1))
        stage.add_module(str(i + 1), nn.BatchNorm2d(c_out))
        stage.add_module(str(i + 2), nn.ReLU(inplace=False))
        i, c = i + 3, c_out
    stage.add_module(str(i), nn.MaxPool2d(2, 2) if pool else nn.Identity())
    return stage


class LatentVGG16(nn.Module):
    """The VGG-16-BN trunk on latents; returns the five stage outputs (relu1_2 .. relu5_3, after the kept pools)."""

    def __init__(self, in_channels: int = 4, channels: tuple[int, ...] = VGG16_CHANNELS):
        super().__init__()
        assert len(channels) == 5
        c = in_channels
        for k in range(5):
            stage = _stage(STAGE_STARTS[k], c, channels[k], CONVS_PER_STAGE[k], KEPT_POOLS[k])
            self.add_module(f"slice{k + 1}", stage)
            c = channels[k]
        self.in_channels = in_channels
        self.channels = tuple(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for k in range(5):
            x = getattr(self, f"slice{k + 1}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """LPIPS's per-layer head: dropout (inactive in eval) then a bias-free 1x1 convolution to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS's ``normalize_tensor``: divide by the L2 norm over channels at each position (plus ``eps``)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LatentLPIPS(nn.Module):
    """Latent LPIPS as a frozen module: ``lpips(a, b) -> (B,)`` per-sample distances, differentiable w.r.t. inputs."""

    def __init__(self, in_channels: int = 4, channels: tuple[int, ...] = VGG16_CHANNELS, l1_weight: float = 0.0):
        super().__init__()
        self.net = LatentVGG16(in_channels, channels)
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", NetLinLayer(c))
        self.l1_weight = float(l1_weight)
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        """Always eval mode: the net is frozen (batch norm keeps its running statistics, dropout stays off)."""
        return super().train(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != self.net.in_channels:
            raise ValueError(
                f"latent LPIPS needs two (B, {self.net.in_channels}, H, W) latents of one shape, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        if min(a.shape[-2:]) < 4:
            raise ValueError(f"latent LPIPS needs latents of at least 4x4 (two 2x pools), got {tuple(a.shape[-2:])}")
        p = next(self.parameters())
        acc = torch.promote_types(p.dtype, torch.float32)  # heads and sums in at least float32 (fp16/bf16 trunks)
        x = torch.cat([a, b]).to(p.dtype)  # one trunk pass for both
        total = torch.zeros(a.shape[0], device=a.device, dtype=acc)
        for k, f in enumerate(self.net(x)):
            fa, fb = f.to(acc).chunk(2)
            diff = (normalize_channels(fa) - normalize_channels(fb)) ** 2
            lin = getattr(self, f"lin{k}").model[1]
            total = total + F.conv2d(diff, lin.weight.to(acc)).mean(dim=(1, 2, 3))
        if self.l1_weight:
            total = total + self.l1_weight * (a.to(acc) - b.to(acc)).abs().mean(dim=(1, 2, 3))
        return total


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles with code, truncated files
            raise TLCMError(f"cannot read {path} as a torch state dict ({type(e).__name__}: {e})", WEIGHTS_HELP) from e
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise TLCMError(f"{path} does not hold a state dict", WEIGHTS_HELP)
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.")
        if k.startswith("lins."):  # the release registers each head twice (lin0 and lins.0): keep one name
            continue
        if k.startswith("lin") and ".model.0.weight" in k and v.ndim == 4:  # LPIPS heads saved without dropout
            k = k.replace(".model.0.", ".model.1.")
        out[k] = v
    return out


def load_latent_lpips(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    l1_weight: float = 0.0,
) -> LatentLPIPS:
    """Latent LPIPS from a ``.safetensors`` / ``.pth`` state dict of the E-LatentLPIPS layout; sizes are read from it.

    A missing file, missing or unexpected keys, or negative head weights are a :class:`TLCMError` naming the layout
    and where released weights come from."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise TLCMError(f"no latent LPIPS weights at {p}", WEIGHTS_HELP)
    state = _read_state(p)
    first = state.get("net.slice1.0.weight")
    if first is None or first.ndim != 4:
        raise TLCMError(f"{p} is not a latent LPIPS state dict (no 4-D net.slice1.0.weight)", WEIGHTS_HELP)
    channels = []
    for k in range(5):
        w = state.get(f"net.slice{k + 1}.{STAGE_STARTS[k]}.weight")
        if w is None:
            raise TLCMError(f"{p} lacks net.slice{k + 1}.{STAGE_STARTS[k]}.weight", WEIGHTS_HELP)
        channels.append(int(w.shape[0]))
    model = LatentLPIPS(int(first.shape[1]), tuple(channels), l1_weight)
    expected = model.state_dict()
    for k in expected:  # batch-norm step counters are not needed for inference; converted files may drop them
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = expected[k]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TLCMError(
            f"{p} does not match the latent LPIPS layout: missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}",
            WEIGHTS_HELP,
        )
    bad = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise TLCMError(f"{p}: tensors of the wrong shape: {bad[:6]}", WEIGHTS_HELP)
    negative = [f"lin{k}" for k in range(5) if bool((state[f"lin{k}.model.1.weight"] < 0).any())]
    if negative:
        raise TLCMError(
            f"{p}: the LPIPS head weights of {negative} are negative, so the result would not be a distance",
            "use calibrated LPIPS heads (they are clamped to >= 0 in training)",
        )
    model.load_state_dict({k: state[k] for k in expected})
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = ["LatentLPIPS", "LatentVGG16", "NetLinLayer", "load_latent_lpips", "normalize_channels"]
