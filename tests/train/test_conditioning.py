"""CFG-preserving students: prompt dropout as pure functions, its one call site in the loop, config and export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tlcm.errors import TLCMError
from tlcm.models import Conditioning
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.conditioning import drop_prompts, prompt_dropout_mask, replace_rows
from tlcm.train.config import resolve_config, validate_config
from tlcm.train.loop import distill


def test_no_dropout_draws_nothing_from_the_generator():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    mask = prompt_dropout_mask(7, 0.0, g)
    assert mask.dtype == torch.bool and mask.shape == (7,) and not mask.any()
    assert torch.equal(g.get_state(), state)  # runs without the option keep their random stream


def test_dropout_frequency_and_determinism():
    n, p = 40_000, 0.15
    a = prompt_dropout_mask(n, p, torch.Generator().manual_seed(3))
    b = prompt_dropout_mask(n, p, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # binomial: the observed share lies within 5 standard deviations of p
    assert abs(a.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            prompt_dropout_mask(3, bad, torch.Generator())


def test_replace_rows_takes_whole_rows_with_their_added_conditioning():
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(torch.randn(4, 3, 5, generator=g),
                        {"text_embeds": torch.randn(4, 6, generator=g), "time_ids": torch.randn(4, 6, generator=g)})
    uncond = Conditioning(torch.randn(4, 3, 5, generator=g),
                          {"text_embeds": torch.randn(4, 6, generator=g), "time_ids": torch.randn(4, 6, generator=g)})
    mask = torch.tensor([True, False, False, True])
    out = replace_rows(cond, uncond, mask)
    for i, m in enumerate(mask.tolist()):
        src = uncond if m else cond
        assert torch.equal(out.encoder_hidden_states[i], src.encoder_hidden_states[i])
        for k in ("text_embeds", "time_ids"):
            assert torch.equal(out.added_cond_kwargs[k][i], src.added_cond_kwargs[k][i])
    plain = replace_rows(Conditioning(cond.encoder_hidden_states), Conditioning(uncond.encoder_hidden_states), mask)
    assert plain.added_cond_kwargs is None
    with pytest.raises(ValueError, match="equal batch sizes"):
        replace_rows(cond, uncond.index(slice(0, 2)), mask)


def test_drop_prompts_returns_the_input_untouched_when_no_row_drops():
    cond, uncond = Conditioning(torch.ones(2, 1, 1)), Conditioning(torch.zeros(2, 1, 1))
    out, mask = drop_prompts(cond, uncond, 0.0, torch.Generator())
    assert out is cond and not mask.any()


def _uncond_states(pipe):
    from tlcm.models import encode_prompts

    return encode_prompts(pipe, [""]).encoder_hidden_states[0]


def test_the_loop_conditions_dropped_rows_on_the_negative_prompt(tiny_cfg, dataset_fn, monkeypatch):
    """Every UNet call of a step (student, target and both CFG halves of the teacher) sees the dropped rows with the
    unconditional states, the others with their prompts."""
    import tlcm.train.conditioning as conditioning

    masks: list[torch.Tensor] = []
    real = conditioning.drop_prompts

    def spy(cond, uncond, p, gen):
        out, mask = real(cond, uncond, p, gen)
        masks.append(mask.clone())
        return out, mask

    monkeypatch.setattr(conditioning, "drop_prompts", spy)
    pipe = tiny_sd15_pipeline(0)
    empty = _uncond_states(pipe)
    calls: list[torch.Tensor] = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    cfg = tiny_cfg(recipe="lcm", max_steps=3, batch_size=4, prompt_dropout=0.5, w_min=1.0, w_max=2.0,
                   validation_prompts=[])
    try:
        distill(cfg, pipe=pipe, dataset_fn=dataset_fn, log_with=None, progress=False)
    finally:
        handle.remove()
    assert len(masks) == 3 and torch.cat(masks).any() and not torch.cat(masks).all()
    checked = 0
    step = 0
    for states in calls:
        rows = states.shape[0]
        if rows == 8:  # the teacher's CFG batch: [cond rows, uncond rows]
            cond_half = states[:4]
        elif rows == 4:
            cond_half = states
        else:
            continue
        # calls of one step come before the next step's draw: match them to the step by order
        while step + 1 < len(masks) and not _matches(cond_half, masks[step], empty):
            step += 1
        assert _matches(cond_half, masks[step], empty)
        checked += 1
    assert checked >= 3 * 3  # student, target and teacher calls of every step


def _matches(states: torch.Tensor, mask: torch.Tensor, empty: torch.Tensor) -> bool:
    is_empty = torch.tensor([torch.equal(s, empty) for s in states])
    return bool(torch.equal(is_empty, mask))  # the dataset's prompts ("shape i") are never empty


def test_prompt_dropout_runs_are_reproducible_and_differ_from_plain(tiny_cfg, dataset_fn, tmp_path):
    from safetensors.torch import load_file

    def run(name, p):
        out = tmp_path / name
        distill(tiny_cfg(output_dir=str(out), max_steps=2, batch_size=4, prompt_dropout=p, learning_rate=1e-2,
                         validation_prompts=[]),
                pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
        return load_file(str(out / "adapter" / "adapter_model.safetensors"))

    a, b, plain = run("a", 0.5), run("b", 0.5), run("plain", 0.0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_cfg_preserving_export_recommends_cfg(tiny_cfg, dataset_fn, tmp_path):
    out = tmp_path / "student"
    cfg = tiny_cfg(output_dir=str(out), max_steps=1, cfg_preserving=True, prompt_dropout=0.2, w_min=0.0, w_max=1.0,
                   sampling_guidance_scale=2.5, validation_prompts=[])
    distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    sampling = json.loads((out / "tlcm_sampling.json").read_text())
    assert sampling["guidance_scale"] == 2.5 and sampling["cfg_preserving"] is True
    assert sampling["negative_prompt"] is True
    assert "CFG-preserving" in (out / "README.md").read_text()
    from tlcm.sample import SampleConfig, resolve

    run = resolve(SampleConfig(model="unused", loras=[(str(out), 1.0)], prompts=["a"]))
    assert run.guidance_scale == 2.5  # `tlcm sample --lora DIR` samples it with CFG by default


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_dropout=1.0), "prompt_dropout"),
    (dict(prompt_dropout=-0.1), "prompt_dropout"),
    (dict(cfg_preserving=True, sampling_guidance_scale=2.5), "prompt_dropout > 0"),
    (dict(cfg_preserving=True, prompt_dropout=0.1), "sampling_guidance_scale"),
    (dict(cfg_preserving=True, prompt_dropout=0.1, sampling_guidance_scale=2.0, guidance_embedding=True,
          student="full"), "exclude each other"),
])
def test_bad_cfg_preserving_configs_fail_early(tiny_cfg, kw, match):
    with pytest.raises(TLCMError, match=match):
        validate_config(tiny_cfg(**kw), need_data=False)


def test_cfg_presets_resolve_and_validate():
    for name in ("toy-lcm-cfg", "toy-mlcd-cfg", "toy-tlcm-cfg"):
        cfg = resolve_config(name, flags={"teacher": "toy", "output_dir": "o"},
                             overrides=[] if "tlcm-cfg" not in name else ["init_lora="])
        assert cfg.cfg_preserving and cfg.prompt_dropout > 0 and cfg.sampling_guidance_scale > 1
        assert cfg.w_max <= 1.0  # small teacher guidance: the user's CFG is most of the guidance applied
        if name != "toy-tlcm-cfg":
            validate_config(cfg, need_data=False)
