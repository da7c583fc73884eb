"""The scenes world (toy world v4): determinism, splits, captions <-> claims, captions leave attributes free."""

from __future__ import annotations

import numpy as np
import pytest

from tlcm.errors import TLCMError
from tlcm.toy import scenes


def _norm(claims: dict) -> dict:
    return {**claims, "objects": sorted(tuple(sorted(q.items())) for q in claims["objects"])}


def test_records_are_a_pure_function_of_seed_split_index():
    a = scenes.sample_records(6, seed=3)
    b = scenes.sample_records(6, seed=3)
    for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
        assert ca == cb and sa == sb
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
    c = scenes.sample_records(6, seed=4)
    assert [r[1] for r in a] != [r[1] for r in c]
    assert np.asarray(a[0][0]).shape == (scenes.RESOLUTION, scenes.RESOLUTION, 3)
    assert scenes.prompts(6, seed=3) == [r[1] for r in a]


@pytest.mark.parametrize("split", scenes.SPLITS)
def test_every_caption_parses_back_to_its_claims_and_the_claims_are_true(split):
    for i in range(1500):
        scene, text, claims = scenes.record(11, split, i)
        assert _norm(scenes.parse_prompt(text)) == _norm(claims), text
        truth = scenes.claim_truth(scene, claims)
        assert all(all(v) for v in truth.values()), (text, truth)
        assert 1 <= scene["count"] == len(scene["objects"]) <= 3


def test_heldout_pairs_never_appear_in_training_scenes_and_lead_heldout_captions():
    for i in range(800):
        scene, _, _ = scenes.record(5, "train", i)
        assert all((o["shape"], o["color"]) not in scenes.HELDOUT_PAIRS for o in scene["objects"])
        scene, _, claims = scenes.record(5, "heldout", i)
        first = scene["objects"][0]
        assert (first["shape"], first["color"]) in scenes.HELDOUT_PAIRS
        assert {"shape": first["shape"], "color": first["color"]}.items() <= claims["objects"][0].items()


def test_captions_leave_most_of_the_scene_free():
    """The property the world exists for: one caption stands for many images. Over many records, the average caption
    names well under half of what a scene holds, and identical captions come with different scenes."""
    named, total, by_caption = 0, 0, {}
    for i in range(2000):
        scene, text, claims = scenes.record(0, "train", i)
        named += sum(len(q) for q in claims["objects"]) + sum(k in claims for k in ("count", "background", "style"))
        total += 5 * scene["count"] + 3
        by_caption.setdefault(text, []).append(scene)
    assert named / total < 0.35
    repeated = [s for s in by_caption.values() if len(s) > 1]
    assert repeated, "some caption should repeat in 2000 records"
    assert all(any(a != b for a, b in zip(ss, ss[1:])) for ss in repeated)


def test_token_length_of_the_longest_caption_fits_the_text_encoder():
    from transformers import BertTokenizer

    from tlcm.toy import common

    longest = scenes.claims_text({
        "objects": [
            {"size": "large", "pattern": "outlined", "color": "purple", "shape": "cross", "region": "bottom right"},
            {"size": "large", "pattern": "outlined", "color": "orange", "shape": "cross", "region": "top right"},
        ],
        "count": 3, "style": "shaded", "background": "gray"}, np.random.default_rng(0))
    tok = BertTokenizer.from_pretrained(str(common.minilm_dir()))
    # the generator's word choices vary in length: the worst case of several draws
    worst = max(len(tok(scenes.claims_text(scenes.parse_prompt(longest), np.random.default_rng(s))).input_ids)
                for s in range(50))
    assert worst <= scenes.TEXT_MAX_LENGTH


@pytest.mark.parametrize("prompt,expected", [
    ("a red circle", {"objects": [{"color": "red", "shape": "circle"}]}),
    ("two shapes on a black background", {"objects": [], "count": 2, "background": "black"}),
    ("a big striped box in the upper left and a cyan shape on a shaded backdrop",
     {"objects": [{"size": "large", "pattern": "striped", "shape": "square", "region": "top left"},
                  {"color": "cyan"}], "style": "shaded"}),
    ("a grey background with a hollow plus sign at the bottom",
     {"objects": [{"pattern": "outlined", "shape": "cross", "region": "bottom"}], "background": "gray"}),
])
def test_parse_hand_written_prompts(prompt, expected):
    assert _norm(scenes.parse_prompt(prompt)) == _norm(expected)


@pytest.mark.parametrize("prompt", ["", "a photo of a cat", "a red", "a circle square",
                                    "a red circle on a pink background"])
def test_parse_rejects_what_the_world_cannot_check(prompt):
    with pytest.raises(TLCMError):
        scenes.parse_prompt(prompt)


def test_render_prompts_draws_scenes_that_satisfy_the_prompt():
    prompts = scenes.prompts(40, seed=9) + ["three shapes: a large striped green circle in the center", "a blue shape"]
    for i, p in enumerate(prompts):
        claims = scenes.parse_prompt(p)
        scene = scenes.scene_for_claims(claims, np.random.default_rng(i))
        assert all(all(v) for v in scenes.claim_truth(scene, claims).values()), p
    images = scenes.render_prompts(prompts[:3], seed=1)
    assert all(im.size == (scenes.RESOLUTION, scenes.RESOLUTION) for im in images)
    with pytest.raises(TLCMError):
        scenes.render_prompts(["a blue circle on a blue background"])
    with pytest.raises(TLCMError, match="small objects are always solid"):
        scenes.render_prompts(["a small striped circle"])


def test_small_objects_are_always_solid():
    for i in range(500):
        scene, _, _ = scenes.record(8, "train", i)
        assert all(o["pattern"] == "solid" for o in scene["objects"] if o["size"] == "small")


def test_imagefolder_export_of_the_scenes_world(tmp_path):
    import json

    from tlcm.toy import worlds
    from tlcm.toy.shapes import load_imagefolder

    worlds.export_imagefolder("v4", tmp_path / "ds", 5, seed=2, n_heldout=2)
    pairs = load_imagefolder(tmp_path / "ds")
    assert [c for _, c in pairs] == scenes.prompts(5, seed=2)
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["scene"] == scenes.record(2, "train", 0)[0]
    assert len(load_imagefolder(tmp_path / "ds", "test")) == 2
