"""Data sets: identity on resume, ownership of shard files, repair of damaged shards, `--inspect`, range checks.

Each test is one of the failing cases of issue 12, on the tiny SD1.5 teacher (2 solver steps, 2 records a shard)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import tlcm.data.synthesize as syn
from tlcm.cli import main
from tlcm.data import read_manifest
from tlcm.data.synthesize import SynthesizeConfig, config_from_manifest, synthesize
from tlcm.errors import TLCMError
from tlcm.runlock import hold


def _cfg(teacher, prompts, out, **kw):
    base = dict(teacher=str(teacher), prompts=str(prompts), out=str(out), steps=2, records_per_shard=2, batch_size=2,
                num_records=5, progress=False)
    return SynthesizeConfig(**{**base, **kw})


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def _interrupt_after(monkeypatch, calls: int):
    """generate_batch raises KeyboardInterrupt on call number ``calls`` (shards before it are complete)."""
    real, seen = syn.generate_batch, []

    def dying(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "generate_batch", dying)
    return lambda: monkeypatch.setattr(syn, "generate_batch", real)


def _count_batches(monkeypatch):
    real, seen = syn.generate_batch, []
    monkeypatch.setattr(syn, "generate_batch", lambda *a, **k: (seen.append(len(a[3])), real(*a, **k))[1])
    return seen


def test_resume_without_the_guidance_flag_is_refused_and_repair_uses_the_recorded_one(tiny_sd15_dir, prompts5,
                                                                                      tmp_path, monkeypatch, capsys):
    out = tmp_path / "g3"
    restore = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        synthesize(_cfg(tiny_sd15_dir, prompts5, out, guidance_scale=3.0))
    restore()
    # the plain re-run without --guidance-scale means 7.5: that is another data set, never a silent mix
    with pytest.raises(TLCMError, match=r"guidance_scale: 3\.0 -> 7\.5"):
        synthesize(_cfg(tiny_sd15_dir, prompts5, out))
    assert not read_manifest(out)["complete"]
    # --repair takes every setting from the manifest
    code = main(["synthesize", "--repair", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    m = read_manifest(out)
    assert m["complete"] and m["generation"]["guidance_scale"] == 3.0
    records = [r for p in sorted(out.glob("shard-*.json")) for r in json.loads(p.read_text())["records"]]
    assert [r["guidance_scale"] for r in records] == [3.0] * 5
    full = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "full", guidance_scale=3.0))
    assert _shards(out) == _shards(full)


def test_a_second_writer_is_refused_while_the_first_runs(tiny_sd15_dir, prompts5, tmp_path, capsys):
    out = tmp_path / "busy"
    with hold(out, what="data set", command="tlcm synthesize (the first run)"):
        with pytest.raises(TLCMError, match=r"is in use: pid \d+ .*\(tlcm synthesize \(the first run\)\)"):
            synthesize(_cfg(tiny_sd15_dir, prompts5, out))
        code = main(["synthesize", "--teacher", str(tiny_sd15_dir), "--prompts", str(prompts5), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "in use" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists()  # the refused run wrote nothing


def test_foreign_shard_files_are_not_adopted(tiny_sd15_dir, prompts5, tmp_path, monkeypatch, capsys):
    other = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "other", seed=100))
    out = tmp_path / "mine"
    restore = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        synthesize(_cfg(tiny_sd15_dir, prompts5, out))
    restore()
    for name in ("shard-00001.safetensors", "shard-00001.json", "shard-00002.safetensors", "shard-00002.json"):
        shutil.copy(other / name, out / name)  # complete, well-formed, but another configuration's
    capsys.readouterr()
    calls = _count_batches(monkeypatch)
    synthesize(_cfg(tiny_sd15_dir, prompts5, out))
    assert calls == [2, 1]  # shards 1 and 2 regenerated, shard 0 kept
    assert "another data set configuration" in capsys.readouterr().out
    full = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "full"))
    assert _shards(out) == _shards(full)


def test_rerun_and_repair_regenerate_damaged_shards_byte_identically(tiny_sd15_dir, prompts5, tmp_path, monkeypatch,
                                                                     capsys):
    out = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "ds"))
    original, manifest = _shards(out), (out / "manifest.json").read_bytes()
    blob = bytearray((out / "shard-00001.safetensors").read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit flipped: same size, other checksum
    (out / "shard-00001.safetensors").write_bytes(bytes(blob))
    (out / "shard-00002.json").unlink()
    calls = _count_batches(monkeypatch)
    synthesize(_cfg(tiny_sd15_dir, prompts5, out))  # the plain re-run, once "complete, nothing to do"
    assert calls == [2, 1] and _shards(out) == original and (out / "manifest.json").read_bytes() == manifest
    text = capsys.readouterr().out
    assert "shard-00001.safetensors is corrupt" in text and "shard-00002.json is missing" in text
    # --repair (settings from the manifest) on a truncated shard
    (out / "shard-00000.safetensors").write_bytes(original["shard-00000.safetensors"][:100])
    calls.clear()
    assert main(["synthesize", "--repair", "--out", str(out), "--no-progress"]) == 0
    assert calls == [2] and _shards(out) == original and (out / "manifest.json").read_bytes() == manifest
    # nothing damaged: verified, and the teacher is not even loaded
    monkeypatch.setattr("tlcm.models.load_pipeline", lambda *a, **k: pytest.fail("teacher loaded"))
    synthesize(_cfg(tiny_sd15_dir, prompts5, out))
    assert "every shard's checksum verified" in capsys.readouterr().out


def test_repair_refuses_what_it_cannot_repair(tmp_path, tiny_sd15_dir, prompts5):
    with pytest.raises(TLCMError, match="holds no data set"):
        config_from_manifest(tmp_path / "nothing")
    out = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "ds", num_records=2))
    with pytest.raises(TLCMError, match=r"steps: 2 -> 3"):  # a flag given with --repair must agree
        synthesize(config_from_manifest(out, steps=3))


def test_inspect_verifies_every_shard(tiny_sd15_dir, prompts5, tmp_path, capsys):
    out = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "ds"))
    capsys.readouterr()
    assert main(["synthesize", "--inspect", str(out), "--max-images", "0"]) == 0
    assert "all 3 shards' sha256 ok" in capsys.readouterr().out
    blob = bytearray((out / "shard-00002.safetensors").read_bytes())
    blob[-3] ^= 0x01
    (out / "shard-00002.safetensors").write_bytes(bytes(blob))
    code = main(["synthesize", "--inspect", str(out), "--max-images", "0"])  # asks about shard 0, shard 2 is bad
    captured = capsys.readouterr()
    assert code == 2 and "shard-00002.safetensors is corrupt" in captured.out + captured.err
    assert "sha256 ok" not in captured.out and "--repair" in captured.err


@pytest.mark.parametrize("solver,steps", [("ddim", 1000), ("dpmpp", 1001)])
def test_too_many_steps_fail_before_generating(tiny_sd15_dir, prompts5, tmp_path, monkeypatch, solver, steps):
    monkeypatch.setattr(syn, "generate_batch", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(TLCMError, match=rf"--steps {steps}"):
        synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "s", solver=solver, steps=steps))
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("guidance", [-5.0, float("nan"), float("inf")])
def test_guidance_must_be_finite_and_not_negative(prompts5, tmp_path, guidance, capsys):
    code = main(["synthesize", "--teacher", "toy", "--prompts", str(prompts5), "--out", str(tmp_path / "g"),
                 "--guidance-scale", str(guidance)])
    err = capsys.readouterr().err
    assert code == 2 and "--guidance-scale" in err and "finite number >= 0" in err
    assert not (tmp_path / "g").exists()


def test_long_prompts_warn_with_the_token_limit(tiny_sd15_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("short\n" + "x" * 10_000 + "\n")
    synthesize(_cfg(tiny_sd15_dir, prompts, tmp_path / "long", num_records=2))
    err = capsys.readouterr().err
    assert "1 of 2 prompts are longer than the text encoder's limit of 16 tokens" in err and "#1" in err


def test_files_are_created_with_the_users_umask(tiny_sd15_dir, prompts5, tmp_path):
    from tlcm.data.shards import atomic_write_bytes

    old = os.umask(0o027)
    try:
        out = synthesize(_cfg(tiny_sd15_dir, prompts5, tmp_path / "u", num_records=2))
        atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    for path in [out / "manifest.json", out / "shard-00000.safetensors", out / "shard-00000.json",
                 tmp_path / "x.bin"]:
        assert path.stat().st_mode & 0o777 == 0o640, path  # 0666 & ~0027, not mkstemp's 0600


def test_teacher_fingerprint_matches_across_load_precision_and_path(tiny_sd15_dir, sd15_other_seed_dir):
    """Synthesis on CUDA loads the teacher in fp16, training in fp32: the same weights must match, another teacher
    must not, and the fingerprint must not depend on the folder the teacher was loaded from."""
    import torch

    from tlcm.data.synthesize import _legacy_fingerprint, fingerprint_matches, teacher_fingerprint
    from tlcm.models import load_pipeline

    fp32 = load_pipeline(str(tiny_sd15_dir))
    other = load_pipeline(str(sd15_other_seed_dir))
    for dtype in (torch.float16, torch.bfloat16):
        low = load_pipeline(str(tiny_sd15_dir), dtype=dtype)  # as diffusers loads it: the fp32 file cast down
        record = {"fingerprint": teacher_fingerprint(low), "fingerprint_dtype": str(dtype).removeprefix("torch.")}
        assert record["fingerprint"] != teacher_fingerprint(fp32)  # another precision hashes other values...
        assert fingerprint_matches(fp32, record)  # ...but is recognised as the same teacher
        assert not fingerprint_matches(other, record)
        assert fingerprint_matches(fp32, {"fingerprint": record["fingerprint"]})  # dtype unrecorded: all are tried
    copy = tiny_sd15_dir.parent / "moved-teacher"
    if not copy.exists():
        shutil.copytree(tiny_sd15_dir, copy)
    assert teacher_fingerprint(load_pipeline(str(copy))) == teacher_fingerprint(fp32)
    assert fingerprint_matches(fp32, {"fingerprint": _legacy_fingerprint(fp32)})  # manifests of tlcm 0.1.0
