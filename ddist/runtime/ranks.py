"""Which torchrun rank this process is, and the few collectives the ranks share.

The base of ddist.runtime.distributed (which starts and stops the process group, wraps models in
DDP and splits batches): kept apart so the artifact store (ddist/runtime/store.py), which data/
writes through, can follow the ranks without importing the services above it. With one process
(no torchrun) every function here is the trivial one.

Every decision about ranks reads this module: what torchrun launched (`launched_rank`, `launched_world`,
`local_rank`, `local_world`: its environment, known before any process group and before torch loads, so
`import ddist` may ask) and the process group's own view once joined (`joined`, `active`, `rank`, `world`).
torch.distributed is imported inside the functions: importing this module stays torch-free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_solo = False  # rank 0 alone runs a stage the other ranks skip: no collectives meanwhile


def launched_rank() -> int:
    """This process's global rank as torchrun launched it (RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_world() -> int:
    """How many processes torchrun launched (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK): the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world() -> int:
    """torchrun's processes on this machine (LOCAL_WORLD_SIZE), which share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def joined() -> bool:
    """Whether this process has joined a process group (ddist.runtime.distributed.start)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def active() -> bool:
    """Whether this process trains and waits together with other ranks right now."""
    return joined() and not _solo


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes."""
    import torch.distributed as dist

    return not joined() or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """make() on rank 0 alone (it may write); every rank gets its result."""
    import torch.distributed as dist

    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Run a block on rank 0 as if there were no other ranks (they skip it)."""
    global _solo
    _solo = True
    try:
        yield
    finally:
        _solo = False
