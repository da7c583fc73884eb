"""Trainable parts at run time: parameters, optimiser, LR schedule, EMA, and their checkpoint state by name.

A part (:class:`Part`) is what one phase steps. The loop never touches an optimiser by position: every piece of state
is stored under the part's name, in two places of a checkpoint folder (``accelerator.save_state`` writes it):

* the weights, as safetensors files named after the part (:data:`WEIGHT_FILES`), written by the save hook
  (:func:`register_checkpoint_hooks`); a student that went through ``accelerator.prepare`` as a full UNet is saved by
  accelerate itself, as before;
* everything else (optimiser unless prepared, LR schedule, update count, EMA, the extra losses' persistent state) in
  one :class:`TrainState` object, ``custom_checkpoint_0.pkl``.

A student sharded by FSDP (:mod:`tlcm.train.distributed`; single-part runs only) holds on each process only its shard
of the weights, the optimiser state and the EMA target, which ``TrainState`` (written by process 0 alone) cannot hold.
Such a part is ``sharded``: the hooks call its savers on *every* process (they gather: collectives), process 0 writes
the full states (the LoRA under the same file and names as an unsharded run), and every process loads them back into
its shard, so a sharded run resumes on any number of processes. Its optimiser and EMA target travel as
``state_files``.

With one part (the consistency recipes) the student is ``accelerator.prepare``-d as before: DDP / FSDP / DeepSpeed
sync its gradients. With several, nothing is wrapped (two adapters on one UNet would leave DDP's reducer guessing which
parameters a pass used): each phase all-reduces its own part's gradients (:meth:`Part.sync_gradients`), as StyleGAN3's
loop does, and the parts are broadcast from process 0 at the start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlcm.errors import TLCMError

STATE_FORMAT = 2
WEIGHT_FILES = {
    "student": "student_lora.safetensors",  # the LoRA student (file name kept from format 1)
    "student_full": "student_unet.safetensors",  # a full student that was not prepared (several parts)
    "fake": "fake_lora.safetensors",
    "discriminator": "discriminator_heads.safetensors",
}


@dataclass
class Part:
    """One trainable part. ``save_weights``/``load_weights`` move its weights in and out as a flat state dict."""

    name: str
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    every: int
    save_weights: Any  # () -> dict[str, Tensor]
    load_weights: Any  # (dict[str, Tensor]) -> None
    weight_file: str | None  # None: accelerate saves the weights (a prepared full UNet)
    prepared: bool = False  # went through accelerator.prepare (its gradients are synced by DDP/FSDP)
    module: Any = None  # the prepared module (for no_sync during gradient accumulation)
    ema: Any = None
    updates: int = 0
    sharded: bool = False  # FSDP shards: savers are collectives, and TrainState holds neither optimiser nor EMA
    state_files: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # more files: name -> (save, load)

    def files(self) -> dict[str, tuple[Any, Any]]:
        """Every file this part writes into a checkpoint: name -> (``save() -> state``, ``load(state)``)."""
        out = {self.weight_file: (self.save_weights, self.load_weights)} if self.weight_file else {}
        return {**out, **self.state_files}

    def sync_gradients(self, accelerator) -> None:
        """Average this part's gradients over processes (parts that were not prepared; a no-op on one process)."""
        if self.prepared or accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= accelerator.num_processes
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast(self) -> None:
        """Give every process process 0's weights (parts that DDP does not broadcast at ``prepare``)."""
        if self.prepared or not torch.distributed.is_initialized():
            return
        for p in self.params:
            torch.distributed.broadcast(p.data, src=0)
        if self.ema is not None:
            for p in self.ema.target.parameters():
                torch.distributed.broadcast(p.data, src=0)

    def checksum(self) -> torch.Tensor:
        return torch.stack([p.detach().double().abs().sum() for p in self.params]).sum()


def make_optimizer(params: list[torch.nn.Parameter], lr: float, cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)


