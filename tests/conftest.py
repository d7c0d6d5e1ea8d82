import os

import torch

# Two pytest-xdist workers on two cores: one intra-op thread each instead of two threads fighting for every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
