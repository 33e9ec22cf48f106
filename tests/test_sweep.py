"""Runs sharing one cache: a teacher two runs need is trained once, a corrupt cached one is rebuilt.
(A failing job in a multirun: tests/test_pipeline.py.)"""

from __future__ import annotations

import logging

import pytest
from conftest import run_ddist, run_pipeline


@pytest.mark.slow
def test_two_runs_needing_one_teacher_train_it_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cache = tmp_path / "cache"  # empty: both runs miss at the same moment
    runs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda d: run_ddist("pipeline.stages=[squeeze]", run_dir=d, cache_dir=cache), runs))
    logs = [p.stderr + p.stdout for p in procs]
    assert sum("(measured:" in log for log in logs) == 1, logs  # one trained it ...
    assert sum("(cached:" in log for log in logs) == 1  # ... the other waited and read it
    assert len(list((cache / "teacher").glob("*/teacher.pt"))) == 1


def test_a_corrupt_cached_teacher_is_rebuilt(tmp_path, caplog):
    cache = tmp_path / "cache"
    run_pipeline("pipeline.stages=[squeeze]", run_dir=tmp_path / "a", cache_dir=cache)
    (checkpoint,) = (cache / "teacher").glob("*/teacher.pt")
    checkpoint.chmod(0o644)  # read-only once cached (root writes anyway)
    checkpoint.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="ddist"):
        run_pipeline("pipeline.stages=[squeeze]", run_dir=tmp_path / "b", cache_dir=cache)
    assert f"The cached teacher at {checkpoint.parent} has teacher.pt of 9 bytes" in caplog.text
    assert "building it again" in caplog.text
    assert checkpoint.read_bytes() != b"truncated"
