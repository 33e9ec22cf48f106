"""A failing job does not end a multirun: it leaves error.json, the sweep goes on and exits non-zero."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import run_ddist, run_pipeline

from ddist import report


@pytest.mark.slow
def test_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    # job 0 asks for an unknown device (a clean ddist error); job 1 is a tiny random-real run
    proc = run_ddist(
        "-m",
        "pipeline=random",
        "device=cuda:7,cpu",
        f"hydra.sweep.dir={sweep_dir}",
        run_dir=tmp_path,
        cache_dir=cache_dir,
        check=False,
    )
    failed, ok = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert json.loads((ok / "results.json").read_text())["method"] == "random"  # the second job still ran
    error = json.loads((failed / "error.json").read_text())
    assert "device" in error["message"] and error["exit_code"] == 2
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "1 of 2 jobs failed" in proc.stderr and failed.name in proc.stderr

    report.main([str(sweep_dir)])
    md = (sweep_dir / "report.md").read_text()
    assert f"failed job: `{failed.name}`" in md and "device" in md


@pytest.mark.slow
def test_a_rerun_that_succeeds_clears_the_old_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "error.json").write_text('{"message": "old", "exit_code": 2}')
    proc = run_ddist("pipeline=random", run_dir=run_dir, cache_dir=cache_dir)
    assert not (run_dir / "error.json").exists()
    assert proc.stdout.rstrip().endswith(f"run directory: {run_dir}")  # the table ends by saying where it is


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
    checkpoint.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="ddist"):
        run_pipeline("pipeline.stages=[squeeze]", run_dir=tmp_path / "b", cache_dir=cache)
    assert "training it again" in caplog.text
    assert checkpoint.read_bytes() != b"truncated"
