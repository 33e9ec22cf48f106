"""`python -m ddist.report PATH... [--out DIR] [--sweep KEY...] [--wandb]` (see ddist/report/__init__.py)."""

import sys

from ddist.report import main

sys.exit(main())
