"""Evaluation presets, and turning user options into a :class:`~tlcm.evaluate.sweep.SweepConfig`.

``toy``
    The embedded toy world on a CPU: the shipped toy teacher, toy-world captions (the world's ``prompts``,
    256 prompts of the ``train`` split drawn with seed 10000, i.e. not the distillation prompts), 32x32 images, metrics
    toy-FID against rendered data and against the teacher's DPM-Solver++ 25-step samples, attribute alignment, k-NN
    precision/recall, and per-prompt diversity (32 prompts x 4 seeds). Teacher solvers DDIM, DPM-Solver++ and Euler
    at 1, 2, 4, 8 steps with and without CFG (guidance 1 and 4); students at 1, 2, 4, 8 steps; and for each student
    the undistilled teacher sampled with that student's scheduler (``teacher+NAME-sampler``, guidance 1 and 4: see
    :mod:`tlcm.evaluate.baselines`).

``coco2017-5k-sdxl``
    The setting of the TLCM paper's tables (SDXL, MSCOCO-2017 5K). The user supplies the captions file
    ``annotations/captions_val2017.json`` from https://cocodataset.org (the first caption of each of the 5,000
    val2017 images, in image-id order, are the prompts) and, for FID against data, the ``val2017`` image folder.
    1024x1024 images, students at 2, 3, 4, 8 steps with guidance 0 (guidance is distilled into TLCM), the teacher with
    DDIM at 25 steps (the paper's teacher row), CLIP score with CLIP ViT-g/14
    (``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``), the LAION aesthetic predictor v2 on CLIP ViT-L/14, FID with the
    clean-fid/StyleGAN TorchScript Inception. Weights come from local paths or the HF cache; missing ones are skipped
    with a notice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tlcm.errors import TLCMError
from tlcm.evaluate.metrics import MetricSpec
from tlcm.evaluate.prompts import read_prompts, seeds_for, take
from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SchedulerSpec, SweepConfig, sampling_defaults


@dataclass(frozen=True)
class Protocol:
    name: str
    base: str | None
    num_prompts: int
    seed: int
    steps: tuple[int, ...]
    teacher_schedulers: tuple[str, ...]
    teacher_steps: tuple[int, ...]
    teacher_guidance: tuple[float, ...]
    student_schedulers: tuple[str, ...]
    student_guidance: tuple[float, ...]
    reference: tuple[str, int, float]  # scheduler, steps, guidance
    height: int | None = None
    width: int | None = None
    batch_size: int = 16
    toy: bool = False
    needs_prompt_file: bool = False
    clip_model: str | None = None
    aesthetic_clip: str | None = None
    baselines: bool = False  # the undistilled teacher with each student's sampler (tlcm.evaluate.baselines)
    diversity: tuple[int, int] | None = None  # per-prompt diversity: K prompts x S seeds
    notes: tuple[str, ...] = field(default_factory=tuple)


TOY_EVAL_SEED = 10_000

PROTOCOLS = {
    "toy": Protocol(
        name="toy", base="toy", num_prompts=256, seed=TOY_EVAL_SEED, steps=(1, 2, 4, 8),
        teacher_schedulers=("ddim", "dpmpp", "euler"), teacher_steps=(1, 2, 4, 8), teacher_guidance=(1.0, 4.0),
        student_schedulers=("tlcm",), student_guidance=(1.0,), reference=("dpmpp", 25, 4.0), batch_size=64,
        toy=True, baselines=True, diversity=(32, 4),
    ),
    "coco2017-5k-sdxl": Protocol(
        name="coco2017-5k-sdxl", base="stabilityai/stable-diffusion-xl-base-1.0", num_prompts=5000, seed=0,
        steps=(2, 3, 4, 8), teacher_schedulers=("ddim",), teacher_steps=(25,), teacher_guidance=(7.5,),
        student_schedulers=("tlcm",), student_guidance=(0.0,), reference=("ddim", 25, 7.5), height=1024,
        width=1024, batch_size=8, needs_prompt_file=True, clip_model="laion/CLIP-ViT-g-14-laion2B-s12B-b42K",
        aesthetic_clip="openai/clip-vit-large-patch14",
        notes=("prompts: --prompts annotations/captions_val2017.json (COCO 2017 captions; first caption per image)",
               "FID vs data: --reference-images val2017/ ; aesthetic: --aesthetic-weights "
               "sac+logos+ava1-l14-linearMSE.pth"),
    ),
}


def get_protocol(name: str | None) -> Protocol | None:
    if name is None:
        return None
    if name not in PROTOCOLS:
        raise TLCMError(f"unknown protocol {name!r}", f"use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def parse_list(text, cast, what: str) -> list:
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        return [cast(t) for t in text]
    try:
        return [cast(t) for t in str(text).split(",") if t.strip()]
    except ValueError as err:
        raise TLCMError(f"bad {what} list {text!r}", f"write a comma-separated list, e.g. --{what} 1,2,4") from err


def parse_diversity(text) -> tuple[int, int] | None:
    """``KxS`` (K prompts, S seeds each), e.g. ``32x4``; ``off``/``0``/``none`` -> ``None``."""
    if text is None or isinstance(text, tuple):
        return text
    t = str(text).strip().lower()
    if t in ("off", "0", "none", "no"):
        return None
    k, sep, n = t.partition("x")
    try:
        k_i, n_i = int(k), int(n)
    except ValueError:
        k_i = n_i = -1
    if not sep or k_i < 1 or n_i < 2:
        raise TLCMError(f"bad --diversity {text!r}", "write KxS with K >= 1 prompts and S >= 2 seeds, e.g. 32x4, "
                        "or --no-diversity")
    return k_i, n_i


def parse_lora(text: str) -> tuple[str, str, float]:
    """``NAME=PATH`` or ``NAME=PATH@WEIGHT`` -> (name, path, weight) (of the first LoRA of a ``+`` list)."""
    name, loras = parse_lora_stack(text)
    return name, *loras[0]


def parse_lora_stack(text: str) -> tuple[str, list[tuple[str, float]]]:
    """``NAME=PATH[@W][+PATH2[@W2]...]`` -> (name, [(path, weight), ...]): a model that is the base with several
    LoRAs at once, e.g. ``accel_style=runs/lcm+style.safetensors@0.8`` (the first one, usually the distilled
    student, supplies the scheduler and sampling defaults)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise TLCMError(f"bad --lora {text!r}", "write --lora NAME=PATH (or NAME=PATH@WEIGHT, or NAME=A@1+B@0.8)")
    loras = []
    for part in rest.split("+"):
        path, weight = part, 1.0
        if "@" in part:
            path, _, w = part.rpartition("@")
            try:
                weight = float(w)
            except ValueError as err:
                raise TLCMError(f"bad LoRA weight in {text!r}", "write NAME=PATH@0.8 (or NAME=A@1+B@0.8)") from err
        if not path:
            raise TLCMError(f"empty LoRA path in {text!r}", "write NAME=PATH[@W][+PATH2[@W2]]")
        loras.append((path, weight))
    return name, loras


