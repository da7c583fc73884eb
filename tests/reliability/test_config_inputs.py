"""Config and input checks: YAML booleans for string choices, finite numbers, ranges, devices; the SDXL
unconditional branch agreed between synthesizer and trainer."""

from __future__ import annotations

import pytest
import torch

from tlcm.cli import main
from tlcm.errors import TLCMError
from tlcm.train.config import DistillConfig, resolve_config, validate_config


def _valid(**kw):
    return DistillConfig(**{"teacher": "t", "output_dir": "o", **kw})


def test_yaml_booleans_mean_the_string_choice(tmp_path):
    cfg = resolve_config("toy-mlcd", overrides=["mixed_precision=no"])
    assert cfg.mixed_precision == "no"
    conf = tmp_path / "c.yaml"
    conf.write_text("mixed_precision: no\n")
    assert resolve_config(None, str(conf)).mixed_precision == "no"
    conf.write_text("uncond: off\n")  # no such choice: a clear error naming the key, not 'False'
    with pytest.raises(TLCMError, match="uncond.*YAML read False as a boolean"):
        resolve_config(None, str(conf))
    with pytest.raises(TLCMError, match=r"uncond='off' is not one of auto, prompt, zeros"):
        validate_config(resolve_config(None, None, {"teacher": "t", "output_dir": "o"}, ["uncond=off"]),
                        need_data=False)


@pytest.mark.parametrize("kw, match", [
    (dict(sigma_data=0.0), "sigma_data=0.0 must be positive"),
    (dict(w_max=float("nan")), "w_max=nan is not a finite number"),
    (dict(learning_rate=float("inf")), "learning_rate=inf is not a finite number"),
    (dict(huber_c=-1.0), "huber_c=-1.0 must be positive"),
    (dict(timestep_scaling=0.0), "timestep_scaling=0.0 must be positive"),
    (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0 is negative"),
    (dict(extra_losses={"x": float("nan")}), "weight of 'x' is not finite"),
    (dict(device="tpu7"), "device 'tpu7'"),
])
def test_range_checks(kw, match):
    with pytest.raises(TLCMError, match=match):
        validate_config(_valid(**kw), need_data=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_distill_on_cuda_without_a_gpu_fails_like_synthesize(capsys, tmp_path):
    code = main(["distill", "--teacher", "toy", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                 "--device", "cuda", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "CUDA is not available" in err and "--device cpu" in err


def test_sdxl_empty_negative_prompt_is_zeros_in_synthesizer_and_trainer():
    from tlcm.data.synthesize import TextEncoder
    from tlcm.models import zero_conditioning, zeros_for_empty_negatives
    from tlcm.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline
    from tlcm.train.loop import PromptEncoder

    prompts = ["a red circle", "a blue square"]
    pipe = tiny_sdxl_pipeline(0)
    assert pipe.config.force_zeros_for_empty_prompt
    no_negatives, negatives = {"generation": {"has_negative_prompts": False}}, {"generation":
                                                                                 {"has_negative_prompts": True}}
    # the data set has no negative prompt: diffusers (and the synthesizer) use zeros; so does the trainer by default
    text = TextEncoder(pipe)
    cond = text.encode(prompts)
    synth_emb, synth_pooled = text.negatives(None, cond)
    _, ref_neg, _, ref_neg_pooled = pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=True)  # diffusers' own
    assert zeros_for_empty_negatives(pipe, DistillConfig().uncond, no_negatives)
    encoder = PromptEncoder(pipe, 32, 32)
    trainer_cond = encoder(prompts)
    trainer = zero_conditioning(trainer_cond)
    for ours, synth, ref in ((trainer.encoder_hidden_states, synth_emb, ref_neg),
                             (trainer.added_cond_kwargs["text_embeds"], synth_pooled, ref_neg_pooled)):
        assert ours.shape == synth.shape == ref.shape and not ours.any() and not synth.any() and not ref.any()
    assert torch.equal(trainer.added_cond_kwargs["time_ids"], trainer_cond.added_cond_kwargs["time_ids"])
    # with negative prompts in the data set, an empty one is encoded as "" on both sides
    assert not zeros_for_empty_negatives(pipe, "auto", negatives)
    assert not zeros_for_empty_negatives(pipe, "prompt", no_negatives)
    synth_empty = text.negatives(["", ""], cond)[0]
    torch.testing.assert_close(encoder(["", ""]).encoder_hidden_states, synth_empty, rtol=0, atol=0)
    # SD1.5 has no such rule: "" on both sides
    sd = tiny_sd15_pipeline(0)
    assert not zeros_for_empty_negatives(sd, "auto", no_negatives)
    sd_text = TextEncoder(sd)
    torch.testing.assert_close(PromptEncoder(sd, None, None)(["", ""]).encoder_hidden_states,
                               sd_text.negatives(None, sd_text.encode(prompts))[0], rtol=0, atol=0)


@pytest.mark.parametrize("uncond, zeroed", [("auto", True), ("prompt", False)])
def test_sdxl_trainer_uses_the_zero_branch_by_default(tmp_path, monkeypatch, uncond, zeroed):
    import tlcm.models as models
    import tlcm.train.loop as loop
    from tlcm.testing import tiny_sdxl_pipeline

    calls = []
    real = models.zero_conditioning  # the step's conditioning (tlcm.train.phases) imports it at call time
    monkeypatch.setattr(models, "zero_conditioning", lambda c: (calls.append(1), real(c))[1])
    lat = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(teacher="tiny", output_dir=str(tmp_path / "o"), max_steps=1, batch_size=2, lora_rank=4,
                        lora_alpha=4, checkpointing_steps=0, validation_prompts=[], resolution=32, uncond=uncond)
    loop.distill(cfg, pipe=tiny_sdxl_pipeline(0), log_with=None, progress=False,
                 dataset_fn=lambda r, w: [{"latents": lat[i], "prompt": "x", "negative_prompt": ""} for i in range(2)])
    assert bool(calls) == zeroed
