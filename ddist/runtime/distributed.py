"""torchrun: one process group for the ranks of a job, and the few rules they follow.

`torchrun --nproc_per_node=N -m ddist ...` starts N ranks of the same job. The entry point
starts the process group (NCCL on CUDA, gloo on CPU) and stops it at exit. Then:
- every rank runs the stages that share their work: squeeze and evaluate train their models
  with DistributedDataParallel (`ddist.training.loop.fit`: each rank a contiguous part of every batch),
  recover and diffusion split their groups and classes (ddist/runtime/shard.py);
- the other stages run on rank 0 alone; the other ranks take over what it made;
- only rank 0 writes: checkpoints, results.json, the W&B run. The other ranks wait for it at a
  barrier, then read. Cache entries follow the store's lock policy (ddist/runtime/store.py).
With one process (no torchrun) every function here is the trivial one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import torch
import torch.distributed as dist

from ddist.errors import ConfigError
from ddist.runtime.ranks import active, alone, barrier, from_main, is_main, joined, local_rank, rank, world

__all__ = ["active", "alone", "barrier", "from_main", "is_main", "my_part", "rank", "start", "stop", "world", "wrap"]


def start() -> datetime:
    """Join the process group (torchrun's environment) and agree on the job's start time:
    rank 0's, which names the run directory of every rank."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())  # "cuda" is this rank's GPU
    # a long timeout: ranks wait at barriers while rank 0 alone runs a stage
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=6))
    stamp = [datetime.now()]
    dist.broadcast_object_list(stamp, src=0)
    return stamp[0]


def stop() -> None:
    if joined():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model DistributedDataParallel when ranks train together (gradients averaged over them), else itself."""
    if not active():
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def my_part(n: int) -> tuple[slice, float]:
    """This rank's contiguous part of a batch of n, and the weight of its mean loss: the DDP
    average over the ranks of weight x (mean loss of the part) is the whole batch's mean loss."""
    size, me = world(), rank()
    if size == 1:
        return slice(None), 1.0
    if n < size:
        raise ConfigError(
            f"A batch of {n} images cannot be split among {size} torchrun ranks. "
            "Run fewer ranks (--nproc_per_node) or raise the batch size."
        )
    lo, hi = n * me // size, n * (me + 1) // size
    return slice(lo, hi), size * (hi - lo) / n
