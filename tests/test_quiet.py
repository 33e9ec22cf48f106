"""The optional Hydra plugins' noise stays off the terminal (ddist/runtime/quiet.py): the joblib launcher's
schema-matching deprecation warning (five times per sweep), alembic's "setup plugin" lines and optuna's
coloured study logs. The unit tests run without the plugins; the multiruns skip where a plugin is absent."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
import warnings

import pytest
from conftest import REPO, run_ddist
from omegaconf import OmegaConf

from ddist.runtime import quiet

SCHEMA_WARNING = (
    "\n'hydra/launcher/joblib' is validated against ConfigStore schema with the same name.\n"
    "This behavior is deprecated in Hydra 1.1 and will be removed in Hydra 1.2."
)


def test_the_joblib_schema_warning_is_ignored_and_other_warnings_are_not():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn(SCHEMA_WARNING, UserWarning, stacklevel=1)
        warnings.warn(SCHEMA_WARNING.replace("joblib", "slurm"), UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [SCHEMA_WARNING.replace("joblib", "slurm"), "something else"]


def test_importing_ddist_installs_the_filter_and_quiets_alembic():
    # a fresh interpreter: pytest resets the warning filters around collection and each test
    code = (
        "import logging, warnings, ddist\n"
        "from ddist.runtime import quiet\n"
        "assert any(a == 'ignore' and m is not None and m.pattern == quiet.JOBLIB_SCHEMA_WARNING\n"
        "           for a, m, *_ in warnings.filters)\n"
        "assert logging.getLogger('alembic').level == logging.WARNING\n"
        "assert logging.getLogger('ddist').getEffectiveLevel() <= logging.WARNING\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_callback_sets_optuna_to_warnings_only_under_an_optuna_sweeper(monkeypatch):
    levels: list[int] = []
    fake = types.SimpleNamespace(logging=types.SimpleNamespace(set_verbosity=levels.append))
    monkeypatch.setitem(sys.modules, "optuna", fake)
    callback = quiet.QuietOptuna()
    sweeper = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"_target_": sweeper}}}))
    assert levels == [logging.WARNING]
    monkeypatch.delitem(sys.modules, "optuna")
    basic = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"_target_": basic}}}))
    assert levels == [logging.WARNING]  # no optuna sweeper, optuna not imported: nothing to do


# per plugin: the module it needs, the sweep's options, which output is read (stderr, or both streams),
# what must show there and what must not
MULTIRUNS = {
    "joblib": (
        "hydra_plugins.hydra_joblib_launcher",
        ["hydra/launcher=joblib", "ipc=1,2"],
        False,
        [],
        ["ConfigStore schema", "Warning"],  # the schema-matching deprecation warning
    ),
    "optuna": (
        "hydra_plugins.hydra_optuna_sweeper",
        [
            "hydra/sweeper=optuna_tpe",
            "hydra.sweeper.n_trials=1",
            "objective_metric=students.0.acc_mean",
            "recover.deda.gamma=interval(1.0, 100.0)",
        ],
        True,
        ["Launching 1 jobs"],  # the sweep ran, Hydra's own lines still show
        ["alembic", "A new study created", "\x1b["],  # alembic's lines, optuna's coloured study logs
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("plugin", list(MULTIRUNS))
def test_a_multirun_with_a_plugin_prints_none_of_its_noise(tmp_path, cache_dir, plugin):
    module, options, both_streams, shown, silenced = MULTIRUNS[plugin]
    pytest.importorskip(module, reason=f"{options[0]} needs its plugin")
    proc = run_ddist(
        "-m",
        *options,
        "dry_run=true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        run_dir=tmp_path,
        cache_dir=cache_dir,
    )
    out = proc.stdout + proc.stderr if both_streams else proc.stderr
    assert all(line in out for line in shown), out
    assert not any(noise in out for noise in silenced), out
