"""Ending a multi-process run cleanly.

A gloo process group that is still alive when the interpreter exits is torn down during interpreter shutdown, and
that can abort a rank whose work is already done ("terminate called without an active exception", SIGABRT, a
failed launch). Destroying it early is not enough on its own: while a trainer still holds its DDP wrapper, the
reducer keeps the process group alive, and freeing the trainer later makes ~ProcessGroupGloo join a gloo worker
while holding the GIL that worker is waiting for, which deadlocks. So the order is: drop every reference to the
trainer, collect it (trainers hold reference cycles), then destroy the process group.
"""

from __future__ import annotations

import gc

import torch.distributed as dist


def end_distributed_run() -> None:
    """Wait for every rank, free what still holds the process group, and destroy it; a no-op in one process.

    Call it after the last trainer of the script is out of scope (for example right after ``main()`` returns), as
    the examples do::

        if __name__ == "__main__":
            main()
            end_distributed_run()
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank tears down while another still has collectives in flight
    gc.collect()  # frees trainers kept alive by reference cycles, and with them their DDP reducers
    dist.destroy_process_group()
