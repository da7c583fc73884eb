"""One config for every distillation recipe: a dataclass, YAML presets, CLI ``key=value`` overrides, validation.

Resolution order (later wins): dataclass defaults -> ``--preset NAME`` (``src/tlcm/configs/NAME.yaml``) ->
``--config FILE.yaml`` -> explicit flags (``--recipe``, ``--teacher``, ...) -> ``--set key=value``. The resolved config
is written as ``config.yaml`` next to every run's outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tlcm.errors import TLCMError

RECIPES = ("lcm", "mlcd", "tlcm")
STATE_SOURCES = ("forward_noise", "teacher_path", "trajectory")

# LCM-LoRA's targets (diffusers' consistency-distillation LoRA scripts): attention and feed-forward projections ...
LORA_TARGETS_LCM = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# ... plus, with ``lora_conv``, the resnet convolutions and time-embedding projections (the released LoRAs' set).
LORA_TARGETS_CONV = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class DistillConfig:
    # what to distil, from what, to where
    recipe: str = "lcm"  # lcm | mlcd | tlcm
    teacher: str = ""  # hub id, diffusers folder, or "toy"
    data: str = ""  # shards folder written by `tlcm synthesize`
    output_dir: str = ""
    seed: int = 0
    device: str = "auto"

    # student
    student: str = "lora"  # lora | full
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS_LCM))
    lora_conv: bool = True  # add LORA_TARGETS_CONV to the targets
    init_lora: str = ""  # a previous run's output dir (its adapter/) to start the student from; required for tlcm
    gradient_checkpointing: bool = False
    # LoRA student: its layers compute (W + s B A) x instead of W x + s B A x (tlcm.train.merged_lora): every pass
    # without the adapter's gradient, and the training pass in the layers where that is fewer multiply-adds. The same
    # function, other float rounding (not bit-identical to the default); pays when the rank is large next to the
    # layer widths (the toy presets turn it on; docs/distill.md); no effect on a full student
    lora_merged: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 needs CUDA)
    guidance_embedding: bool = False  # full LCM: embed w into timestep_cond (needs a UNet with time_cond_proj_dim)

    # optimisation
    max_steps: int = 1000
    batch_size: int = 8  # per process
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # any diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay: float = 0.95  # target network theta^- for a full fine-tune; a LoRA student uses itself (no grad)

    # consistency distillation
    num_ddim_timesteps: int = 50  # skipping-step grid (k = T / this)
    w_min: float = 5.0  # LCM guidance w ~ U[w_min, w_max]; CFG is (1 + w) cond - w uncond
    w_max: float = 15.0
    loss_type: str = "huber"  # huber | l2
    huber_c: float = 1e-3
    boundary_condition: str = "lcm"  # lcm (c_skip/c_out) | none (plain x0)
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    num_segments: int = 4  # mlcd / tlcm
    # auto: diffusers' rule, as the synthesizer applies it (SDXL with force_zeros_for_empty_prompt: zeros for an empty
    # negative prompt; otherwise the encoded negative prompt, "" by default) | prompt (always the encoded negative
    # prompt) | zeros (diffusers' LCM scripts)
    uncond: str = "auto"

    # CFG-preserving students (tlcm.train.conditioning): small teacher guidance (w_min/w_max) plus prompt dropout, so
    # the unconditional branch is distilled too and CFG with a negative prompt works at sampling_guidance_scale > 1
    cfg_preserving: bool = False
    prompt_dropout: float = 0.0  # share of rows conditioned on their negative prompt instead of their prompt

    # TLCM stage 2
    stage2_source: str = "student"  # student (own multistep samples, the paper) | data (synthetic shard latents)
    stage2_sample_steps: int = 4
    stage2_substeps: int = 3
    stage2_times: str = "grid"  # grid (any skipping-grid time, span = one segment) | edges (segment boundaries only)

    # where stage-1 training states come from (lcm / mlcd): forward_noise (the synthetic x0 noised to t, as LCM) |
    # teacher_path (the teacher's own DDIM+CFG walk from pure noise down to t, the TLCM paper's "multistep denoising
    # strategy", one more teacher step per segment below the top) | trajectory (states stored by `tlcm synthesize
    # --trajectory K1,K2,...`, at the solver's times)
    state_source: str = "forward_noise"
    teacher_path_segments: int = 0  # edges the teacher walks on its path; 0: num_segments

    # the bag of techniques: weights on the student's loss (0 switches a term off; see docs/distill.md)
    consistency_weight: float = 1.0  # the recipe's consistency loss
    student_sample_steps: list[int] = field(default_factory=lambda: [1])  # step counts of the student outputs that
    # DMD and the GAN judge: one count drawn per step, walked with gradient on its last step (backward simulation)
    student_update_every: int = 1  # two time-scale rule: the fake score / discriminator update K times per student

    # distribution matching (DMD2): real score = teacher with CFG, fake score = a second LoRA trained by denoising
    dmd_weight: float = 0.0
    dmd_guidance_scale: float = 0.0  # real score's CFG, diffusers' form g (w = g - 1); 0: w ~ U[w_min, w_max]
    dmd_t_min: int = 20  # DMD2's 0.02 T .. 0.98 T
    dmd_t_max: int = 980
    fake_learning_rate: float = 0.0  # 0: learning_rate
    fake_lora_rank: int = 0  # 0: the student's rank

    # adversarial: heads on the teacher's (or the fake score's) encoder/mid features at a re-noised latent
    gan_weight: float = 0.0  # weight of the generator term on the student's loss
    gan_loss: str = "ns"  # ns (non-saturating, DMD2) | hinge
    gan_backbone: str = "teacher"  # teacher (frozen; heads only) | fake (the fake-score adapter trains with D, DMD2)
    gan_features: str = "down+mid"  # down+mid (a head on each down block and the mid block) | mid
    gan_real: str = "student"  # student (its gan_real_steps output, the paper) | data (training or gan_real_data)
    gan_real_steps: int = 4
    gan_real_data: str = ""  # shards folder of "real" latents (e.g. `tlcm encode-images`); "": the training data
    gan_t_min: int = 0  # the latents D judges are re-noised to t ~ U[gan_t_min, gan_t_max]
    gan_t_max: int = 999
    gan_disc_weight: float = 1.0  # weight of the discriminator's loss (on the fake score's loss with backbone fake)
    disc_learning_rate: float = 1e-4  # the paper: D 1e-4, G 1e-5

    # DMD's regression on the teacher's own (initial noise, latent) pairs of synthesised shards: the student's 1-step
    # output from a record's noise (drawn again from its seed) vs the record's latent (tlcm.losses.regression)
    regression_weight: float = 0.0

    # preference learning: a differentiable reward on the decoded student output at the low-noise end
    reward_model: str = ""  # spec for tlcm.losses.reward.load_reward: toy | clip:PATH | pickscore:PATH | aesthetic:W
    reward_weight: float = 0.0
    reward_kind: str = "plain"  # plain (-R) | hinge (the paper: margin, plus a hinge on a mismatched prompt)
    reward_margin: float = 0.0  # the hinge's margin in the reward's units; 0: the reward's default_margin (toy)
    reward_mismatch_margin: float = 0.0  # how much more an image must score with its own prompt than another one
    reward_sample_steps: list[int] = field(default_factory=lambda: [4])  # the student walks one of these step
    # counts (drawn per step); the reward sees the x0 of its last, lowest-noise step (gradient through that step only)

    # latent perceptual distance (loss_type: lpips) with weights the user supplies
    lpips_weights: str = ""

    # extra losses (user-registered terms): {name: weight}
    extra_losses: dict[str, float] = field(default_factory=dict)
    extra_loss_modules: list[str] = field(default_factory=list)

    # bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: int = 3
    logging_steps: int = 10
    validation_steps: int = 0  # 0: only at the end
    validation_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    validation_num_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    profile_steps: int = 0  # >0: profile that many steps after the first (train_summary.json step_profile)
    resolution: int = 0  # 0: the shards' size, else the teacher's own (train/resolution.py; SDXL time ids, validation)
    allow_teacher_mismatch: bool = False  # train on shards of another teacher / latent size / VAE scaling (warned)

    # what the output folder recommends to samplers
    sampling_guidance_scale: float = 1.0  # diffusers' guidance_scale (Imagen form); <= 1 means no CFG at inference
    sampling_steps: int = 4
    timestep_grid: str = "lcm"  # lcm (999, 759, 499, 259) | linspace (999, 749, 499, 249 ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # derived values
    @property
    def skip(self) -> int:
        return 1000 // self.num_ddim_timesteps

    def target_modules(self) -> list[str]:
        mods = list(self.lora_target_modules)
        if self.lora_conv:
            mods += [m for m in LORA_TARGETS_CONV if m not in mods]
        return mods


_FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}

# String settings that take one of a few values.
CHOICES = {
    "recipe": RECIPES, "student": ("lora", "full"), "mixed_precision": ("no", "bf16", "fp16"),
    "loss_type": ("huber", "l2", "lpips"), "boundary_condition": ("lcm", "none"), "stage2_source": ("student", "data"),
    "stage2_times": ("grid", "edges"), "timestep_grid": ("lcm", "linspace"), "uncond": ("auto", "prompt", "zeros"),
    "state_source": STATE_SOURCES, "gan_loss": ("ns", "hinge"), "gan_backbone": ("teacher", "fake"),
    "gan_features": ("down+mid", "mid"), "gan_real": ("student", "data"), "reward_kind": ("plain", "hinge"),
}
# YAML 1.1 reads these words as booleans; where a string choice is meant, map the boolean back to the choice.
_YAML_FALSE, _YAML_TRUE = ("no", "off", "false"), ("yes", "on", "true")


def preset_names() -> list[str]:
    root = resources.files("tlcm") / "configs"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> Path:
    root = resources.files("tlcm") / "configs"
    path = root / f"{name}.yaml"
    if not path.is_file():
        chains = root / "chains"
        chain_list = sorted(p.name[:-5] for p in chains.iterdir() if p.name.endswith(".yaml")) \
            if chains.is_dir() else []
        raise TLCMError(f"unknown preset {name!r}", f"use one of: {', '.join(preset_names() + chain_list)}")
    return Path(str(path))


def _coerce(key: str, value: Any, default: Any) -> Any:
    def bad(expected: str) -> TLCMError:
        return TLCMError(f"config key {key!r} expects {expected}, got {value!r}", f"fix the value of {key}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise bad("an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads no/yes/on/off as booleans: `mixed_precision: no` is False
            words = [w for w in (_YAML_TRUE if value else _YAML_FALSE) if w in CHOICES.get(key, ())]
            if words:
                return words[0]
            raise TLCMError(f"config key {key!r} expects a string, but YAML read {value!r} as a boolean",
                            f"quote the value in YAML, e.g. {key}: 'no'")
        if not isinstance(value, (str, int, float)):
            raise bad("a string")
        return str(value)
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if default and all(isinstance(d, int) for d in default):  # e.g. step counts: "1,2,4" -> [1, 2, 4]
            try:
                return [int(v) for v in value]
            except (TypeError, ValueError):
                raise bad("a list of integers") from None
        return list(value)
    if isinstance(default, dict):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): float(v) for k, v in value.items()}
    return value


def _unknown_key(key: str) -> TLCMError:
    close = difflib.get_close_matches(key, list(_FIELDS), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(_FIELDS)}"
    return TLCMError(f"unknown config key {key!r}", hint)


def apply_mapping(cfg: DistillConfig, mapping: dict[str, Any], source: str = "config") -> DistillConfig:
    """Set fields from a (YAML-loaded) mapping, coercing types; unknown keys are errors."""
    if not isinstance(mapping, dict):
        raise TLCMError(f"{source} must be a YAML mapping of config keys", "write `key: value` lines")
    for key, value in mapping.items():
        if key not in _FIELDS:
            raise _unknown_key(key)
        setattr(cfg, key, _coerce(key, value, _default(key)))
    return cfg


def _default(key: str) -> Any:
    f = _FIELDS[key]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def apply_overrides(cfg: DistillConfig, overrides: list[str]) -> DistillConfig:
    """``key=value`` strings (values parsed as YAML); ``extra_losses.NAME=W`` sets one entry of a mapping."""
    for item in overrides:
        if "=" not in item:
            raise TLCMError(f"override {item!r} is not key=value", "write e.g. --set learning_rate=1e-5")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and raw.strip() and _is_number(raw.strip()):
            value = float(raw)  # YAML reads "1e-5" as a string
        if key in _FIELDS and isinstance(_default(key), str) and isinstance(value, (bool, int, float)):
            value = raw.strip()  # a string setting: `--set mixed_precision=no` means "no", not YAML's False
        if "." in key and key.split(".", 1)[0] in _FIELDS and isinstance(_default(key.split(".", 1)[0]), dict):
            head, sub = key.split(".", 1)
            current = dict(getattr(cfg, head))
            current[sub] = value
            setattr(cfg, head, _coerce(head, current, {}))
            continue
        if key not in _FIELDS:
            raise _unknown_key(key)
        setattr(cfg, key, _coerce(key, value, _default(key)))
    return cfg


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TLCMError(f"config file {str(p)!r} does not exist", "pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise TLCMError(f"config file {str(p)!r} is not valid YAML: {err}", "fix the YAML syntax") from err
    return data


def resolve_config(
    preset: str | None = None,
    config_file: str | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> DistillConfig:
    """Build a config from the layers above (does not validate: call :func:`validate_config`)."""
    cfg = DistillConfig()
    if preset:
        apply_mapping(cfg, load_yaml(preset_path(preset)), f"preset {preset}")
    if config_file:
        apply_mapping(cfg, load_yaml(config_file), config_file)
    if flags:
        apply_mapping(cfg, {k: v for k, v in flags.items() if v is not None}, "command-line flags")
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def _choice(cfg: DistillConfig, key: str, options: tuple[str, ...]) -> None:
    if getattr(cfg, key) not in options:
        raise TLCMError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(options)}", f"set {key} to one of those")


def validate_config(cfg: DistillConfig, need_data: bool = True, need_output: bool = True,
                    check_init: bool = True) -> DistillConfig:
    """Check everything that can be checked without loading a model; raise :class:`TLCMError` with the fix.

    ``check_init=False`` skips the checks on ``init_lora`` (a chain validates later phases before the earlier ones
    have written the adapter they start from).
    """
    for key, options in CHOICES.items():
        _choice(cfg, key, options)
    for key in _FIELDS:  # nan passes every comparison below, so finiteness is checked first
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise TLCMError(f"{key}={value} is not a finite number", f"set {key} to a finite value")
        if isinstance(value, dict):
            bad = [k for k, v in value.items() if not math.isfinite(float(v))]
            if bad:
                raise TLCMError(f"{key}: weight of {bad[0]!r} is not finite", f"give {key} finite weights")
    for key in ("sigma_data", "timestep_scaling", "huber_c", "adam_epsilon"):
        if getattr(cfg, key) <= 0:
            raise TLCMError(f"{key}={getattr(cfg, key)} must be positive",
                            f"set {key} > 0 (default {_default(key)})")
    if cfg.max_grad_norm < 0:
        raise TLCMError(f"max_grad_norm={cfg.max_grad_norm} is negative", "use 0 (no clipping) or a positive norm")
    if cfg.device != "auto":
        from tlcm.models import resolve_device

        resolve_device(cfg.device)  # unknown or unavailable: a clear error here, not a silent CPU run
    if not cfg.teacher:
        raise TLCMError("no teacher given", "pass --teacher MODEL (a hub id, a diffusers folder, or 'toy')")
    if need_output and not cfg.output_dir:
        raise TLCMError("no output directory given", "pass --output-dir DIR")
    if need_data:
        if not cfg.data:
            raise TLCMError("no training data given", "pass --data SHARDS (a folder written by `tlcm synthesize`)")
        if not Path(cfg.data).exists():
            raise TLCMError(f"data folder {cfg.data!r} does not exist",
                            "run `tlcm synthesize --teacher T --prompts P --out SHARDS` first and pass that folder")
        from tlcm.data import read_manifest

        read_manifest(cfg.data, require_complete=True)  # raises TLCMError naming what is missing
    if cfg.student == "lora":
        if cfg.lora_rank < 1:
            raise TLCMError(f"lora_rank={cfg.lora_rank} gives an empty adapter", "set lora_rank to 1 or more (LCM: 64)")
        if cfg.lora_alpha <= 0:
            raise TLCMError(f"lora_alpha={cfg.lora_alpha} must be positive", "set lora_alpha (LCM-LoRA: = rank)")
        if not cfg.target_modules():
            raise TLCMError("no LoRA target modules", "set lora_target_modules or lora_conv=true")
    if not 1 <= cfg.num_ddim_timesteps <= 1000 or 1000 % cfg.num_ddim_timesteps:
        raise TLCMError(f"num_ddim_timesteps={cfg.num_ddim_timesteps} must divide 1000",
                        "use 50 (LCM), 25, 20, 100, ...")
    if cfg.recipe in ("mlcd", "tlcm") and not 1 <= cfg.num_segments <= cfg.num_ddim_timesteps:
        raise TLCMError(
            f"num_segments={cfg.num_segments} exceeds the {cfg.num_ddim_timesteps} points of the skipping-step grid",
            f"use 1..{cfg.num_ddim_timesteps} segments (TLCM: 4 or 8) or raise num_ddim_timesteps")
    if cfg.w_min < 0 or cfg.w_max < cfg.w_min:
        raise TLCMError(f"guidance range w in [{cfg.w_min}, {cfg.w_max}] is invalid", "need 0 <= w_min <= w_max")
    if not 0.0 <= cfg.prompt_dropout < 1.0:
        raise TLCMError(f"prompt_dropout={cfg.prompt_dropout} must be in [0, 1)", "use e.g. prompt_dropout=0.15")
    if cfg.cfg_preserving:
        if cfg.prompt_dropout <= 0:
            raise TLCMError("cfg_preserving needs prompt_dropout > 0: without it the student never learns the "
                            "unconditional branch that CFG subtracts", "set e.g. prompt_dropout=0.15")
        if cfg.sampling_guidance_scale <= 1:
            raise TLCMError(f"cfg_preserving students sample with CFG, but sampling_guidance_scale="
                            f"{cfg.sampling_guidance_scale} turns it off", "set e.g. sampling_guidance_scale=2.5")
        if cfg.guidance_embedding:
            raise TLCMError("cfg_preserving and guidance_embedding exclude each other: a guidance embedding replaces "
                            "CFG at inference", "drop one of them")
    for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpoints_total_limit",
                "stage2_sample_steps", "stage2_substeps", "sampling_steps", "logging_steps"):
        if getattr(cfg, key) < 1:
            raise TLCMError(f"{key}={getattr(cfg, key)} must be at least 1", f"set {key} to a positive integer")
    if cfg.learning_rate <= 0:
        raise TLCMError(f"learning_rate={cfg.learning_rate} must be positive", "set e.g. learning_rate=1e-4")
    if cfg.lora_merged and cfg.mixed_precision != "no":
        raise TLCMError(f"lora_merged with mixed_precision={cfg.mixed_precision}: merging a LoRA into "
                        "low-precision base weights rounds most of its update away",
                        "use mixed_precision=no with it, or set lora_merged=false")
    if cfg.profile_steps < 0:
        raise TLCMError(f"profile_steps={cfg.profile_steps} must not be negative",
                        "set profile_steps=0 (off) or the number of steps to profile, e.g. 4")
    if not 0 <= cfg.ema_decay < 1:
        raise TLCMError(f"ema_decay={cfg.ema_decay} must be in [0, 1)", "LCM uses 0.95")
    if any(n < 1 or n > cfg.num_ddim_timesteps for n in cfg.validation_num_steps):
        raise TLCMError(f"validation_num_steps={cfg.validation_num_steps} must lie in 1..{cfg.num_ddim_timesteps}",
                        "use e.g. [1, 2, 4, 8]")
    if cfg.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise TLCMError("mixed_precision=fp16 needs a CUDA device", "use bf16 or no on CPU")
    if check_init and cfg.recipe == "tlcm" and not cfg.init_lora and cfg.student == "lora":
        raise TLCMError("recipe tlcm (stage 2) starts from a stage-1 student, but init_lora is empty",
                        "run `tlcm distill --recipe mlcd ...` first and pass --set init_lora=THAT_OUTPUT_DIR")
    if check_init and cfg.init_lora and not (Path(cfg.init_lora) / "adapter" / "adapter_config.json").exists():
        raise TLCMError(f"init_lora {cfg.init_lora!r} holds no adapter/adapter_config.json",
                        "pass the --output-dir of a finished LoRA distillation run")
    if cfg.init_lora and cfg.student != "lora":
        raise TLCMError("init_lora only applies to a LoRA student", "set student=lora or clear init_lora")
    _validate_techniques(cfg, need_data)
    import importlib

    for mod in cfg.extra_loss_modules:
        try:
            importlib.import_module(mod)
        except ImportError as err:
            raise TLCMError(f"extra_loss_modules: cannot import {mod!r}: {err}", "fix the module name") from err
    from tlcm.losses import get_loss

    for name in cfg.extra_losses:
        get_loss(name)
    return cfg


def _check_regression_pairs(cfg: DistillConfig) -> None:
    """regression_weight needs exact (noise, latent) pairs: shards of `tlcm synthesize`, at the student's guidance."""
    from tlcm.data import read_manifest

    manifest = read_manifest(cfg.data)
    if manifest.get("source", "synthesize") != "synthesize":
        raise TLCMError(f"regression_weight > 0, but {cfg.data} holds encoded images: they have no initial noise that "
                        "the teacher turned into them", "train the regression on shards from `tlcm synthesize` (or "
                        "set regression_weight=0)")
    g = (manifest.get("generation") or {}).get("guidance_scale")
    if g is None or cfg.guidance_embedding:
        return
    w = max(float(g) - 1.0, 0.0)  # the shards' diffusers CFG g is LCM's w = g - 1
    if not (cfg.w_min == cfg.w_max and abs(cfg.w_min - w) < 1e-6):
        raise TLCMError(f"regression_weight > 0: the pairs in {cfg.data} were solved at guidance {float(g):g} "
                        f"(w = {w:g} in the LCM form), but this student trains at w in [{cfg.w_min:g}, {cfg.w_max:g}] "
                        "without a guidance embedding, so its one-step map would be pulled to another guidance",
                        f"set w_min=w_max={w:g}, or synthesize the pairs at guidance {cfg.w_min + 1:g}")


