"""Keep freed CPU memory in the process heap (glibc) instead of handing it back to the OS.

glibc serves an allocation above its mmap threshold (which it raises by itself up to 32 MiB) with a
fresh mmap and unmaps it on free, so each op that writes a new activation of a stacked recover batch
(ConvNet-3 on CIFAR-10, 100 images: 52 MB a layer) first page-faults it in: an elementwise op over
such a tensor took 30 ms instead of 7. `cpu_allocator=cache` turns that off with mallopt
(M_MMAP_MAX=0: large blocks come from the heap too; M_TRIM_THRESHOLD at its maximum: freed memory
stays there for the next op), as a caching allocator does on a GPU; the process's resident memory
then stays at its peak. `system` calls nothing and keeps glibc's defaults (setting any of these
parameters would also switch off glibc's dynamic threshold). The setting is process-wide and
one-way: a run applies it once, at its start (scripts/bench_parallel_groups.py --allocators
compares the two in separate processes). Other C libraries (macOS, musl) are left alone, with a
log line saying so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from ddist.logging import info

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
CACHE = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: 2**31 - 1}  # no mmapped blocks; never give the heap's top back


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def configure_allocator(setting: str) -> bool:
    """Apply `cpu_allocator` (cache | system) to this process; True when glibc caches from now on."""
    if setting == "system":
        info("cpu_allocator: system (the C library's defaults)")
        return False
    libc = _glibc()
    if libc is None:
        info("cpu_allocator: cache not applied (not glibc: the C library's defaults stay)")
        return False
    applied = all(libc.mallopt(param, value) == 1 for param, value in CACHE.items())
    info("cpu_allocator: cache" + ("" if applied else " refused by glibc (its defaults stay)"))
    return applied
