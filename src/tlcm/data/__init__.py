"""Training data: the data-free synthetic engine (teacher -> shards), real-image encoding, and the shard reader.

Public API::

    open_shards(path, shuffle=True, seed=0, rank=None, world_size=None, infinite=False, verify=True)
    read_manifest(path)                      # dict: teacher, generation config, counts, shards with checksums
    write_shards(out_dir, latents, prompts, records_per_shard=..., meta=...)   # datasets straight from tensors
    verify_dataset(path)                     # list of problems, empty when every checksum matches
    synthesize(SynthesizeConfig(...))        # teacher + prompts -> dataset folder (what `tlcm synthesize` runs)
    encode_images(EncodeImagesConfig(...))   # image folder + captions -> the same format through the VAE
    load_prompts(path, column=...)           # prompts from txt/jsonl/csv/parquet/HF dataset folder
"""

from tlcm.data.shards import (
    ShardDataset,
    load_shard,
    open_shards,
    read_manifest,
    to_hf_dataset,
    verify_dataset,
    write_shard,
    write_shards,
)

__all__ = [
    "ShardDataset",
    "load_shard",
    "open_shards",
    "read_manifest",
    "to_hf_dataset",
    "verify_dataset",
    "write_shard",
    "write_shards",
]


def __getattr__(name):
    # The generation side imports diffusers; keep `import tlcm.data` light for readers.
    if name in ("synthesize", "SynthesizeConfig", "inspect_shard"):
        from tlcm.data import synthesize as _s

        return getattr(_s, name if name != "synthesize" else "synthesize")
    if name in ("encode_images", "EncodeImagesConfig"):
        from tlcm.data import realdata

        return getattr(realdata, name)
    if name in ("load_prompts", "PromptSet", "default_prompts_path"):
        from tlcm.data import prompts

        return getattr(prompts, name)
    raise AttributeError(f"module 'tlcm.data' has no attribute {name!r}")
