"""tlcm: data-free few-step distillation (TLCM, LCM-LoRA) of latent diffusion models."""

__version__ = "0.1.0"

from tlcm.errors import TLCMError  # noqa: E402

__all__ = ["TLCMError", "__version__"]
