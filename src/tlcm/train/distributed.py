"""Sharded training (FSDP2: ``torch.distributed.fsdp.fully_shard``), one code path on CPU (gloo) and GPU (nccl).

How a run asks for it: ``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp.yaml``) or ``--use_fsdp``
sets ``ACCELERATE_USE_FSDP=true`` and ``FSDP_*`` variables. accelerate's own FSDP plugin refuses to start without a
GPU and wraps models inside ``prepare``; tlcm instead starts a plain multi-process accelerator and shards its networks
itself, so the code that runs on a GPU cluster is the code tested on CPU (``tests/train/test_fsdp.py``):

- every UNet of the run is sharded: a LoRA student's one UNet (student and, adapters off, teacher), or a full
  student, its frozen teacher and its EMA target; ``fully_shard`` on each transformer/resnet block, then the root.
  Student and EMA target are sharded alike, so the EMA update stays local to each rank's shard.
- the student is not given to ``accelerator.prepare`` (that would wrap it in DDP); its optimiser is wrapped in an
  ``AcceleratedOptimizer`` so gradient accumulation steps exactly as under ``prepare``.
- checkpoints gather the trainable weights, the optimiser state and the EMA target as full state dicts, written by the
  main process (a LoRA student writes the same ``student_lora.safetensors`` as an unsharded run), and load them back
  sharded, so a sharded run resumes on any number of processes: :func:`part_io` gives the student part
  (:class:`tlcm.train.parts.Part`) these savers and loaders, and the parts' checkpoint hooks call them.
- only single-part runs (the consistency recipes, with or without a reward) shard: a DMD / GAN run trains several
  parts on one UNet and refuses an FSDP launch (:func:`refuse_multi_part`).
- validation runs on every rank (a sharded forward is a collective); the export gathers a plain copy of what it
  writes on the main process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from tlcm.errors import TLCMError
from tlcm.train.parts import WEIGHT_FILES

log = logging.getLogger("tlcm.distill")

LORA_FILE = WEIGHT_FILES["student"]  # the name an unsharded LoRA checkpoint uses too (loop.LORA_CKPT_FILE)
STUDENT_FILE = WEIGHT_FILES["student_full"]
EMA_FILE = "ema_target.safetensors"
OPTIMIZER_FILE = "optimizer_full.pt"
DEFAULT_WRAP = ("BasicTransformerBlock", "ResnetBlock2D")


@dataclass(frozen=True)
class FSDPSettings:
    """What tlcm honours of accelerate's FSDP settings (the rest is logged as ignored)."""

    reshard_after_forward: bool = True  # FULL_SHARD; false = SHARD_GRAD_OP (keep gathered weights until backward)
    offload_params: bool = False  # GPU only: keep shards in host memory
    wrap_classes: tuple[str, ...] = DEFAULT_WRAP  # blocks sharded as their own unit


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in ("1", "true", "yes")


