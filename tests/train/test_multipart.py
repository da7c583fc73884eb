"""The multi-part trainer on tiny pipelines: gradient isolation per phase, bit-identical resume of every part,
persistent extra-loss state, an unchanged export format, and the state sources of stage 1."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tlcm.testing import tiny_sd15_components, tiny_sd15_pipeline
from tlcm.train.loop import distill

CALLS: list[int] = []


@pytest.fixture(scope="module")
def clip_reward(tmp_path_factory):
    """A tiny CLIP score saved like a hub checkpoint: the reward spec ``clip:DIR`` (tlcm.losses.reward)."""
    from tests.losses.test_reward import save_clip, tiny_clip

    return f"clip:{save_clip(tmp_path_factory.mktemp('reward') / 'clip', tiny_clip(0))}"


@pytest.fixture
def counting_loss():
    """An extra loss whose persistent state counts its calls (and records what it saw)."""
    from tlcm.losses import register_loss, unregister_loss

    @register_loss("unit_test_counter")
    def counter(ctx):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        CALLS.append(ctx.state["calls"])
        return ctx.main.loss * 0.0

    CALLS.clear()
    yield
    unregister_loss("unit_test_counter")


MULTI = dict(recipe="mlcd", dmd_weight=1.0, gan_weight=0.1, gan_backbone="fake", student_sample_steps=[1, 2],
             gan_real_steps=2, student_update_every=2, gradient_accumulation_steps=2, max_steps=3,
             checkpointing_steps=1, checkpoints_total_limit=3, learning_rate=1e-2, fake_learning_rate=1e-2,
             disc_learning_rate=1e-2,
             reward_weight=0.5, reward_kind="hinge", reward_margin=1e3, reward_mismatch_margin=0.5,
             reward_sample_steps=[1, 2], extra_losses={"unit_test_counter": 1.0}, validation_prompts=[])


def _run(tiny_cfg, dataset_fn, out, reward, resume=None, **kw):
    cfg = tiny_cfg(output_dir=str(out), reward_model=reward, **{**MULTI, **kw})
    return distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, resume=resume, log_with=None,
                   progress=False)


def _state(ckpt):
    return torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_multi_part_resume_is_bit_identical(tiny_cfg, dataset_fn, tmp_path, clip_reward, counting_loss):
    full = tmp_path / "full"
    _run(tiny_cfg, dataset_fn, full, clip_reward)
    assert CALLS == [1, 2, 3, 4]  # student phase at steps 0 and 2 (every 2nd), 2 micro-batches each
    ck1, ck3 = full / "checkpoints" / "checkpoint-1", full / "checkpoints" / "checkpoint-3"
    files = ["student_lora.safetensors", "fake_lora.safetensors"]
    assert all((ck3 / f).is_file() for f in files) and not (ck3 / "discriminator_heads.safetensors").exists()
    s3 = _state(ck3)
    assert sorted(s3["parts"]) == ["fake", "student"]
    assert s3["parts"]["student"]["updates"] == 2 and s3["parts"]["fake"]["updates"] == 3
    assert s3["extra_losses"] == {"unit_test_counter": {"calls": 4}}
    for f in files:  # every part moved between the checkpoints (the comparison below is not between idle parts)
        a, b = load_file(str(ck1 / f)), load_file(str(ck3 / f))
        assert any(not torch.equal(a[k], b[k]) for k in a), f
    assert any(k.startswith("heads.") for k in load_file(str(ck3 / "fake_lora.safetensors")))

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(ck1, part / "checkpoints" / "checkpoint-1")
    CALLS.clear()
    _run(tiny_cfg, dataset_fn, part, clip_reward, resume="latest")
    assert CALLS == [3, 4]  # the extra loss's state came back with the checkpoint
    rk3 = part / "checkpoints" / "checkpoint-3"
    for f in files:
        a, b = load_file(str(ck3 / f)), load_file(str(rk3 / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert _equal(s3, _state(rk3))  # optimisers, schedules, update counts, extra-loss state: all identical
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_exported_student_is_one_plain_lora(tiny_cfg, dataset_fn, tmp_path, clip_reward):
    """Fake adapter and discriminator heads never reach the output folder: same keys as an lcm run, and the file
    loads in plain diffusers as the trained student."""
    from diffusers import StableDiffusionPipeline

    from tlcm.train.config import DistillConfig
    from tlcm.train.student import build_networks, lora_state_dict

    out = tmp_path / "dmd"
    trained = tiny_sd15_pipeline(0)
    cfg = tiny_cfg(output_dir=str(out), reward_model=clip_reward, **{**MULTI, "gan_backbone": "teacher",
                                                                     "max_steps": 1, "gradient_accumulation_steps": 1,
                                                                     "extra_losses": {}})
    distill(cfg, pipe=trained, dataset_fn=dataset_fn, log_with=None, progress=False)
    unet = tiny_sd15_components(0)["unet"]
    build_networks(unet, DistillConfig(teacher="t", lora_rank=4, lora_alpha=4))  # what an lcm run exports
    expected = {f"base_model.model.{k}": v.shape for k, v in lora_state_dict(unet).items()}
    got = {k: v.shape for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items()}
    assert got == expected
    diffusers_keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert all(k.startswith("unet.") and "fake" not in k and "heads" not in k for k in diffusers_keys)
    assert len(diffusers_keys) == len(expected)

    z, t, e = torch.randn(1, 4, 16, 16), torch.tensor([499]), torch.randn(1, 16, 32)
    pipe = StableDiffusionPipeline(**tiny_sd15_components(0), requires_safety_checker=False)
    with torch.no_grad():
        student = trained.unet(z, t, e).sample  # the trained UNet, the student's adapter active
        base = pipe.unet(z, t, e).sample
        pipe.load_lora_weights(str(out))
        lora = pipe.unet(z, t, e).sample
    assert (lora - base).abs().max() > 1e-5
    torch.testing.assert_close(lora, student, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backbone", ["teacher", "fake"])
def test_each_phase_steps_its_part_alone(backbone, tiny_cfg, dataset_fn, tmp_path, monkeypatch, clip_reward):
    import tlcm.train.loop as loop
    from tlcm.train.parts import Part

    captured, records = {}, []
    real_build, real_sync = loop.build_parts, Part.sync_gradients

    def spy_build(*a, **k):
        parts, module = real_build(*a, **k)
        captured["parts"] = parts
        return parts, module

    def spy_sync(self, accelerator):  # called after the phase's backward, before its optimiser step
        others = {n: all(p.grad is None for p in q.params) for n, q in captured["parts"].items() if q is not self}
        grads = [p.grad for p in self.params]
        records.append((self.name, all(g is not None for g in grads),
                        sum(float(g.abs().sum()) for g in grads if g is not None), others))
        real_sync(self, accelerator)

    monkeypatch.setattr(loop, "build_parts", spy_build)
    monkeypatch.setattr(Part, "sync_gradients", spy_sync)
    cfg = tiny_cfg(output_dir=str(tmp_path / "o"), reward_model=clip_reward, **{**MULTI, "gan_backbone": backbone,
                                                                                "max_steps": 1,
                                                      "gradient_accumulation_steps": 1, "extra_losses": {},
                                                      "checkpointing_steps": 0})
    distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    names = [r[0] for r in records]
    assert names == (["student", "fake", "discriminator"] if backbone == "teacher" else ["student", "fake"])
    for name, all_have_grad, total, others in records:
        assert all_have_grad and total > 0, name  # the stepping part received gradients
        assert all(others.values()), (name, others)  # and no other part did


def _trajectory_dataset(num=8, k=3):
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(num, k, 4, 16, 16, generator=g)
    ts = torch.tensor([901, 461, 41])

    def make(rank, world):
        return [{"latents": traj[i, -1], "prompt": f"p{i % 2}", "negative_prompt": "", "trajectory": traj[i],
                 "trajectory_timesteps": ts} for i in range(rank, num, world)]

    return make, traj, ts


def test_stored_trajectory_states_feed_the_stage_1_loss(tiny_cfg, tmp_path, monkeypatch):
    import tlcm.train.phases as phases

    seen = []
    real = phases.mlcd_loss_at

    def spy(student, target, teacher, z, t, *a, **k):
        seen.append((z.detach().clone(), t.clone()))
        return real(student, target, teacher, z, t, *a, **k)

    monkeypatch.setattr(phases, "mlcd_loss_at", spy)
    make, traj, ts = _trajectory_dataset()
    cfg = tiny_cfg(recipe="mlcd", state_source="trajectory", output_dir=str(tmp_path / "o"), max_steps=2,
                   validation_prompts=[])
    distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=make, log_with=None, progress=False)
    assert len(seen) == 2
    flat = traj.reshape(-1, 4, 16, 16)
    for z, t in seen:
        for zi, ti in zip(z, t.tolist()):
            assert ti in ts.tolist()
            k = ts.tolist().index(ti)
            assert any(torch.equal(zi, flat[j]) for j in range(k, len(flat), len(ts)))  # the stored state at t


def test_teacher_path_states_in_the_loop(tiny_cfg, dataset_fn, tmp_path, monkeypatch):
    import tlcm.train.phases as phases
    from tlcm.math import segment_edges

    calls = []
    real = phases.teacher_path_states

    def spy(teacher, noise, t, w, schedule, edges):
        calls.append(edges.tolist())
        return real(teacher, noise, t, w, schedule, edges)

    monkeypatch.setattr(phases, "teacher_path_states", spy)
    cfg = tiny_cfg(recipe="lcm", state_source="teacher_path", teacher_path_segments=4, output_dir=str(tmp_path / "o"),
                   max_steps=1, validation_prompts=[])
    distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    assert calls == [segment_edges(4).tolist()]