def make_lr_scheduler(optimizer, spec, max_steps: int):
    from diffusers.optimization import get_scheduler

    return get_scheduler(spec.lr_scheduler, optimizer=optimizer, num_warmup_steps=spec.lr_warmup_steps,
                         num_training_steps=spec.num_updates(max_steps))


@dataclass
class TrainState:
    """Everything of a run's state that is not weights, by part name; registered with accelerate for checkpoints."""

    parts: dict[str, Part]
    extra_losses: dict[str, dict] = field(default_factory=dict)  # per extra loss: its persistent ``ctx.state``

    def state_dict(self) -> dict:
        out = {"format": STATE_FORMAT, "parts": {}, "extra_losses": self.extra_losses}
        for name, part in self.parts.items():
            out["parts"][name] = {
                "optimizer": None if part.prepared else part.optimizer.state_dict(),
                "lr_scheduler": part.lr_scheduler.state_dict(),
                "updates": part.updates,
                "ema": part.ema.state_dict() if part.ema is not None and not part.sharded else None,
            }
        return out

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise TLCMError("the checkpoint was written by an older tlcm (another checkpoint layout)",
                            "start the run afresh (drop --resume), or resume it with the tlcm that wrote it")
        saved, have = sorted(state["parts"]), sorted(self.parts)
        if saved != have:
            raise TLCMError(f"the checkpoint holds the parts {saved}, this run trains {have}",
                            "resume with the config that wrote the checkpoint (its config.yaml), or start afresh")
        for name, part in self.parts.items():
            s = state["parts"][name]
            if s["optimizer"] is not None:
                part.optimizer.load_state_dict(s["optimizer"])
            part.lr_scheduler.load_state_dict(s["lr_scheduler"])
            part.updates = int(s["updates"])
            if part.ema is not None and not part.sharded:
                part.ema.load_state_dict(s["ema"])
        self.extra_losses.clear()
        self.extra_losses.update(state.get("extra_losses") or {})


def _write(path: Path, state) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def register_checkpoint_hooks(accelerator, parts: dict[str, Part], drop_prepared_models: bool) -> None:
    """Save/load every part's files (:meth:`Part.files`) by name around ``save_state``/``load_state``.

    ``drop_prepared_models``: the prepared student is a LoRA UNet, saved here as its adapter only, so accelerate must
    not write (or read) the whole UNet.
    """

    def save_hook(models, weights, output_dir):
        main = accelerator.is_main_process
        for part in parts.values():
            if not (main or part.sharded):  # a sharded part's savers gather: every process calls them
                continue
            for name, (save, _) in part.files().items():
                state = save()
                if main:
                    _write(Path(output_dir) / name, state)
        if drop_prepared_models:
            while weights:
                weights.pop()

    def load_hook(models, input_dir):
        for part in parts.values():
            for name, (_, load) in part.files().items():
                path = Path(input_dir) / name
                if not path.is_file():
                    raise TLCMError(f"checkpoint {input_dir} has no {name} (part {part.name!r}"
                                    f"{', sharded by FSDP' if part.sharded else ''})",
                                    "resume with the config and the launch (FSDP or not) that wrote the checkpoint, "
                                    "or start afresh")
                load(_read(path))
        if drop_prepared_models:
            while models:
                models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def check_in_sync(accelerator, parts: dict[str, Part]) -> None:
    """All processes hold the same weights (parts synced by hand); an internal error otherwise."""
    if accelerator.num_processes == 1 or not parts:
        return
    local = torch.stack([p.checksum() for p in parts.values()]).to(accelerator.device)
    every = accelerator.gather(local[None]).reshape(accelerator.num_processes, -1)
    assert torch.allclose(every, every[0].expand_as(every), rtol=1e-6, atol=0), \
        f"parts {list(parts)} diverged across processes: {every.tolist()}"


__all__ = ["Part", "TrainState", "WEIGHT_FILES", "check_in_sync", "make_lr_scheduler", "make_optimizer",
           "register_checkpoint_hooks"]
