"""The shard format: writer, manifest, checksums, and the streaming reader's splitting and shuffling."""

import json

import pytest
import torch

from tlcm.data import open_shards, read_manifest, to_hf_dataset, verify_dataset, write_shards
from tlcm.errors import TLCMError


def _make(tmp_path, n=10, per=3, **kw):
    torch.manual_seed(0)
    lat = torch.randn(n, 4, 8, 8)
    out = write_shards(tmp_path / "ds", lat, [f"prompt {i}" for i in range(n)], records_per_shard=per,
                       meta={"scaling_factor": 0.18215, "teacher": {"id": "test"}}, **kw)
    return out, lat


def test_roundtrip_and_manifest(tmp_path):
    out, lat = _make(tmp_path, trajectory=torch.randn(10, 2, 4, 8, 8), trajectory_timesteps=torch.tensor([500, 250]))
    m = read_manifest(out)
    assert m["complete"] and m["num_records"] == 10 and m["num_shards"] == 4 and m["latent_shape"] == [4, 8, 8]
    assert m["scaling_factor"] == 0.18215 and m["teacher"] == {"id": "test"}
    assert [s["count"] for s in m["shards"]] == [3, 3, 3, 1]
    recs = list(open_shards(out, shuffle=False))
    assert [r["index"] for r in recs] == list(range(10))
    r = recs[4]
    assert r["latents"].dtype == torch.float32 and r["prompt"] == "prompt 4" and r["seed"] == 4
    torch.testing.assert_close(r["latents"], lat[4].half().float())
    assert r["trajectory"].shape == (2, 4, 8, 8) and r["trajectory_timesteps"].tolist() == [500, 250]
    assert verify_dataset(out) == []


def test_shuffle_is_deterministic_and_covers_everything(tmp_path):
    out, _ = _make(tmp_path, n=40, per=4)
    a = [r["index"] for r in open_shards(out, seed=3, buffer_size=8)]
    b = [r["index"] for r in open_shards(out, seed=3, buffer_size=8)]
    c = [r["index"] for r in open_shards(out, seed=4, buffer_size=8)]
    assert a == b and a != c and sorted(a) == list(range(40)) and a != list(range(40))
    ds = open_shards(out, seed=3, buffer_size=8)
    e0, e1 = [r["index"] for r in ds], [r["index"] for r in ds]  # the epoch advances after a pass
    assert e0 == a and e1 != e0 and sorted(e1) == list(range(40))


@pytest.mark.parametrize("n,per,world", [(12, 3, 2), (10, 3, 2), (10, 3, 3), (7, 4, 2), (23, 3, 4), (40, 3, 4)])
def test_ranks_are_disjoint_complete_and_balanced(tmp_path, n, per, world):
    out, _ = _make(tmp_path, n=n, per=per)
    ds = [open_shards(out, rank=rank, world_size=world, seed=1) for rank in range(world)]
    for _epoch in range(2):
        got = [[r["index"] for r in d] for d in ds]  # each pass advances the epoch: another shard permutation
        assert sorted(i for g in got for i in g) == list(range(n))
        assert max(map(len, got)) - min(map(len, got)) <= 1
        assert [len(g) for g in got] == [len(d) for d in ds]


def test_fewer_shards_than_processes_is_a_clear_error(tmp_path):
    out, _ = _make(tmp_path, n=7, per=4)  # 2 shards
    assert len(open_shards(out, rank=1, world_size=2)) == 3
    with pytest.raises(TLCMError, match=r"2 shard\(s\) for 3 processes(.|\n)*--records-per-shard 2 or less"):
        open_shards(out, rank=0, world_size=3)


def test_dataloader_workers_split(tmp_path):
    out, _ = _make(tmp_path, n=12, per=2)
    dl = torch.utils.data.DataLoader(open_shards(out, shuffle=False), batch_size=None, num_workers=2)
    assert sorted(r["index"] for r in dl) == list(range(12))


def test_infinite_repeats(tmp_path):
    out, _ = _make(tmp_path, n=5, per=5)
    it = iter(open_shards(out, infinite=True))
    got = [next(it)["index"] for _ in range(12)]
    assert sorted(got[:5]) == list(range(5)) and sorted(got[5:10]) == list(range(5))


def test_flipped_byte_is_caught_with_path(tmp_path):
    out, _ = _make(tmp_path)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(TLCMError, match="shard-00001.safetensors is corrupt"):
        list(open_shards(out, shuffle=False))
    problems = verify_dataset(out)
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0]
    assert len(list(open_shards(out, shuffle=False, verify=False))) == 10  # reading unverified still works


def test_truncated_and_edited_metadata_are_caught(tmp_path):
    out, _ = _make(tmp_path)
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    meta = out / "shard-00000.json"
    m = json.loads(meta.read_text())
    m["records"][0]["prompt"] = "edited"
    meta.write_text(json.dumps(m))
    problems = verify_dataset(out)
    assert any("shard-00002.safetensors" in p for p in problems) and any("shard-00000.json" in p for p in problems)


def test_incomplete_and_missing_datasets_are_refused(tmp_path):
    with pytest.raises(TLCMError, match="does not exist"):
        open_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TLCMError, match="no manifest.json"):
        open_shards(tmp_path / "empty")
    out, _ = _make(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TLCMError, match="incomplete"):
        open_shards(out)


def test_hf_dataset_view(tmp_path):
    out, lat = _make(tmp_path, n=5, per=2)
    ds = to_hf_dataset(out)
    assert len(ds) == 5 and ds[3]["prompt"] == "prompt 3"
    torch.testing.assert_close(ds[3]["latents"], lat[3].half().float())
