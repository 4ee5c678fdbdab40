import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models: one intra-op thread avoids OpenMP oversubscription on a shared 2-core box (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
