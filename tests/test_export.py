"""``tlcm export``: every format loaded back by its own client library and compared with the student's images.

The students are hand-made ``tlcm distill`` folders on the tiny SD1.5 and SDXL pipelines: a non-zero peft LoRA on
the modules of the official TLCM release (attention, projections, feed-forward, resnet convs including 3x3 ones,
samplers, time_emb_proj) with ``lora_alpha != r``, saved with the trainer's own writers. The reference images are
the student's (its UNet with the adapter active, its scheduler) at the same seeds; images are uint8, so "max pixel
difference <= 1/255" is ``<= 1`` on the arrays. All exports load in float32, where merging ``W + s B A`` changes
each weight by float32 rounding only, far below one pixel level.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import TLCM_TARGET_MODULES, nonzero_lora_config, tiny_sdxl_wide_pipeline
from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.export import ExportConfig, export, exported_defaults
from tlcm.models import load_pipeline
from tlcm.sample import configure_scheduler, generate

PROMPTS = ["a red circle", "a blue square"]
STEPS = 2
RANK, ALPHA = 4, 8  # scale 2: a loader that ignored alpha would be off by a factor of 2


def _tiny(kind: str):
    from tlcm.testing import tiny_sd15_pipeline

    # the wide SDXL variant: diffusers' single-file loader tells SDXL's two text encoders apart by width
    return tiny_sd15_pipeline(0) if kind == "sd15" else tiny_sdxl_wide_pipeline(0)


def _images(pipe, scheduler_config: dict | None = None) -> np.ndarray:
    if scheduler_config is not None:
        configure_scheduler(pipe, mode=None, config=scheduler_config)
    out = generate(pipe, PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, seeds=0)
    return np.stack([np.asarray(image, dtype=np.int16) for image in out])


def _scheduler_config(kind: str, pipe) -> dict:
    """sd15: a TLCM (segments) student, which needs TLCMScheduler; sdxl: an LCM student, LCMScheduler-equivalent."""
    from tlcm.scheduler import TLCMScheduler

    if kind == "sd15":
        sched = TLCMScheduler.from_config(pipe.scheduler.config, mode="segments", num_segments=2,
                                          boundary_condition="none", gamma=1.0)
    else:
        sched = TLCMScheduler.from_config(pipe.scheduler.config, mode="lcm", boundary_condition="lcm", gamma=1.0)
    return {k: v for k, v in sched.config.items()}


def make_student(kind: str, folder, base_dir, seed: int = 11):
    """A ``tlcm distill``-style LoRA student folder; returns (folder, its reference images, scheduler config)."""
    from tlcm.train.export import save_diffusers_lora
    from tlcm.train.student import save_peft_adapter

    pipe = _tiny(kind)
    torch.manual_seed(seed)
    config = nonzero_lora_config(TLCM_TARGET_MODULES, r=RANK, alpha=ALPHA)
    pipe.unet.add_adapter(config)
    folder.mkdir(parents=True)
    save_diffusers_lora(pipe, pipe.unet, folder)
    save_peft_adapter(pipe.unet, config, folder / "adapter")
    sched = _scheduler_config(kind, pipe)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (folder / "tlcm_sampling.json").write_text(json.dumps(
        {"guidance_scale": 1.0, "num_inference_steps": STEPS, "base_model": str(base_dir), "recipe": "mlcd"}))
    return folder, _images(pipe, sched), sched


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def world(request, tmp_path_factory):
    """Per kind: base pipeline folder, student, reference images, and one export of every format."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"export-{kind}")
    base = root / "base"
    _tiny(kind).save_pretrained(str(base), safe_serialization=True)
    student, reference, sched = make_student(kind, root / "student", base)
    outs = {
        "kohya": export(ExportConfig(str(student), "kohya", str(root / "lora.safetensors"))),
        "peft": export(ExportConfig(str(student), "peft", str(root / "adapter"))),
        "fused": export(ExportConfig(str(student), "fused", str(root / "fused"))),
        "single": export(ExportConfig(str(student), "fused", str(root / "model.safetensors"), single_file=True)),
    }
    base_images = _images(load_pipeline(str(base)), sched)
    assert np.abs(base_images - reference).max() > 20  # the LoRA visibly changes the images
    return dict(kind=kind, root=root, base=base, student=student, reference=reference, sched=sched, **outs)


