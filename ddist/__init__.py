"""ddist: config-driven dataset distillation."""

import os

# Idle OpenMP threads sleep instead of spinning at barriers. Spinning threads made the
# same recover stage 2.6-3.7x slower whenever another process shared the cores; this must
# be set before torch is imported (ddist imports torch after this line). A user's own
# setting wins. See ddist/threads.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
