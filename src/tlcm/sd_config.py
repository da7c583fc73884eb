"""Stable Diffusion's scheduler settings, in one low-level module that imports nothing of ours.

``tlcm.models`` (loading teachers), ``tlcm.testing`` (tiny pipelines) and ``tlcm.toy`` (the toy world's scheduler
folder) all read them from here, so the toy world never needs ``tlcm.models`` and the import graph has one direction:
``models -> toy`` (lazily, to resolve the name ``"toy"``), never back.
"""

from __future__ import annotations

STABLE_DIFFUSION_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
"""The DDPM schedule Stable Diffusion 1.x/2.x and SDXL were trained with (their released DDIM/PNDM configs).

SD2.x 768 (``stabilityai/stable-diffusion-2-1``) uses the same betas with ``prediction_type="v_prediction"``;
SD2.1-base (512) predicts epsilon like SD1.5."""