def _adapted_layers(unet) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in unet.modules() if isinstance(m, LoraLayer))


def test_kohya_file_loads_in_diffusers_and_matches_the_student(world):
    pipe = load_pipeline(str(world["base"]))
    pipe.load_lora_weights(str(world["kohya"]))
    student_unet = _tiny(world["kind"]).unet
    student_unet.add_adapter(nonzero_lora_config(TLCM_TARGET_MODULES, r=RANK, alpha=ALPHA))
    assert _adapted_layers(pipe.unet) == _adapted_layers(student_unet) > 70  # every layer found its module
    assert np.abs(_images(pipe, world["sched"]) - world["reference"]).max() <= 1


def test_kohya_keys_shapes_alpha_and_metadata(world):
    from tlcm.convert import UNetLayout, ldm_unet_module, unet_to_ldm

    state = load_file(str(world["kohya"]))
    with safe_open(str(world["kohya"]), framework="pt") as f:
        meta = f.metadata()
    names = {k.split(".")[0] for k in state}
    assert all(k.startswith("lora_unet_") for k in names)
    assert len(state) == 3 * len(names)
    base_unet = _tiny(world["kind"]).unet
    modules = {n: m for n, m in base_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    sdxl = world["kind"] == "sdxl"
    if sdxl:
        # sgm naming: lora_unet_ + the LDM module path, as kohya's sd-scripts write SDXL LoRAs; ComfyUI and A1111
        # resolve it by replacing '.' with '_' in the original checkpoint's keys, so every name must be one of those
        ldm_weights = {k.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_"): k
                       for k in unet_to_ldm(base_unet.state_dict(), base_unet.config) if k.endswith(".weight")}
        layout = UNetLayout.from_config(base_unet.config)
        by_name = {"lora_unet_" + ldm_unet_module(m, layout).replace(".", "_"): m for m in modules}
        assert names <= set("lora_unet_" + n for n in ldm_weights)
        assert any("input_blocks" in n for n in names) and not any("down_blocks" in n for n in names)
    else:
        # diffusers naming: lora_unet_ + the diffusers module path (kohya's SD1.x naming, read by A1111's
        # convert_diffusers_name_to_compvis and ComfyUI's unet_to_diffusers map)
        by_name = {"lora_unet_" + m.replace(".", "_"): m for m in modules}
        assert any("down_blocks" in n for n in names)
    assert names <= set(by_name)
    convs3 = 0
    for name in names:
        weight = modules[by_name[name]].weight
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == RANK and state[f"{name}.alpha"].item() == ALPHA
        assert down.dtype == up.dtype == torch.float32 and state[f"{name}.alpha"].dtype == torch.float32
        if weight.ndim == 4:  # conv LoRA: k x k down, 1x1 up, as kohya's LoRA-C3Lier and peft both store it
            assert down.shape == (RANK, weight.shape[1], *weight.shape[2:])
            assert up.shape == (weight.shape[0], RANK, 1, 1)
            convs3 += weight.shape[2] == 3
        else:
            assert down.shape == (RANK, weight.shape[1]) and up.shape == (weight.shape[0], RANK)
    assert convs3 > 0
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == ("sdxl_base_v1-0" if sdxl else "sd_v1")
    assert meta["tlcm.kohya_naming"] == ("sgm" if sdxl else "diffusers")
    assert json.loads(meta["tlcm.scheduler"])["mode"] == world["sched"]["mode"]


def test_peft_folder_loads_with_peftmodel_and_matches_the_student(world):
    from peft import PeftModel

    config = json.loads((world["peft"] / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == str(
        world["base"])
    pipe = load_pipeline(str(world["base"]))
    PeftModel.from_pretrained(pipe.unet, str(world["peft"]))  # injects the adapter into pipe.unet in place
    assert np.abs(_images(pipe, world["sched"]) - world["reference"]).max() <= 1


def test_fused_folder_loads_in_plain_diffusers_with_the_students_scheduler(world):
    from diffusers import DiffusionPipeline, LCMScheduler

    from tlcm.scheduler import TLCMScheduler

    pipe = DiffusionPipeline.from_pretrained(str(world["fused"]))
    if world["kind"] == "sd15":  # segments walk: only TLCMScheduler samples it
        assert isinstance(pipe.scheduler, TLCMScheduler) and pipe.scheduler.config.mode == "segments"
    else:  # an LCM student: diffusers' own LCMScheduler, so the folder needs no tlcm to load
        assert type(pipe.scheduler) is LCMScheduler
        assert json.loads((world["fused"] / "model_index.json").read_text())["scheduler"] == ["diffusers",
                                                                                              "LCMScheduler"]
    assert _adapted_layers(pipe.unet) == 0
    sampling = json.loads((world["fused"] / "tlcm_sampling.json").read_text())
    assert sampling["num_inference_steps"] == STEPS and sampling["guidance_scale"] == 1.0
    assert sampling["exported_from"]["base_model"] == str(world["base"])
    pipe.set_progress_bar_config(disable=True)
    # the pipeline's own scheduler, untouched: the fused folder alone reproduces the student
    assert np.abs(_images(pipe) - world["reference"]).max() <= 1


def test_single_file_round_trips_through_from_single_file(world):
    fused = load_pipeline(str(world["fused"]))
    single = load_pipeline(str(world["single"]), config=str(world["base"]))  # from_single_file, offline configs
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(fused, name, None), getattr(single, name, None)
        if a is None:
            assert b is None
            continue
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name  # the layout conversion is exact
    assert np.abs(_images(single, world["sched"]) - world["reference"]).max() <= 1
    sampling, sched = exported_defaults(world["single"])
    assert sampling["num_inference_steps"] == STEPS
    assert sched["_class_name"] == ("TLCMScheduler" if world["kind"] == "sd15" else "LCMScheduler")
    assert sched.get("mode", "lcm") == world["sched"]["mode"]


def test_sample_uses_the_defaults_baked_into_a_fused_export(world, tmp_path):
    from PIL import Image

    for model, config in ((world["fused"], None), (world["single"], world["base"])):
        out = tmp_path / model.name
        args = ["sample", "--model", str(model), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--out", str(out),
                "--no-progress"] + (["--config", str(config)] if config else [])
        assert main(args) == 0
        record = json.loads((out / "sample_config.json").read_text())
        assert record["steps"] == STEPS and record["scheduler"]["mode"] == world["sched"]["mode"]
        images = np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(out.glob("0*.png"))])
        assert np.abs(images - world["reference"]).max() <= 1


def test_float16_export_is_the_float32_export_rounded(world, tmp_path):
    """fp16 outputs: every tensor is the float32 export's tensor rounded to fp16, exactly (alpha stays float32)."""
    kohya16 = export(ExportConfig(str(world["student"]), "kohya", str(tmp_path / "l16.safetensors"), dtype="float16"))
    single16 = export(ExportConfig(str(world["student"]), "fused", str(tmp_path / "m16.safetensors"),
                                   single_file=True, dtype="float16"))
    for fp16, fp32 in ((kohya16, world["kohya"]), (single16, world["single"])):
        a, b = load_file(str(fp16)), load_file(str(fp32))
        assert set(a) == set(b)
        for k in a:
            expected = b[k] if k.endswith(".alpha") else b[k].half()
            assert a[k].dtype == expected.dtype and torch.equal(a[k], expected), k


def test_exports_are_deterministic_bytes(world, tmp_path):
    again = {
        "kohya": export(ExportConfig(str(world["student"]), "kohya", str(tmp_path / "lora.safetensors"))),
        "single": export(ExportConfig(str(world["student"]), "fused", str(tmp_path / "model.safetensors"),
                                      single_file=True)),
        "peft": export(ExportConfig(str(world["student"]), "peft", str(tmp_path / "adapter"))),
    }
    for key, path in again.items():
        files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [None]
        for rel in files:
            a = (path / rel) if rel else path
            b = (world[key] / rel) if rel else world[key]
            assert a.read_bytes() == b.read_bytes(), (key, rel)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


# -- more students ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd15-base") / "base"
    _tiny("sd15").save_pretrained(str(base), safe_serialization=True)
    return base


def test_full_unet_student_fuses_and_refuses_lora_formats(sd15_base, tmp_path):
    student = tmp_path / "full"
    pipe = _tiny("sd15")
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.unet.save_pretrained(str(student / "unet"))
    sched = _scheduler_config("sd15", pipe)
    (student / "scheduler").mkdir()
    (student / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    (student / "tlcm_sampling.json").write_text(json.dumps({"num_inference_steps": STEPS, "base_model":
                                                             str(sd15_base)}))
    reference = _images(pipe, sched)
    fused = export(ExportConfig(str(student), "fused", str(tmp_path / "fused")))
    assert np.abs(_images(load_pipeline(str(fused))) - reference).max() <= 1
    with pytest.raises(TLCMError, match="full UNet, not a LoRA"):
        export(ExportConfig(str(student), "kohya", str(tmp_path / "x.safetensors")))


def test_a_plain_diffusers_lora_file_converts_to_kohya(sd15_base, sd15_lora_file, tmp_path):
    """Any LoRA tlcm reads converts, here a diffusers-format file (no student folder, so --model is needed)."""
    out = export(ExportConfig(str(sd15_lora_file), "kohya", str(tmp_path / "k.safetensors"), model=str(sd15_base)))
    a, b = load_pipeline(str(sd15_base)), load_pipeline(str(sd15_base))
    a.load_lora_weights(str(sd15_lora_file))
    b.load_lora_weights(str(out))
    z, t, e = torch.randn(1, 4, 16, 16), torch.tensor([499]), torch.randn(1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.unet(z, t, e).sample, a.unet(z, t, e).sample, rtol=1e-5, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_student(sd15_base, tmp_path_factory):
    return make_student("sd15", tmp_path_factory.mktemp("st") / "student", sd15_base)[0]


def test_errors_name_the_problem_and_the_fix(sd15_student, sd15_base, tmp_path):
    def fails(match, **kw):
        cfg = dict(student=str(sd15_student), to="kohya", out=str(tmp_path / "o.safetensors"))
        cfg.update(kw)
        with pytest.raises(TLCMError, match=match) as info:
            export(ExportConfig(**cfg))
        assert info.value.fix

    fails("unknown export format 'ckpt'", to="ckpt")
    fails("is not a student folder", student=str(tmp_path))
    fails("does not exist", student=str(tmp_path / "nope"))
    fails("must be a .safetensors file", out=str(tmp_path / "o.pt"))
    fails("--single-file is an option of --to fused", single_file=True)
    fails("--scale applies when fusing", scale=0.5)
    fails("does not record its base model", student=str(sd15_student / "adapter"))
    # a LoRA trained for SDXL on an SD1.5 base: the shapes differ
    xl = make_student("sdxl", tmp_path / "xl", sd15_base)[0]
    fails("does not match this model's UNet", student=str(xl), model=str(sd15_base))
    # existing outputs are kept unless --overwrite, and --overwrite only replaces exports
    existing = tmp_path / "o.safetensors"
    existing.write_bytes(b"keep")
    fails("already exists")
    assert existing.read_bytes() == b"keep"
    export(ExportConfig(str(sd15_student), "kohya", str(existing), overwrite=True))
    assert load_file(str(existing))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    fails("not a previous export", to="peft", out=str(precious), overwrite=True)
    assert (precious / "notes.txt").read_text() == "mine"


def test_single_file_refuses_pipelines_outside_the_sd_family():
    from tlcm.export import single_file_state
    from tlcm.testing import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(0)
    pipe.text_encoder = torch.nn.Linear(2, 2)  # e.g. the toy world's BERT text encoder
    with pytest.raises(TLCMError, match="hold a CLIPTextModel there"):
        single_file_state(pipe, torch.float32)


def test_cli_exports_and_reports_errors(sd15_student, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["export", str(sd15_student), "--to", "peft", "--out", str(out), "--no-progress"]) == 0
    assert "wrote peft adapter folder" in capsys.readouterr().out
    first = (out / "adapter_model.safetensors").read_bytes()
    assert main(["export", str(sd15_student), "--to", "peft", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(sd15_student), "--to", "peft", "--out", str(out), "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == first
    with pytest.raises(SystemExit) as info:  # argparse: unknown format
        main(["export", str(sd15_student), "--to", "onnx", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    shutil.rmtree(out)
