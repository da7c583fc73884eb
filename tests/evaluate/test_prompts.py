import json

import pytest

from tlcm.errors import TLCMError
from tlcm.evaluate.prompts import read_prompts, seeds_for, take


def test_text_file_skips_blank_and_comment_lines(prompt_file):
    assert read_prompts(prompt_file) == ["a red circle", "a blue square", "a green cross", "a yellow triangle"]


def test_csv_and_jsonl_columns(tmp_path):
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n")
    assert read_prompts(tmp_path / "p.csv") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt_text": "x"}\n{"prompt_text": "y"}\n')
    assert read_prompts(tmp_path / "p.jsonl", column="prompt_text") == ["x", "y"]
    with pytest.raises(TLCMError, match="none of the columns"):
        read_prompts(tmp_path / "p.jsonl")
    with pytest.raises(TLCMError, match="no column 'nope'"):
        read_prompts(tmp_path / "p.csv", column="nope")


def test_coco_annotations_first_caption_per_image_in_id_order(tmp_path):
    data = {"images": [{"id": 9}, {"id": 3}],
            "annotations": [{"id": 1, "image_id": 9, "caption": "nine a"},
                            {"id": 2, "image_id": 3, "caption": "three a"},
                            {"id": 3, "image_id": 9, "caption": "nine b"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    assert read_prompts(tmp_path / "captions_val2017.json") == ["three a", "nine a"]


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", "\n# only a comment\n", "holds no prompts"),
    ("bad.json", "{not json", "could not parse"),
    ("weird.json", '{"a": 1}', "neither a list"),
    ("p.xlsx", "x", "unsupported prompt file type"),
])
def test_bad_prompt_files(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(TLCMError, match=match):
        read_prompts(tmp_path / name)


def test_missing_file_and_counts(tmp_path, prompt_file):
    with pytest.raises(TLCMError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    prompts = read_prompts(prompt_file)
    assert take(prompts, 2) == prompts[:2]
    with pytest.raises(TLCMError, match="has 4 prompts but 5"):
        take(prompts, 5)
    assert seeds_for(3, 7) == [7, 8, 9]