def _style_vae(base: str, world: str | None) -> str:
    """The VAE the style classifier must read through: the base pipeline folder's own, else the shipped toy one."""
    from pathlib import Path

    folder = Path(str(base)).expanduser() / "vae"
    return str(folder) if (folder / "config.json").is_file() else "toy"


def toy_world_of(model: str | None) -> str | None:
    """The toy world of a base model: ``toy`` names, and pipeline folders that carry ``tlcm_toy.json`` (toy builds
    and their fine-tunes); ``None`` for anything else."""
    from pathlib import Path

    from tlcm.toy import MARKER, is_toy_name, world_of_model

    if model is None:
        return None
    if is_toy_name(model) or (Path(str(model)).expanduser() / MARKER).is_file():
        return world_of_model(str(Path(str(model)).expanduser()) if not is_toy_name(model) else model)
    return None


def config_from_options(
    *,
    out: str,
    protocol: str | None = None,
    model: str | None = None,
    lora: list[str] | None = None,
    schedulers=None,
    student_schedulers=None,
    steps=None,
    teacher_steps=None,
    guidance=None,
    student_guidance=None,
    no_teacher: bool = False,
    prompts: str | None = None,
    prompt_column: str | None = None,
    num_prompts: int | None = None,
    seed: int | None = None,
    toy_split: str = "train",
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    negative_prompt: str | None = None,
    reference_solver: str | None = None,
    reference_guidance: float | None = None,
    no_reference: bool = False,
    reference_images: str | None = None,
    inception_weights: str | None = None,
    clip_model: str | None = None,
    aesthetic_weights: str | None = None,
    aesthetic_clip: str | None = None,
    timestep_spacing: str = "trailing",
    resume: bool = True,
    baselines: bool | None = None,
    diversity=None,
    no_diversity: bool = False,
    style: str | None = None,
    style_classifier: str | None = None,
    **_ignored,
) -> SweepConfig:
    """Resolve a protocol plus explicit options (explicit wins) into a sweep configuration.

    ``baselines``: add the undistilled teacher with each student's sampler (default: the protocol's choice, on for
    ``toy``). ``diversity``: ``KxS`` for per-prompt diversity (default: the protocol's, ``32x4`` for ``toy``);
    ``no_diversity`` turns it off. ``style``: a toy rendering style whose ``style_score`` is measured.
    """
    # a toy name or a toy pipeline folder (e.g. a `tlcm toy finetune` output) implies the toy protocol
    proto = get_protocol(protocol if protocol else ("toy" if toy_world_of(model) else None))
    base = model or (proto.base if proto else None)
    if not base:
        raise TLCMError("no model to evaluate", "pass --model (a hub id, a pipeline folder or 'toy') or --protocol")
    world = toy_world_of(base)
    toy_world = world is not None or bool(proto and proto.toy)
    if style and not toy_world:
        raise TLCMError(f"--style {style} scores a toy rendering style, but {base!r} is not a toy model",
                        "use --style with --model toy or a toy pipeline folder (e.g. a `tlcm toy finetune` output)")
    world_mod = None
    if toy_world:
        from tlcm.toy.worlds import get_world

        world_mod = get_world(world)  # toy, toy-v3, toy-v4, or a toy pipeline folder (None: the default world)

    # prompts and seeds
    count = num_prompts if num_prompts is not None else (proto.num_prompts if proto else None)
    seed0 = seed if seed is not None else (proto.seed if proto else 0)
    if prompts:
        prompt_list = take(read_prompts(prompts, prompt_column), count, prompts)
    elif toy_world:
        prompt_list = world_mod.prompts(count or 256, seed=seed0, split=toy_split)
    elif proto and proto.needs_prompt_file:
        raise TLCMError(f"protocol {proto.name!r} needs its prompt file", "; ".join(proto.notes))
    else:
        raise TLCMError("no prompts", "pass --prompts FILE (.txt, .csv, .jsonl, .json, .parquet)")

    # models
    st = parse_list(steps, int, "steps") or list(proto.steps if proto else (1, 2, 4, 8))
    t_steps = parse_list(teacher_steps, int, "teacher-steps") or (
        list(proto.teacher_steps) if proto and steps is None else st)
    t_sched = parse_list(schedulers, str, "schedulers") or list(proto.teacher_schedulers if proto else
                                                                   ("ddim", "dpmpp", "euler"))
    t_guid = parse_list(guidance, float, "guidance") or list(proto.teacher_guidance if proto else (7.5,))
    s_sched = parse_list(student_schedulers, str, "student-schedulers") or list(
        proto.student_schedulers if proto else ("tlcm",))
    models: list[ModelSpec] = []
    if not no_teacher:
        models.append(ModelSpec("teacher", base, schedulers=t_sched, steps=t_steps, guidance=t_guid))
    students: list[ModelSpec] = []
    for item in lora or []:
        name, stack = parse_lora_stack(item)
        (path, weight), extra = stack[0], stack[1:]
        sg = parse_list(student_guidance, float, "student-guidance")
        if sg is None:
            saved = sampling_defaults(path).get("guidance_scale")
            sg = [float(saved)] if saved is not None else list(proto.student_guidance if proto else (1.0,))
        students.append(ModelSpec(name, base, lora=path, lora_weight=weight, schedulers=s_sched, steps=st,
                                  guidance=sg, extra_loras=extra))
    use_baselines = baselines if baselines is not None else bool(proto and proto.baselines)
    if use_baselines and students:
        from tlcm.evaluate.baselines import baseline_models

        models += baseline_models(students, base, t_guid, taken=[m.name for m in models])
    models += students
    if not models:
        raise TLCMError("nothing to evaluate: --no-teacher and no --lora", "add --lora NAME=DIR or drop --no-teacher")

    # reference and metrics
    if toy_world:
        # the world's own records when the prompts are theirs (exact samples of the conditional), else drawn scenes
        data = f"toy-records:{toy_split}:{seed0}" if not prompts else "toy"
    ref = ReferenceSpec(data=data if toy_world else reference_images)
    if not no_reference:
        r_sched, r_steps, r_guid = proto.reference if proto else ("dpmpp", 25, max(t_guid))
        if reference_solver:
            r_sched, _, n = reference_solver.partition(":")
            try:
                r_steps = int(n) if n else 25
            except ValueError as err:
                raise TLCMError(f"bad --reference-solver {reference_solver!r}", "write e.g. dpmpp:25") from err
        SchedulerSpec.parse(r_sched)
        ref.model, ref.scheduler, ref.steps = "teacher", r_sched, r_steps
        ref.guidance = reference_guidance if reference_guidance is not None else r_guid
        if no_teacher:  # the reference is still the base model; add it without cells
            models.insert(0, ModelSpec("teacher", base, schedulers=[], steps=[], guidance=[]))
    metric_spec = MetricSpec(
        toy=toy_world,
        toy_world=world_mod.VERSION if world_mod else None,
        fid=not toy_world or inception_weights is not None,
        inception_weights=inception_weights,
        clip_model=clip_model or (proto.clip_model if proto else None),
        aesthetic_weights=aesthetic_weights,
        aesthetic_clip=aesthetic_clip or (proto.aesthetic_clip if proto else None),
        device=device,
        diversity=None if no_diversity else (parse_diversity(diversity) if diversity is not None
                                             else (proto.diversity if proto else None)),
        style=style,
        style_classifier=style_classifier,
        style_vae=_style_vae(base, world) if style else None,
    )
    return SweepConfig(
        models=models,
        prompts=prompt_list,
        seeds=seeds_for(len(prompt_list), seed0),
        out_dir=out,
        height=height or (proto.height if proto else None),
        width=width or (proto.width if proto else None),
        batch_size=batch_size or (proto.batch_size if proto else 16),
        device=device,
        dtype=dtype,
        negative_prompt=negative_prompt,
        timestep_spacing=timestep_spacing,
        reference=ref,
        metrics=metric_spec,
        resume=resume,
        protocol=proto.name if proto else None,
    )
