import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # shared 2-core machine: one intra-op thread is ~15x faster than two under contention
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
