"""`python -m ddist` (or `ddist`): the Hydra entry point over conf/config.yaml.

A single run that fails on a user-fixable problem prints one paragraph and exits 2; so does a
config that does not compose (an unknown key, a wrong type, a value outside its choices: the
schemas of ddist/config/schema.py), naming the key, instead of Hydra's multi-line report. In a
multirun a failing job must not end the sweep: its message goes to `error.json` in its job
directory, the other jobs run, and the sweep exits non-zero at the end with a summary of
the failed jobs (ddist.runtime.multirun.FailureSummary, a Hydra callback in conf/hydra/default.yaml).

Under torchrun (WORLD_SIZE > 1) the ranks join one process group before Hydra starts and take
rank 0's start time, so all of them name the same run directory (`ddist.now` in
conf/hydra/default.yaml, ddist/__init__.py); only rank 0 keeps Hydra's .hydra/ there, each rank logs to its own file.
With `objective_metric` set, a job returns that value of its results (an optimising sweeper's objective).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
from pathlib import Path

import hydra
import hydra._internal.utils as hydra_utils
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.plugins.completion_plugin import CompletionPlugin
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import ddist
from ddist import CONF_DIR
from ddist.errors import DdistError
from ddist.runtime.ranks import launched_world


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    # imported after Hydra has parsed the command line: `--help` stays fast
    from ddist import pipeline
    from ddist.runtime import multirun

    job_dir = Path(cfg.paths.output_dir)
    multirun.clear_error(job_dir)  # a rerun of a job in a reused sweep directory starts clean
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
        if not multirun.in_multirun():
            sys.exit(2)
        multirun.record_error(job_dir, message, exit_code=2)
    except Exception as err:
        if not multirun.in_multirun():
            raise
        # a bug: keep the traceback in the job's log, and let the sweep go on
        logging.getLogger("ddist").exception("job failed")
        multirun.record_error(job_dir, f"{type(err).__name__}: {err}", exit_code=1)
    return None  # a failed job: an optimising sweeper marks the trial failed and goes on


def composition_error(err: ConfigCompositionException) -> str:
    """One line for a config that does not compose: the key, OmegaConf's reason, and where (an
    override or a file). Hydra puts OmegaConf's error in the cause (overrides) or in its own text (files)."""
    cause = err.__cause__
    text = f"{err}\n{cause}" if isinstance(cause, OmegaConfBaseException) else str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.startswith("full_key:")), None)
    if not at:
        return " ".join(lines)
    key = lines[at].removeprefix("full_key:").strip()
    where = re.sub(r":? *\w+ raised while composing config:$", "", lines[0])  # "In 'experiment/x'", "Error merging ..."
    return f"{key}: {lines[at - 1]} ({where})"


def missing_experiment(err: ConfigCompositionException) -> str | None:
    """The message for `experiment=NAME` naming no file under conf/experiment/, or None for any other error.
    Hydra lists only a group's top-level options, and the experiments sit in subfolders (deda/cifar10_ipc10)."""
    missing = getattr(err, "missing_cfg_file", None) if isinstance(err, MissingConfigException) else None
    if not missing or not str(missing).startswith("experiment/"):
        return None
    name = str(missing).removeprefix("experiment/")
    root = CONF_DIR / "experiment"
    names = sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return (
        f"experiment={name}: no such file conf/experiment/{name}.yaml.{hint} "
        f"The experiments (conf/experiment/*/*.yaml): {', '.join(names)}."
    )


def _report_composition_errors(run_and_report):
    """Hydra's run_and_report, with a composition error reported like ddist's own errors."""

    def report(func):
        def guarded():
            try:
                return func()
            except ConfigCompositionException as err:
                experiment = missing_experiment(err)
                if experiment and os.environ.get("HYDRA_FULL_ERROR") != "1":
                    print(f"ddist: error: {experiment}", file=sys.stderr)
                    sys.exit(2)
                if os.environ.get("HYDRA_FULL_ERROR") == "1" or isinstance(err, MissingConfigException):
                    raise  # Hydra's report: the full trace, or the list of available options
                print(
                    f"ddist: config error: {composition_error(err)}\n"
                    "Check the overrides and the config files under conf/ (their keys: ddist/config/schema.py).",
                    file=sys.stderr,
                )
                sys.exit(2)

        return run_and_report(guarded)

    return report


# Ctrl-C: this line and exit code 130 instead of a traceback; the W&B run ends as interrupted
# (ddist.pipeline.run) and the same command run again continues it (its id: ddist.logging.run_id).
INTERRUPTED = "interrupted: rerun the same command to resume"


def _complete_from_conf(query):
    """Hydra's tab completion, except that `GROUP=` of a group of conf/ completes to that group's files
    (ddist.group_options): nested experiment names (experiment=deda/cifar10_ipc10), no `*_schema` entries."""

    def complete(self, word: str, config_name: str | None, words: list[str]) -> tuple[list[str], bool]:
        group, eq, _ = word.partition("=")
        if not eq or "/" in group or group == "hydra" or not (CONF_DIR / group).is_dir():
            return query(self, word, config_name=config_name, words=words)
        return [f"{group}={o}" for o in ddist.group_options(group) if f"{group}={o}".startswith(word)], True

    return complete


def main() -> None:
    try:
        _run()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except ValueError as err:
        if not str(err).startswith(_ONE_COMMAND):  # Hydra's flags, checked outside its error reporter
            raise
        print(
            "ddist: error: give one of -m (--multirun), --cfg, --info and --shell-completion. To see a sweep "
            "job's config, drop -m and give that job's values: `ddist ipc=1 --cfg job`.",
            file=sys.stderr,
        )
        sys.exit(2)


_ONE_COMMAND = "Only one of --run, --multirun, --cfg, --info and --shell_completion"


def _run() -> None:
    # Hydra composes inside its own error reporter (no public hook), so that is where a composition error
    # becomes one message and exit code 2
    hydra_utils.run_and_report = _report_composition_errors(hydra_utils.run_and_report)
    CompletionPlugin._query_config_groups = _complete_from_conf(CompletionPlugin._query_config_groups)  # type: ignore[method-assign]
    if launched_world() == 1:
        _main()
        return
    from ddist.runtime import distributed  # torch: imported only when torchrun started several ranks

    ddist.started = distributed.start()  # every rank names its run directory by rank 0's start time
    try:
        _main()
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
