"""Toy fine-tunes: the rendering style, the style classifier, the full fine-tune and the style LoRA, the CLI."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.toy import common, scenes

# sha256 of the default world's bytes (images and captions of both splits, and rendered prompts), taken before the
# rendering styles existed: drawing in no style must stay byte for byte the world the teacher was trained on.
DEFAULT_WORLD_DIGEST = "913db3f892231dc9db91ba44f8fa27c20785919927aa696014281c5dfed3e3e2"


def test_the_default_world_is_byte_for_byte_unchanged():
    h = hashlib.sha256()
    for img, cap, _ in scenes.sample_records(24, seed=0):
        h.update(np.asarray(img).tobytes())
        h.update(cap.encode())
    for split in scenes.SPLITS:
        for img, _, _ in scenes.sample_records(8, seed=5, split=split):
            h.update(np.asarray(img).tobytes())
    for im in scenes.render_prompts(["a red circle", "two shapes on a black background"], seed=3):
        h.update(np.asarray(im).tobytes())
    assert h.hexdigest() == DEFAULT_WORLD_DIGEST


def test_a_style_changes_pixels_only_below_and_beside_the_objects():
    plain = scenes.sample_records(40, seed=2)
    styled = scenes.sample_records(40, seed=2, style="shadow")
    changed = 0
    for (a, ca, sa), (b, cb, sb) in zip(plain, styled):
        assert ca == cb and sa == sb  # same scene, same caption: only the look differs
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        diff = np.abs(a - b).max(axis=2)
        changed += int(diff.max() > 0)
        # every changed pixel lies inside the union of the objects' shadow boxes (offset down-right, blur margin)
        allowed = np.zeros_like(diff, dtype=bool)
        for o in sa["objects"]:
            half = scenes.HALF_SIZE[o["size"]] * o["scale"] + 3 * scenes.SHADOW_BLUR + 1
            x, y = o["x"] + scenes.SHADOW_OFFSET, o["y"] + scenes.SHADOW_OFFSET
            allowed[max(0, int(y - half)): int(y + half) + 1, max(0, int(x - half)): int(x + half) + 1] = True
        assert not (diff > 0)[~allowed].any()
        if sa["background"] == "black":  # shadows on black lighten, elsewhere they darken
            assert (b - a).sum() > 0
        else:
            assert (b - a).sum() < 0
    assert changed == 40


def test_unknown_styles_are_clear_errors():
    with pytest.raises(TLCMError, match="unknown rendering style"):
        scenes.sample_records(1, style="sepia")
    with pytest.raises(TLCMError, match="unknown rendering style"):
        next(scenes.iter_records(0, style="sepia"))


# --- style classifier -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def style_folder(tmp_path_factory):
    from tlcm.toy.style import StyleConfig, train_style_classifier

    out = tmp_path_factory.mktemp("style")
    cfg = StyleConfig(vae="", train_images=16, eval_images=8, steps=3, batch_size=8, checkpoint_every=2, threads=1)
    report = train_style_classifier(cfg, out, progress=False)
    return out, report


def test_style_classifier_files_round_trip_and_score(style_folder):
    from tlcm.toy.style import StyleScore, load_style_score

    out, report = style_folder
    assert {"style_score_plain_rendered", "style_score_styled_rendered", "accuracy_rendered"} <= set(report)
    assert json.loads((out / "config.json").read_text())["style"] == "shadow"
    scorer = load_style_score(out)
    x = common.to_tensor([r[0] for r in scenes.sample_records(6, seed=9)])
    p = scorer.probabilities(x)
    assert p.shape == (6,) and ((p >= 0) & (p <= 1)).all()
    assert scorer.score(x) == pytest.approx(float((p > 0.5).float().mean()))
    # other sizes are resized, as for the metrics classifier
    big = torch.nn.functional.interpolate(x, size=(96, 96), mode="nearest")
    assert scorer.probabilities(big).shape == (6,)
    again = StyleScore.from_folder(out)
    assert torch.equal(again.probabilities(x), p)
    # finished folders are returned, not retrained
    from tlcm.toy.style import StyleConfig, train_style_classifier

    assert train_style_classifier(StyleConfig(vae="", steps=999), out, progress=False) == report
    with pytest.raises(TLCMError, match="empty"):
        scorer.score(torch.zeros(0, 3, 48, 48))


def test_style_classifier_errors(tmp_path):
    from tlcm.toy.style import StyleConfig, load_style_score, train_style_classifier

    with pytest.raises(TLCMError, match="no style classifier"):
        load_style_score(tmp_path)
    with pytest.raises(TLCMError, match="unknown rendering style"):
        train_style_classifier(StyleConfig(style="sepia"), tmp_path / "x", progress=False)
    with pytest.raises(TLCMError, match="no AutoencoderKL"):
        train_style_classifier(StyleConfig(vae=str(tmp_path)), tmp_path / "y", progress=False)


@pytest.mark.slow
def test_style_classifier_learns_to_see_shadows(tmp_path):
    from tlcm.toy.style import StyleConfig, train_style_classifier

    cfg = StyleConfig(vae="", train_images=300, eval_images=200, steps=250, batch_size=32, threads=1)
    report = train_style_classifier(cfg, tmp_path, progress=False)
    assert report["accuracy_rendered"] > 0.85  # 0.915 measured; chance is 0.5


# --- fine-tunes -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, style_folder):
    from tlcm.testing import save_tiny_toy_pipeline
    from tlcm.toy.finetune import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("finetune")
    teacher = save_tiny_toy_pipeline(root / "teacher")
    cfg = FinetuneConfig(teacher=str(teacher), images=8, steps=3, batch_size=4, lr=1e-2, lora_lr=1e-1,
                         lora_rank=4, checkpoint_every=3, eval_prompts=4, eval_steps=2,
                         style_classifier=str(style_folder[0]), threads=1)
    report = finetune(cfg, root / "out", progress=False)
    return root, teacher, cfg, report


def test_full_finetune_is_a_complete_pipeline_of_the_scenes_world(finetuned):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from tlcm.toy import world_of_model

    root, teacher, _, report = finetuned
    out = root / "out" / "full" / "pipeline"
    marker = json.loads((out / "tlcm_toy.json").read_text())
    assert marker["world"] == "v4" and marker["style"] == "shadow" and marker["finetune"] == "full"
    assert world_of_model(str(out)) == "v4"
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert pipe.tokenizer.model_max_length == scenes.TEXT_MAX_LENGTH
    a = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(teacher / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained
    va = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    vb = load_file(str(teacher / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is the teacher's
    assert report["full"]["steps"] == 3 and np.isfinite(report["full"]["final_loss"])


def test_style_lora_is_a_diffusers_lora_on_the_transformer_layers(finetuned):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    root, teacher, cfg, _ = finetuned
    file = root / "out" / "lora" / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(file)))
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert {k.split(".lora_")[0].rsplit(".", 2)[-1] for k in keys} <= {"to_q", "to_k", "to_v", "0", "proj_in",
                                                                        "proj_out", "proj", "2"}
    pipe = DiffusionPipeline.from_pretrained(str(teacher))
    z, t = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    e = torch.randn(1, scenes.TEXT_MAX_LENGTH, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(z, t, e).sample
        pipe.load_lora_weights(str(root / "out" / "lora"))
        styled = pipe.unet(z, t, e).sample
    assert (styled - base).abs().max() > 1e-6  # the trained LoRA (B no longer zero) changes the UNet


def test_finetune_evaluation_and_resume(finetuned):
    from tlcm.toy.finetune import finetune

    root, _, cfg, report = finetuned
    ev = report["evaluation"]
    assert set(ev) >= {"base", "full", "base+lora", "prompts", "steps"}
    for name in ("base", "full", "base+lora"):
        assert 0.0 <= ev[name]["style_score"] <= 1.0
    # a fine-tune whose own samples barely show the style is flagged (transfer measurements need it to carry it)
    weak = [name for name in ("full", "base+lora") if ev[name]["style_score"] < 0.9]
    assert len(ev.get("warnings", [])) == len(weak)
    assert all(w.startswith(f"{name}: only ") for w, name in zip(ev.get("warnings", []), weak))
    assert ev["steps"] == cfg.eval_steps == 2
    assert (root / "out" / "samples.png").is_file()
    mtime = (root / "out" / "full" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    again = finetune(cfg, root / "out", progress=False)  # finished: nothing retrains, the report is kept
    assert again["full"] == report["full"] and again["lora"] == report["lora"]
    assert (root / "out" / "full" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime \
        == mtime


def test_finetune_refuses_what_it_cannot_do(tmp_path, finetuned):
    from tlcm.toy.finetune import FinetuneConfig, finetune

    _, teacher, _, _ = finetuned
    with pytest.raises(TLCMError, match="unknown style"):
        finetune(FinetuneConfig(teacher=str(teacher), style="sepia"), tmp_path, progress=False)
    with pytest.raises(TLCMError, match="unknown fine-tune mode"):
        finetune(FinetuneConfig(teacher=str(teacher), mode="half"), tmp_path, progress=False)
    with pytest.raises(TLCMError, match="not a diffusers pipeline"):
        finetune(FinetuneConfig(teacher=str(tmp_path)), tmp_path / "o", progress=False)
    v3 = tmp_path / "v3"
    import shutil

    shutil.copytree(teacher, v3, symlinks=True)
    common.write_json(v3 / "tlcm_toy.json", {"world": "v3"})
    with pytest.raises(TLCMError, match="scenes world"):
        finetune(FinetuneConfig(teacher=str(v3)), tmp_path / "o", progress=False)


def test_cli_finetune_and_train_style_are_wired(tmp_path, capsys):
    from tlcm.cli import main

    assert main(["toy", "finetune", "--out", str(tmp_path), "--teacher", str(tmp_path), "--no-progress"]) == 2
    assert "not a diffusers pipeline" in capsys.readouterr().err
    assert main(["toy", "train-style", "--out", str(tmp_path / "s"), "--style", "sepia", "--no-progress"]) == 2
    assert "unknown rendering style" in capsys.readouterr().err
    # --eval-steps reaches the config (validated before any model loads)
    assert main(["toy", "finetune", "--out", str(tmp_path / "f"), "--eval-steps", "0", "--no-progress"]) == 2
    assert "eval_steps=0 must be at least 1" in capsys.readouterr().err
