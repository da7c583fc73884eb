"""TLCMScheduler: one diffusers scheduler for 1-8 step sampling of LCM, TCD-style and multi-segment (TLCM) students.

Every formula lives in :mod:`tlcm.math`; this class only keeps the schedule state a diffusers pipeline expects.
See ``docs/scheduler.md`` for the modes, the timestep grids and the N != M rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from tlcm.math import (
    CLEAN,
    alpha_sigma,
    alphas_cumprod_from_config,
    betas_from_config,
    boundary_scalings,
    consistency_output,
    ddim_step,
    dynamic_threshold,
    lcm_inference_timesteps,
    linspace_inference_timesteps,
    model_output_to_x0_eps,
    renoise,
    segment_edges,
    segment_inference_timesteps,
    skipping_step_grid,
    tcd_intermediate_timestep,
    x0_eps_to_model_output,
)
from tlcm.math.parameterization import PREDICTION_TYPES

logger = logging.get_logger(__name__)

MODES = ("lcm", "tcd", "segments")
BOUNDARY_CONDITIONS = ("lcm", "none")
TIMESTEP_GRIDS = ("lcm", "linspace")
SIGMA_DATA = 0.5


@dataclass
class TLCMSchedulerOutput(BaseOutput):
    """``prev_sample``: the next model input (or the final sample); ``denoised``: this step's x0 estimate."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class TLCMScheduler(SchedulerMixin, ConfigMixin):
    """Few-step sampler for consistency-distilled students (LCM, LCM-LoRA, TLCM), usable in any diffusers pipeline.

    Each step turns the network output at ``t`` into ``(x0_hat, eps_hat)`` (``prediction_type``), optionally applies
    the LCM boundary condition ``x0 = c_skip z_t + c_out x0_hat`` (``boundary_condition="lcm"``; ``"none"`` for TLCM
    students trained without it, whose boundary comes from the DDIM jump), then moves to the next time ``t_prev``:

    * ``mode="lcm"``: re-noise ``x0`` to ``t_prev`` with fresh noise. With the defaults this is diffusers'
      ``LCMScheduler`` operation for operation: same timesteps, same random draws, same outputs.
    * ``mode="tcd"``: DDIM from ``t`` to ``s = floor((1 - gamma) t_prev)`` with ``(x0, eps)``, then re-noise
      ``s -> t_prev`` with fresh noise. ``gamma = 1`` puts ``s`` at the clean end, which is ``mode="lcm"`` exactly;
      ``gamma = 0`` is deterministic DDIM. (diffusers' ``TCDScheduler``: same intermediate steps when
      ``boundary_condition="none"`` and ``0 < gamma < 1``; it uses ``s = 0`` rather than clean at ``gamma = 1`` and
      returns the DDIM point at ``t = 0`` rather than ``x0`` after the last step.)
    * ``mode="segments"``: deterministic walk over the ``num_segments`` (M) segment edges of a TLCM (MLCD) student,
      each step a DDIM jump with ``(x0, eps)`` to the next start time, and to ``x0`` after the last.
      **N != M rule**: ``N == M`` starts at every upper edge ``e_M, ..., e_1``; ``N < M`` starts at N of them, evenly
      spaced from the top (``floor(linspace(0, M, N))``), so every step starts where the student was trained to
      leave from; ``N > M`` raises ``ValueError`` (use ``mode="lcm"``/``"tcd"`` for a stage-2 student instead).

    ``timestep_grid`` chooses the times of modes ``lcm``/``tcd``: ``"lcm"`` (``LCMScheduler``'s rule on the
    ``original_inference_steps`` skipping-step grid: 4 steps 999, 759, 499, 259) or ``"linspace"`` (the official
    TLCM inference script: 4 steps 999, 749, 499, 124). Use the grid the student was trained or validated on.

    Step counts above 8 are allowed (up to the grid's size); fewer than 1 raise ``ValueError``. ``set_alpha_to_one``,
    ``steps_offset`` and ``timestep_spacing`` are accepted for config compatibility and, as in ``LCMScheduler``,
    unused: the clean end always has ``abar = 1``. ``alphas_cumprod`` is float32, bit-identical to diffusers'.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        mode: str = "lcm",
        gamma: float = 0.3,
        num_segments: int = 8,
        boundary_condition: str = "lcm",
        timestep_grid: str = "lcm",
    ):
        _check_choice("mode", mode, MODES)
        _check_choice("boundary_condition", boundary_condition, BOUNDARY_CONDITIONS)
        _check_choice("timestep_grid", timestep_grid, TIMESTEP_GRIDS)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (1: LCM, 0: deterministic), got {gamma}")
        if mode == "segments":
            segment_edges(num_segments, num_train_timesteps, original_inference_steps)  # validates num_segments

        self.betas = betas_from_config(self.config, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_config(self.config, dtype=torch.float32)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self.custom_timesteps = False
        self._step_index = None
        self._begin_index = None

    # -- step bookkeeping, as in diffusers' LCMScheduler ------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index of the current timestep in ``self.timesteps``; advances by one per :meth:`step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First step index, set by img2img pipelines through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at ``self.timesteps[begin_index]`` (img2img pipelines skip the top of the schedule this way)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of ``timestep`` in the schedule (the second match when it appears twice, as diffusers does)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {int(timestep)} is not in the schedule {schedule_timesteps.tolist()}")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: discrete-time DDPM models take ``z_t`` unscaled."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # -- the schedule ------------------------------------------------------------------------------------------------

    def segment_edges(self, original_inference_steps: int | None = None) -> np.ndarray:
        """Ascending edges ``[CLEAN, e_1, ..., e_M]`` of mode ``segments`` (see :func:`tlcm.math.segment_edges`)."""
        steps = original_inference_steps or self.config.original_inference_steps
        return segment_edges(self.config.num_segments, self.config.num_train_timesteps, steps)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Choose the descending times for ``num_inference_steps`` steps (or take custom ``timesteps``).

        ``strength < 1`` (img2img): on the ``lcm`` grid, LCMScheduler's rule (the grid is cut to its lowest
        ``strength`` fraction first); on the other grids and for custom times, the last ``int(N * strength)`` times.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps` to set_timesteps")
        cfg = self.config
        original_steps = original_inference_steps if original_inference_steps is not None else (
            cfg.original_inference_steps
        )
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")

        if timesteps is not None:
            ts = self._check_custom_timesteps(timesteps, original_steps, strength)
            self.custom_timesteps = True
        else:
            if int(num_inference_steps) < 1:
                raise ValueError(
                    f"num_inference_steps must be at least 1, got {num_inference_steps}: TLCMScheduler samples in "
                    "1 or more steps (1-8 is the range students are trained for)"
                )
            n = int(num_inference_steps)
            if cfg.mode == "segments":
                ts = _keep_strength(segment_inference_timesteps(n, self.segment_edges(original_steps)), strength)
            elif cfg.timestep_grid == "lcm":
                ts = lcm_inference_timesteps(n, cfg.num_train_timesteps, original_steps, strength)
            else:
                ts = _keep_strength(linspace_inference_timesteps(n, cfg.num_train_timesteps), strength)
            self.custom_timesteps = False

        self.timesteps = torch.from_numpy(np.asarray(ts, dtype=np.int64)).to(device=device, dtype=torch.long)
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None

    def _check_custom_timesteps(self, timesteps, original_steps: int, strength: float) -> np.ndarray:
        ts = np.asarray([int(t) for t in timesteps], dtype=np.int64)
        if len(ts) == 0:
            raise ValueError("custom `timesteps` must not be empty")
        if np.any(np.diff(ts) >= 0):
            raise ValueError(f"custom `timesteps` must be strictly descending, got {ts.tolist()}")
        if ts[0] >= self.config.num_train_timesteps or ts[-1] < 0:
            last = self.config.num_train_timesteps - 1
            raise ValueError(f"custom `timesteps` must lie in 0..{last}, got {ts.tolist()}")
        off_grid = sorted(set(ts.tolist()) - set(skipping_step_grid(self.config.num_train_timesteps, original_steps)))
        if off_grid and self.config.mode == "lcm" and self.config.timestep_grid == "lcm":
            logger.warning(f"custom timesteps {off_grid} are not on the {original_steps}-step distillation grid")
        return _keep_strength(ts, strength)

    # -- one step ----------------------------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> TLCMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Move ``sample`` from ``timestep`` to the next time of the schedule; also return the x0 estimate.

        Returns ``TLCMSchedulerOutput(prev_sample, denoised)`` or, with ``return_dict=False``, that tuple (the LCM
        pipelines unpack both; after the last step ``prev_sample is denoised``).
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        if self.step_index is None:
            self._init_step_index(timestep)
        cfg = self.config
        last = self.step_index + 1 >= len(self.timesteps)
        t_prev = CLEAN if last else int(self.timesteps[self.step_index + 1])

        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, timestep)
        x0, eps = model_output_to_x0_eps(model_output, sample, alpha_t, sigma_t, cfg.prediction_type)
        x0_changed = cfg.thresholding or cfg.clip_sample or cfg.boundary_condition == "lcm"
        if cfg.thresholding:
            x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        if cfg.boundary_condition == "lcm":
            # float32 scalings for tensor times, float64 for Python ints: LCMScheduler's own arithmetic in both cases.
            scal_dtype = torch.float32 if isinstance(timestep, torch.Tensor) else torch.float64
            c_skip, c_out = boundary_scalings(timestep, SIGMA_DATA, cfg.timestep_scaling, dtype=scal_dtype)
            x0 = consistency_output(sample, x0, c_skip.to(sample.device), c_out.to(sample.device))
        if x0_changed and cfg.mode != "lcm":
            # Keep (x0, eps) one consistent pair describing z_t, so a DDIM jump to t itself returns z_t.
            eps = model_output_to_x0_eps(x0, sample, alpha_t, sigma_t, "sample")[1]

        if last:
            prev_sample = x0
        elif cfg.mode == "lcm":
            prev_sample = self._noise_from_clean(x0, t_prev, model_output, generator)
        elif cfg.mode == "tcd":
            s = tcd_intermediate_timestep(t_prev, cfg.gamma)
            if s == CLEAN:
                prev_sample = self._noise_from_clean(x0, t_prev, model_output, generator)
            else:
                alpha_s, sigma_s = alpha_sigma(self.alphas_cumprod, s)
                z_s = ddim_step(x0, eps, alpha_s, sigma_s)
                if s == t_prev:
                    prev_sample = z_s
                else:
                    alpha_p, sigma_p = alpha_sigma(self.alphas_cumprod, t_prev)
                    noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                         dtype=z_s.dtype)
                    prev_sample = renoise(z_s, alpha_s, sigma_s, alpha_p, sigma_p, noise)
        else:  # segments
            alpha_p, sigma_p = alpha_sigma(self.alphas_cumprod, t_prev)
            prev_sample = ddim_step(x0, eps, alpha_p, sigma_p)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return TLCMSchedulerOutput(prev_sample=prev_sample, denoised=x0)

    def _noise_from_clean(self, x0, t_prev: int, model_output, generator) -> torch.Tensor:
        # LCM's re-noise: the forward process from the clean end, z = alpha x0 + sigma n (a DDIM step with fresh n).
        alpha_p, sigma_p = alpha_sigma(self.alphas_cumprod, t_prev)
        noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=x0.dtype)
        return ddim_step(x0, noise, alpha_p, sigma_p)

    # -- training-side helpers, as in diffusers ------------------------------------------------------------------

    def _alpha_sigma_like(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.alphas_cumprod = self.alphas_cumprod.to(device=x.device)
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(dtype=x.dtype), timesteps.to(x.device))
        shape = (-1,) + (1,) * (x.ndim - 1)
        return alpha.flatten().reshape(shape), sigma.flatten().reshape(shape)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Forward process ``z_t = alpha_t x0 + sigma_t eps`` at per-sample ``timesteps``."""
        alpha, sigma = self._alpha_sigma_like(original_samples, timesteps)
        return ddim_step(original_samples, noise, alpha, sigma)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target ``alpha_t eps - sigma_t x0``."""
        alpha, sigma = self._alpha_sigma_like(sample, timesteps)
        return x0_eps_to_model_output(sample, noise, alpha, sigma, "v_prediction")

    def previous_timestep(self, timestep) -> torch.Tensor:
        """The time the step from ``timestep`` goes to (``CLEAN`` after the last one)."""
        index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
        return torch.tensor(CLEAN) if index == len(self.timesteps) - 1 else self.timesteps[index + 1]


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _keep_strength(timesteps: np.ndarray, strength: float) -> np.ndarray:
    # img2img on a fixed list of times: keep the last int(N * strength), as LCMScheduler does for custom times.
    n = len(timesteps)
    keep = min(int(n * strength), n)
    if keep < 1:
        raise ValueError(f"strength={strength} leaves no step of {n}; raise strength or num_inference_steps")
    return np.asarray(timesteps[n - keep:], dtype=np.int64)
