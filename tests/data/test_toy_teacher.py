"""`tlcm synthesize --teacher toy`: the shipped toy teacher and its training-split prompts, end to end."""

import pytest
import torch

from tlcm.cli import main
from tlcm.data import open_shards, read_manifest
from tlcm.errors import TLCMError


@pytest.fixture(scope="module")
def toy_available():
    try:
        import tlcm.toy

        tlcm.toy.teacher_path()
        tlcm.toy.default_prompts_path()
    except (ImportError, TLCMError) as err:
        pytest.skip(f"toy teacher not available: {err}")


def test_toy_teacher_synthesize_and_inspect(toy_available, tmp_path, capsys):
    out = tmp_path / "toy"
    code = main(["synthesize", "--teacher", "toy", "--out", str(out), "--num-records", "3", "--steps", "2",
                 "--batch-size", "3", "--no-progress", "--trajectory", "1"])
    assert code == 0
    m = read_manifest(out)
    assert m["complete"] and m["teacher"]["id"] == "toy" and m["latent_shape"] == [4, 12, 12]
    assert m["generation"]["num_prompts"] > 1000  # the toy world's training split
    recs = list(open_shards(out, shuffle=False))
    assert len(recs) == 3 and all(torch.isfinite(r["latents"]).all() for r in recs)
    assert recs[0]["trajectory"].shape == (1, 4, 12, 12)
    code = main(["synthesize", "--inspect", str(out), "--grid", str(tmp_path / "grid.png"), "--max-images", "3"])
    assert code == 0 and (tmp_path / "grid.png").exists()
    # same command again: nothing to do
    assert main(["synthesize", "--teacher", "toy", "--out", str(out), "--num-records", "3", "--steps", "2",
                 "--batch-size", "3", "--no-progress", "--trajectory", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
