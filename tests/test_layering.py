"""The import graph flows one way: entry point -> stages -> the layers below; no cycles."""

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


def stage_of(module: str) -> str | None:
    """ddist.stages.<name>[...] -> <name>; None outside the stages."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


def test_no_stage_imports_another_stage_and_nothing_below_imports_a_stage():
    wrong = []
    for name, path in MODULES.items():
        for imported in imports(path, top_level_only=False) & MODULES.keys():
            target = stage_of(imported)
            if target is None:
                continue
            own = stage_of(name)
            if own != target and name not in ("ddist.pipeline", "ddist.__main__"):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, wrong


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


def top_package(module: str) -> str:
    """ddist.objectives.deda -> ddist.objectives; ddist.utils -> ddist.utils."""
    return ".".join(module.split(".")[:2])


# objectives and metrics take tensors (and, where they must, a model): never datasets, configs or runs
TENSOR_LAYERS = ("ddist.objectives", "ddist.metrics")
# ddist.config: the schemas' choice types (Literals), which a loss names once with its option
TENSOR_LAYER_MAY_IMPORT = {
    *TENSOR_LAYERS,
    "ddist.models",
    "ddist.errors",
    "ddist.logging",
    "ddist.utils",
    "ddist.config",
}
# what the pipeline and the stages build on: none of it knows about runs, stages or the entry point
BELOW_STAGES = ("ddist.models", "ddist.objectives", "ddist.metrics", "ddist.data")
ABOVE = {"ddist.stages", "ddist.pipeline", "ddist.__main__", "ddist.context", "ddist.teacher", "ddist.students"}


def package_imports(packages: tuple[str, ...]) -> list[tuple[str, str]]:
    """(module, the ddist package it imports) for every module under `packages`."""
    return [
        (name, top_package(imported))
        for name, path in MODULES.items()
        if top_package(name) in packages
        for imported in imports(path, top_level_only=False) & MODULES.keys()
    ]


def test_objectives_and_metrics_import_only_models_and_helpers():
    wrong = [pair for pair in package_imports(TENSOR_LAYERS) if pair[1] not in TENSOR_LAYER_MAY_IMPORT]
    assert not wrong, wrong


def test_models_data_objectives_and_metrics_never_import_the_run_layers():
    wrong = [pair for pair in package_imports(BELOW_STAGES) if pair[1] in ABOVE]
    assert not wrong, wrong


def test_importing_the_models_package_does_not_import_diffusers():
    """ddist.models.diffusion pulls in diffusers (seconds): only code that asks for it pays."""
    code = "import sys, ddist.models, ddist.objectives; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
