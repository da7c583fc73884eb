"""Prompt sources: every supported format, cleaning, deduplication, and clear errors for bad input."""

import json

import pytest

from tlcm.data.prompts import load_prompts
from tlcm.errors import TLCMError


def test_text_file_cleans_and_dedupes(prompt_file):
    ps = load_prompts(prompt_file)
    assert ps.prompts == ["a red circle", "a blue square", "green triangle", "yellow star"]
    assert ps.negative_prompts == [""] * 4 and ps.duplicates_removed == 1 and ps.empty_removed == 1
    assert len(load_prompts(prompt_file, dedupe=False)) == 5
    assert load_prompts(prompt_file, negative_prompt="blurry").negative_prompts == ["blurry"] * 4


def test_sha_changes_with_content(prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("a red circle\n")
    assert load_prompts(prompt_file).sha256() != load_prompts(other).sha256()
    assert load_prompts(prompt_file).sha256() == load_prompts(prompt_file).sha256()


def _rows():
    return [{"caption": "cat", "neg": "dog", "id": 1}, {"caption": "cow", "neg": "", "id": 2},
            {"caption": "cat", "neg": "dog", "id": 3}, {"caption": "cat", "neg": "bird", "id": 4}]


def test_jsonl_csv_parquet_and_hf_dataset(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "p.json").write_text(json.dumps(rows))
    csv_rows = "\n".join(f"{r['id']},{r['caption']},{r['neg']}" for r in rows)
    (tmp_path / "p.csv").write_text("id,caption,neg\n" + csv_rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for name in ("p.jsonl", "p.json", "p.csv", "p.parquet", "hf"):
        ps = load_prompts(tmp_path / name)  # "caption" found without --prompt-column
        assert ps.prompts == ["cat", "cow"], name
        ps = load_prompts(tmp_path / name, column="caption", negative_column="neg")
        assert ps.prompts == ["cat", "cow", "cat"] and ps.negative_prompts == ["dog", "", "bird"], name


def test_unknown_column_lists_the_columns(tmp_path):
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()))
    with pytest.raises(TLCMError, match=r"no column 'prompt'.*caption") as err:
        load_prompts(tmp_path / "p.jsonl", column="prompt")
    assert "--prompt-column" in str(err.value)
    (tmp_path / "q.jsonl").write_text(json.dumps({"foo": "x"}))
    with pytest.raises(TLCMError, match="no prompt column"):
        load_prompts(tmp_path / "q.jsonl")


def test_bad_inputs(tmp_path, prompt_file):
    with pytest.raises(TLCMError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TLCMError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(TLCMError, match="plain text file"):
        load_prompts(prompt_file, column="caption")
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(TLCMError, match="cannot parse"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(TLCMError, match="save_to_disk"):
        load_prompts(tmp_path / "folder")
