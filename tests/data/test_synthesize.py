"""The synthetic engine on tiny SD1.5/SDXL teachers: determinism, resume, no-op, refusals, solvers, CLI errors."""

import json

import pytest
import torch

import tlcm.data.synthesize as syn
from tlcm.cli import main
from tlcm.data import open_shards, read_manifest
from tlcm.data.synthesize import SynthesizeConfig, regenerate, synthesize
from tlcm.errors import TLCMError


def _cfg(teacher, prompts, out, **kw):
    base = dict(teacher=str(teacher), prompts=str(prompts), out=str(out), steps=2, records_per_shard=2, batch_size=2,
                progress=False)
    return SynthesizeConfig(**{**base, **kw})


def _shas(out):
    return [(s["name"], s["sha256"], s["json_sha256"]) for s in read_manifest(out)["shards"]]


def _latents(out):
    return torch.stack([r["latents"] for r in open_shards(out, shuffle=False)])


def test_same_seed_same_latent_and_regeneration(sd15_dir, prompt_file, tmp_path):
    a = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "a", num_records=5, latent_dtype="fp32"))
    b = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "b", num_records=5, latent_dtype="fp32"))
    assert _shas(a) == _shas(b)
    recs = list(open_shards(a, shuffle=False))
    assert [r["seed"] for r in recs] == [0, 1, 2, 3, 4]
    from tlcm.data import load_shard

    assert load_shard(a, read_manifest(a)["shards"][1])[0]["seeds"].tolist() == [2, 3]
    assert [r["prompt"] for r in recs] == ["a red circle", "a blue square", "green triangle", "yellow star",
                                          "a red circle"]  # prompts cycle, seeds do not
    assert not torch.equal(recs[0]["latents"], recs[4]["latents"])
    again = regenerate(a, [3, 0, 4], device="cpu")  # any subset, from the manifest alone, bit for bit
    assert torch.equal(again, torch.stack([recs[3]["latents"], recs[0]["latents"], recs[4]["latents"]]))
    c = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "c", num_records=5, latent_dtype="fp32", seed=1))
    assert not torch.allclose(_latents(c)[0], recs[0]["latents"])


def test_resume_after_interruption_equals_uninterrupted_run(sd15_dir, prompt_file, tmp_path, monkeypatch):
    full = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "full", num_records=7))
    real, calls = syn.generate_batch, []

    def dying(*args, **kwargs):
        calls.append(len(args[3]))
        if len(calls) == 3:  # killed in the middle of shard 1 (batch 2 of ... ) : that shard is lost
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "generate_batch", dying)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        synthesize(_cfg(sd15_dir, prompt_file, out, num_records=7, records_per_shard=3, batch_size=2))
    # records_per_shard differs from `full`: the manifest locked the first configuration, so it is refused
    with pytest.raises(TLCMError, match="records_per_shard: 3 -> 2"):
        synthesize(_cfg(sd15_dir, prompt_file, out, num_records=7))
    (out / "manifest.json").unlink()
    for p in out.glob("shard-*"):
        p.unlink()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        synthesize(_cfg(sd15_dir, prompt_file, out, num_records=7))
    assert (out / "shard-00001.json").exists() and not (out / "shard-00002.json").exists()
    assert not read_manifest(out)["complete"]
    with pytest.raises(TLCMError, match="incomplete"):
        open_shards(out)
    # A kill between the tensor file and its JSON, and a stray temporary file, are both harmless.
    (out / "shard-00002.safetensors").write_bytes(b"half a shard")
    (out / ".shard-00003.safetensors.abc.tmp").write_bytes(b"junk")
    calls.clear()
    monkeypatch.setattr(syn, "generate_batch", lambda *a, **k: (calls.append(len(a[3])), real(*a, **k))[1])
    synthesize(_cfg(sd15_dir, prompt_file, out, num_records=7))
    assert calls == [2, 1]  # only shards 2 and 3 (records 4..6) were generated
    assert _shas(out) == _shas(full) and read_manifest(out)["complete"]
    assert not list(out.glob(".*.tmp"))
    # Re-running a complete dataset is a no-op: it does not even load the teacher.
    monkeypatch.setattr("tlcm.models.load_pipeline", lambda *a, **k: pytest.fail("teacher loaded"))
    synthesize(_cfg(sd15_dir, prompt_file, out, num_records=7))
    assert _shas(out) == _shas(full)


