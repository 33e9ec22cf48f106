"""Methods as self-describing plug-ins: one module per method (sre2l, deda, plain, minimax, rsm),
each holding its `Method` descriptor (ddist/methods/base.py) beside its builder.

Importing this package imports every module in it (importing ddist does, so each method's settings
schema is registered before Hydra composes a config): a new method is its module, its option file
and its test, with nothing listed elsewhere. The rest of ddist reads the registries through
`recover_method`, `finetune_method` and `choices`.
"""

import importlib
import pkgutil

from ddist.methods.base import (
    NEEDS,
    REGISTRY,
    Method,
    Need,
    choices,
    diffusion_method,
    finetune_method,
    lookup,
    recover_method,
    register,
    unregister,
)

__all__ = [
    "NEEDS",
    "REGISTRY",
    "Method",
    "Need",
    "choices",
    "diffusion_method",
    "finetune_method",
    "lookup",
    "recover_method",
    "register",
    "unregister",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
