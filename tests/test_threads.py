"""The `threads` option: how many torch threads a job takes, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ddist import threads
from ddist.errors import ConfigError


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