def fsdp_request(environ=None) -> FSDPSettings | None:
    """The FSDP request ``accelerate launch`` put in the environment, or ``None`` for an unsharded run."""
    env = os.environ if environ is None else environ
    if not _flag(env.get("ACCELERATE_USE_FSDP"), False):
        return None
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", env.get("FSDP_SHARDING_STRATEGY", "true")).strip().upper()
    if reshard in ("TRUE", "1", "FULL_SHARD"):
        reshard_after = True
    elif reshard in ("FALSE", "0", "SHARD_GRAD_OP"):
        reshard_after = False
    else:
        raise TLCMError(f"FSDP sharding {reshard!r} is not supported by tlcm",
                        "use fsdp_reshard_after_forward true (FULL_SHARD) or false (SHARD_GRAD_OP); for replicated "
                        "weights use DDP (configs/accelerate/ddp-gpu.yaml)")
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    classes = tuple(c.strip() for c in env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
    wrap = () if policy == "NO_WRAP" else (classes or DEFAULT_WRAP)
    ignored = [k for k in ("FSDP_ACTIVATION_CHECKPOINTING", "FSDP_CPU_RAM_EFFICIENT_LOADING")
               if _flag(env.get(k), False)]
    if ignored or env.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT") != "FULL_STATE_DICT":
        log.info("FSDP: tlcm ignores %s; gradient checkpointing is the tlcm key gradient_checkpointing, and "
                 "checkpoints always hold full state dicts", ", ".join(ignored + ["FSDP_STATE_DICT_TYPE"]))
    return FSDPSettings(reshard_after, _flag(env.get("FSDP_OFFLOAD_PARAMS"), False), wrap)


@contextlib.contextmanager
def accelerate_without_fsdp():
    """Build the ``Accelerator`` inside this: accelerate then sets up plain processes and tlcm shards the networks."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if saved is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _shard(module: torch.nn.Module, mesh, settings: FSDPSettings) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kw = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
              offload_policy=CPUOffloadPolicy() if settings.offload_params and mesh.device_type == "cuda"
              else OffloadPolicy())
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in settings.wrap_classes:
            fully_shard(sub, **kw)
    fully_shard(module, **kw)


def shard_networks(accelerator, networks, cfg) -> bool:
    """Shard every UNet of ``networks`` in place when the launch asked for FSDP; return whether it did.

    Call before building the optimiser (sharding replaces the parameters). The trainable weights are first broadcast
    from rank 0 (a LoRA is initialised at random on each rank), and a full student's EMA target copied from it.
    """
    settings = fsdp_request()
    if settings is None:
        return False
    if accelerator.num_processes < 2:
        log.warning("FSDP requested with one process: nothing to shard, training unsharded")
        return False
    if cfg.mixed_precision == "fp16":
        raise TLCMError("FSDP with mixed_precision=fp16 needs a sharded gradient scaler, which tlcm does not set up",
                        "use mixed_precision=bf16 (or no) with FSDP")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with torch.no_grad():
        for p in networks.trainable_parameters():
            dist.broadcast(p.data, src=0)
        if networks.target_unet is not None:
            networks.target_unet.load_state_dict(networks.student.state_dict())
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    seen: set[int] = set()
    for net in (networks.student, networks.teacher_unet, networks.target_unet):
        if net is not None and id(net) not in seen:
            seen.add(id(net))
            _shard(net, mesh, settings)
    networks.parameters_changed()  # sharding replaced every Parameter object
    accelerator.print(f"FSDP (fully_shard) over {accelerator.num_processes} processes: {len(seen)} UNet(s), units "
                      f"{', '.join(settings.wrap_classes) or 'root only'}, reshard_after_forward "
                      f"{settings.reshard_after_forward}")
    return True


def prepare(accelerator, student, optimizer, sharded: bool):
    """``accelerator.prepare(student, optimizer)``, or for a sharded student the student as it is and its optimiser
    in an ``AcceleratedOptimizer`` (steps only when gradients sync, as a prepared one does; not checkpointed by
    accelerate: :func:`part_io` saves its full state)."""
    if not sharded:
        return accelerator.prepare(student, optimizer)
    from accelerate.optimizer import AcceleratedOptimizer

    return student, AcceleratedOptimizer(optimizer, device_placement=False, scaler=None)


# ------------------------------------------------------------------------------------------------ full state dicts


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_state(module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on rank 0, on CPU; an empty dict on the other ranks. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options(ignore_frozen_params=trainable_only))


def load_full_state(module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict (every rank passes the same one) into a sharded ``module``; keys absent from ``state``
    keep their values (a LoRA checkpoint has no base weights)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    known = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    unknown = [k for k in state if k not in known]
    if unknown:
        raise TLCMError(f"the checkpoint has {len(unknown)} weights this model lacks ({unknown[0]}, ...)",
                        "resume with the same teacher and student settings that wrote the checkpoint")
    set_model_state_dict(module, state, options=_options(strict=False))


def _peft_names(module, state: dict[str, torch.Tensor], adapter: str) -> dict[str, str]:
    """module parameter name -> peft's saved name (``...lora_A.<adapter>.weight`` -> ``...lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    index = {name: torch.tensor(i) for i, name in enumerate(state)}
    renamed = get_peft_model_state_dict(module, state_dict=index, adapter_name=adapter)
    names = list(state)
    return {names[int(i)]: key for key, i in renamed.items()}


def load_adapter_state(unet, state: dict[str, torch.Tensor], adapter: str) -> None:
    """Load one adapter's full weights, in peft's names (what :func:`tlcm.train.student.lora_state_dict` saves; every
    process passes the same), into a sharded UNet."""
    params = {n: p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n}
    rename = {peft: name for name, peft in _peft_names(unet, params, adapter).items()}
    unknown, missing = sorted(set(state) - set(rename)), sorted(set(rename) - set(state))
    if unknown or missing:
        raise TLCMError(f"the checkpoint's LoRA does not fit this student (unknown {unknown[:2]}, missing "
                        f"{missing[:2]})", "resume with the LoRA settings (rank, targets) that wrote the checkpoint")
    load_full_state(unet, {rename[k]: v for k, v in state.items()})


def part_io(student, optimizer, ema, is_lora: bool, adapter: str):
    """The sharded student part's checkpoint I/O: ``(save_weights, load_weights, weight_file, state_files)``.

    Every saver is a collective (all processes call it) returning the full state on the main process; every loader
    takes the full state on all processes and keeps each one's shard. The weights: the LoRA in peft's names
    (``student_lora.safetensors``, as an unsharded run) or the whole UNet; ``state_files``: the optimiser's full state
    (``optimizer_full.pt``) and, for a full student, the EMA target (``ema_target.safetensors``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from tlcm.train.student import lora_state_dict

    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    if is_lora:
        def save_weights():
            return lora_state_dict(student, adapter)

        def load_weights(state):
            load_adapter_state(student, state, adapter)
    else:
        def save_weights():
            return {k: v.contiguous() for k, v in full_state(student).items()}

        def load_weights(state):
            load_full_state(student, state)

    def save_optimizer():
        return get_optimizer_state_dict(student, inner, options=_options())

    def load_optimizer(state):
        set_optimizer_state_dict(student, inner, optim_state_dict=state, options=_options())

    files = {OPTIMIZER_FILE: (save_optimizer, load_optimizer)}
    if ema is not None:
        files[EMA_FILE] = (lambda: {k: v.contiguous() for k, v in full_state(ema.target).items()},
                           lambda state: load_full_state(ema.target, state))
    return save_weights, load_weights, LORA_FILE if is_lora else STUDENT_FILE, files


def refuse_multi_part(accelerator, num_parts: int) -> None:
    """Several parts (DMD, GAN) sync their own gradients on replicated weights: single process or DDP only."""
    from accelerate.utils import DistributedType

    if num_parts < 2:
        return
    sharded = fsdp_request() is not None and accelerator.num_processes > 1
    if sharded or accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU,
                                                       DistributedType.MULTI_GPU):
        raise TLCMError("DMD / GAN recipes train several parts and run single-process or under DDP, not "
                        f"{'FSDP' if sharded else accelerator.distributed_type}",
                        "launch with a DDP config (configs/accelerate/ddp-*.yaml)")


# ---------------------------------------------------------------------------------------------------------- export


def _plain_class(module) -> type:
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__[1:] if c is not FSDPModule and not issubclass(c, FSDPModule))


def gather_for_export(networks, cfg, accelerator):
    """``(unet, networks)`` with plain (unsharded) copies of what the export writes, on the main process; ``(None,
    None)`` elsewhere. A collective. A LoRA copy holds only the adapter's weights (its base stays on the meta device:
    the export reads the adapter alone); a full student's copy holds the whole UNet the export saves."""
    from tlcm.train.student import ADAPTER_NAME, Networks

    if networks.is_lora:
        source, state = networks.student, full_state(networks.student, trainable_only=True)
    else:
        source = networks.target_unet if networks.target_unet is not None and cfg.ema_decay > 0 else networks.student
        state = full_state(source)
    if not accelerator.is_main_process:
        return None, None
    with torch.device("meta"):
        plain = _plain_class(source).from_config(dict(source.config))
        if networks.is_lora:
            plain.add_adapter(networks.lora_config, adapter_name=ADAPTER_NAME)
    result = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if networks.is_lora is False or "lora_" in k]
    assert not missing and not result.unexpected_keys, (missing[:3], result.unexpected_keys[:3])
    if networks.is_lora:
        return plain, Networks(plain, plain, None, True, networks.lora_config)
    return plain, Networks(plain, plain, plain, False, None)
