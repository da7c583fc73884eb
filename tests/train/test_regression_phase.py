"""The regression term in a training step: each record's own initial noise (its seed), the student's one-step sampler
timestep, the record's latent as target; and what the config refuses."""

from __future__ import annotations

import pytest
import torch

import tlcm.train.phases as phases
from tlcm.errors import TLCMError
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.config import DistillConfig, validate_config
from tlcm.train.loop import distill


def _pairs_dataset(num: int = 6):
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(num, 4, 16, 16, generator=g)

    def make(rank: int, world: int):
        return [{"latents": latents[i], "prompt": f"shape {i % 3}", "negative_prompt": "", "seed": 1000 + 17 * i,
                 "guidance_scale": 4.0} for i in range(rank, num, world)]

    return make, latents


@pytest.mark.parametrize("recipe", ["mlcd", "lcm"])
def test_regression_uses_each_records_noise_and_the_one_step_sampler(recipe, tiny_cfg, tmp_path, monkeypatch):
    from tlcm.scheduler import TLCMScheduler

    seen = []
    real = phases.regression_loss

    def spy(net, noise, x0, t_start, schedule, mode, boundary, kind, huber_c):
        seen.append((noise.clone(), x0.clone(), int(t_start), mode, boundary))
        return real(net, noise, x0, t_start, schedule, mode, boundary, kind, huber_c)

    monkeypatch.setattr(phases, "regression_loss", spy)
    make, latents = _pairs_dataset()
    out = tmp_path / recipe
    cfg = tiny_cfg(output_dir=str(out), recipe=recipe, regression_weight=0.5, consistency_weight=1.0, max_steps=2,
                   batch_size=3, w_min=3.0, w_max=3.0, validation_prompts=[])
    distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=make, log_with=None, progress=False)
    assert len(seen) == 2
    by_latent = {tuple(latents[i].flatten()[:4].tolist()): 1000 + 17 * i for i in range(len(latents))}
    sched = TLCMScheduler.from_pretrained(str(out / "scheduler"))
    sched.set_timesteps(1)
    for noise, x0, t_start, mode, boundary in seen:
        for j in range(x0.shape[0]):  # the noise tlcm synthesize drew for that record: randn from its seed
            seed = by_latent[tuple(x0[j].flatten()[:4].tolist())]
            ref = torch.randn(tuple(x0.shape[1:]), generator=torch.Generator().manual_seed(seed))
            assert torch.equal(noise[j], ref)
        # the student's own one-step sampler: its first timestep and parameterisation
        assert t_start == int(sched.timesteps[0])
        assert boundary == sched.config.boundary_condition and mode == sched.config.mode


def _valid(**kw) -> DistillConfig:
    return DistillConfig(**{"teacher": "t", "output_dir": "o", "regression_weight": 1.0, "w_min": 3.0,
                            "w_max": 3.0, **kw})


def test_regression_needs_synthesized_pairs_at_the_students_guidance(tmp_path):
    from tlcm.data import write_shards

    synth = write_shards(tmp_path / "synth", torch.zeros(2, 4, 8, 8), ["a", "b"], seeds=[0, 1], guidance_scale=4.0,
                         meta={"source": "synthesize", "generation": {"guidance_scale": 4.0}})
    validate_config(_valid(data=str(synth)))  # g = 4 is w = 3: accepted
    with pytest.raises(TLCMError, match=r"solved at guidance 4 \(w = 3 .*w in \[1, 1\]"):
        validate_config(_valid(data=str(synth), w_min=1.0, w_max=1.0))
    with pytest.raises(TLCMError, match=r"w in \[2, 6\]"):
        validate_config(_valid(data=str(synth), w_min=2.0, w_max=6.0))
    images = write_shards(tmp_path / "img", torch.zeros(2, 4, 8, 8), ["a", "b"], meta={"source": "images"})
    with pytest.raises(TLCMError, match="encoded images"):
        validate_config(_valid(data=str(images)))
    with pytest.raises(TLCMError, match="regression_weight=-1.0 must not be negative"):
        validate_config(_valid(regression_weight=-1.0), need_data=False)
    # regression alone is a loss term: the "every weight 0" guard counts it
    validate_config(_valid(consistency_weight=0.0), need_data=False)


def test_regression_refuses_records_without_a_seed(tiny_cfg, dataset_fn, tmp_path):
    # records with no seed (here: latents handed in through the API) have no known initial noise: no silent seed 0
    cfg = tiny_cfg(output_dir=str(tmp_path / "o"), recipe="mlcd", regression_weight=1.0, max_steps=1,
                   w_min=3.0, w_max=3.0, validation_prompts=[])
    with pytest.raises(TLCMError, match="carry no seed"):
        distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
