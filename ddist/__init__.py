"""ddist: config-driven dataset distillation."""

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning at barriers. Spinning threads made the
# same recover stage 2.6-3.7x slower whenever another process shared the cores; this must
# be set before torch is imported (ddist imports torch after this line). A user's own
# setting wins. See ddist/threads.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# The Hydra config tree ships inside the package (ddist/conf, a link to the checkout's
# top-level conf/ that wheels turn into files), so a non-editable install runs from any
# directory. Absolute: Hydra resolves a relative config path differently for
# `python -m ddist` (a file) and for the `ddist` console script (a module).
CONF_DIR = Path(__file__).resolve().parent / "conf"

# The schemas of that tree go into Hydra's ConfigStore before anything composes it.
from ddist import config as _config  # noqa: E402, F401
