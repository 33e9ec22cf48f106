"""OmegaConf 2.3 validates Enums but not Literals: `for_omegaconf` rebuilds a dataclass schema
(ddist/config/schema.py) for OmegaConf with each Literal turned into a StrEnum of its values. A StrEnum
member is a str (it compares, hashes, formats and JSON-encodes as its value), so code reads
`cfg.recover.objective == "deda"` as before. A field named after a Python keyword (rsm's `lambda`) is
declared with a trailing underscore and rebuilt without it.

A schema may also be `extend`ed by a node that a plug-in owns: ddist/methods/ types
diffusion.finetune.<name> by a fine-tuning method's own settings schema this way, as its descriptor
registers (schema.py cannot import the methods: they sit above it).
"""

from __future__ import annotations

import dataclasses
import keyword
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar, cast

from omegaconf import MISSING, OmegaConf

T = TypeVar("T")


def for_omegaconf(schema: type) -> type:
    """The dataclass `schema` as OmegaConf 2.3 takes it: Literals become StrEnums (nested dataclasses
    too). Rebuilt classes and enums are module attributes of their own names, so configs pickle
    (joblib and submitit ship them to other processes) and error messages name the schema."""
    if hasattr(_rebuilt, schema.__name__):
        return getattr(_rebuilt, schema.__name__)
    hints = typing.get_type_hints(schema)
    annotations, defaults = {}, {}
    for f in dataclasses.fields(schema):
        key = f.name[:-1] if f.name.endswith("_") and keyword.iskeyword(f.name[:-1]) else f.name
        annotations[key] = _convert(hints[f.name], f"{schema.__name__}_{key}")
        defaults[key] = f.default
    for key, node in _EXTENSIONS.get(schema, {}).items():  # after its own fields: MISSING, as the YAML sets them
        annotations[key], defaults[key] = for_omegaconf(node), MISSING
    bases = tuple(for_omegaconf(b) for b in schema.__bases__ if dataclasses.is_dataclass(b))
    qualname = f"{_REBUILT_NAMESPACE}.{schema.__name__}"
    namespace = {"__annotations__": annotations, "__module__": __name__, "__qualname__": qualname, **defaults}
    namespace |= {"__init__": _init, **{f"{k}_": _alias(k) for k in annotations if keyword.iskeyword(k)}}
    # a generated __init__ could not take `lambda`: _init takes the fields as keywords (OmegaConf.to_object
    # calls it), and `lambda_` reads `lambda`, so an object answers the schema's field name too
    rebuilt: type = dataclass(init=False, repr=False, eq=False)(type(schema.__name__, bases, namespace))
    setattr(_rebuilt, schema.__name__, rebuilt)
    _SOURCES[schema.__name__] = schema
    return rebuilt


def extend(schema: type, fields: Mapping[str, type]) -> None:
    """Give `schema`, as for_omegaconf rebuilds it, the fields `fields` (name -> a dataclass), after its own, in
    that order and MISSING by default (replacing those given before): nodes that plug-ins own, which `schema`'s
    module cannot import (the fine-tuning methods' settings, diffusion.finetune.<name>: ddist/methods/base.py).
    The rebuilt classes that hold `schema` are dropped, to be rebuilt with the fields: store the schemas that
    hold it in ConfigStore again afterwards (before any config is composed)."""
    _EXTENSIONS[schema] = dict(fields)
    for rebuilt_name, source in list(_SOURCES.items()):
        if _holds(source, schema):
            delattr(_rebuilt, rebuilt_name)
            del _SOURCES[rebuilt_name]


def _holds(schema: Any, target: type) -> bool:
    """Whether the type `schema` is `target` or has it among its bases or field types, at any depth."""
    if schema is target:
        return True
    args = typing.get_args(schema)
    if args:  # X | None, list[X], dict[K, X], Literal[...]
        return any(_holds(a, target) for a in args if isinstance(a, type) or typing.get_args(a))
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return False
    hints = typing.get_type_hints(schema)
    return any(_holds(b, target) for b in schema.__bases__) or any(
        _holds(hints[f.name], target) for f in dataclasses.fields(schema)
    )


def typed(schema: type[T], values: Mapping[str, Any] | None = None) -> T:
    """`values` as a DictConfig validated against `schema` (rebuilt by for_omegaconf), typed as the schema:
    the node a stage reads from a composed config, for code that starts from a dict (tests, scripts)."""
    return cast(T, OmegaConf.merge(OmegaConf.structured(for_omegaconf(schema)), values or {}))


def _init(self: Any, **fields: Any) -> None:
    """The rebuilt class's __init__: each field from its keyword (OmegaConf.to_object passes them all)."""
    for name, value in fields.items():
        setattr(self, name, value)


def _alias(name: str) -> property:
    return property(lambda self: getattr(self, name))


def _convert(hint: Any, enum_name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        qualname = f"{_REBUILT_NAMESPACE}.{enum_name}"
        enum = StrEnum(enum_name, [(v, v) for v in args], module=__name__, qualname=qualname)  # type: ignore[misc]
        setattr(_rebuilt, enum_name, enum)
        return enum
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, f"{enum_name}: OmegaConf takes X | None, not {hint}"
        return _convert(inner[0], enum_name) | None
    if origin is list:
        return list[_convert(args[0], enum_name)]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _convert(args[1], enum_name)]  # type: ignore[misc,valid-type]
    if dataclasses.is_dataclass(hint):
        return for_omegaconf(hint)  # type: ignore[arg-type]
    return hint


# the rebuilt classes and enums, reachable for pickle as ddist.config.compat._rebuilt.<name>
_REBUILT_NAMESPACE = "_rebuilt"
_rebuilt = types.SimpleNamespace()
# the schema each rebuilt class was made from, by name (what `extend` drops), and the fields plug-ins added
_SOURCES: dict[str, type] = {}
_EXTENSIONS: dict[type, dict[str, type]] = {}
