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
