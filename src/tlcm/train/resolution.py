"""The image size a distillation trains at: from the config if set, else the shards, else the teacher's own size.

Sizes come from three places that must agree before any step runs:

- the config's ``resolution`` (square; 0 = not set);
- the shards: the manifest's ``latent_shape`` (C, h, w) times the VAE's downsampling factor;
- the teacher: ``unet.config.sample_size`` times that factor (512 for SD1.5 and SD2.1-base, 768 for SD2.1, 1024 for
  SDXL, 32 for the tiny test pipelines).

Rules: a set ``resolution`` must equal the shards' size; without it, the shards' size is used and must equal the
teacher's (set ``resolution`` to the shards' size to train away from the teacher's size on purpose); without shards
(an in-memory dataset), ``resolution`` or the teacher's size. The size also drives SDXL's size conditioning
(``time_ids``: original size, crop (0, 0), target size) and the validation images.
"""

from __future__ import annotations

from tlcm.errors import TLCMError

Size = tuple[int, int]


def _fmt(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def data_image_size(manifest: dict, vae_scale_factor: int) -> Size | None:
    """(height, width) in pixels of the shards' latents, or ``None`` when the manifest records no latent shape."""
    shape = manifest.get("latent_shape")
    if not shape:
        return None
    return int(shape[-2]) * vae_scale_factor, int(shape[-1]) * vae_scale_factor


def resolve_image_size(resolution: int, data_size: Size | None, teacher_size: Size, vae_scale_factor: int,
                       data_name: str = "the shards") -> Size:
    """The (height, width) to train at, or a :class:`TLCMError` naming both sizes of any disagreement."""
    if resolution < 0:
        raise TLCMError(f"resolution={resolution} is negative", "set resolution to 0 (automatic) or a pixel size")
    if resolution:
        if resolution % vae_scale_factor:
            raise TLCMError(f"resolution={resolution} is not a multiple of the VAE's factor {vae_scale_factor}",
                            f"use a multiple of {vae_scale_factor}, or 0 to take the size from the data or teacher")
        size = (resolution, resolution)
        if data_size is not None and data_size != size:
            raise TLCMError(
                f"resolution={resolution} ({_fmt(size)}) but {data_name} hold {_fmt(data_size)} images "
                f"({data_size[0] // vae_scale_factor}x{data_size[1] // vae_scale_factor} latents x VAE factor "
                f"{vae_scale_factor})",
                f"drop the resolution setting to train at the data's {_fmt(data_size)}, or synthesize shards at "
                f"{_fmt(size)}")
        return size
    if data_size is None:
        return teacher_size
    if data_size != teacher_size:
        raise TLCMError(
            f"{data_name} hold {_fmt(data_size)} images but the teacher's own size is {_fmt(teacher_size)}",
            f"synthesize shards with this teacher at its own size, pass the teacher that made them, or set "
            f"resolution={data_size[0]} to train at the data's size on purpose" if data_size[0] == data_size[1] else
            "synthesize shards with this teacher at its own size, or pass the teacher that made them")
    return data_size


def training_image_size(cfg, pipe) -> Size:
    """:func:`resolve_image_size` for a config and its loaded teacher, reading the shards' manifest when
    ``cfg.data`` is set; also checks the shards' latent channels against the UNet's."""
    from tlcm.models import default_image_size

    factor = int(pipe.vae_scale_factor)
    data_size = None
    if cfg.data:
        from tlcm.data import read_manifest

        manifest = read_manifest(cfg.data)
        data_size = data_image_size(manifest, factor)
        shape = manifest.get("latent_shape")
        channels = pipe.unet.config.in_channels
        if shape and int(shape[0]) != channels:
            raise TLCMError(f"the shards in {cfg.data!r} hold {shape[0]}-channel latents but the teacher's UNet takes "
                            f"{channels}", "pass the teacher that synthesized the shards")
    name = f"the shards in {cfg.data!r}" if cfg.data else "the data"
    return resolve_image_size(int(cfg.resolution), data_size, tuple(default_image_size(pipe)), factor, name)
