"""Pure tensor math for few-step latent diffusion: no ``nn.Module``, no I/O, nothing else of ours imported.

Conventions (see ``shared/docs/METHOD.md``):

* discrete DDPM times ``t = 0 .. T-1``; ``t = -1`` (:data:`CLEAN`) is the clean end of the trajectory, where
  ``abar = 1``: diffusers' "``prev_timestep < 0`` means ``final_alpha_cumprod``" rule, with ``set_alpha_to_one``;
* ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``, ``z_t = alpha_t x0 + sigma_t eps``;
* classifier-free guidance in the LCM form ``(1 + w) cond - w uncond``; ``g = w + 1`` in the Imagen form.
"""

from tlcm.math.consistency import boundary_scalings, consistency_output
from tlcm.math.parameterization import model_output_to_x0_eps, x0_eps_to_model_output
from tlcm.math.schedule import CLEAN, alpha_sigma, alphas_cumprod_from_config, betas_from_config
from tlcm.math.solvers import (
    cfg_combine,
    ddim_step,
    dynamic_threshold,
    guidance_imagen_to_lcm,
    guidance_lcm_to_imagen,
    renoise,
)
from tlcm.math.timesteps import (
    lcm_inference_timesteps,
    linspace_inference_timesteps,
    segment_edges,
    segment_index,
    segment_inference_timesteps,
    skipping_step_grid,
    tcd_intermediate_timestep,
)

__all__ = [
    "CLEAN",
    "alpha_sigma",
    "alphas_cumprod_from_config",
    "betas_from_config",
    "boundary_scalings",
    "cfg_combine",
    "consistency_output",
    "ddim_step",
    "dynamic_threshold",
    "guidance_imagen_to_lcm",
    "guidance_lcm_to_imagen",
    "lcm_inference_timesteps",
    "linspace_inference_timesteps",
    "model_output_to_x0_eps",
    "renoise",
    "segment_edges",
    "segment_index",
    "segment_inference_timesteps",
    "skipping_step_grid",
    "tcd_intermediate_timestep",
    "x0_eps_to_model_output",
]
