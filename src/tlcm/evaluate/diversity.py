"""How much a model's samples vary: per-prompt diversity and k-NN manifold precision / recall, from features.

FID and alignment do not catch a student that draws one image per prompt whatever the noise (mode collapse): a
caption-determined image can match the teacher's feature *mean* and name every attribute. Two measures do:

- **Per-prompt diversity**: for K prompts, each sampled with S seeds, the mean Euclidean distance between the
  features of the S images of one prompt (over all S(S-1)/2 pairs), averaged over the K prompts. A model that ignores
  its noise scores 0; the ratio to the teacher's reference samples (same prompts, same seeds) says how much of the
  teacher's variety a student keeps.
- **Precision / recall** (Kynkaanniemi et al. 2019, "Improved precision and recall"): a sample is inside a set's
  manifold when it lies within the distance to the k-th nearest neighbour of some member of the set. Precision =
  share of generated samples inside the reference manifold; recall = share of reference samples inside the generated
  manifold (low recall: the model misses part of the reference distribution).

:func:`plan_diversity` decides which images the diversity needs. It reuses the evaluation's own images: the first K
distinct prompts of the prompt list, each with every image the list already has for it (repeated prompts carry
distinct seeds), topped up to S with *extra* (prompt, seed) pairs whose seeds follow the largest seed of the list.
For a list without repeats that is K x (S - 1) extra images per cell (96 for 32 x 4); for a list built as K prompts
repeated S times, none.

The measures themselves are pure tensor math in :mod:`tlcm.math.manifold` ; the metric plugins
in :mod:`tlcm.evaluate.metrics` supply the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class DiversityPlan:
    """Which images form each prompt's group: indices into ``main images + extra images``."""

    groups: tuple[tuple[int, ...], ...]
    extra_prompts: tuple[str, ...] = ()
    extra_seeds: tuple[int, ...] = ()

    @property
    def num_extra(self) -> int:
        return len(self.extra_prompts)


def plan_diversity(prompts: Sequence[str], seeds: Sequence[int], num_prompts: int,
                   seeds_per_prompt: int) -> DiversityPlan:
    """Groups of ``seeds_per_prompt`` images for the first ``num_prompts`` distinct prompts (see the module doc)."""
    if num_prompts < 1 or seeds_per_prompt < 2:
        raise ValueError(f"diversity needs >= 1 prompt and >= 2 seeds per prompt, got {num_prompts}x{seeds_per_prompt}")
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    where: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        where.setdefault(p, []).append(i)
    n = len(prompts)
    next_seed = max(int(s) for s in seeds) + 1 if len(seeds) else 0
    groups, extra_prompts, extra_seeds = [], [], []
    for prompt, indices in list(where.items())[:num_prompts]:
        group = list(indices[:seeds_per_prompt])
        while len(group) < seeds_per_prompt:
            group.append(n + len(extra_prompts))
            extra_prompts.append(prompt)
            extra_seeds.append(next_seed)
            next_seed += 1
        groups.append(tuple(group))
    return DiversityPlan(tuple(groups), tuple(extra_prompts), tuple(extra_seeds))
