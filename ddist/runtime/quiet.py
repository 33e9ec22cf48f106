"""Keep the optional Hydra plugins' noise off the user's terminal, narrowly.

- hydra-joblib-launcher: conf/hydra/launcher/joblib.yaml shadows the plugin's own `joblib` schema in
  Hydra's ConfigStore (on purpose: it lists every field), and Hydra warns about that "automatic schema
  matching" once per code path and per worker process (five times for `-m hydra/launcher=joblib ipc=1,2`).
  `install()` ignores that one message, in every process that imports ddist (a joblib worker too).
- hydra-optuna-sweeper: importing optuna imports alembic, which logs seven "setup plugin alembic..." lines
  at INFO through Hydra's root handler; optuna adds its own coloured handler for its study logs. alembic's
  logger is set to WARNING here; optuna's verbosity by `QuietOptuna` (a Hydra callback,
  conf/hydra/default.yaml) once the sweep starts, because importing optuna resets its level to INFO.
Warnings and errors of both still show.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Hydra's message starts with a newline: "\n'hydra/launcher/joblib' is validated against ConfigStore schema ..."
JOBLIB_SCHEMA_WARNING = r"\s*'hydra/launcher/joblib' is validated against ConfigStore schema with the same name"
QUIET_LOGGERS = ("alembic",)


def install() -> None:
    warnings.filterwarnings("ignore", message=JOBLIB_SCHEMA_WARNING, category=UserWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_optuna() -> None:
    """Optuna's study logs ("A new study created ...") at WARNING, without its coloured INFO lines."""
    optuna = importlib.import_module("optuna")  # an optional plugin's dependency: typed Any with or without it
    optuna.logging.set_verbosity(logging.WARNING)


class QuietOptuna(Callback):
    """Before an Optuna sweeper starts its study: optuna logs warnings only."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        target = str(config.hydra.sweeper.get("_target_", ""))
        if "optuna" in target or "optuna" in sys.modules:
            quiet_optuna()