def _validate_techniques(cfg: DistillConfig, need_data: bool) -> None:
    """The bag of techniques and the state source: ranges, combinations, and what each one needs."""
    for key in ("consistency_weight", "dmd_weight", "gan_weight", "reward_weight", "regression_weight",
                "dmd_guidance_scale",
                "fake_learning_rate", "disc_learning_rate", "gan_disc_weight", "reward_mismatch_margin"):
        if getattr(cfg, key) < 0:
            raise TLCMError(f"{key}={getattr(cfg, key)} must not be negative", f"set {key} to 0 or more")
    terms = ("consistency_weight", "dmd_weight", "gan_weight", "reward_weight", "regression_weight")
    if all(getattr(cfg, k) == 0 for k in terms) and not any(cfg.extra_losses.values()):
        raise TLCMError("every loss term has weight 0: the student would not learn",
                        f"set at least one of {', '.join(terms)} above 0")
    for key in ("student_update_every", "gan_real_steps", "teacher_path_segments", "fake_lora_rank"):
        if getattr(cfg, key) < (0 if key in ("teacher_path_segments", "fake_lora_rank") else 1):
            raise TLCMError(f"{key}={getattr(cfg, key)} is out of range", f"set {key} to a positive integer")
    steps = [*cfg.student_sample_steps, cfg.gan_real_steps, *cfg.reward_sample_steps]
    if not cfg.student_sample_steps or not cfg.reward_sample_steps or \
            any(not 1 <= n <= cfg.num_ddim_timesteps for n in steps):
        raise TLCMError(f"student step counts {steps} (student_sample_steps, gan_real_steps, reward_sample_steps) "
                        f"must lie in 1..{cfg.num_ddim_timesteps}", "use e.g. student_sample_steps=[1,2,4]")
    for lo, hi in (("dmd_t_min", "dmd_t_max"), ("gan_t_min", "gan_t_max")):
        if not 0 <= getattr(cfg, lo) <= getattr(cfg, hi) <= 999:
            raise TLCMError(f"{lo}={getattr(cfg, lo)}, {hi}={getattr(cfg, hi)} must satisfy 0 <= {lo} <= {hi} <= 999",
                            "DMD2 uses 20..980 for DMD and 0..999 for the GAN")
    if cfg.state_source != "forward_noise" and cfg.recipe == "tlcm":
        raise TLCMError(f"state_source={cfg.state_source} applies to stage 1 (lcm, mlcd); stage 2 has stage2_source",
                        "set state_source=forward_noise for recipe tlcm")
    if cfg.teacher_path_segments > cfg.num_ddim_timesteps:
        raise TLCMError(f"teacher_path_segments={cfg.teacher_path_segments} exceeds the skipping grid",
                        f"use 0..{cfg.num_ddim_timesteps}")
    if cfg.state_source == "trajectory" and need_data and cfg.data:
        from tlcm.data import read_manifest

        stored = (read_manifest(cfg.data).get("generation") or {}).get("trajectory_steps") or []
        if not stored:
            raise TLCMError(f"state_source=trajectory, but the shards in {cfg.data} store no trajectory points",
                            "re-synthesize with `tlcm synthesize --trajectory 5,10,15,20 ...`, or use "
                            "state_source=teacher_path (the teacher walks on the fly)")
    if cfg.gan_weight > 0 and cfg.gan_real == "data" and cfg.gan_real_data and need_data:
        if not Path(cfg.gan_real_data).exists():
            raise TLCMError(f"gan_real_data folder {cfg.gan_real_data!r} does not exist",
                            "pass a shards folder written by `tlcm encode-images` or `tlcm synthesize`")
        from tlcm.data import read_manifest

        read_manifest(cfg.gan_real_data, require_complete=True)
    if cfg.regression_weight > 0 and need_data and cfg.data:
        _check_regression_pairs(cfg)
    if cfg.reward_weight > 0 and not cfg.reward_model:
        raise TLCMError("reward_weight > 0 but no reward_model is set",
                        "set reward_model (toy, clip:PATH, pickscore:PATH or aesthetic:WEIGHTS) or reward_weight=0")
    if cfg.loss_type == "lpips" and not cfg.lpips_weights:
        raise TLCMError("loss_type=lpips needs the latent LPIPS weights", "set lpips_weights=PATH (or loss_type=l2)")
    multi = cfg.dmd_weight > 0 or cfg.gan_weight > 0
    if multi and cfg.mixed_precision == "fp16":
        raise TLCMError("DMD and the GAN train several networks with their own optimisers; fp16 needs one loss "
                        "scaler per optimiser, which tlcm does not keep", "use mixed_precision=bf16 (or no)")
