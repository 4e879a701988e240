import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile with inductor (slow, ~30 s each)")


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny shapes: one intra-op thread avoids OpenMP oversubscription stalls (tens of
    seconds on a busy 2-core machine) and changes no result."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
