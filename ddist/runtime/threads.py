"""How many CPU threads torch uses in this job.

Two OpenMP threads on two cores slow down 2.6-3.7x as soon as any other process runs:
the threads spin at every barrier waiting for a core the other process holds. ddist
therefore (1) asks OpenMP to sleep rather than spin (`OMP_WAIT_POLICY=PASSIVE`, set in
`ddist/__init__.py` before torch is imported, unless the user set it) and (2) gives each
job its share of the cores: `threads=auto` is the cores this process may use divided by
the jobs running at once (a joblib multirun's `n_jobs`, torchrun's local world size).
"""

from __future__ import annotations

import os

import torch

from ddist.errors import ConfigError
from ddist.logging import info
from ddist.runtime.ranks import local_world


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups' cpusets), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def concurrent_jobs() -> int:
    """Jobs sharing this machine's cores right now: torchrun's local ranks x a joblib multirun's workers."""
    jobs = local_world()
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        n_jobs = hc.launcher.get("n_jobs") if hc.mode == RunMode.MULTIRUN else None
    except ValueError:  # not under @hydra.main (a test calling pipeline.run directly)
        n_jobs = None
    if n_jobs is not None and n_jobs != 0:
        jobs *= available_cores() if n_jobs < 0 else int(n_jobs)  # joblib: -1 = one job per core
    return max(jobs, 1)


def thread_count(setting: int | str) -> tuple[int, str]:
    """(threads, why) for the `threads` option: a positive int, or auto."""
    if setting == "auto":
        omp = os.environ.get("OMP_NUM_THREADS", "").strip()
        if omp:  # the user's explicit choice for this process wins
            first = omp.split(",")[0].strip()  # OpenMP's nested form "4,2": the outer level is ours
            if not first.isdigit():
                raise ConfigError(
                    f"The environment variable OMP_NUM_THREADS={omp!r} is not a thread count. "
                    "Set it to a positive integer (export OMP_NUM_THREADS=4), or unset it to let threads=auto "
                    "divide the cores, or set threads=N."
                )
            return max(int(first), 1), "OMP_NUM_THREADS"
        cores, jobs = available_cores(), concurrent_jobs()
        return max(cores // jobs, 1), f"{cores} cores / {jobs} concurrent job(s)"
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(
            f"threads must be a positive integer or auto (got {setting!r}). Set threads=auto or threads=1."
        )
    return setting, "threads option"


def configure_threads(setting: int | str) -> int:
    """Apply the `threads` option with torch.set_num_threads before any work; log the choice."""
    n, why = thread_count(setting)
    torch.set_num_threads(n)
    info(f"threads: {n} ({why}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
    return n
