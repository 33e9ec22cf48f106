"""The stage descriptor and its registry: what each stage says about itself, beside its code.

A stage is one module ddist/stages/<name>.py holding `run(cfg: Config, ctx) -> ctx` (cfg: the composed
DictConfig, typed as the schema ddist.config.schema.Config so that mypy checks every read) and, at
module level, its descriptor, e.g.

    STAGE = Stage(name="recover", needs=frozenset({"teacher"}), makes=frozenset({"distilled"}), shared=True)

The stage modules import torch (diffusion: diffusers) at their top, and validation runs before any of
that should load (`import ddist` stays torch-free, test_importing_ddist_does_not_import_torch). So the
registry reads each module's `STAGE = Stage(...)` statement from its source (ast, literal values only)
without importing it; the pipeline, which imports the module to run it, checks that the module's own
`STAGE` is the one read (`module_of`), so the two cannot drift. A new stage is its module and a line in a
conf/pipeline/*.yaml: validation (pipeline.stages' choices, what each stage needs and makes), the
dispatch and torchrun's sharing all look it up here.
"""

from __future__ import annotations

import ast
import functools
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ddist.errors import ConfigError

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
PACKAGE = "ddist.stages"


@dataclass(frozen=True)
class Stage:
    """One stage, as validation and the pipeline see it.

    name:   its entry in pipeline.stages (the module's file name)
    needs:  the RunContext artifacts it reads (ctx.require): made by an earlier stage or given as an option
    makes:  the artifacts it adds for the stages after it
    shared: torchrun's ranks share its work (DDP training, sharded groups and classes); else rank 0 runs it
            alone and the other ranks take its ctx
    """

    name: str
    needs: frozenset[str] = field(default_factory=frozenset)
    makes: frozenset[str] = field(default_factory=frozenset)
    shared: bool = False

    @property
    def module(self) -> str:
        return f"{PACKAGE}.{self.name}"


def _value(node: ast.expr) -> object:
    """A literal, or frozenset(<literal>) / frozenset()."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "frozenset":
        return frozenset(ast.literal_eval(node.args[0])) if node.args else frozenset()
    return ast.literal_eval(node)


def declared(path: Path) -> Stage | None:
    """The `STAGE = Stage(...)` a stage module declares at module level, read from its source; None if none."""
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["STAGE"]
            and isinstance(node.value, ast.Call)
        ):
            try:
                return Stage(**{k.arg: _value(k.value) for k in node.value.keywords if k.arg})  # type: ignore[arg-type]
            except (ValueError, TypeError) as e:
                raise AssertionError(f"{path}: STAGE = Stage(...) must take literal keywords only ({e})") from e
    return None


@functools.cache
def registry() -> dict[str, Stage]:
    """stage name -> its descriptor, for every module of ddist/stages/ that declares one."""
    found = {}
    for path in sorted(STAGES_DIR.glob("*.py")):
        stage = declared(path)
        if stage is None:
            continue
        assert stage.name == path.stem, f"{path}: STAGE names {stage.name!r}, the file {path.stem!r}"
        found[stage.name] = stage
    return found


def names() -> tuple[str, ...]:
    return tuple(registry())


def stage(name: str, option: str = "pipeline.stages") -> Stage:
    """The stage called `name`; ConfigError naming `option` and the choices when there is none."""
    try:
        return registry()[name]
    except KeyError:
        raise ConfigError(
            f"{option}={name!r} is not a stage; choose one of {', '.join(names())} "
            f"(each a module of ddist/stages/ declaring its STAGE)."
        ) from None


def providers(artifact: str) -> tuple[str, ...]:
    """The stages that make `artifact`."""
    return tuple(s.name for s in registry().values() if artifact in s.makes)


def module_of(name: str) -> ModuleType:
    """Import the stage's module (heavy: torch, diffusers) and check its STAGE is the one the registry read."""
    module = importlib.import_module(stage(name).module)
    assert getattr(module, "STAGE", None) == registry()[name], f"{module.__name__}.STAGE differs from its source"
    return module
