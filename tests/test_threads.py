"""The `threads` option: how many torch threads a job takes, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddist.errors import ConfigError
from ddist.runtime import allocator, threads


def test_explicit_count_is_applied():
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_takes_the_users_omp_setting(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.thread_count("auto")[0] == 3


@pytest.mark.parametrize("bad", ["abc", "-2", "1.5"])
def test_auto_names_an_unreadable_omp_setting(monkeypatch, bad):
    monkeypatch.setenv("OMP_NUM_THREADS", bad)
    with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS=.*positive integer"):
        threads.thread_count("auto")
    assert threads.thread_count(2) == (2, "threads option")  # an explicit threads=N does not read it


def test_auto_divides_the_cores_among_concurrent_jobs(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    assert threads.thread_count("auto")[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun with 4 local ranks
    assert threads.thread_count("auto")[0] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more jobs than cores: still one thread
    assert threads.thread_count("auto")[0] == 1


@pytest.mark.parametrize("bad", [0, -2, "many", 1.5, True])
def test_bad_values_name_the_option(bad):
    with pytest.raises(ConfigError, match="threads"):
        threads.thread_count(bad)


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_ddist_asks_openmp_not_to_spin_unless_the_user_chose(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import ddist, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


# ----------------------------------------------------------------------------- cpu_allocator


MMAPPED_GROWTH = """
import ctypes
from ddist.runtime import allocator

class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h): ten size_t
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = allocator._glibc()
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
def growth():  # glibc's mmapped bytes while a 64 MiB block is held (above its 32 MiB top threshold)
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(2**26)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(ctypes.c_void_p(block))
    return grown
default = growth()
print(default, allocator.configure_allocator("system"), growth(), allocator.configure_allocator("cache"), growth())
"""


@pytest.mark.skipif(
    not hasattr(allocator._glibc(), "mallinfo2"), reason="cpu_allocator acts on glibc only (mallinfo2: 2.33+)"
)
def test_cpu_allocator_cache_serves_large_blocks_from_the_heap():
    """In a fresh process (cpu_allocator is process-wide and one-way): glibc mmaps a 64 MiB block by
    default and under `system`, and serves it from the heap under `cache`."""
    out = subprocess.run([sys.executable, "-c", MMAPPED_GROWTH], capture_output=True, text=True, check=True)
    default, system_applied, system, cache_applied, cache = out.stdout.split()
    assert int(default) >= 2**26 and int(system) == int(default) and system_applied == "False"
    assert cache_applied == "True" and int(cache) == 0
