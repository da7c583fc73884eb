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
  sharded, so a sharded run resumes on any number of processes.
- validation runs on every rank (a sharded forward is a collective); the export gathers a plain copy of what it
  writes on the main process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tlcm.errors import TLCMError

log = logging.getLogger("tlcm.distill")

LORA_FILE = "student_lora.safetensors"  # the name an unsharded LoRA checkpoint uses too (loop.LORA_CKPT_FILE)
STUDENT_FILE = "student.safetensors"
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
    accelerator.print(f"FSDP (fully_shard) over {accelerator.num_processes} processes: {len(seen)} UNet(s), units "
                      f"{', '.join(settings.wrap_classes) or 'root only'}, reshard_after_forward "
                      f"{settings.reshard_after_forward}")
    return True


def prepare(accelerator, student, optimizer, sharded: bool):
    """``accelerator.prepare(student, optimizer)``, or for a sharded student the student as it is and its optimiser
    in an ``AcceleratedOptimizer`` (steps only when gradients sync, as a prepared one does; not checkpointed by
    accelerate: :func:`register_checkpointing` saves its full state)."""
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


def _peft_names(module, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """module parameter name -> peft's saved name (``...lora_A.default.weight`` -> ``...lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    index = {name: torch.tensor(i) for i, name in enumerate(state)}
    renamed = get_peft_model_state_dict(module, state_dict=index)
    names = list(state)
    return {names[int(i)]: key for key, i in renamed.items()}


def register_checkpointing(accelerator, networks, student, optimizer, ema=None) -> None:
    """Checkpoint a sharded run through accelerate's save/load hooks: gathered on save, sharded on load."""
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    def save_hook(models, weights, output_dir):
        out = Path(output_dir)
        weights_state = full_state(student, trainable_only=True)
        optim_state = get_optimizer_state_dict(student, inner, options=_options())
        ema_state = full_state(ema.target) if ema is not None else None
        if accelerator.is_main_process:
            if networks.is_lora:
                rename = _peft_names(student, weights_state)
                save_file({rename[k]: v.contiguous() for k, v in weights_state.items()}, str(out / LORA_FILE))
            else:
                save_file({k: v.contiguous() for k, v in weights_state.items()}, str(out / STUDENT_FILE))
            torch.save(optim_state, out / OPTIMIZER_FILE)
            if ema_state is not None:
                save_file({k: v.contiguous() for k, v in ema_state.items()}, str(out / EMA_FILE))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        src = Path(input_dir)
        weights_file = src / (LORA_FILE if networks.is_lora else STUDENT_FILE)
        needed = [weights_file, src / OPTIMIZER_FILE] + ([src / EMA_FILE] if ema is not None else [])
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise TLCMError(f"checkpoint {src} lacks {', '.join(missing)}: it was not written by a sharded (FSDP) run "
                            "of this kind of student",
                            "resume with the launch configuration (FSDP or not) and student setting that wrote it")
        state = load_file(str(weights_file))
        if networks.is_lora:
            trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
            rename = {v: k for k, v in _peft_names(student, trainable).items()}
            unknown = sorted(set(state) - set(rename))
            if unknown:
                raise TLCMError(f"the checkpoint's LoRA has weights this student lacks ({unknown[0]}, ...)",
                                "resume with the LoRA settings (rank, targets) that wrote the checkpoint")
            state = {rename[k]: v for k, v in state.items()}
        load_full_state(student, state)
        optim_state = torch.load(src / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(student, inner, optim_state_dict=optim_state, options=_options())
        if ema is not None:
            load_full_state(ema.target, load_file(str(src / EMA_FILE)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


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
