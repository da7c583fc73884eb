"""The student and its teacher: a peft LoRA on the teacher's UNet (one copy of the weights), or a full UNet copy.

With a LoRA student the teacher *is* the same UNet with its adapters disabled (diffusers' LCM-LoRA SDXL script), so
memory holds the base weights once. A full fine-tune keeps three UNets: student (trained), teacher (frozen) and the
EMA target ``theta^-``.

The bag of techniques adds, when asked: the **fake score** of distribution matching, a second peft adapter named
``fake`` on the teacher's UNet (the same UNet as a LoRA student's), and the discriminator's **heads**. Which adapter
a forward uses is switched per pass with :meth:`Networks.use`; peft's switches also flip ``requires_grad`` on every
adapter (``set_adapter``, ``enable_adapters``), so after each switch :class:`Networks` re-applies the trainable set
the loop chose for the phase (:meth:`Networks.set_trainable`): exactly one part receives gradients.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tlcm.errors import TLCMError
from tlcm.train.config import LORA_TARGETS_CONV, DistillConfig
from tlcm.train.merged_lora import install_merged_forward, set_base_only
from tlcm.train.seeding import seeded_rng

ADAPTER_NAME = "default"
FAKE_ADAPTER = "fake"
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


def adapter_parameters(unet, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters of one peft adapter on ``unet`` (names ``...lora_A.<adapter>.weight``), in module order."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n]


@dataclass
class Networks:
    """Everything the loop calls. ``student`` is trainable; ``teacher_unet``/``target_unet`` may be ``student``."""

    student: torch.nn.Module
    teacher_unet: torch.nn.Module  # same object as student for LoRA (use teacher_context); hosts the fake adapter
    target_unet: torch.nn.Module | None  # EMA copy (full), or None: the student without gradient
    is_lora: bool
    lora_config: object | None = None
    fake_config: object | None = None  # the fake-score adapter's LoraConfig, when distribution matching is on
    heads: torch.nn.Module | None = None  # the discriminator heads, when the GAN is on
    _trainable: set[int] = field(default_factory=set)
    _candidates: list[torch.nn.Parameter] | None = None
    _layers: list | None = None
    _role: str = "student"
    _blocks: dict = field(default_factory=dict)

    # --- which parameters exist, and which train in the current phase ---------------------------------------------

    def student_parameters(self) -> list[torch.nn.Parameter]:
        if self.is_lora:
            return adapter_parameters(self.student, ADAPTER_NAME)
        return list(self.student.parameters())

    def fake_parameters(self) -> list[torch.nn.Parameter]:
        return adapter_parameters(self.teacher_unet, FAKE_ADAPTER) if self.fake_config is not None else []

    def head_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.heads.parameters()) if self.heads is not None else []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The student's parameters (what the consistency recipes train)."""
        return self.student_parameters()

    def parameters_changed(self) -> None:
        """Forget the cached parameter lists (after FSDP sharding replaced every ``Parameter`` object)."""
        self._candidates = None
        self._blocks.clear()

    def _all_trainable(self) -> list[torch.nn.Parameter]:
        if self._candidates is None:  # the Parameter objects never change after build_networks
            self._candidates = self.student_parameters() + self.fake_parameters() + self.head_parameters()
        return self._candidates

    def set_trainable(self, params: list[torch.nn.Parameter]) -> None:
        """Make exactly ``params`` require gradients (among the student, fake adapter and heads); kept across
        adapter switches until the next call."""
        self.set_trainable_ids({id(p) for p in params})

    def trainable_ids(self) -> frozenset[int]:
        """The current trainable set (``id`` of each parameter), to restore later with :meth:`set_trainable_ids`."""
        return frozenset(self._trainable)

    def set_trainable_ids(self, ids) -> None:
        self._trainable = set(ids)
        self._apply_trainable()

    def drop_grads(self) -> None:
        """Forget every gradient of the student, fake adapter and heads."""
        for p in self._all_trainable():
            p.grad = None

    def _apply_trainable(self, params: list[torch.nn.Parameter] | None = None) -> None:
        if not self._trainable:
            return
        for p in self._all_trainable() if params is None else params:
            p.requires_grad_(id(p) in self._trainable)

    # --- which network a forward pass is --------------------------------------------------------------------------

    def _tuner_layers(self) -> list:
        """The peft layers of the teacher's UNet, found once (diffusers' switches walk every module per call)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            self._layers = [m for m in self.teacher_unet.modules() if isinstance(m, BaseTunerLayer)]
        return self._layers

    @contextlib.contextmanager
    def use(self, role: str):
        """Yield the module to call as ``role``: ``teacher`` (adapters off), ``fake`` (the fake adapter alone) or
        ``student`` (its own adapter, the default state). The previous state is restored on exit.

        The switches are peft's own per-layer ``enable_adapters`` / ``set_adapter``, which also set
        ``requires_grad`` on the adapters; the trainable set is re-applied after each of them."""
        if role == "student":
            yield self.student
            return
        if role not in ("teacher", "fake"):
            raise ValueError(f"unknown network role {role!r}")
        assert role == "teacher" or self.fake_config is not None, "no fake-score adapter was built"
        assert self._role == "student", f"nested network roles ({self._role} inside, {role} asked)"
        self._set_role(self._tuner_layers(), role)
        self._apply_trainable()
        self._role = role
        try:
            yield self.teacher_unet
        finally:
            self._role = "student"
            self._set_role(self._tuner_layers(), "student")
            self._apply_trainable()

    def _set_role(self, layers: list, role: str) -> None:
        """Put peft ``layers`` of the teacher's UNet in the state of ``role`` (the student state: adapters on,
        the student's active)."""
        if role == "teacher":
            for layer in layers:
                if not set_base_only(layer, True):  # lora_merged layers switch without peft's requires_grad walk
                    layer.enable_adapters(False)
        elif role == "fake" and self.is_lora:
            for layer in layers:
                layer.set_adapter([FAKE_ADAPTER])
        elif role == "student":
            for layer in layers:
                set_base_only(layer, False)
                if self.is_lora and layer.active_adapters != [ADAPTER_NAME]:
                    layer.set_adapter([ADAPTER_NAME])
                if layer.disable_adapters:
                    layer.enable_adapters(True)

    # --- gradient checkpointing across roles ----------------------------------------------------------------------

    def checkpoint_function(self):
        """diffusers' ``gradient_checkpointing_func`` that remembers the role of the forward pass.

        Non-reentrant checkpointing recomputes a block's forward during ``backward``, which runs after the role
        context has closed: the recomputation would use the student's adapter where the forward used the fake one
        (or none). This function records the role at forward time and re-applies it to the block's own peft layers
        (and their ``requires_grad``) for the recomputation only.
        """
        import torch.utils.checkpoint

        def fn(module, *args):
            role = self._role

            def run(*inner):
                if self._role == role:
                    return module(*inner)
                layers, params = self._block(module)
                self._set_role(layers, role)
                self._apply_trainable(params)
                try:
                    return module(*inner)
                finally:
                    self._set_role(layers, self._role)
                    self._apply_trainable(params)

            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

        return fn

    def _block(self, module) -> tuple[list, list[torch.nn.Parameter]]:
        key = id(module)
        if key not in self._blocks:
            from peft.tuners.tuners_utils import BaseTunerLayer

            candidates = {id(p) for p in self._all_trainable()}
            self._blocks[key] = ([m for m in module.modules() if isinstance(m, BaseTunerLayer)],
                                 [p for p in module.parameters() if id(p) in candidates])
        return self._blocks[key]

    @contextlib.contextmanager
    def teacher_context(self, unwrapped_student=None):
        """Run the teacher: with LoRA, the adapters are switched off for the duration."""
        with self.use("teacher") as unet:
            yield unet


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


