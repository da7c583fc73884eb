"""The training loop on tiny pipelines: learning, resume exactness, export, NaN stop."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tlcm.errors import TLCMError
from tlcm.losses import NoiseSchedule, lcm_loss, mlcd_loss, tlcm_loss
from tlcm.testing import tiny_sd15_pipeline
from tlcm.train.loop import distill


def _nets_and_loss(recipe, cfg):
    """The networks and a closure computing the recipe's loss on one fixed batch with fixed randomness."""
    from tlcm.models import encode_prompts
    from tlcm.train.recipes import edges_of
    from tlcm.train.student import build_networks

    pipe = tiny_sd15_pipeline(0)
    nets = build_networks(pipe.unet, cfg)
    cond = encode_prompts(pipe, ["a", "b", "c", "d"])
    uncond = encode_prompts(pipe, [""] * 4)
    schedule = NoiseSchedule.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    unet = nets.student

    def student(z, t):
        return unet(z, t, **cond.unet_kwargs()).sample

    def teacher(z, t):
        with nets.teacher_context(unet) as u:
            return u(z, t, **cond.unet_kwargs()).sample, u(z, t, **uncond.unet_kwargs()).sample

    def loss():
        if recipe == "lcm":
            return lcm_loss(student, student, teacher, x0, noise, torch.tensor([19, 259, 499, 999]), 4.0, schedule)
        if recipe == "mlcd":
            return mlcd_loss(student, student, teacher, x0, noise, torch.tensor([19, 259, 499, 999]), 4.0, schedule,
                             torch.from_numpy(edges_of(cfg)), loss_type="l2")
        return tlcm_loss(student, student, teacher, x0, noise, torch.tensor([999, 739, 499, 239]),
                         torch.tensor([499, 239, -1, -1]), 4.0, schedule, num_substeps=2)

    return nets, loss


