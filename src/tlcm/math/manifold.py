"""Feature-space measures of how a set of samples covers a reference: per-prompt diversity and k-NN manifold
precision / recall (Kynkaanniemi et al. 2019, "Improved precision and recall"). Pure tensor math in float64.

- per-prompt diversity: for groups of samples of one prompt (different seeds), the mean Euclidean distance between
  the features of the group's members, averaged over groups. A sampler that ignores its noise scores 0.
- precision / recall: a sample is inside a set's manifold when it lies within the distance to the k-th nearest
  neighbour of some member of the set. Precision = share of generated samples inside the reference manifold;
  recall = share of reference samples inside the generated manifold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_NEIGHBOURS = 5


def per_prompt_diversity(features: torch.Tensor, groups: Sequence[Sequence[int]]) -> float:
    """Mean over groups of the mean pairwise Euclidean feature distance within the group (float64 inside)."""
    feats = torch.as_tensor(features).double()
    per_group = []
    for g in groups:
        if len(g) < 2:
            continue
        per_group.append(torch.pdist(feats[list(g)]).mean())
    if not per_group:
        raise ValueError("per-prompt diversity needs at least one group of two or more images")
    return float(torch.stack(per_group).mean())


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_NEIGHBOURS) -> tuple[float, float]:
    """``(precision, recall)`` of ``fake`` against ``real`` with k-NN manifolds (float64 distances).

    With very small sets ``k`` shrinks so that the k-th neighbour exists (``k <= n - 1``).
    """
    real = torch.as_tensor(real).double()
    fake = torch.as_tensor(fake).double()
    if len(real) < 2 or len(fake) < 2:
        raise ValueError("precision/recall needs at least two real and two generated samples")
    k = max(1, min(k, len(real) - 1, len(fake) - 1))

    def radii(x):  # distance to the k-th nearest *other* member: the point itself is its own 0-th neighbour
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    d = torch.cdist(fake, real)  # (n_fake, n_real)
    precision = (d <= radii(real)[None, :]).any(dim=1).double().mean()
    recall = (d.T <= radii(fake)[None, :]).any(dim=1).double().mean()
    return float(precision), float(recall)
