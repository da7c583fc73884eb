from __future__ import annotations

import pytest
import torch


class _PoolFeatures(torch.nn.Module):
    """Stands in for the TorchScript Inception: same call signature, [0, 255] input, 12-d pooled colour features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(img / 255.0, 2)
        return x.flatten(1)


@pytest.fixture(scope="session")
def fake_inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(_PoolFeatures()).save(str(path))
    return path


@pytest.fixture()
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("# toy prompts\na red circle\n\na blue square\na green cross\na yellow triangle\n")
    return p
