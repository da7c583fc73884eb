"""LoRA layers computed as one merged weight: ``(W + s B A) x`` instead of ``W x + s B (A x)`` (``lora_merged``).

Why: on a network whose widths are close to the LoRA rank (the toy teacher: rank 16 on 32-64 channels) the adapter's
two extra matmuls per layer cost more than the layer itself; merging first costs one small ``B A`` product per layer
and call. The function is the same, the float rounding is not (runs are not bit-identical to the adapter path).

Per call and layer, with ``N`` tokens (pixels), fan-in ``i`` (``in_channels * k * k`` for a conv), fan-out ``o`` and
rank ``r`` (multiply-adds; forward, input gradient and weight gradients):

- adapter path: ``r (i + o) N`` forward, ``r (i + o) N`` input gradient, ``r (i + o) N`` for ``dA``/``dB``;
- merged: ``r i o`` for ``B A``, no extra forward or input-gradient work, and when the adapter trains,
  ``i o N`` for ``dW = g x^T`` (then ``r i o`` for ``dA``/``dB``).

So a pass that needs no gradient for the adapter (the target, the stage-2 sampling walk, the teacher-free student
samples, or a frozen adapter) is always merged, and a pass that trains it is merged only in the layers where
``i o < 3 r (i + o)``: 117 of the toy UNet's 164 adapted layers at rank 16, few of SD1.5's at rank 64 (its
320-wide linears).
Without gradient the merged weight is cached until the adapter's tensors change (their version counters), so it is
built once per optimiser step, not once per call; it holds one extra copy of the adapted weights.

Layers with dropout or DoRA on the active adapter, several active adapters, or a merged/disabled adapter run peft's
own forward unchanged. :func:`set_base_only` is the teacher role's switch (:meth:`tlcm.train.student.Networks.use`):
the base layer alone, without peft's walk over every adapter tensor's ``requires_grad`` that
``enable_adapters(False)`` does (about 9 ms per switch on the toy UNet's 164 layers, twice per step).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _fans(base: torch.nn.Module) -> tuple[int, int]:
    w = base.weight
    return int(w[0].numel()), int(w.shape[0])  # fan-in (in * k * k), fan-out


def merged_cheaper_with_grad(layer, adapter: str) -> bool:
    """True when training ``adapter`` through the merged weight costs fewer multiply-adds per token than through the
    adapter's own matmuls (see the module docstring)."""
    fan_in, fan_out = _fans(layer.get_base_layer())
    r = int(layer.r[adapter])
    return fan_in * fan_out < 3 * r * (fan_in + fan_out)


def _mergeable(layer, adapter: str) -> bool:
    if adapter not in getattr(layer, "lora_A", {}):
        return False
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity):
        return False
    if getattr(layer, "use_dora", {}).get(adapter, False):
        return False
    return isinstance(layer.get_base_layer(), (torch.nn.Linear, torch.nn.Conv2d))


def _apply(layer, x, weight):
    """The base layer's operation with ``weight`` (``F.linear`` / ``_conv_forward``: what its ``forward`` runs)."""
    base = layer._tlcm_base
    if layer._tlcm_linear:
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


def set_base_only(layer, on: bool) -> bool:
    """Switch a patched layer to its frozen base layer alone (the teacher role of
    :meth:`tlcm.train.student.Networks.use`) or back; False for a layer :func:`install_merged_forward` did not patch
    (use peft's ``enable_adapters`` there)."""
    if not hasattr(layer, "_tlcm_base_only"):
        return False
    layer._tlcm_base_only = on
    return True


def _merged_forward(layer, x, *args, **kwargs):
    if layer._tlcm_base_only:  # the teacher role: the frozen base layer alone
        base = layer._tlcm_base
        if args or kwargs or base._forward_hooks or base._forward_pre_hooks:
            return base(x, *args, **kwargs)
        return _apply(layer, x, base.weight)  # its forward without a module call's overhead: the same bytes
    if args or kwargs:
        return layer._tlcm_adapter_forward(x, *args, **kwargs)
    active = layer.active_adapters
    if len(active) != 1 or layer.disable_adapters or layer.merged:
        return layer._tlcm_adapter_forward(x)
    adapter = active[0]
    parts = layer._tlcm_parts.get(adapter)
    if parts is None or (parts[2] and parts[0] is not layer.lora_A[adapter].weight):  # added or replaced since
        parts = layer._tlcm_parts[adapter] = _parts(layer, adapter)
    a, b, mergeable, cheap_with_grad = parts
    base = layer._tlcm_base
    if not mergeable or base._forward_hooks or base._forward_pre_hooks:  # hooks run only through peft's forward
        return layer._tlcm_adapter_forward(x)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):  # this pass trains the adapter
        if not cheap_with_grad:
            return layer._tlcm_adapter_forward(x)
        weight = base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype)
    else:
        key = (adapter, a.data_ptr(), a._version, b.data_ptr(), b._version, base.weight.data_ptr(),
               base.weight._version, layer.scaling[adapter])
        cached = layer._tlcm_merged_cache
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype))
            layer._tlcm_merged_cache = cached
        weight = cached[1]
    return _apply(layer, x.to(weight.dtype), weight)


def _parts(layer, adapter: str) -> tuple:
    """``(A weight, B weight, mergeable, cheaper merged with gradient)`` of one adapter of ``layer``."""
    if not _mergeable(layer, adapter):
        return None, None, False, False
    return (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight, True,
            merged_cheaper_with_grad(layer, adapter))


def install_merged_forward(unet: torch.nn.Module) -> int:
    """Make every peft LoRA ``Linear``/``Conv2d`` layer of ``unet`` compute through the merged weight (idempotent);
    the number of layers patched. Switching adapters (``set_adapter``, ``enable_adapters``) keeps working."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for layer in unet.modules():
        if not isinstance(layer, LoraLayer) or not isinstance(layer.get_base_layer(),
                                                                (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not hasattr(layer, "_tlcm_adapter_forward"):
            layer._tlcm_adapter_forward = layer.forward  # peft's bound forward
            layer._tlcm_merged_cache = None
            layer._tlcm_base_only = False  # set_base_only: the teacher role, instead of peft's enable_adapters(False)
            layer.forward = types.MethodType(_merged_forward, layer)
        layer._tlcm_base = layer.get_base_layer()
        layer._tlcm_linear = isinstance(layer._tlcm_base, torch.nn.Linear)
        layer._tlcm_parts = {a: _parts(layer, a) for a in layer.lora_A}
        n += 1
    return n
