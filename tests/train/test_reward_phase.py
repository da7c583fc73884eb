"""The trainer's reward term and latent-LPIPS distance with real (tiny) models: a CLIP score saved like a hub
checkpoint and read back by ``tlcm.losses.reward.load_reward``, an aesthetic head on it (a reward that ignores the
prompt), and latent LPIPS weights in the release layout. The formulas are recomputed here in float64 from the
recorded reward calls, and the decoded images from the student's recorded sample."""

from __future__ import annotations

import json

import pytest
import torch

from tests.losses.test_perceptual import random_state
from tests.losses.test_reward import save_clip, tiny_clip
from tlcm.errors import TLCMError
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.loop import distill

PROMPTS = ["shape 0", "shape 1", "shape 1", "shape 2"]
POOL = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("rewards")
    clip = save_clip(root / "clip", tiny_clip(0))
    g = torch.Generator().manual_seed(5)
    save_file({"weight": torch.randn(1, 16, generator=g), "bias": torch.zeros(1)}, str(root / "head.safetensors"))
    return {"clip": f"clip:{clip}", "aesthetic": f"aesthetic:{root / 'head.safetensors'},clip={clip}"}


def _losses(cfg, pipe):
    """The run's StepLosses as ``distill`` builds them (reward and margin through the loop's own loader)."""
    from tlcm.losses import NoiseSchedule
    from tlcm.train.loop import PromptEncoder, _load_reward
    from tlcm.train.phases import StepLosses
    from tlcm.train.student import build_networks

    nets = build_networks(pipe.unet, cfg)
    reward, margin = _load_reward(cfg, "cpu", torch.float32)
    encoder = PromptEncoder(pipe, 32, 32)
    losses = StepLosses(cfg, nets, nets.student, NoiseSchedule.from_config(pipe.scheduler.config), encoder,
                        torch.device("cpu"), torch.float32, 0, {}, vae=pipe.vae, reward=reward, reward_margin=margin,
                        prompt_pool=sorted(set(cfg.validation_prompts)))
    return nets, losses, reward


