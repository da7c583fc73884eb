"""Evaluation: a (model or LoRA) x scheduler x steps x guidance grid, scored, timed and reported.

- :mod:`tlcm.evaluate.metrics`: metric plugins (toy-FID and alignment; Inception FID; CLIP score; aesthetic; k-NN
  precision/recall and per-prompt diversity of the feature metrics).
- :mod:`tlcm.evaluate.diversity`: per-prompt diversity and precision/recall as pure math on features, and which images
  the diversity needs.
- :mod:`tlcm.evaluate.baselines`: the undistilled teacher sampled with each student's own scheduler, the best
  training-free sampler per step count and NFE budget, and each student's ratio to it.
- :mod:`tlcm.evaluate.sweep`: the grid runner (:func:`run_sweep`), timing, network evaluations, peak memory.
- :mod:`tlcm.evaluate.report`: results.json/.csv, the markdown table, PNG grids and plots.
- :mod:`tlcm.evaluate.protocols`: presets (``toy``, ``coco2017-5k-sdxl``) and option resolution.
- :mod:`tlcm.evaluate.prompts`: prompt files (text, tables, COCO captions), fixed counts and seeds.
"""

from tlcm.evaluate.metrics import MetricSpec, Reference, build_metrics
from tlcm.evaluate.protocols import PROTOCOLS, config_from_options
from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SchedulerSpec, SweepConfig, run_sweep

__all__ = ["PROTOCOLS", "MetricSpec", "ModelSpec", "Reference", "ReferenceSpec", "SchedulerSpec", "SweepConfig",
           "build_metrics", "config_from_options", "run_sweep"]
