"""tlcm: data-free few-step distillation (TLCM, LCM-LoRA) of latent diffusion models."""

__version__ = "0.1.0"

from tlcm import _quiet  # noqa: E402
from tlcm.errors import TLCMError  # noqa: E402

_quiet.install()  # two irrelevant third-party log lines (see tlcm/_quiet.py)

__all__ = ["TLCMError", "TLCMScheduler", "__version__"]


def __getattr__(name):  # lazy: `import tlcm` stays light; `from tlcm import TLCMScheduler` imports diffusers
    if name == "TLCMScheduler":
        from tlcm.scheduler import TLCMScheduler

        return TLCMScheduler
    raise AttributeError(f"module 'tlcm' has no attribute {name!r}")