@pytest.mark.parametrize("recipe", ["lcm", "mlcd", "tlcm"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(recipe, tiny_cfg):
    cfg = tiny_cfg(recipe=recipe, lora_rank=8, lora_alpha=8)
    nets, loss = _nets_and_loss(recipe, cfg)
    opt = torch.optim.SGD(nets.trainable_parameters(), lr=0.0)
    before = loss().loss
    before.backward()
    # a small step along the negative gradient (normalised), the target held as the loss defines it
    grads = [p.grad for p in nets.trainable_parameters()]
    norm = torch.sqrt(sum((g**2).sum() for g in grads))
    assert norm > 0
    with torch.no_grad():
        for p in nets.trainable_parameters():
            p -= 1e-2 * p.grad / norm
    opt.zero_grad()
    with torch.no_grad():
        after = loss().loss
    assert after < before, (float(before), float(after))


def _lora(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_save_resume_reproduces_uninterrupted_run(tiny_cfg, dataset_fn, tmp_path):
    common = dict(recipe="lcm", max_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2,
                  lr_scheduler="constant_with_warmup", lr_warmup_steps=3, learning_rate=1e-2, validation_prompts=[])
    full = tmp_path / "full"
    distill(tiny_cfg(output_dir=str(full), **common), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn,
            log_with=None, progress=False)
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2", "checkpoint-4"]
    # "interrupted" run: only what existed at step 2
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-2", part / "checkpoints" / "checkpoint-2")
    distill(tiny_cfg(output_dir=str(part), **common), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn,
            resume="latest", log_with=None, progress=False)
    a, b = _lora(full), _lora(part)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "train_summary.json").read_text())["resumed_from_step"] == 2
    # and the weights did move (the comparison is not between two untouched adapters)
    c = load_file(str(full / "checkpoints" / "checkpoint-2" / "student_lora.safetensors"))
    assert any(not torch.equal(c[k], a[k.removeprefix("base_model.model.")] if k in a else a["base_model.model." + k])
               for k in c)


def test_resume_without_checkpoint_is_clear(tiny_cfg, dataset_fn):
    with pytest.raises(TLCMError, match="no checkpoint found"):
        distill(tiny_cfg(), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, resume="latest", log_with=None,
                progress=False)


def test_output_folder_and_lora_loads_in_plain_diffusers(tiny_cfg, dataset_fn, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel

    from tlcm.testing import tiny_sd15_components

    out = tmp_path / "student"
    cfg = tiny_cfg(recipe="mlcd", output_dir=str(out), max_steps=2, learning_rate=0.05, checkpointing_steps=1,
                   checkpoints_total_limit=1)
    trained = tiny_sd15_pipeline(0)
    distill(cfg, pipe=trained, dataset_fn=dataset_fn, progress=False)
    for name in ("pytorch_lora_weights.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "scheduler/scheduler_config.json", "tlcm_sampling.json", "config.yaml", "README.md"):
        assert (out / name).is_file(), name
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-2"]  # keep last K = 1
    assert list((out / "validation").glob("*.png")) and list((out / "logs").rglob("events.out.tfevents*"))
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "TLCMScheduler" and sched["mode"] == "segments" and sched["num_segments"] == 2
    sampling = json.loads((out / "tlcm_sampling.json").read_text())
    assert sampling["recipe"] == "mlcd" and sampling["base_model"] == "tiny"

    z, t, e = torch.randn(1, 4, 16, 16), torch.tensor([499]), torch.randn(1, 16, 32)
    pipe = StableDiffusionPipeline(**tiny_sd15_components(0), requires_safety_checker=False)
    with torch.no_grad():
        student = trained.unet(z, t, e).sample  # the trained UNet, adapter active
        base = pipe.unet(z, t, e).sample
        pipe.load_lora_weights(str(out))
        lora = pipe.unet(z, t, e).sample
        peft_unet = PeftModel.from_pretrained(tiny_sd15_components(0)["unet"], str(out / "adapter"))
        via_peft = peft_unet(z, t, e).sample
    assert (lora - base).abs().max() > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(lora, student, atol=1e-4, rtol=1e-4)  # the diffusers file is the student
    torch.testing.assert_close(via_peft, student, atol=1e-4, rtol=1e-4)  # and so is the peft folder


def test_lora_alpha_other_than_rank_loads_at_its_trained_scale(tiny_cfg, dataset_fn, tmp_path):
    """The diffusers file carries the adapter's LoraConfig: without it load_lora_weights assumes alpha = rank and
    scales an alpha-8 rank-4 LoRA by 1 instead of 2."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from tlcm.testing import tiny_sd15_components

    out = tmp_path / "alpha"
    cfg = tiny_cfg(recipe="mlcd", output_dir=str(out), max_steps=2, learning_rate=0.05, lora_rank=4, lora_alpha=8,
                   validation_prompts=[])
    trained = tiny_sd15_pipeline(0)
    distill(cfg, pipe=trained, dataset_fn=dataset_fn, log_with=None, progress=False)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8

    z, t, e = torch.randn(2, 4, 16, 16), torch.tensor([499, 99]), torch.randn(2, 16, 32)
    pipe = StableDiffusionPipeline(**tiny_sd15_components(0), requires_safety_checker=False)
    with torch.no_grad():
        student = trained.unet(z, t, e).sample
        base = pipe.unet(z, t, e).sample
        pipe.load_lora_weights(str(out))
        lora = pipe.unet(z, t, e).sample
    # the same float32 ops on the same weights: equal up to a few roundings of the output's magnitude (without the
    # metadata the output differs by 0.87 here)
    tol = 16 * torch.finfo(torch.float32).eps * float(student.abs().max())
    assert float((student - base).abs().max()) > 1000 * tol  # the LoRA's part is far above the tolerance
    torch.testing.assert_close(lora, student, atol=tol, rtol=0)


def test_nan_loss_stops_with_step_and_checkpoint(tiny_cfg, dataset_fn):
    from tlcm.losses import register_loss, unregister_loss

    @register_loss("unit_test_nan_after_2")
    def nan_after_two(ctx):
        return torch.tensor(float("nan")) if ctx.step >= 2 else torch.tensor(0.0)

    try:
        cfg = tiny_cfg(max_steps=5, checkpointing_steps=2, extra_losses={"unit_test_nan_after_2": 1.0})
        with pytest.raises(TLCMError, match=r"at step 3(.|\n)*checkpoint-2"):
            distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    finally:
        unregister_loss("unit_test_nan_after_2")


def test_full_finetune_with_guidance_embedding_resumes_and_exports_unet(tiny_cfg, dataset_fn, tmp_path):
    """Full LCM: a student UNet with a w embedding, an EMA target (checkpointed), a unet/ folder."""
    from diffusers import UNet2DConditionModel

    common = dict(recipe="lcm", student="full", guidance_embedding=True, max_steps=2, checkpointing_steps=1,
                  ema_decay=0.5, learning_rate=1e-3, validation_prompts=[])
    full = tmp_path / "full"
    distill(tiny_cfg(output_dir=str(full), **common), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn,
            log_with=None, progress=False)
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "checkpoint-1", part / "checkpoints" / "checkpoint-1")
    distill(tiny_cfg(output_dir=str(part), **common), pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn,
            resume="latest", log_with=None, progress=False)
    a = UNet2DConditionModel.from_pretrained(str(full / "unet"))
    b = UNet2DConditionModel.from_pretrained(str(part / "unet"))
    assert a.config.time_cond_proj_dim is not None
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # EMA target restored exactly
    teacher = tiny_sd15_pipeline(0).unet.state_dict()
    assert any(not torch.equal(sa[k], teacher[k]) for k in teacher)
    assert not (full / "pytorch_lora_weights.safetensors").exists()


def test_sdxl_lora_exports_and_loads(tiny_cfg, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from tlcm.testing import tiny_sdxl_components, tiny_sdxl_pipeline

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(4, 4, 16, 16, generator=g)

    def ds(rank, world):
        return [{"latents": lat[i], "prompt": "x", "negative_prompt": ""} for i in range(rank, 4, world)]

    out = tmp_path / "xl"
    trained = tiny_sdxl_pipeline(0)
    distill(tiny_cfg(recipe="lcm", output_dir=str(out), max_steps=1, learning_rate=0.05, validation_prompts=[],
                     resolution=32, uncond="zeros"), pipe=trained, dataset_fn=ds, log_with=None, progress=False)
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(0))
    z, t = torch.randn(1, 4, 16, 16), torch.tensor([499])
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]])
    kw = dict(encoder_hidden_states=torch.randn(1, 16, 64),
              added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": time_ids})
    with torch.no_grad():
        student = trained.unet(z, t, **kw).sample
        base = pipe.unet(z, t, **kw).sample
        pipe.load_lora_weights(str(out))
        lora = pipe.unet(z, t, **kw).sample
    assert (lora - base).abs().max() > 1e-5
    torch.testing.assert_close(lora, student, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_lora_step_runs(tiny_cfg, dataset_fn):
    cfg = tiny_cfg(recipe="mlcd", max_steps=1, mixed_precision="bf16", validation_prompts=[])
    out = distill(cfg, pipe=tiny_sd15_pipeline(0), dataset_fn=dataset_fn, log_with=None, progress=False)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 1 and all(v == v for v in summary["final_losses"].values())  # finite
    lora = _lora(out)
    assert all(v.dtype == torch.float32 for v in lora.values())  # LoRA kept in fp32


def test_stored_text_embeddings_are_used(tiny_cfg, monkeypatch):
    """Shards with prompt_embeds: the text encoder only sees the unconditional prompt."""
    import tlcm.models

    seen: list[str] = []
    real = tlcm.models.encode_prompts

    def spy(pipe, prompts, *a, **k):
        seen.extend(prompts)
        return real(pipe, prompts, *a, **k)

    monkeypatch.setattr(tlcm.models, "encode_prompts", spy)
    g = torch.Generator().manual_seed(0)
    recs = [{"latents": torch.randn(4, 16, 16, generator=g), "prompt": f"never encoded {i}", "negative_prompt": "",
             "prompt_embeds": torch.randn(16, 32, generator=g)} for i in range(4)]
    distill(tiny_cfg(max_steps=1, validation_prompts=[]), pipe=tiny_sd15_pipeline(0), dataset_fn=lambda r, w: recs,
            log_with=None, progress=False)
    assert seen and set(seen) == {""}


@pytest.mark.parametrize("student", ["lora", "full"])
def test_every_random_init_follows_the_seed_alone(student):
    """Equal configs build equal networks whatever the global RNG holds, and building leaves the global RNG as it
    was: the student (LoRA A matrices; a full student's new guidance embedding), the fake adapter and the heads."""
    from tlcm.testing import tiny_sd15_components
    from tlcm.train.config import DistillConfig
    from tlcm.train.student import build_networks

    def build(global_seed: int, seed: int = 3):
        cfg = DistillConfig(teacher="t", student=student, lora_rank=4, lora_alpha=4, seed=seed, dmd_weight=1.0,
                            gan_weight=0.1, guidance_embedding=student == "full")
        unet = tiny_sd15_components(0)["unet"]
        torch.manual_seed(global_seed)
        nets = build_networks(unet, cfg)
        after = torch.rand(1)
        torch.manual_seed(global_seed)
        assert torch.equal(after, torch.rand(1))  # the global RNG did not move
        return {name: p.detach().clone() for name, p in
                [*nets.student.named_parameters(), *nets.teacher_unet.named_parameters(),
                 *(("heads." + n, p) for n, p in nets.heads.named_parameters())]}

    a, b, c = build(0), build(1), build(0, seed=4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the randomly initialised tensors (GroupNorm affine and lora_B start as constants)
    random = [k for k in a if "lora_A" in k or "cond_proj.weight" in k or (k.startswith("heads.") and a[k].ndim > 1)]
    assert any("fake" in k for k in random) and any(k.startswith("heads.") for k in random)
    assert any("cond_proj" in k for k in random) == (student == "full")
    assert all(not torch.equal(a[k], c[k]) for k in random)  # another seed, other inits
