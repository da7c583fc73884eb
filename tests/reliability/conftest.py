import pytest


@pytest.fixture
def prompts5(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\ngreen triangle\nyellow star\nbig dot\n")
    return path


@pytest.fixture(scope="session")
def sd15_other_seed_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("teachers") / "sd15-seed7", seed=7)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_sd15_dir):
    """A complete 8-record data set for the tiny SD1.5 teacher, written straight from tensors (no generation),
    with that teacher's fingerprint, latent shape and scaling as `tlcm synthesize` records them."""
    return make_shards(tmp_path_factory.mktemp("shards") / "sd15", tiny_sd15_dir)


def make_shards(out, teacher_dir, *, num=8, seed=0, channels=4, scaling=None, fingerprint=None):
    import torch

    from tlcm.data import write_shards
    from tlcm.data.synthesize import teacher_fingerprint
    from tlcm.models import load_pipeline

    pipe = load_pipeline(str(teacher_dir))
    g = torch.Generator().manual_seed(seed)
    teacher = {"id": str(teacher_dir), "fingerprint": fingerprint or teacher_fingerprint(pipe),
               "fingerprint_dtype": "float32"}
    return write_shards(out, torch.randn(num, channels, 16, 16, generator=g), [f"shape {i % 4}" for i in range(num)],
                        records_per_shard=4, meta={"teacher": teacher, "source": "synthesize",
                                                   "scaling_factor": scaling or pipe.vae.config.scaling_factor})


@pytest.fixture
def dataset_fn():
    from tests.train.conftest import memory_dataset

    return memory_dataset()
