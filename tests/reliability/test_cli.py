"""The command line's failure handling: one line with the path and a fix (exit 2) for what a user can act on, the
traceback behind --debug, bugs keep theirs; bad paths and values fail before any work; `tlcm --help` is light."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tlcm.cli import main


def _fail_with(monkeypatch, exc):
    import tlcm.commands.synthesize as cmd

    def boom(args):
        raise exc

    monkeypatch.setattr(cmd, "run", boom)


@pytest.mark.parametrize("exc, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/shard-00003.safetensors"),
     "disk full while writing /data/shard-00003.safetensors"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/manifest.json"), "permission denied: /data/manifest"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/file/x"), "part of /data/file/x is a file"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "read-only file system: /ro/x"),
    (MemoryError(), "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99999999999 bytes"),
     "out of memory"),
    (RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: file "
                  "write failed"), "the disk is full"),
])
def test_actionable_failures_are_one_line_with_a_fix(monkeypatch, capsys, exc, text):
    _fail_with(monkeypatch, exc)
    code = main(["synthesize", "--out", "x"])
    err = capsys.readouterr().err
    assert code == 2 and text in err and "fix:" in err and "Traceback" not in err
    with pytest.raises(type(exc)):  # --debug: the traceback, before or after the command
        main(["--debug", "synthesize", "--out", "x"])
    with pytest.raises(type(exc)):
        main(["synthesize", "--out", "x", "--debug"])


def test_a_wrapped_os_error_is_found_through_its_cause(monkeypatch, capsys):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/optimizer.bin")
        except OSError as inner:
            raise ValueError("save failed") from inner
    except ValueError as outer:
        wrapped = outer
    _fail_with(monkeypatch, wrapped)
    assert main(["synthesize"]) == 2
    assert "disk full while writing /ckpt/optimizer.bin" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_interrupts_exit_130(monkeypatch, capsys):
    _fail_with(monkeypatch, RuntimeError("an internal invariant broke"))
    with pytest.raises(RuntimeError, match="invariant"):
        main(["synthesize"])
    _fail_with(monkeypatch, KeyboardInterrupt())
    assert main(["synthesize"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_help_imports_no_heavy_library():
    code = ("import sys, tlcm.cli; tlcm.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'yaml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.strip()
    assert out == "[]"


def test_evaluate_protocol_names_match_the_protocols():
    from tlcm.commands.evaluate import PROTOCOL_NAMES
    from tlcm.evaluate.protocols import PROTOCOLS

    assert sorted(PROTOCOL_NAMES) == sorted(PROTOCOLS)


def test_export_format_names_match_the_library():
    from tlcm.commands.export import FORMATS as COMMAND_FORMATS
    from tlcm.export import FORMATS

    assert COMMAND_FORMATS == FORMATS


# -------------------------------------------------------------------------------- bad paths and values, real commands


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_output_paths_that_are_files(tmp_path, capsys, tiny_sd15_dir, prompts5, tiny_shards):
    f = tmp_path / "file"
    f.write_text("x")
    cases = [
        ("synthesize", "--teacher", tiny_sd15_dir, "--prompts", prompts5, "--out", f),
        ("synthesize", "--teacher", tiny_sd15_dir, "--prompts", prompts5, "--out", f / "sub"),
        ("distill", "--teacher", tiny_sd15_dir, "--data", tiny_shards, "--output-dir", f / "run"),
        ("sample", "--model", tiny_sd15_dir, "--prompt", "x", "--out", f),
        ("encode-images", "--images", tmp_path, "--teacher", tiny_sd15_dir, "--out", f),
        ("toy", "dataset", "--out", f, "--n", "2"),
        ("evaluate", "--out", f, "--model", tiny_sd15_dir, "--prompts", prompts5, "--steps", "1", "--no-reference"),
    ]
    for argv in cases:
        code, err = _run(capsys, *argv)
        assert code == 2 and str(f) in err and "file" in err and "Traceback" not in err, (argv, err)
    assert f.read_text() == "x"  # nothing damaged


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_folder(tmp_path, capsys, tiny_sd15_dir, prompts5):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, err = _run(capsys, "synthesize", "--teacher", tiny_sd15_dir, "--prompts", prompts5, "--out", ro / "d")
    finally:
        ro.chmod(0o700)
    assert code == 2 and "no permission" in err


@pytest.mark.parametrize("device", ["tpu7", "cuda:7" if not __import__("torch").cuda.is_available() else "cuda:999"])
def test_unknown_or_missing_devices(capsys, tmp_path, prompts5, tiny_sd15_dir, device):
    code, err = _run(capsys, "synthesize", "--teacher", tiny_sd15_dir, "--prompts", prompts5, "--out",
                     tmp_path / "d", "--device", device)
    assert code == 2 and device in err and "--device" in err and "Traceback" not in err


def test_non_utf8_prompt_files(tmp_path, capsys, tiny_sd15_dir):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    code, err = _run(capsys, "sample", "--model", tiny_sd15_dir, "--prompts-file", bad, "--out", tmp_path / "s")
    assert code == 2 and "not UTF-8" in err and "0xe9" in err and "iconv" in err
    code, err = _run(capsys, "synthesize", "--teacher", tiny_sd15_dir, "--prompts", bad, "--out", tmp_path / "d")
    assert code == 2 and "not UTF-8" in err


def test_non_finite_lora_weight_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", "toy", "--prompt", "x", "--lora", f"{tmp_path}/x.safetensors:nan"])
    assert exit_.value.code == 2 and "not a finite number" in capsys.readouterr().err
    from tlcm.errors import TLCMError
    from tlcm.sample import SampleConfig, resolve

    with pytest.raises(TLCMError, match="weight inf"):
        resolve(SampleConfig(model="toy", prompts=["x"], loras=[("a.safetensors", float("inf"))]))
    with pytest.raises(TLCMError, match="--guidance-scale nan"):
        resolve(SampleConfig(model="toy", prompts=["x"], guidance_scale=float("nan")))


def test_toy_evaluate_and_demo_counts_fail_before_any_work(capsys, monkeypatch, tmp_path):
    import tlcm.demo as demo
    import tlcm.toy.build as build

    monkeypatch.setattr(build, "evaluate_teacher", lambda *a, **k: pytest.fail("evaluated"))
    code, err = _run(capsys, "toy", "evaluate", "--steps", "0")
    assert code == 2 and "--steps 0" in err
    monkeypatch.setattr(demo, "_synthesize", lambda *a, **k: pytest.fail("synthesized"))
    monkeypatch.setattr(demo, "_distill", lambda *a, **k: pytest.fail("trained"))
    code, err = _run(capsys, "demo", "--quick", "--out", tmp_path / "demo", "--eval-prompts", "0")
    assert code == 2 and "--eval-prompts 0" in err
    assert not (tmp_path / "demo").exists()


def test_disk_full_during_synthesize_then_resume(tmp_path, capsys, monkeypatch, tiny_sd15_dir, prompts5):
    import tlcm.data.synthesize as syn

    real, calls = syn.write_shard, []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(args[0] / "shard-00001.safetensors"))
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "write_shard", full_disk)
    argv = ["synthesize", "--teacher", tiny_sd15_dir, "--prompts", prompts5, "--out", tmp_path / "d", "--steps", "2",
            "--records-per-shard", "2", "--batch-size", "2", "--no-progress"]
    code, err = _run(capsys, *argv)
    assert code == 2 and "disk full while writing" in err and "shard-00001" in err
    monkeypatch.setattr(syn, "write_shard", real)
    code, err = _run(capsys, *argv)
    assert code == 0, err
    from tlcm.data import verify_dataset

    assert verify_dataset(tmp_path / "d") == []


def test_sample_warns_about_prompts_longer_than_the_token_limit(tmp_path, tiny_sd15_dir):
    from tlcm.sample import SampleConfig, sample

    seen = []
    sample(SampleConfig(model=str(tiny_sd15_dir), prompts=["ok", "y" * 10_000], steps=1, out=str(tmp_path / "s"),
                        progress=False), warn=seen.append)
    assert any("1 of 2 prompts are longer than the text encoder's limit of 16 tokens" in w for w in seen), seen
