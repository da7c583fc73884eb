"""Step-cost profile: how much of a training step is the networks it must run (``profile_steps`` in the config).

While a profiled step runs, :class:`NetworkRecorder` notes every network evaluation the phases make (the student's
forward, the target's, the teacher's guided forward, stage-2 sampling, the fake score, the discriminator, the VAE
decoder and the reward model): the callable, its inputs (detached, same storage), the grad mode, the network role
(teacher / fake / student adapter state) and the trainable set. After the step, :meth:`NetworkRecorder.replay` runs
each evaluation again *alone* on the same inputs (forward, plus a backward when the step's forward carried a graph)
and times it. ``step / networks`` is then the whole step's time over the sum of those times: 1.0 means the loop adds
nothing to the networks it must run; what lies above is bookkeeping (adapter switches, data, losses, optimiser, EMA).

Times are the process's CPU time (``time.process_time``: robust on a shared machine; compare at one torch thread) on
CPU, and wall time after a CUDA synchronise on a GPU. Replaying draws no random numbers and its gradients are
dropped, so a profiled run trains exactly the weights of an unprofiled one (tested).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


def make_clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """``clock() -> seconds`` for the device, and its name for the summary."""
    if device.type == "cuda":
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return clock, "wall time after torch.cuda.synchronize"
    return time.process_time, "process CPU time (time.process_time)"


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    return x


@dataclass
class Call:
    label: str
    fn: Callable
    args: tuple
    grad_args: tuple[bool, ...]
    grad: bool
    role: str
    trainable: frozenset[int]


@dataclass
class NetworkRecorder:
    """Records the network calls of the steps it is ``active`` for (see the module docstring)."""

    networks: Any
    active: bool = False
    calls: list[Call] = field(default_factory=list)

    def wrap(self, label: str, fn: Callable, role: str = "student") -> Callable:
        """``fn`` itself, which also records each call while the recorder is active. ``role``: the network state
        (:meth:`tlcm.train.student.Networks.use`) the call runs in; the replay enters it outside the timed span."""

        def recorded(*args):
            if self.active:
                self.calls.append(Call(label, fn, tuple(_detach(a) for a in args),
                                       tuple(isinstance(a, torch.Tensor) and a.requires_grad for a in args),
                                       torch.is_grad_enabled(), role, self.networks.trainable_ids()))
            return fn(*args)

        return recorded

    def replay(self, clock: Callable[[], float], autocast: Callable) -> dict[str, float]:
        """Run every recorded call again alone (forward, and backward when it carried a graph); seconds per label.
        Gradients the replay leaves are dropped (the step's optimisers have already stepped and zeroed)."""
        nets = self.networks
        saved = nets.trainable_ids()
        out: dict[str, float] = {}
        try:
            for call in self.calls:
                nets.set_trainable_ids(call.trainable)
                args = tuple(a.clone().requires_grad_(True) if g else a for a, g in zip(call.args, call.grad_args))
                with nets.use(call.role), autocast(), torch.set_grad_enabled(call.grad):
                    t0 = clock()
                    res = call.fn(*args)
                    outs = [r for r in (res if isinstance(res, (tuple, list)) else [res])
                            if isinstance(r, torch.Tensor) and r.requires_grad]
                    if call.grad and outs:
                        torch.autograd.backward(outs, [torch.ones_like(r) for r in outs])
                    dt = clock() - t0
                key = call.label + (" fwd+bwd" if call.grad and outs else " fwd")
                out[key] = out.get(key, 0.0) + dt
                del res, outs, args
        finally:
            self.calls.clear()
            nets.set_trainable_ids(saved)
            nets.drop_grads()
        return out


@dataclass
class StepProfile:
    """Per profiled step: the whole step's time and each network's replayed time."""

    clock_name: str
    steps: list[dict] = field(default_factory=list)

    def add(self, step: int, step_s: float, networks: dict[str, float]) -> None:
        self.steps.append({"step": step, "step_s": step_s, "networks": networks})

    def summary(self) -> dict:
        """Medians over the profiled steps (the ``step_profile`` field of ``train_summary.json``)."""
        if not self.steps:
            return {}
        labels = sorted({k for s in self.steps for k in s["networks"]})
        step_s = statistics.median(s["step_s"] for s in self.steps)
        net_s = statistics.median(sum(s["networks"].values()) for s in self.steps)
        return {
            "clock": self.clock_name,
            "profiled_steps": [s["step"] for s in self.steps],
            "step_s": round(step_s, 4),
            "networks_s": round(net_s, 4),
            "step_over_networks": round(step_s / net_s, 3) if net_s > 0 else None,
            "networks": {k: round(statistics.median(s["networks"].get(k, 0.0) for s in self.steps), 4)
                         for k in labels},
            "per_step": [{"step": s["step"], "step_s": round(s["step_s"], 4),
                          "networks_s": round(sum(s["networks"].values()), 4)} for s in self.steps],
        }


__all__ = ["NetworkRecorder", "StepProfile", "make_clock"]
