from __future__ import annotations

import pytest
import torch


def memory_dataset(num: int = 12, seed: int = 0):
    """A ``dataset_fn(rank, world)`` over fixed random latents and 4 prompts (tiny pipelines: 16x16x4 latents)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(num, 4, 16, 16, generator=g)
    prompts = [f"shape {i % 4}" for i in range(num)]

    def make(rank: int, world: int):
        return [{"latents": latents[i], "prompt": prompts[i], "negative_prompt": ""} for i in range(rank, num, world)]

    return make


@pytest.fixture
def dataset_fn():
    return memory_dataset()


@pytest.fixture
def tiny_cfg(tmp_path):
    from tlcm.train.config import DistillConfig

    def make(**kw):
        base = dict(teacher="tiny", output_dir=str(tmp_path / "out"), max_steps=2, batch_size=2, lora_rank=4,
                    lora_alpha=4, checkpointing_steps=0, validation_num_steps=[1, 2], validation_prompts=["a"],
                    num_segments=2, logging_steps=1)
        base.update(kw)
        return DistillConfig(**base)

    return make