@pytest.mark.parametrize("spec,kind", [("clip", "hinge"), ("aesthetic", "hinge"), ("clip", "plain")])
def test_reward_term_is_the_reward_loss_of_the_decoded_student_sample(spec, kind, rewards, tiny_cfg, monkeypatch):
    import tlcm.train.phases as phases
    from tlcm.losses.reward import mismatched_prompts

    margin, mismatch_margin = 1e3, 0.5  # a margin no score reaches: the first hinge is active for every image
    cfg = tiny_cfg(recipe="mlcd", reward_model=rewards[spec], reward_weight=1.0, reward_kind=kind,
                   reward_margin=margin, reward_mismatch_margin=mismatch_margin, reward_sample_steps=[1, 2],
                   validation_prompts=POOL, seed=7)
    pipe = tiny_sd15_pipeline(0)
    nets, losses, reward = _losses(cfg, pipe)
    samples, calls = [], []
    real_walk, real_forward = phases.backward_simulation, reward.forward

    def walk(*a, **k):
        samples.append(real_walk(*a, **k))
        return samples[-1]

    def forward(images, prompts):
        calls.append((images.detach().clone(), list(prompts)))
        return real_forward(images, prompts)

    monkeypatch.setattr(phases, "backward_simulation", walk)
    monkeypatch.setattr(reward, "forward", forward)
    batch = {"latents": torch.zeros(4, 4, 16, 16), "prompt": PROMPTS, "negative_prompt": [""] * 4}
    loss = losses.reward_term(phases.MicroBatch(batch, step=3, micro=1))

    # the images the reward saw: the student's sample, decoded as the pipeline decodes (values clamped to [0, 1])
    (x,) = samples
    vae = pipe.vae
    with torch.no_grad():
        expected = (vae.decode(x.detach() / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(calls[0][0], expected, atol=1e-6, rtol=0)
    assert calls[0][1] == PROMPTS
    # the mismatched prompts: only for a reward that reads them, drawn from this step's own stream
    if kind == "hinge" and spec == "clip":
        assert len(calls) == 2 and torch.equal(calls[1][0], calls[0][0])
        gen = phases.step_generator(cfg.seed, 3, 1, 0, phases.MISMATCH)
        assert calls[1][1] == mismatched_prompts(PROMPTS, gen, pool=POOL)
        assert all(a != b for a, b in zip(calls[1][1], PROMPTS))
    else:
        assert len(calls) == 1
    # the loss, recomputed in float64 from the rewards of the recorded calls
    with torch.no_grad():
        r = [real_forward(images, prompts).double() for images, prompts in calls]
    if kind == "plain":
        want = -r[0].mean()
    else:
        want = (margin - r[0]).clamp(min=0).mean()
        if len(r) == 2:
            want = want + (r[1] - r[0] + mismatch_margin).clamp(min=0).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs()))
    # and its gradient reaches the student's LoRA (through the decode and the walk's last step)
    loss.backward()
    grads = [p.grad for p in nets.student_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


def test_reward_margin_comes_from_the_config_or_the_model(rewards, tiny_cfg, monkeypatch):
    import tlcm.losses.reward as reward_module
    from tlcm.train.loop import _load_reward

    hinge = dict(reward_model=rewards["clip"], reward_weight=1.0, reward_kind="hinge", validation_prompts=POOL)
    assert _load_reward(tiny_cfg(**hinge, reward_margin=2.5), "cpu", torch.float32)[1] == 2.5
    with pytest.raises(TLCMError, match="needs a margin"):  # a CLIP score has no default margin
        _load_reward(tiny_cfg(**hinge), "cpu", torch.float32)
    real = reward_module.load_reward

    def with_default(*a, **k):
        model = real(*a, **k)
        model.default_margin = 7.5  # as the toy reward stores one
        return model

    monkeypatch.setattr(reward_module, "load_reward", with_default)
    assert _load_reward(tiny_cfg(**hinge), "cpu", torch.float32)[1] == 7.5
    assert _load_reward(tiny_cfg(**{**hinge, "reward_kind": "plain"}), "cpu", torch.float32)[1] is None
    # one image per batch and no pool of other prompts: no mismatched prompt exists (an aesthetic score needs none)
    lone = dict(batch_size=1, validation_prompts=["a"])
    with pytest.raises(TLCMError, match="mismatched prompt"):
        _load_reward(tiny_cfg(**{**hinge, **lone}), "cpu", torch.float32)
    _load_reward(tiny_cfg(**{**hinge, **lone, "reward_model": rewards["aesthetic"]}), "cpu", torch.float32)


def test_a_batch_without_another_prompt_names_the_step_and_the_fix(rewards, tiny_cfg):
    import tlcm.train.phases as phases

    cfg = tiny_cfg(reward_model=rewards["clip"], reward_weight=1.0, reward_kind="hinge", reward_margin=1.0,
                   validation_prompts=[])
    _, losses, _ = _losses(cfg, tiny_sd15_pipeline(0))
    batch = {"latents": torch.zeros(2, 4, 16, 16), "prompt": ["same", "same"], "negative_prompt": ["", ""]}
    with pytest.raises(TLCMError, match="step 6.*too few distinct") as err:
        losses.reward_term(phases.MicroBatch(batch, step=5, micro=0))
    assert "validation_prompts" in err.value.fix


def test_a_run_with_a_reward_trains_and_logs_it(rewards, tiny_cfg, dataset_fn):
    cfg = tiny_cfg(recipe="mlcd", max_steps=2, reward_model=rewards["clip"], reward_weight=0.5, reward_kind="hinge",
                   reward_margin=1e3, reward_sample_steps=[1], validation_prompts=[], learning_rate=1e-2)
    out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert list(summary["parts"]) == ["student"]  # the reward is a term of the student's phase, not a part
    assert summary["final_losses"]["loss/reward"] > 0


def test_lpips_loss_type_measures_with_the_latent_lpips_of_the_weights_file(tiny_cfg, dataset_fn, tmp_path,
                                                                             monkeypatch):
    from safetensors.torch import save_file

    import tlcm.losses.consistency as consistency
    from tlcm.losses.perceptual import LatentLPIPS

    state = random_state()
    save_file(state, str(tmp_path / "lpips.safetensors"))
    seen = []
    real = consistency.distance

    def spy(a, b, kind="huber", huber_c=1e-3):
        seen.append(kind)
        return real(a, b, kind, huber_c)

    monkeypatch.setattr(consistency, "distance", spy)
    cfg = tiny_cfg(recipe="mlcd", max_steps=1, loss_type="lpips", lpips_weights=str(tmp_path / "lpips.safetensors"),
                   validation_prompts=[])
    out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    assert len(seen) == 1 and isinstance(seen[0], LatentLPIPS)
    got = seen[0].state_dict()
    assert all(torch.equal(got[k], state[k].float()) for k in got if not k.endswith("num_batches_tracked"))
    loss = json.loads((out / "train_summary.json").read_text())["final_losses"]["loss/consistency"]
    assert loss > 0
