"""``tlcm encode-images``: image folder + captions -> shards through the VAE, in the synthetic format."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tlcm.cli import main
from tlcm.data import open_shards, read_manifest
from tlcm.data.realdata import EncodeImagesConfig, encode_images, find_images
from tlcm.errors import TLCMError


def _folder(tmp_path, n=5, sidecar=False):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"{'sub/' if i % 2 else ''}img{i}.{'png' if i % 3 else 'jpg'}"
        size = (40 + 8 * i, 32)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / name)
        rows.append({"file_name": name, "text": f"caption {i}"})
        if sidecar:
            (root / name).with_suffix(".txt").write_text(f"caption {i}\n")
    if not sidecar:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_encode_images_roundtrip(sd15_dir, tmp_path):
    root = _folder(tmp_path)
    cfg = EncodeImagesConfig(images=str(root), out=str(tmp_path / "ds"), teacher=str(sd15_dir), batch_size=2,
                             records_per_shard=2, progress=False, latent_dtype="fp32")
    out = encode_images(cfg)
    m = read_manifest(out)
    assert m["complete"] and m["num_records"] == 5 and m["source"] == "images" and m["latent_shape"] == [4, 16, 16]
    recs = list(open_shards(out, shuffle=False))
    assert sorted(r["prompt"] for r in recs) == [f"caption {i}" for i in range(5)]
    # The stored latent is the VAE posterior sample with the record's seed, times the scaling factor.
    from diffusers import AutoencoderKL

    from tlcm.data.realdata import load_image
    from tlcm.data.synthesize import initial_noise

    vae = AutoencoderKL.from_pretrained(str(sd15_dir), subfolder="vae")
    files = [f for f, _ in find_images(root)]
    x, orig, _ = load_image(root / files[3], 32)
    dist = vae.encode(x[None]).latent_dist
    want = (dist.mean + dist.std * initial_noise([3], (4, 16, 16))) * vae.config.scaling_factor
    torch.testing.assert_close(recs[3]["latents"], want[0], rtol=1e-4, atol=1e-4)
    again = encode_images(cfg)  # complete: a no-op
    assert read_manifest(again)["shards"] == m["shards"]
    with pytest.raises(TLCMError, match="sample_mode"):
        encode_images(EncodeImagesConfig(**{**cfg.__dict__, "sample_mode": "mean"}))


def test_sidecar_captions_and_cli(sd15_dir, tmp_path, capsys):
    root = _folder(tmp_path, n=3, sidecar=True)
    assert find_images(root) == [("img0.jpg", "caption 0"), ("img2.png", "caption 2"), ("sub/img1.png", "caption 1")]
    code = main(["encode-images", "--images", str(root), "--teacher", str(sd15_dir), "--out", str(tmp_path / "o"),
                 "--sample-mode", "mean", "--no-progress"])
    assert code == 0 and read_manifest(tmp_path / "o")["num_records"] == 3


def test_bad_image_folders(sd15_dir, tmp_path, capsys):
    code = main(["encode-images", "--images", str(tmp_path / "none"), "--teacher", str(sd15_dir),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    root = _folder(tmp_path, n=2, sidecar=True)
    (root / "img0.txt").unlink()
    with pytest.raises(TLCMError, match="1 of 2 images .* have no caption"):
        find_images(root)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.jpg", "caption": "x"}))
    with pytest.raises(TLCMError, match="--caption-column"):
        find_images(root)
