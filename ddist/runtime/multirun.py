"""Multirun bookkeeping: a failed job leaves `error.json` and the sweep goes on.

Hydra's sweepers stop a sweep on SystemExit, so a job must not exit on a clean ddist
error in a multirun; the entry point records it here instead. At the end of the sweep
`FailureSummary` (a Hydra callback, conf/hydra/default.yaml) reads the records of this
sweep's jobs, prints one line per failed job and exits with the worst job's code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_FILE = "error.json"


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # not under @hydra.main
        return False


def record_error(job_dir: Path, message: str, exit_code: int) -> None:
    from ddist.runtime.artifacts import atomic_write_text  # torch-heavy: keep `ddist.report` light

    atomic_write_text(job_dir / ERROR_FILE, json.dumps({"message": message, "exit_code": exit_code}, indent=2))


def clear_error(job_dir: Path) -> None:
    (job_dir / ERROR_FILE).unlink(missing_ok=True)


def read_error(job_dir: Path) -> dict | None:
    """The failure recorded in a job directory, or None."""
    try:
        return json.loads((job_dir / ERROR_FILE).read_text())
    except (OSError, ValueError):
        return None


class FailureSummary(Callback):
    """After a multirun: one line per failed job, then exit non-zero if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = [
            (d, err)
            for d in sorted(p.parent for p in sweep_dir.glob(f"*/{ERROR_FILE}"))
            if (err := read_error(d)) is not None
        ]
        if not failed:
            return
        total = sum(1 for _ in sweep_dir.glob("*/.hydra"))
        lines = [f"ddist: {len(failed)} of {total} jobs failed (details in each job's {ERROR_FILE}):"]
        lines += [f"  {d.name}: {err['message'].splitlines()[0].removeprefix('ddist: error: ')}" for d, err in failed]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(max(int(err.get("exit_code", 1)) for _, err in failed))
