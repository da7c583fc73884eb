"""The shapes world: determinism, the caption grammar and its parser, the compositional split, imagefolder I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tlcm.errors import TLCMError
from tlcm.toy import shapes


def _pixels(records):
    return np.stack([np.asarray(r[0]) for r in records])


def test_records_are_deterministic_and_prefix_stable():
    a = shapes.sample_records(12, seed=3)
    b = shapes.sample_records(12, seed=3)
    assert [r[1] for r in a] == [r[1] for r in b]
    assert np.array_equal(_pixels(a), _pixels(b))
    # record i depends only on (seed, split, i): a longer draw starts with the shorter one
    longer = shapes.sample_records(20, seed=3)
    assert np.array_equal(_pixels(longer[:12]), _pixels(a))
    other = shapes.sample_records(12, seed=4)
    assert [r[1] for r in other] != [r[1] for r in a]
    assert shapes.prompts(12, seed=3) == [r[1] for r in a]


def test_images_are_32x32_rgb_and_show_the_colours():
    img, _, attrs = shapes.sample_records(1, seed=0)[0]
    assert img.size == (32, 32) and img.mode == "RGB"
    arr = np.asarray(img).reshape(-1, 3).astype(int)
    bg = np.array(shapes.BACKGROUNDS[attrs["background"]])
    fg = np.array(shapes.COLORS[attrs["color"]])
    assert (np.abs(arr - bg).max(1) <= 12).mean() > 0.4  # mostly background
    assert (np.abs(arr - fg).max(1) <= 12).sum() >= 9  # and a visible shape in its colour


def test_attribute_vocabulary_is_as_specified():
    assert {"circle", "square", "triangle"} <= set(shapes.SHAPES) and len(shapes.SHAPES) >= 4
    assert len(shapes.COLORS) >= 8 and len(shapes.BACKGROUNDS) >= 4
    assert shapes.SIZES == ("small", "large") and len(shapes.POSITIONS) == 9


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_every_caption_parses_back_to_its_attributes(split):
    for _, text, attrs in shapes.sample_records(300, seed=11, split=split):
        assert shapes.attributes_from_prompt(text) == attrs, text


def test_grammar_has_paraphrases():
    texts = shapes.prompts(400, seed=5)
    assert len(set(texts)) > 300
    assert any("backdrop" in t for t in texts) and any(" on a " in t for t in texts)
    assert any("disc" in t for t in texts) and any("big" in t for t in texts)
    assert (
        any(":" in t for t in texts) and any(t.startswith("a ") for t in texts) and any(" with a " in t for t in texts)
    )


def test_parser_reads_the_issue_examples_and_partial_prompts():
    expected = {"shape": "circle", "color": "red", "size": "large", "position": "top left", "background": "blue"}
    assert shapes.attributes_from_prompt("a large red circle in the top left on a blue background") == expected
    assert shapes.attributes_from_prompt("top-left: big red disc, blue backdrop") == expected
    assert shapes.attributes_from_prompt("A red circle") == {"shape": "circle", "color": "red"}
    assert shapes.attributes_from_prompt("small green cross, grey background")["background"] == "gray"
    assert shapes.attributes_from_prompt("a blue square in the top center")["position"] == "top center"


@pytest.mark.parametrize(
    "bad",
    ["a photo of an astronaut riding a horse", "", "a red circle and a blue square", "a cat on a purple background"],
)
def test_parser_refuses_unparseable_prompts(bad):
    with pytest.raises(TLCMError):
        shapes.attributes_from_prompt(bad)


def test_split_holds_out_shape_colour_pairs():
    train = shapes.sample_records(600, seed=2, split="train")
    held = shapes.sample_records(100, seed=2, split="heldout")
    assert not any((a["shape"], a["color"]) in shapes.HELDOUT_PAIRS for _, _, a in train)
    assert all((a["shape"], a["color"]) in shapes.HELDOUT_PAIRS for _, _, a in held)
    # every shape and every colour still appears in training: only the combinations are new
    assert {a["shape"] for _, _, a in train} == set(shapes.SHAPES)
    assert {a["color"] for _, _, a in train} == set(shapes.COLORS)
    with pytest.raises(TLCMError):
        shapes.sample_records(1, split="test")


def test_captions_fit_the_text_encoder_length():
    from transformers import BertTokenizer

    from tlcm.toy.common import TEXT_MAX_LENGTH, minilm_dir

    tok = BertTokenizer.from_pretrained(str(minilm_dir()))
    texts = shapes.prompts(500, seed=1) + shapes.prompts(100, seed=1, split="heldout")
    assert max(len(ids) for ids in tok(texts).input_ids) <= TEXT_MAX_LENGTH


def test_render_prompts_draws_what_the_prompt_says():
    prompt_list = shapes.prompts(4, seed=9)
    a = shapes.render_prompts(prompt_list, seed=0)
    b = shapes.render_prompts(prompt_list, seed=1)
    assert len(a) == 4 and a[0].size == (32, 32)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # jitter differs, attributes do not


def test_imagefolder_export_and_import(tmp_path):
    out = shapes.export_imagefolder(tmp_path / "ds", 6, seed=0, n_heldout=3)
    rows = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"file_name", "text", "shape", "color"} <= set(rows[0])
    pairs = shapes.load_imagefolder(out)
    assert [c for _, c in pairs] == [r[1] for r in shapes.sample_records(6, seed=0)]
    assert len(shapes.load_imagefolder(out, split="test")) == 3
    # the HF datasets imagefolder loader reads it too (a packaged builder: no download)
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 6 and ds[0]["text"] == rows[0]["text"] and ds[0]["image"].size == (32, 32)


def test_imagefolder_import_of_a_user_folder(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "a.jpg")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(folder / "b.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.jpg", "caption": "red"})
        + "\n"
        + json.dumps({"file_name": "b.png", "caption": "blue"})
    )
    pairs = shapes.load_imagefolder(folder)
    assert [c for _, c in pairs] == ["red", "blue"]
    img = shapes.load_image(pairs[0][0], 32)
    assert img.size == (32, 32)


def test_imagefolder_errors_name_the_fix(tmp_path):
    with pytest.raises(TLCMError, match="no such image folder"):
        shapes.load_imagefolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TLCMError, match="metadata.jsonl"):
        shapes.load_imagefolder(tmp_path / "empty")
    (tmp_path / "empty" / "metadata.jsonl").write_text('{"file_name": "nope.png", "text": "x"}\n')
    with pytest.raises(TLCMError, match="missing"):
        shapes.load_imagefolder(tmp_path / "empty")
