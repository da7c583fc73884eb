"""The student and its teacher: a peft LoRA on the teacher's UNet (one copy of the weights), or a full UNet copy.

With a LoRA student the teacher *is* the same UNet with its adapters disabled (diffusers' LCM-LoRA SDXL script), so
memory holds the base weights once. A full fine-tune keeps three UNets: student (trained), teacher (frozen) and the
EMA target ``theta^-``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tlcm.errors import TLCMError
from tlcm.train.config import LORA_TARGETS_CONV, DistillConfig
from tlcm.train.identity import seeded_rng

ADAPTER_NAME = "default"
GUIDANCE_EMBED_DIM = 256  # LCM-Dreamshaper's time_cond_proj_dim


def _module_names(unet) -> list[str]:
    return [name for name, _ in unet.named_modules()]


def _matches(name: str, key: str) -> bool:
    # peft's rule for a string key: the full name, or a suffix starting at a '.' boundary
    return name == key or name.endswith("." + key)


def resolve_target_modules(unet, cfg: DistillConfig) -> list[str]:
    """The configured LoRA targets, each checked against the UNet; conv defaults absent from it are dropped."""
    names = _module_names(unet)
    explicit = list(cfg.lora_target_modules)
    for key in explicit:
        if not any(_matches(n, key) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise TLCMError(
                f"LoRA target module {key!r} matches no layer of the teacher UNet",
                f"use names that exist in the UNet, e.g. to_q, to_k, to_v, to_out.0, ff.net.2 (leaf names: "
                f"{', '.join(leaves[:30])}...)",
            )
    if cfg.lora_conv:
        explicit += [k for k in LORA_TARGETS_CONV if k not in explicit and any(_matches(n, k) for n in names)]
    return explicit


@dataclass
class Networks:
    """Everything the loop calls. ``student`` is trainable; ``teacher_unet``/``target_unet`` may be ``student``."""

    student: torch.nn.Module
    teacher_unet: torch.nn.Module  # same object as student for LoRA (use teacher_context)
    target_unet: torch.nn.Module | None  # EMA copy (full), or None: the student without gradient
    is_lora: bool
    lora_config: object | None = None

    @contextlib.contextmanager
    def teacher_context(self, unwrapped_student):
        """Run the teacher: with LoRA, the adapters are switched off for the duration."""
        if self.is_lora:
            unwrapped_student.disable_adapters()
            try:
                yield unwrapped_student
            finally:
                unwrapped_student.enable_adapters()
        else:
            yield self.teacher_unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]


def lora_config_from(cfg: DistillConfig, unet):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=resolve_target_modules(unet, cfg),
        init_lora_weights="gaussian",
    )


def load_adapter_into(unet, adapter_dir: str | Path) -> object:
    """Add the peft adapter saved in ``adapter_dir`` (our ``adapter/`` folder) to ``unet`` and load its weights."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise TLCMError(f"adapter in {adapter_dir} has {len(unexpected)} keys this UNet lacks ({unexpected[0]}, ...)",
                        "start from an adapter trained on the same base model")
    return config


def build_networks(unet, cfg: DistillConfig, weight_dtype: torch.dtype = torch.float32) -> Networks:
    """Freeze the teacher, inject the LoRA (or copy the UNet), set up the target network."""
    unet.requires_grad_(False)
    wants_embed = cfg.guidance_embedding
    has_embed = getattr(unet.config, "time_cond_proj_dim", None) is not None
    if cfg.student == "lora":
        if wants_embed and not has_embed:
            raise TLCMError("guidance_embedding needs a UNet with time_cond_proj_dim, and a LoRA cannot add one",
                            "use student=full for LCM with a guidance embedding, or guidance_embedding=false")
        if cfg.init_lora:
            config = load_adapter_into(unet, Path(cfg.init_lora) / "adapter")
            # the resolved config records the adapter actually trained (the stage-1 one's shape)
            cfg.lora_rank, cfg.lora_alpha = int(config.r), float(config.lora_alpha)
            cfg.lora_target_modules, cfg.lora_conv = sorted(config.target_modules), False
        else:
            config = lora_config_from(cfg, unet)
            with seeded_rng(cfg.seed, "lora-init"):  # [identity] peft's gaussian init draws from the global RNG
                unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        return Networks(unet, unet, None, True, config)

    if wants_embed and not has_embed:
        from diffusers import UNet2DConditionModel

        with seeded_rng(cfg.seed, "guidance-embedding"):  # [identity] the new cond_proj layer's init
            student = UNet2DConditionModel.from_config({**dict(unet.config), "time_cond_proj_dim": GUIDANCE_EMBED_DIM})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), missing
        student = student.to(torch.float32)
    else:
        student = copy.deepcopy(unet).to(torch.float32)
    teacher = unet.to(dtype=weight_dtype)
    teacher.eval()
    student.requires_grad_(True)
    student.train()
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    target = copy.deepcopy(student)
    target.requires_grad_(False)
    target.eval()
    return Networks(student, teacher, target, False, None)


class EMA:
    """Exponential moving average ``target <- decay * target + (1 - decay) * student`` over matching parameters."""

    def __init__(self, target: torch.nn.Module, decay: float):
        self.target = target
        self.decay = decay

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> None:
        for t, s in zip(self.target.parameters(), student.parameters()):
            t.lerp_(s.detach().to(t.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "target": self.target.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.target.load_state_dict(state["target"])


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming (no adapter name, no ``base_model.model.`` prefix)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def save_peft_adapter(unet, lora_config, path: str | Path) -> Path:
    """A folder that ``peft.PeftModel.from_pretrained(unet, path)`` loads: adapter_config.json + weights."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(path))
    cfg_file = path / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    data["target_modules"] = sorted(data["target_modules"]) if isinstance(data["target_modules"], list) else \
        data["target_modules"]
    cfg_file.write_text(json.dumps(data, indent=2))
    state = {f"base_model.model.{k}": v for k, v in lora_state_dict(unet).items()}
    save_file(state, str(path / "adapter_model.safetensors"))
    return path
