"""Which torchrun rank this process is, and the few collectives the ranks share.

The base of ddist.runtime.distributed (which starts and stops the process group, wraps models in
DDP and splits batches): kept apart so the artifact store (ddist/runtime/store.py), which data/
writes through, can follow the ranks without importing the services above it. With one process
(no torchrun) every function here is the trivial one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")

_solo = False  # rank 0 alone runs a stage the other ranks skip: no collectives meanwhile


def active() -> bool:
    """Whether this process trains and waits together with other ranks right now."""
    return dist.is_available() and dist.is_initialized() and not _solo


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """make() on rank 0 alone (it may write); every rank gets its result."""
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
