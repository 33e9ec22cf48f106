"""Progress in a log file: plain lines at intervals, never carriage-return frames; the W&B run's
id (the same for a rerun of the same command) and Ctrl-C on the command line."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, compose_cfg

from ddist import logging as dlog
from ddist.__main__ import INTERRUPTED


def test_progress_in_a_log_writes_lines_not_frames(monkeypatch, caplog, capsys):
    monkeypatch.setenv("DDIST_PROGRESS", "1")
    monkeypatch.setattr(dlog, "LOG_INTERVAL", 0.0)  # a line on every update, to see them
    with caplog.at_level(logging.INFO, logger="ddist"):
        bar = dlog.progress(desc="recover", total=3)  # pytest's stderr is not a terminal
        for _ in range(3):
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("recover" in line and "3/3" in line for line in lines), lines
    assert "\r" not in capsys.readouterr().err


def test_progress_is_silent_when_switched_off(monkeypatch, caplog, capsys):
    monkeypatch.setenv("DDIST_PROGRESS", "0")
    with caplog.at_level(logging.INFO, logger="ddist"):
        assert list(dlog.progress(range(4), desc="x")) == [0, 1, 2, 3]
    assert not caplog.records and capsys.readouterr().err == ""


def test_the_wandb_run_id_is_the_runs_identity_not_its_directory(tmp_path):
    """The same config in another run directory (a rerun of the command) gets the same W&B id; another
    config another id."""
    cache = tmp_path / "cache"
    first = compose_cfg("ipc=1", cache_dir=cache, run_dir=tmp_path / "a")
    rerun = compose_cfg("ipc=1", "logger=wandb", cache_dir=cache, run_dir=tmp_path / "b")
    assert dlog.run_id(first) == dlog.run_id(rerun)
    assert dlog.run_id(compose_cfg("ipc=2", cache_dir=cache, run_dir=tmp_path / "a")) != dlog.run_id(first)
    assert dlog.run_id(compose_cfg("ipc=1", "seed=1", cache_dir=cache, run_dir=tmp_path / "a")) != dlog.run_id(first)


def _interrupted_run(run_dir, cache_dir) -> tuple[subprocess.CompletedProcess, str]:
    """`python -m ddist` (a long teacher, offline W&B) sent SIGINT once its W&B run has started: what it
    printed and exited with, and the W&B run's id (the offline run directory's suffix)."""
    args = [*TINY, "teacher.epochs=5000", "logger=wandb", "logger.mode=offline", f"paths.cache_dir={cache_dir}"]
    env = {**os.environ, "DDIST_PROGRESS": "0", "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddist", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a pytest-xdist worker ignores SIGINT, and an ignored SIGINT stays ignored in its children (Python
        # then installs no KeyboardInterrupt handler): the run gets the terminal's default, as a user's does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def training() -> bool:
        """The W&B run is open and the teacher's training has begun (its first stage logged): a SIGINT
        earlier could land inside wandb.init, which handles it itself."""
        started = list((run_dir / "wandb").glob("offline-run-*"))
        return bool(started) and any("stage squeeze" in p.read_text() for p in run_dir.glob("*.log"))

    deadline = time.time() + 300
    while not training() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the teacher's training
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), wandb_run.name.split("-", 3)[-1]


@pytest.mark.slow
def test_ctrl_c_prints_one_line_exits_130_and_the_rerun_continues_the_same_wandb_run(tmp_path):
    cache = tmp_path / "cache"
    first, first_id = _interrupted_run(tmp_path / "first", cache)
    assert first.returncode == 130, first.stderr[-3000:]
    assert first.stderr.strip() == INTERRUPTED
    rerun, rerun_id = _interrupted_run(tmp_path / "rerun", cache)  # a new run directory, the same W&B run
    assert rerun.returncode == 130 and rerun.stderr.strip() == INTERRUPTED
    assert rerun_id == first_id


def test_the_baselines_students_log_under_their_own_namespace(tmp_path, monkeypatch):
    """The random-real baseline's students log "baseline/random/..."; the set's students' curves and
    final test_acc (W&B's summary: a key's last value) are the set's alone. Students and the teacher
    log test accuracy as a curve (every eval_every epochs), its last point the reported number."""
    from conftest import run_pipeline

    logged: list[tuple[dict, int | None]] = []
    monkeypatch.setattr(dlog.RunLogger, "log", lambda self, metrics, step=None: logged.append((metrics, step)))
    every = ("evaluate.eval_every=1", "teacher.eval_every=1")  # TINY: 3 student epochs, 2 teacher epochs
    results = run_pipeline("ipc=1", *every, run_dir=tmp_path / "run", cache_dir=tmp_path / "cache")
    last: dict[str, float] = {}
    for metrics, _ in logged:
        last.update(metrics)
    set_acc, baseline_acc = "evaluate/convnet_r0/test_acc", "baseline/random/convnet_r0/test_acc"
    assert set_acc in last and baseline_acc in last, sorted(last)
    (student,) = results["students"]
    assert last[set_acc] == student["accs"][0]
    assert last[baseline_acc] == results["baseline"]["students"][0]["accs"][0]
    assert not any(k.startswith("evaluate/random") for k in last), sorted(last)

    def curve(key: str) -> list[tuple[int | None, float]]:
        return [(step, metrics[key]) for metrics, step in logged if key in metrics]

    points = curve(set_acc)
    assert [step for step, _ in points] == sorted(step for step, _ in points) and len(points) == 3, points
    assert points[-1][1] == student["accs"][0]
    assert len(curve(baseline_acc)) == 3
    teacher = curve("squeeze/test_acc")
    assert len(teacher) == 2 and teacher[-1][1] == results["teacher_acc"], teacher

    from ddist.pipeline import format_table

    (row,) = [line.split() for line in format_table(results).splitlines() if line.strip().startswith("convnet")]
    assert row[3] == "-", row  # one repeat: no std, not "0.00%"


def test_search_trials_get_their_own_wandb_names_and_tags(tmp_path, monkeypatch):
    """Trial n of an optimising sweep is named "...-t<n>" and tagged search (and val); a plain run is not."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg = compose_cfg("ipc=1", "evaluate.split=val", cache_dir=tmp_path, run_dir=tmp_path / "run")
    assert dlog._trial_suffix(cfg) == "" and dlog._search_tags(cfg) == []  # no objective: not a search
    OmegaConf.update(cfg, "objective_metric", "students.0.acc_mean", force_add=True)
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: SimpleNamespace(job=SimpleNamespace(num=7))))
    assert dlog._trial_suffix(cfg) == "-t7"
    assert dlog._search_tags(cfg) == ["search", "val"]
