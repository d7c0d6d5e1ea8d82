import os

import pytest
import torch

# Two pytest-xdist workers on two cores: one intra-op thread each instead of two threads fighting for every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with ``pytestmark``): tiny models gain nothing from splitting
    their ops across threads, only OpenMP synchronisation, and in-process reference runs must do the same arithmetic
    as the one-thread subprocess runs they are compared with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
