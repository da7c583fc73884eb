"""One seeding mechanism for every randomly initialised part of a run (student LoRA, a new guidance embedding, the
fake-score adapter, the discriminator heads).

peft, diffusers and ``torch.nn`` initialise weights from torch's *global* RNG. :func:`seeded_rng` runs such a block
in a forked RNG state seeded from ``(seed, purpose)`` and restores the global state afterwards, so each part's
initial weights depend on ``--seed`` and its purpose only: not on what ran before in the process, not on the other
parts, and nothing after it sees a changed global RNG.
"""

from __future__ import annotations

import contextlib
import hashlib

import torch


def derived_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` derived from the run's seed (independent streams for different purposes)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") % 2**63


@contextlib.contextmanager
def seeded_rng(seed: int, purpose: str):
    """Run the block with torch's global RNG (CPU and every CUDA device) seeded from ``(seed, purpose)``; restore it
    afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derived_seed(seed, purpose))
        yield


__all__ = ["derived_seed", "seeded_rng"]
