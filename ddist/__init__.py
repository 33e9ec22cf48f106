"""ddist: config-driven dataset distillation."""

import os
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from ddist.runtime.ranks import launched_rank

# Idle OpenMP threads sleep instead of spinning at barriers. Spinning threads made the
# same recover stage 2.6-3.7x slower whenever another process shared the cores; this must
# be set before torch is imported (ddist imports torch after this line). A user's own
# setting wins. See ddist/runtime/threads.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# the optional Hydra plugins' noise (a deprecation warning repeated per process, alembic's INFO lines)
# stays off the terminal in every process that imports ddist, a joblib worker too: ddist/runtime/quiet.py
from ddist.runtime.quiet import install as _quiet_plugins

_quiet_plugins()

# The Hydra config tree ships inside the package (ddist/conf, a link to the checkout's
# top-level conf/ that wheels turn into files), so a non-editable install runs from any
# directory. Absolute: Hydra resolves a relative config path differently for
# `python -m ddist` (a file) and for the `ddist` console script (a module).
CONF_DIR = Path(__file__).resolve().parent / "conf"

# Resolvers of the run directory (conf/hydra/default.yaml), registered wherever ddist is
# imported (a joblib worker too). ddist.now formats the job's start time: under torchrun
# `ddist.__main__` sets it to rank 0's, so every rank names the same directory (cached
# per pattern: a multirun's jobs read the values their config carries). Only rank 0 keeps
# Hydra's .hydra/ there; every other rank logs to its own file.
started = datetime.now()
_rank = launched_rank()  # torchrun's environment (ddist/runtime/ranks.py): no process group yet
if not OmegaConf.has_resolver("ddist.now"):
    OmegaConf.register_new_resolver("ddist.now", lambda pattern: started.strftime(pattern), use_cache=True)
    OmegaConf.register_new_resolver("ddist.rank0_only", lambda value: value if _rank == 0 else None)
    OmegaConf.register_new_resolver("ddist.rank_suffix", lambda: f"_rank{_rank}" if _rank else "")
    OmegaConf.register_new_resolver("ddist.config_groups", lambda: config_groups())


def config_groups() -> str:
    """`ddist --help`'s groups (conf/hydra/default.yaml): each group of conf/ with the options its files
    give, a nested one by its path (experiment: deda/cifar10_ipc10, ...); not the `*_schema` entries of
    Hydra's ConfigStore, which are no option of the command line."""
    import textwrap

    lines = []
    for group in sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        lines += textwrap.wrap(f"{group}: {', '.join(group_options(group))}", width=100, subsequent_indent="    ")
    return "\n".join(lines)


def group_options(group: str) -> list[str]:
    """The options of a group of conf/ (`ddist GROUP=OPTION`): its files, a nested one by its path."""
    return sorted(
        f.relative_to(CONF_DIR / group).with_suffix("").as_posix() for f in (CONF_DIR / group).rglob("*.yaml")
    )


# The schemas of that tree go into Hydra's ConfigStore before anything composes it: the config's,
# and each method's own settings (ddist.methods imports every method module, each registering itself;
# they import torch and their objectives only when they build).
from ddist import methods as _methods  # noqa: E402, F401
from ddist.config import schema as _schema  # noqa: E402, F401
