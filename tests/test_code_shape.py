"""Rules of the code's shape that no linter states: every rank decision goes through one module."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddist"
ROOT = PACKAGE.parent

# torchrun's environment and the process group's view of the ranks, read anywhere but ddist/runtime/ranks.py
RANK_DECISION = re.compile(
    r"""environ(\.get\(|\[)["'](LOCAL_)?(RANK|WORLD_SIZE)["']|\b(get_rank|get_world_size|is_initialized)\("""
)


def test_every_rank_and_world_size_decision_goes_through_ranks():
    ranks = PACKAGE / "runtime" / "ranks.py"
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]
    wrong = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        if path != ranks and "conf" not in path.relative_to(ROOT).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if RANK_DECISION.search(line)
    ]
    assert not wrong, "read ranks through ddist/runtime/ranks.py (launched_*, local_*, joined, rank, world):\n" + (
        "\n".join(wrong)
    )


def test_scripts_take_from_a_stage_only_its_run():
    """Scripts import library code; of a stage module they may call its public `run`, never its helpers."""
    import ast

    wrong = []
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        tree = ast.parse(path.read_text())
        stages = {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "ddist.stages"
            for a in node.names
        }
        wrong += [
            f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in stages
            and node.attr != "run"
        ]
        wrong += [
            f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ..."
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ddist.stages.")
        ]
    assert not wrong, "scripts use a stage's internals (import them from the library instead):\n" + "\n".join(wrong)


MAX_PARAMETERS = 8


def test_no_function_takes_more_than_eight_parameters():
    """Past eight parameters a call is hard to read and easy to get wrong: group related ones (a small
    dataclass, a config node). Counts positional and keyword-only parameters, self and cls aside."""
    import ast

    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if "conf" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")]
                if len(params) > MAX_PARAMETERS:
                    wrong.append(f"{name}:{node.lineno} {node.name} takes {len(params)}: {', '.join(params)}")
    assert not wrong, f"functions over {MAX_PARAMETERS} parameters (group related ones):\n" + "\n".join(wrong)
