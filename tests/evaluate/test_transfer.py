"""`tlcm evaluate` for transfer measurements: a model may be the base plus several LoRAs with weights, the base may be a
toy fine-tune folder, and the style score is a metric."""

from __future__ import annotations

import json

import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.evaluate.protocols import config_from_options, parse_lora, parse_lora_stack, toy_world_of


def test_lora_stacks_parse_with_weights():
    assert parse_lora_stack("s=/a/b") == ("s", [("/a/b", 1.0)])
    assert parse_lora_stack("s=/a/b@0.5+c.safetensors@1.2+d") == ("s", [("/a/b", 0.5), ("c.safetensors", 1.2),
                                                                        ("d", 1.0)])
    assert parse_lora("s=/a/b@0.5+c@2") == ("s", "/a/b", 0.5)  # the first one, as before
    for bad, match in (("/a/b", "NAME=PATH"), ("s=/a@x", "bad LoRA weight"), ("s=/a+", "empty LoRA path"),
                       ("s=/a+@2", "empty LoRA path")):
        with pytest.raises(TLCMError, match=match):
            parse_lora_stack(bad)


def _random_lora(pipe_dir, out, seed: int):
    """A diffusers-format LoRA with non-zero B on the attention projections of the pipeline's UNet."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(str(pipe_dir))
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    state = {k: v * 0.3 for k, v in get_peft_model_state_dict(pipe.unet).items()}
    type(pipe).save_lora_weights(str(out), unet_lora_layers=state, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def test_a_stacked_model_loads_every_lora_with_its_weight(tiny_sd15_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from tlcm.evaluate.sweep import load_model
    from tlcm.lora import load_loras

    a = _random_lora(tiny_sd15_dir, tmp_path / "a", 1)
    b = _random_lora(tiny_sd15_dir, tmp_path / "b", 2)
    cfg = config_from_options(out=str(tmp_path / "e"), model=str(tiny_sd15_dir), prompts=_prompts(tmp_path),
                              no_teacher=True, lora=[f"ab={a}@0.7+{b}@0.4"], student_schedulers="lcm", steps="1",
                              no_reference=True)
    spec = cfg.model("ab")
    assert spec.lora == str(a) and spec.lora_weight == 0.7 and spec.extra_loras == [(str(b), 0.4)]
    pipe = load_model(spec, "cpu", "float32")
    ref = DiffusionPipeline.from_pretrained(str(tiny_sd15_dir))
    load_loras(ref, [(str(a), 0.7), (str(b), 0.4)])
    only_a = DiffusionPipeline.from_pretrained(str(tiny_sd15_dir))
    load_loras(only_a, [(str(a), 0.7)])
    z, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    e = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want, single = (p.unet(z, t, e).sample for p in (pipe, ref, only_a))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - single).abs().max() > 1e-5  # the second LoRA is active


def _prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red circle\na blue square\na large green shape\na cross on a black background\n")
    return str(p)


def test_toy_world_of_reads_names_and_markers(tmp_path, tiny_sd15_dir):
    from tlcm.testing import save_tiny_toy_pipeline

    assert toy_world_of("toy") == "v4" and toy_world_of("toy-v3") == "v3"
    assert toy_world_of(str(tiny_sd15_dir)) is None  # a diffusers folder without tlcm_toy.json is no toy model
    assert toy_world_of("org/model") is None and toy_world_of(None) is None
    folder = save_tiny_toy_pipeline(tmp_path / "toy")
    assert toy_world_of(str(folder)) == "v4"


def test_style_needs_a_toy_model(tiny_sd15_dir, tmp_path):
    with pytest.raises(TLCMError, match="not a toy model"):
        config_from_options(out=str(tmp_path), model=str(tiny_sd15_dir), prompts=_prompts(tmp_path), style="shadow")


@pytest.fixture(scope="module")
def style_classifier(tmp_path_factory):
    from tlcm.toy.style import StyleConfig, train_style_classifier

    out = tmp_path_factory.mktemp("style")
    train_style_classifier(StyleConfig(vae="", train_images=8, eval_images=4, steps=2, batch_size=4, threads=1), out,
                           progress=False)
    return out


def test_a_toy_finetune_folder_is_evaluated_as_a_toy_model_with_its_style(tmp_path, style_classifier, monkeypatch):
    """A toy pipeline folder (what `tlcm toy finetune` writes) as --model: toy protocol, its world's prompts and
    rendered data, the style score; a stacked student (accel + style LoRA) on it."""
    from tlcm.evaluate.sweep import run_sweep
    from tlcm.testing import save_tiny_toy_pipeline
    from tlcm.toy import scenes

    base = save_tiny_toy_pipeline(tmp_path / "finetune")
    accel = _random_lora(base, tmp_path / "accel", 3)
    style = _random_lora(base, tmp_path / "style", 4)
    cfg = config_from_options(out=str(tmp_path / "eval"), model=str(base), lora=[f"both={accel}+{style}@0.8"],
                              student_schedulers="lcm", schedulers="ddim", steps="1,2", teacher_steps="2",
                              num_prompts=3, no_reference=True, style="shadow", baselines=False,
                              style_classifier=str(style_classifier), batch_size=3)
    assert cfg.protocol == "toy" and cfg.metrics.toy and cfg.metrics.toy_world == "v4"
    assert cfg.prompts == scenes.prompts(3, seed=10_000)  # the scenes world's captions, not the shapes world's
    # real data: the world's own records whose captions the prompts are (exact samples; unstyled, as the base world)
    assert cfg.reference.data == "toy-records:train:10000" and cfg.metrics.style_vae == str(base / "vae")
    # (without a v4 metrics classifier installed, the toy metrics step aside with a notice; the style score stays)
    results = run_sweep(cfg, log=lambda *_: None)
    rows = {(r["model"], r["steps"]): r for r in results["cells"]}
    assert set(rows) == {("teacher", 2), ("both", 1), ("both", 2)}
    for r in rows.values():
        assert 0.0 <= r["style_score"] <= 1.0
    assert rows[("both", 1)]["extra_loras"] == [[str(style), 0.8]]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "style_score" in (tmp_path / "eval" / "results.md").read_text() and saved["cells"]


def test_style_metric_without_its_classifier_is_a_notice(tmp_path):
    from tlcm.evaluate.metrics import MetricSpec, ToyStyleScore, build_metrics

    metrics, notices = build_metrics(MetricSpec(fid=False, style="shadow", style_classifier=str(tmp_path)))
    assert not any(isinstance(m, ToyStyleScore) for m in metrics)
    assert any("style score skipped" in n and "train-style" in n for n in notices)


def test_toy_reference_data_may_be_drawn_in_a_style(tmp_path):
    """``ReferenceSpec(data="toy:v4:shadow")``: the prompts rendered by the scenes world in that style (the data a
    fine-tune's samples are compared with), the same scenes as without the style."""
    import numpy as np

    from tlcm.evaluate.sweep import ModelSpec, ReferenceSpec, SweepConfig, build_reference
    from tlcm.toy import scenes

    prompts = scenes.prompts(3, seed=10_000)

    def data(spec: str):
        cfg = SweepConfig(models=[ModelSpec("m", "toy")], prompts=prompts, seeds=[5, 6, 7], out_dir=str(tmp_path),
                          reference=ReferenceSpec(model=None, data=spec))
        return [np.asarray(im) for im in build_reference(cfg, tmp_path, log=lambda *_: None).data_images]

    styled, plain = data("toy:v4:shadow"), data("toy:v4")
    for got, want in zip(styled, scenes.render_prompts(prompts, seed=5, style="shadow")):
        assert np.array_equal(got, np.asarray(want))
    for got, want in zip(plain, scenes.render_prompts(prompts, seed=5)):
        assert np.array_equal(got, np.asarray(want))
    assert all(not np.array_equal(a, b) for a, b in zip(styled, plain))
    with pytest.raises(TLCMError, match="unknown rendering style"):
        data("toy:v4:sepia")


def test_toy_metrics_may_come_from_a_folder(tmp_path):
    """``MetricSpec(toy_metrics=DIR)``: the toy metrics read that classifier (e.g. a `tlcm toy build` before it ships);
    a folder without one is a notice naming it, never a silent fallback to another classifier."""
    from tlcm.evaluate.metrics import MetricSpec, ToyWorldMetrics, build_metrics
    from tlcm.toy.scene_metrics import SceneMetricsConfig, train_scene_metrics

    train_scene_metrics(SceneMetricsConfig(train_images=16, eval_images=4, steps=2, batch_size=8, width=8,
                                           feature_dim=16, checkpoint_every=2, threads=1), tmp_path / "m",
                        progress=False)
    metrics, notices = build_metrics(MetricSpec(fid=False, toy=True, toy_world="v4", toy_metrics=str(tmp_path / "m")))
    toy = [m for m in metrics if isinstance(m, ToyWorldMetrics)]
    assert len(toy) == 1 and toy[0].toy.world == "v4"
    from tlcm.toy import scenes

    x = [r[0] for r in scenes.sample_records(2, seed=3)]
    assert toy[0].toy.features(x).shape == (2, 16)  # the folder's feature_dim, not the shipped classifier's
    metrics, notices = build_metrics(MetricSpec(fid=False, toy=True, toy_world="v4", toy_metrics=str(tmp_path / "x")))
    assert not any(isinstance(m, ToyWorldMetrics) for m in metrics)
    assert any("toy metrics skipped" in n for n in notices)