def test_changed_config_refused_unless_overwrite(sd15_dir, prompt_file, tmp_path):
    out = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "d", num_records=3))
    with pytest.raises(TLCMError, match=r"different configuration: steps: 2 -> 3") as err:
        synthesize(_cfg(sd15_dir, prompt_file, out, num_records=3, steps=3))
    assert "--overwrite" in str(err.value)
    other = tmp_path / "other.txt"
    other.write_text("something else\n")
    with pytest.raises(TLCMError, match="prompts_sha256"):
        synthesize(_cfg(sd15_dir, other, out, num_records=3))
    synthesize(_cfg(sd15_dir, prompt_file, out, num_records=3, steps=3, overwrite=True))
    m = read_manifest(out)
    assert m["generation"]["steps"] == 3 and m["complete"] and m["num_records"] == 3


def test_mismatched_teacher_refused(sd15_dir, sd15_other_dir, prompt_file, tmp_path):
    out = synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "t", num_records=2))
    with pytest.raises(TLCMError, match="fingerprint") as err:
        synthesize(_cfg(sd15_other_dir, prompt_file, out, num_records=2))
    assert str(sd15_dir) in str(err.value)


def test_sdxl_embeddings_and_trajectory(sdxl_dir, prompt_file, tmp_path):
    out = synthesize(_cfg(sdxl_dir, prompt_file, tmp_path / "xl", num_records=3, steps=3, save_embeddings=True,
                          trajectory_steps=[1, 2], negative_prompt="ugly", save_images="jpeg"))
    m = read_manifest(out)
    assert m["teacher"]["sdxl"] and m["generation"]["guidance_scale"] == 6.0 and m["latent_shape"] == [4, 16, 16]
    assert (m["generation"]["height"], m["generation"]["width"]) == (32, 32)
    r = next(iter(open_shards(out, shuffle=False)))
    assert r["negative_prompt"] == "ugly" and r["guidance_scale"] == 6.0
    assert r["prompt_embeds"].shape == (16, 64) and r["pooled_prompt_embeds"].shape == (32,)
    assert r["trajectory"].shape == (2, 4, 16, 16) and r["trajectory_timesteps"].shape == (2,)
    assert len(list((out / "images").glob("*.jpg"))) == 3


def test_ddim_and_euler_trajectories_agree(sd15_dir, prompt_file, tmp_path):
    # DDIM is Euler's method in (z/alpha, sigma/alpha): the stored states, both in the DDPM convention
    # z_t = alpha_t x0 + sigma_t eps, must coincide when the grids match (final steps differ: DDIM stops at t=0's
    # alpha, Euler at sigma=0).
    kw = dict(num_records=2, steps=4, trajectory_steps=[1, 2, 3], latent_dtype="fp32")
    d = list(open_shards(synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "ddim", solver="ddim", **kw)),
                         shuffle=False))
    e = list(open_shards(synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "euler", solver="euler", **kw)),
                         shuffle=False))
    for a, b in zip(d, e):
        assert a["trajectory_timesteps"].tolist() == b["trajectory_timesteps"].tolist()
        torch.testing.assert_close(a["trajectory"], b["trajectory"], rtol=1e-3, atol=1e-3)
    p = list(open_shards(synthesize(_cfg(sd15_dir, prompt_file, tmp_path / "dpm", **kw)), shuffle=False))
    assert not torch.allclose(p[0]["latents"], d[0]["latents"])


def _cli(capsys, *argv):
    code = main(["synthesize", *map(str, argv)])
    return code, capsys.readouterr().err


