"""The import graph flows one way, wing by wing: entry -> stages -> services -> leaves -> base.

No stage imports another stage; nothing below the stages imports a stage or the entry point;
objectives and metrics import no config, logging or runtime; no cycles. LAYER names each wing's
layer and MAY_IMPORT what a layer may import, so a wrong import fails naming both ends."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddist"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """ddist modules imported by the file (module level only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddist"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from ddist import pipeline`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ddist"))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "conf" not in p.parts}


# Each module's layer: the longest prefix of its dotted name in this table. A module under no
# entry fails test_every_module_has_a_layer: a new wing is placed here on purpose.
LAYER = {
    # entry: the command line and the pipeline that runs the stages
    "ddist.__main__": "entry",
    "ddist.pipeline": "entry",
    # stages: thin recipes (setup, loop, save), one per stage
    "ddist.stages": "stages",
    # services the stages share
    "ddist.training": "services",  # the training loop, teacher, students, baseline, denoiser, recover's loop
    "ddist.diffusion": "services",  # the diffusion stage's library: keys, loading, the sampler
    "ddist.report": "services",  # the report over runs and the analyse stage's figures
    "ddist.methods": "services",  # one plug-in per method: its settings schema, builder, checks, dry-run cut, needs
    "ddist.runtime": "services",  # context, threads, allocator, ranks, shards, work directories, merge
    "ddist.config.checks": "services",  # every check of a composed config, before any work
    "ddist.config.dry_run": "services",  # the dry-run cuts
    # leaves: what the services build on; they know nothing of runs or stages
    "ddist.objectives": "leaves",
    "ddist.models": "leaves",
    "ddist.data": "leaves",
    "ddist.metrics": "leaves",
    # base: imported by every layer, importing nothing above it
    "ddist": "base",  # the package: CONF_DIR, the resolvers, the schemas' registration
    "ddist.errors": "base",
    "ddist.utils": "base",
    "ddist.logging": "base",
    "ddist.config": "base",
    "ddist.config.schema": "base",
    "ddist.config.compat": "base",
    # runtime by role, base by dependency: atomic files and the artifact store, which data/ writes
    # through (the decoded-image cache, the batch plan, the subsets), the ranks the store follows,
    # and multirun's bookkeeping, which logging asks whether this job is part of a sweep
    "ddist.runtime.artifacts": "base",
    "ddist.runtime.store": "base",
    "ddist.runtime.ranks": "base",
    "ddist.runtime.multirun": "base",
    "ddist.runtime.quiet": "base",  # the plugins' noise, silenced wherever ddist is imported
}
# layer -> the layers its modules may import (a stage never another stage: see below)
MAY_IMPORT = {
    "entry": {"entry", "stages", "services", "leaves", "base"},
    "stages": {"stages", "services", "leaves", "base"},
    "services": {"services", "leaves", "base"},
    "leaves": {"leaves", "base"},
    "base": {"base"},
}
# The one import against the flow: importing the package registers every method's settings schema with
# Hydra before any config is composed (ddist.methods discovers the method modules). It stays light because
# a method module imports torch and its objectives only inside its builder and checks
# (test_importing_ddist_does_not_import_torch).
REGISTRATION = {("ddist", "ddist.methods")}
# objectives and metrics take tensors (and, where they must, a model): never datasets, configs,
# logging or runs. These are the only packages they may import.
TENSOR_LAYERS = ("ddist.objectives", "ddist.metrics")
TENSOR_LAYER_MAY_IMPORT = ("ddist.objectives", "ddist.metrics", "ddist.models", "ddist.errors", "ddist.utils")
# the top level of ddist/ holds at most this many modules besides its folders
TOP_LEVEL_MODULES = 8


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER:
            return LAYER[prefix]
    return None


def stage_of(module: str) -> str | None:
    """ddist.stages.<name>[...] -> <name>; None outside the stages."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def edges() -> list[tuple[str, str]]:
    """(module, the ddist module it imports), anywhere in the file (function-level imports too)."""
    return [
        (name, imported)
        for name, path in MODULES.items()
        for imported in sorted(imports(path, top_level_only=False) & MODULES.keys())
        if imported != name
    ]


def test_every_module_has_a_layer():
    missing = [name for name in MODULES if layer_of(name) is None]
    assert not missing, f"modules in no wing of LAYER (tests/test_layering.py): {missing}"


def test_imports_flow_one_way_entry_stages_services_leaves_base():
    wrong = [
        f"{name} ({layer_of(name)}) imports {imported} ({layer_of(imported)}); "
        f"{layer_of(name)} may import only {sorted(MAY_IMPORT[layer_of(name) or ''])}"
        for name, imported in edges()
        if layer_of(imported) not in MAY_IMPORT[layer_of(name) or ""] and (name, imported) not in REGISTRATION
    ]
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage():
    wrong = [
        f"{name} imports {imported}: stages hand each other artifacts through RunContext, never code"
        for name, imported in edges()
        if stage_of(name) and stage_of(imported) and stage_of(name) != stage_of(imported)
    ]
    assert not wrong, "\n".join(wrong)


def test_objectives_and_metrics_import_no_config_logging_or_runtime():
    wrong = [
        f"{name} imports {imported}: objectives and metrics import only {TENSOR_LAYER_MAY_IMPORT} "
        "(pass choices as plain strings, warn in ddist.config.checks)"
        for name, imported in edges()
        if name.startswith(TENSOR_LAYERS) and not any(imported.startswith(p) for p in TENSOR_LAYER_MAY_IMPORT)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_top_level_holds_few_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MODULES, f"ddist/ holds {len(top)} modules ({top}): put new ones in a wing"


def test_no_import_cycles():
    graph = {
        name: {m for m in imports(path, top_level_only=False) if m in MODULES and m != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 and not (node.startswith(nxt + ".") or nxt == "ddist"):
                cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_importing_ddist_does_not_import_torch():
    """`import ddist` registers the schemas (the methods' too) in well under a second: torch loads only
    where a model, a tensor or the logging is used (python -m ddist.report reads JSON only)."""
    code = "import sys, ddist; print('torch' in sys.modules, 'ddist.methods.deda' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_importing_the_models_package_does_not_import_diffusers():
    """ddist.models.diffusion pulls in diffusers (seconds): only code that asks for it pays."""
    code = "import sys, ddist.models, ddist.objectives; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
