"""`python -m ddist` (or `ddist`): the Hydra entry point over conf/config.yaml.

A single run that fails on a user-fixable problem prints one paragraph and exits 2. In a
multirun a failing job must not end the sweep: its message goes to `error.json` in its job
directory, the other jobs run, and the sweep exits non-zero at the end with a summary of
the failed jobs (ddist.sweep.FailureSummary, a Hydra callback in conf/hydra/default.yaml).

Under torchrun (WORLD_SIZE > 1) the ranks join one process group before Hydra starts and take
rank 0's start time, so all of them name the same run directory (`ddist.now` in
conf/hydra/default.yaml, ddist/__init__.py); only rank 0 keeps Hydra's .hydra/ there, each rank logs to its own file.
With `objective_metric` set, a job returns that value of its results (an optimising sweeper's objective).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import ddist
from ddist import CONF_DIR
from ddist.errors import DdistError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    # imported after Hydra has parsed the command line: `--help` stays fast
    from ddist import pipeline, sweep

    job_dir = Path(cfg.paths.output_dir)
    sweep.clear_error(job_dir)  # a rerun of a job in a reused sweep directory starts clean
    try:
        # what a sweeper that optimises (hydra/sweeper=optuna_tpe) reads: the value objective_metric names
        return pipeline.objective(cfg, pipeline.run(cfg))
    except (DdistError, OmegaConfBaseException) as err:
        # a user-fixable problem: one paragraph, no traceback
        message = (
            f"ddist: error: {err}"
            if isinstance(err, DdistError)
            else (f"ddist: config error: {err}\nCheck the overrides and the config files under conf/.")
        )
        print(message, file=sys.stderr)
        if not sweep.in_multirun():
            sys.exit(2)
        sweep.record_error(job_dir, message, exit_code=2)
    except Exception as err:
        if not sweep.in_multirun():
            raise
        # a bug: keep the traceback in the job's log, and let the sweep go on
        logging.getLogger("ddist").exception("job failed")
        sweep.record_error(job_dir, f"{type(err).__name__}: {err}", exit_code=1)
    return None  # a failed job: an optimising sweeper marks the trial failed and goes on


def main() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        _main()
        return
    from ddist import distributed  # torch: imported only when torchrun started several ranks

    ddist.started = distributed.start()  # every rank names its run directory by rank 0's start time
    try:
        _main()
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
