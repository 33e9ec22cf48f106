"""Shared test helpers: run the real entry point in a subprocess with tiny settings (run_ddist,
kept for tests of the command line itself), or compose the config and run the whole pipeline
(run_pipeline) or single stages in-process, without ~6 s of imports per run.

Every end-to-end test uses a session-wide cache directory, so the tiny digits teacher
is trained once per test session (the cache is keyed by config, as in real use).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from ddist.data import dataset_spec
from ddist.runtime.context import RunContext

# One torch thread per test process (and per subprocess, which inherits it): the suite
# shares a 2-core machine with other jobs, where spinning OpenMP threads slow it 3x.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core this process may use (its affinity mask, as ddist's threads=auto),
    not the machine's core count that xdist would read when psutil is installed."""
    from ddist.runtime.threads import available_cores

    return available_cores()


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Settings that make a digits job take seconds: a 2-epoch narrow teacher, 3-epoch students.
TINY = [
    "logger=none",
    "teacher.epochs=2",
    "teacher.model.width=16",
    "evaluate.epochs=3",
    "evaluate.students=[{name: convnet, width: 16}]",
    "analyse.enabled=false",
]


# Students in fp32, not evaluate.precision=auto: a test's numbers must not depend on whether the CPU has AMX.
PINNED_PRECISION = "evaluate.precision=fp32"


# A digits teacher that is trained (93% test accuracy) yet quick (~10 s on one CPU thread): the
# realistic features (post-ReLU, correlated) the DEDA tests measure the regulariser on.
TRAINED_TEACHER = ["teacher.epochs=8", "teacher.model.width=16"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def compose_cfg(*overrides: str, cache_dir: Path, run_dir: Path):
    """The composed config of `python -m ddist OVERRIDES` (no W&B, CPU), for in-process stages."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "config",
            overrides=[
                "logger=none",
                "device=cpu",
                PINNED_PRECISION,
                f"paths.cache_dir={cache_dir}",
                f"paths.output_dir={run_dir}",
                *overrides,
            ],
        )


def stage_ctx(cfg, run_dir: Path) -> RunContext:
    """The ctx the pipeline hands its first stage."""
    return RunContext(run_dir=run_dir, device=torch.device("cpu"), spec=dataset_spec(cfg.dataset))


@pytest.fixture(scope="session")
def trained_digits_teacher(cache_dir, tmp_path_factory) -> Path:
    """TRAINED_TEACHER's checkpoint, trained once per session into the session cache (squeeze
    in-process); configs composed with TRAINED_TEACHER and this cache_dir hit it."""
    from ddist.stages import squeeze

    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose_cfg(*TRAINED_TEACHER, cache_dir=cache_dir, run_dir=run_dir)
    return squeeze.run(cfg, stage_ctx(cfg, run_dir)).require("teacher")


def run_pipeline(*overrides: str, run_dir: Path, cache_dir: Path, tiny: bool = True) -> dict:
    """What `python -m ddist OVERRIDES` runs, in this process: the composed config (with TINY
    unless tiny=False; CPU, no W&B) through ddist.pipeline.run; returns the results. A bad input
    raises its error here (no exit code); run_ddist covers the command line itself."""
    from ddist import pipeline

    tiny_overrides = [o for o in TINY if o != "logger=none"] if tiny else []  # compose_cfg sets it
    return pipeline.run(compose_cfg(*tiny_overrides, *overrides, cache_dir=cache_dir, run_dir=run_dir))


def run_logged(*overrides: str, run_dir: Path, cache_dir: Path, caplog, tiny: bool = True) -> str:
    """run_pipeline, returning what the run logged (ddist's INFO lines), as a test of the log reads it."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddist"):
        run_pipeline(*overrides, run_dir=run_dir, cache_dir=cache_dir, tiny=tiny)
    return caplog.text


def start_forked_run(*overrides: str, run_dir: Path, cache_dir: Path) -> multiprocessing.Process:
    """run_pipeline in a forked child of this process, for the tests that SIGKILL a run midway: the
    child starts with torch and ddist already imported (a `python -m ddist` subprocess spends ~5 s on
    that), and a SIGKILL still runs none of its clean-up. Its output goes to /dev/null; its torch keeps
    this worker's one thread (OMP_NUM_THREADS=1 above: no OpenMP pool to break across the fork)."""
    child = multiprocessing.get_context("fork").Process(
        target=_forked_run, args=(overrides, run_dir, cache_dir), daemon=True
    )
    child.start()
    return child


def kill_when(child: multiprocessing.Process, ready: Callable[[], bool], poll: float = 0.02) -> None:
    """SIGKILL `child` as soon as ready() holds (or it ends, or 10 minutes pass) and wait for it; a test then
    asserts `child.exitcode == -signal.SIGKILL`: the run was killed, not finished."""
    deadline = time.time() + 600
    while not ready() and child.is_alive() and time.time() < deadline:
        time.sleep(poll)
    child.kill()
    child.join()


def _forked_run(overrides: tuple[str, ...], run_dir: Path, cache_dir: Path) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.environ["DDIST_PROGRESS"] = "0"
    run_pipeline(*overrides, run_dir=run_dir, cache_dir=cache_dir)


def run_ddist(
    *overrides: str,
    run_dir: Path,
    cache_dir: Path,
    tiny: bool = True,
    module: str = "ddist",
    check: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m ddist OVERRIDES` in a subprocess; returns the completed process."""
    flags = [a for a in overrides if a.startswith("-")]  # Hydra wants its flags before the overrides
    args = [
        *flags,
        *(TINY if tiny else []),
        PINNED_PRECISION,
        f"paths.cache_dir={cache_dir}",
        *(a for a in overrides if a not in flags),
    ]
    if not flags:
        args.append(f"hydra.run.dir={run_dir}")
    full_env = {**os.environ, "DDIST_PROGRESS": "0", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=900,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ddist failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
        )
    return proc


def tiny_teacher(cache_dir: Path) -> Path:
    """The checkpoint of the TINY teacher (digits, whole dataset) in a cache that may also hold other
    teachers, of other datasets too (the folder-dataset tests train 3-channel ones with the same settings,
    the validation-split tests digits ones on a train split without its val images)."""
    for key_file in sorted(cache_dir.glob("teacher/*/key.json")):
        key = json.loads(key_file.read_text())
        teacher, dataset = key["teacher"], key["dataset"]
        tiny = teacher["epochs"] == 2 and teacher["model"].get("width") == 16
        whole = not any((dataset.get("subset") or {}).values()) and not dataset.get("val_per_class")
        digits = dataset["name"] == "digits" and whole
        if tiny and digits and (key_file.parent / "teacher.pt").is_file():
            return key_file.parent / "teacher.pt"
    raise AssertionError(f"no tiny teacher cached in {cache_dir}")


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