def needs_fake_score(cfg: DistillConfig) -> bool:
    return cfg.dmd_weight > 0 or (cfg.gan_weight > 0 and cfg.gan_backbone == "fake")


def add_fake_adapter(unet, cfg: DistillConfig, student_lora_config=None) -> object:
    """The fake-score model: a LoRA adapter named ``fake`` on the teacher's UNet, on the student's target modules.

    Its B matrices start at zero (peft's ``gaussian`` init), so it starts as the teacher, as DMD2's fake UNet does;
    its A matrices come from ``(cfg.seed, "fake-adapter")`` (:func:`tlcm.train.seeding.seeded_rng`), so equal configs
    build equal adapters.
    """
    from peft import LoraConfig

    rank = cfg.fake_lora_rank or (int(student_lora_config.r) if student_lora_config is not None else cfg.lora_rank)
    targets = (sorted(student_lora_config.target_modules) if student_lora_config is not None
               else resolve_target_modules(unet, cfg))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian")
    with seeded_rng(cfg.seed, "fake-adapter"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # a second adapter, on purpose
        unet.add_adapter(config, adapter_name=FAKE_ADAPTER)
    return config


def build_networks(unet, cfg: DistillConfig, weight_dtype: torch.dtype = torch.float32) -> Networks:
    """Freeze the teacher, inject the LoRA (or copy the UNet), set up the target network; add the fake-score adapter
    and the discriminator heads when the config's techniques need them.

    Every random initialisation follows ``cfg.seed`` and leaves the global RNG untouched (equal configs, equal
    bytes): each part draws from :func:`tlcm.train.seeding.seeded_rng` with its own purpose (``lora-init``,
    ``guidance-embedding``, ``fake-adapter``, ``discriminator-heads``)."""
    nets = _build_student(unet, cfg, weight_dtype)
    if needs_fake_score(cfg):
        nets.fake_config = add_fake_adapter(nets.teacher_unet, cfg, nets.lora_config)
        if nets.is_lora:
            nets.teacher_unet.set_adapter(ADAPTER_NAME)
        elif weight_dtype != torch.float32:
            for name, p in nets.teacher_unet.named_parameters():
                if "lora_" not in name:
                    p.data = p.data.to(weight_dtype)
    if cfg.gan_weight > 0:
        from tlcm.train.discriminator import build_heads

        nets.heads = build_heads(nets.teacher_unet, cfg.gan_features, seed=cfg.seed)
    if nets.fake_config is not None or nets.heads is not None:
        nets.set_trainable(nets.student_parameters())
    if cfg.lora_merged and nets.is_lora:  # after the fake adapter: it is merged too
        install_merged_forward(nets.teacher_unet)
    return nets


def _build_student(unet, cfg: DistillConfig, weight_dtype: torch.dtype) -> Networks:
    unet.requires_grad_(False)
    wants_embed = cfg.guidance_embedding
    has_embed = getattr(unet.config, "time_cond_proj_dim", None) is not None
    if cfg.student == "lora":
        if wants_embed and not has_embed:
            raise TLCMError("guidance_embedding needs a UNet with time_cond_proj_dim, and a LoRA cannot add one",
                            "use student=full for LCM with a guidance embedding, or guidance_embedding=false")
        if cfg.init_lora:
            with seeded_rng(cfg.seed, "lora-init"):  # peft draws an init (then overwritten) from the global RNG
                config = load_adapter_into(unet, Path(cfg.init_lora) / "adapter")
            # the resolved config records the adapter actually trained (the stage-1 one's shape)
            cfg.lora_rank, cfg.lora_alpha = int(config.r), float(config.lora_alpha)
            cfg.lora_target_modules, cfg.lora_conv = sorted(config.target_modules), False
        else:
            config = lora_config_from(cfg, unet)
            with seeded_rng(cfg.seed, "lora-init"):  # peft's init draws from the global RNG
                unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
        nets = Networks(unet, unet, None, True, config)
        if cfg.gradient_checkpointing:  # the teacher, student and fake score share this UNet: role-aware recompute
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=nets.checkpoint_function())
        return nets

    if wants_embed and not has_embed:
        from diffusers import UNet2DConditionModel

        with seeded_rng(cfg.seed, "guidance-embedding"):  # the new cond_proj layer's init
            student = UNet2DConditionModel.from_config({**dict(unet.config), "time_cond_proj_dim": GUIDANCE_EMBED_DIM})
        missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), missing
        student = student.to(torch.float32)
    else:
        student = copy.deepcopy(unet).to(torch.float32)
    teacher = unet if needs_fake_score(cfg) else unet.to(dtype=weight_dtype)  # cast after the fake adapter joins
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


def lora_state_dict(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """One adapter's weights in peft's naming (no adapter name, no ``base_model.model.`` prefix).

    The one function through which adapter weights leave the model (export and checkpoints). On a UNet sharded by
    FSDP it gathers each weight whole: a collective, which every process must call."""
    from peft import get_peft_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().contiguous()
            for k, v in state.items()}


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
