"""``tlcm encode-images``: real images + captions -> the shard format, through the teacher's VAE (LCM parity)."""

from __future__ import annotations

import argparse

NAME = "encode-images"
HELP = ("Encode an image folder with captions (metadata.jsonl/csv or .txt per image) into training shards through "
        "the teacher's VAE, for the original LCM recipe on real data.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="image folder (imagefolder metadata.jsonl/.csv, or a .txt "
                   "caption beside each image)")
    p.add_argument("--teacher", required=True, help="hub id, local diffusers pipeline folder, or 'toy'")
    p.add_argument("--out", required=True, help="dataset folder to create or resume")
    p.add_argument("--caption-column", default="text", help="caption column in metadata.jsonl/.csv (default: text)")
    p.add_argument("--resolution", type=int, help="square crop size in pixels (default: the teacher's)")
    p.add_argument("--sample-mode", choices=["sample", "mean"], default="sample",
                   help="store a posterior sample (seeded per record, as diffusers' LCM scripts) or its mean")
    p.add_argument("--seed", type=int, default=0, help="record i samples with seed SEED+i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--records-per-shard", type=int, default=256)
    p.add_argument("--dtype", default="fp32", help="VAE compute dtype (default: fp32)")
    p.add_argument("--latent-dtype", default="fp16", help="storage dtype (default: fp16)")
    p.add_argument("--device", default=None)
    p.add_argument("--save-embeddings", action="store_true", help="also store the captions' text embeddings")
    p.add_argument("--overwrite", action="store_true", help="discard an existing dataset with another configuration")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tlcm.data.realdata import EncodeImagesConfig, encode_images

    encode_images(EncodeImagesConfig(
        images=args.images, out=args.out, teacher=args.teacher, caption_column=args.caption_column,
        resolution=args.resolution, sample_mode=args.sample_mode, seed=args.seed, batch_size=args.batch_size,
        records_per_shard=args.records_per_shard, dtype=args.dtype, latent_dtype=args.latent_dtype,
        device=args.device, save_embeddings=args.save_embeddings, overwrite=args.overwrite,
        progress=not args.no_progress))
    return 0