def test_cli_bad_inputs(sd15_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = _cli(capsys, "--teacher", sd15_dir, "--prompts", tmp_path / "nope.txt", "--out", out)
    assert code == 2 and "nope.txt" in err and "does not exist" in err and "Traceback" not in err
    (tmp_path / "empty.txt").write_text("\n\n")
    code, err = _cli(capsys, "--teacher", sd15_dir, "--prompts", tmp_path / "empty.txt", "--out", out)
    assert code == 2 and "holds no prompts" in err
    (tmp_path / "p.jsonl").write_text(json.dumps({"caption": "x"}) + "\n")
    code, err = _cli(capsys, "--teacher", sd15_dir, "--prompts", tmp_path / "p.jsonl", "--prompt-column", "text",
                     "--out", out)
    assert code == 2 and "no column 'text'" in err and "caption" in err
    code, err = _cli(capsys, "--teacher", tmp_path / "no-teacher", "--prompts", prompt_file, "--out", out)
    assert code == 2 and "no-teacher" in err
    code, err = _cli(capsys, "--teacher", sd15_dir, "--prompts", prompt_file, "--out", out, "--trajectory", "0,5",
                     "--steps", "4")
    assert code == 2 and "outside 1..3" in err
    code, err = _cli(capsys, "--prompts", prompt_file, "--out", out)
    assert code == 2 and "--teacher" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    code, err = _cli(capsys, "--teacher", sd15_dir, "--prompts", prompt_file, "--out", tmp_path / "busy")
    assert code == 2 and "not empty" in err


def test_cli_generate_and_inspect(sd15_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "ds"
    code, _ = _cli(capsys, "--teacher", sd15_dir, "--prompts", prompt_file, "--out", out, "--steps", "2",
                   "--records-per-shard", "3", "--no-progress")
    assert code == 0 and read_manifest(out)["num_records"] == 4
    code = main(["synthesize", "--inspect", str(out / "shard-00001.safetensors"), "--grid", str(tmp_path / "g.png")])
    text = capsys.readouterr().out
    assert code == 0 and "1 records from #3" in text and "sha256 ok" in text and (tmp_path / "g.png").exists()
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    code, err = _cli(capsys, "--inspect", shard, "--max-images", "0")
    assert code == 2 and str(shard) in err and "corrupt" in err


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("negatives", [None, ["ugly", "blurry"]])
def test_generation_matches_a_plain_pipeline_call(kind, negatives):
    # Embeddings computed outside the pipeline (uncond once per run) must give what diffusers gives by itself.
    from tlcm.data.synthesize import _latent_spec, generate_batch, initial_noise, make_scheduler
    from tlcm.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sd15_pipeline if kind == "sd15" else tiny_sdxl_pipeline)(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(pipe, "dpmpp")
    shape, size = _latent_spec(pipe)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    ours = generate_batch(pipe, prompts, negatives, seeds, steps=3, guidance_scale=5.0, latent_shape=shape,
                          size=size)["latents"]
    ref = pipe(prompt=prompts, negative_prompt=negatives, latents=initial_noise(seeds, shape), num_inference_steps=3,
               guidance_scale=5.0, output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_dry_run_plans_without_writing(sd15_dir, prompt_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "dry"
    args = ["--teacher", sd15_dir, "--prompts", prompt_file, "--out", out, "--steps", "2", "--records-per-shard", "2",
            "--num-records", "5", "--no-progress"]
    monkeypatch.setattr("tlcm.models.load_pipeline", lambda *a, **k: pytest.fail("teacher loaded"))
    code = main(["synthesize", *map(str, args), "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and not out.exists()
    assert plan["action"] == "new dataset" and plan["records"] == 5 and plan["shards"] == 3
    assert plan["prompts_kept"] == 4 and plan["duplicates_removed"] == 1 and plan["seeds"] == "0..4"
    monkeypatch.undo()
    assert main(["synthesize", *map(str, args)]) == 0
    capsys.readouterr()
    (out / "shard-00002.json").unlink()
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "complete": False}))
    assert main(["synthesize", *map(str, args), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["action"] == "resume: 2 of 3 shards done"
    code, err = _cli(capsys, *args, "--steps", "3", "--dry-run")
    assert code == 2 and "steps: 2 -> 3" in err
