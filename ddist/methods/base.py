"""The method descriptor and its registries: what a method says about itself, so that the schema's
choices, the builders, validation's checks, the dry-run cuts and the stages look it up instead of
listing methods by hand.

A method (a recover objective, a diffusion fine-tuning objective) is one module of ddist/methods/
holding its `Method` and calling `register(...)` at import; importing ddist imports every such
module (ddist.methods discovers them), so a method's settings schema is in Hydra's ConfigStore
before any config is composed. A method module imports its heavy code (torch, the objectives)
inside its builder only: importing ddist stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ddist.config.compat import for_omegaconf
from ddist.config.schema import add_finetune_settings
from ddist.errors import ConfigError

Kind = Literal["recover", "finetune"]
# What a method may ask of the run, given to its builder by the stage (recover's, for now):
# - teacher: the frozen teacher (`teacher=`), BatchNorm folded into its convs where teacher.fold_bn ...
# - bn_hooks: ... unless the method hooks the teacher's BatchNorm layers: then the unfolded teacher
# - class_stats: the real class statistics (`class_stats=` {layer: (mean [C, d], cov [C, d, d])}) of the
#   teacher's features at recover.class_stats.layers (ddist/training/class_stats.py), cached per teacher
# - whole_class_batches: every batch holds whole classes (recover.batch.mode=whole_class, checked up front)
#   and the builder gets their size (`ipc=`)
Need = Literal["teacher", "bn_hooks", "class_stats", "whole_class_batches"]
NEEDS: tuple[Need, ...] = ("teacher", "bn_hooks", "class_stats", "whole_class_batches")
# the option that names a method of each kind
OPTION: dict[Kind, str] = {"recover": "recover.objective", "finetune": "diffusion.finetune.objective"}


def _nothing(cfg: DictConfig) -> None:
    pass


@dataclass(frozen=True)
class Method:
    """One method, as the rest of ddist sees it.

    name:     the value of its option (recover.objective, diffusion.finetune.objective) and the name
              of what it makes (meta.json's and results.json's "method")
    kind:     recover | finetune
    build:    makes the method's objective from its settings node and, as keywords, exactly what
              `needs` asks for (recover: teacher=, class_stats=, ipc=; finetune: num_classes=)
    settings: its own settings schema (a dataclass in its module), or None when it has none:
              - recover: one extending RecoverConfig (DedaRecoverConfig adds recover.deda), stored in
                ConfigStore as recover/<name>_schema, which its option file conf/recover/<name>.yaml
                lists first in its defaults: recover=<name> retypes the recover node
              - finetune: the node diffusion.finetune.<name> itself (RsmConfig: lambda, reduction).
                Every diffusion option file holds every fine-tuning method's settings side by side
                (finetune.objective picks one at the command line, so there is no option file to swap
                in), so the node is a field of the finetune schema: register adds it to FinetuneConfig
                as OmegaConf sees it (schema.add_finetune_settings; schema.py cannot import the methods
                above it) and stores the diffusion schemas again, all at import of ddist, before any
                config is composed. So the composed config is typed exactly as when schema.py declared the
                node (same keys, order and values: same cache keys and meta.json): an unknown key or a
                choice outside a Literal fails at composition naming the option, and to_object gives the
                schema's objects. (Checking the node only in validation, by merging it with the schema,
                would leave it untyped in every config built without validation and in OmegaConf.to_object.)
    check:    the rules between its options, given the whole config (ConfigError / warn); run by
              validation before the first stage, after the generic ones its `needs` imply
    dry_run:  cuts its own loops to one step in a dry run (the shared loops are cut already)
    needs:    what it asks of the run (NEEDS)
    stacks:   recover: its objective can run `recover.batch.parallel_groups` > 1 batches as one
              stacked problem (it has per_group)
    """

    name: str
    kind: Kind
    build: Callable[..., Any]
    settings: type | None = None
    check: Callable[[DictConfig], None] = _nothing
    dry_run: Callable[[DictConfig], None] = _nothing
    needs: frozenset[Need] = field(default_factory=frozenset)
    stacks: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        assert not unknown, f"method {self.name}: unknown needs {sorted(unknown)} (one of {NEEDS})"

    @property
    def option(self) -> str:
        return OPTION[self.kind]


# kind -> name -> its method
REGISTRY: dict[Kind, dict[str, Method]] = {"recover": {}, "finetune": {}}


def register(method: Method) -> Method:
    """Add `method` to its kind's registry and its settings schema (if any) to Hydra's ConfigStore: a
    recover method's as recover/<name>_schema, so `recover=<name>` composes once its option file names that
    schema; a fine-tuning method's as the diffusion schemas' finetune.<name> node (see Method.settings).
    Registering the same name again replaces it (a test's toy method, a reloaded module)."""
    REGISTRY[method.kind][method.name] = method
    if method.settings is None:
        pass
    elif method.kind == "finetune":
        add_finetune_settings(method.name, method.settings)
    else:
        ConfigStore.instance().store(group="recover", name=f"{method.name}_schema", node=for_omegaconf(method.settings))
    return method


def unregister(method: Method) -> None:
    """Drop `method` from its registry (its schema stays stored: ConfigStore has no removal)."""
    REGISTRY[method.kind].pop(method.name, None)


def choices(kind: Kind) -> list[str]:
    return sorted(REGISTRY[kind])


def lookup(kind: Kind, name: Any) -> Method:
    """The method `name` of `kind`; a ConfigError naming the option and the choices when none is."""
    found = REGISTRY[kind].get(str(name))
    if found is None:
        raise ConfigError(
            f"{OPTION[kind]}={name} is not a {kind} method; choose one of {', '.join(choices(kind))} "
            f"(each a module of ddist/methods/)."
        )
    return found


# Loss weights above this cannot be meant: they drown every other term (and float32).
WEIGHT_LIMIT = 1e6


def warn_large_weights(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Warn about each loss weight among `keys` (dotted options; absent ones are skipped) above WEIGHT_LIMIT."""
    from ddist.logging import warn  # imports torch: not at import of ddist

    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > WEIGHT_LIMIT:
            warn(
                f"{key}={value:g} is larger than {WEIGHT_LIMIT:g}: that term will drown every other one "
                "(and float32). Is that meant?"
            )


def diffusion_method(finetune: str, sample: str) -> str:
    """The method name of a sampled set (meta.json's and results.json's "method"): its fine-tuning method
    and its sampler (diffusion.finetune.objective, diffusion.sample.method) joined by "_", each left out
    at its plain setting (none, independent); "diffusion" when both are: rsm_cgs, minimax, cgs, ..."""
    parts = [str(name) for name, plain in ((finetune, "none"), (sample, "independent")) if name != plain]
    return "_".join(parts) or "diffusion"


def recover_method(name: Any) -> Method:
    return lookup("recover", name)


def finetune_method(name: Any) -> Method:
    return lookup("finetune", name)
