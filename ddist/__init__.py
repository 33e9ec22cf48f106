"""ddist: config-driven dataset distillation."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra config tree beside the package. Absolute: Hydra resolves a relative config path
# differently for `python -m ddist` (a file) and for the `ddist` console script (a module).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
