"""One launcher for the tests that run two real CPU ranks: ``ACCELERATE_USE_CPU=true torchrun --standalone
--nproc_per_node 2`` over gloo (``accelerate launch --num_processes 2 --cpu`` starts a single process; DESIGN.md)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_two_cpu_ranks(script, *args, timeout: int = 600, **env_overrides) -> subprocess.CompletedProcess:
    """Run ``script`` with ``args`` on two gloo ranks (one OpenMP thread each, offline, no GPU, the repository on the
    path); fails the test with the end of stderr when the launch fails."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **env_overrides,
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *map(str, args)]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
