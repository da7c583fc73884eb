import pytest


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("teachers") / "sd15", seed=0)


@pytest.fixture(scope="session")
def sd15_other_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("teachers") / "sd15-other", seed=7)


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    from tlcm.testing import save_tiny_pipeline

    return save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("teachers") / "sdxl", seed=0)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n\na red circle\n  green triangle  \nyellow star\n")
    return path
