"""The package layout: seqbench's own imports (also those inside functions) form no cycle and point one way,
cli -> run / analysis / calc / experiment -> models -> ops, with config, messages and formatting imported by
all and importing none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "seqbench"

# Higher ranks may import lower ones; a stage may import itself; stages of one rank may not import each other.
RANK = {"cli": 4, "run": 3, "analysis": 3, "calc": 3, "experiment": 3, "probes": 2.5, "models": 2, "ops": 1,
        "config": 0, "messages": -1, "formatting": -1}
MAX_LINES = 400
OLD_DESIGN = "DESIGN" + ".md"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def seqbench_imports(path: Path) -> set[str]:
    """Every seqbench module ``path`` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("seqbench")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seqbench"):
            found.add(node.module)
            # ``from seqbench.ops import fast`` imports the module seqbench.ops.fast
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        edges[name] = {m for m in seqbench_imports(path) if _is_module(m) and m != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``edges`` as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    assert find_cycle(graph()) is None


def test_every_module_has_a_known_stage():
    stages = {stage(m) for m in graph()} - {"package"}
    assert stages <= set(RANK), f"modules outside the known stages: {stages - set(RANK)}"


@pytest.mark.parametrize("module", sorted(graph()))
def test_imports_point_one_way(module):
    own = stage(module)
    if own == "package":
        return
    bad = [m for m in graph()[module]
           if stage(m) != own and (RANK[stage(m)] >= RANK[own])]
    assert not bad, f"{module} imports {bad}: imports must point cli -> run/analysis/calc -> models -> ops -> config"


def test_modules_stay_small():
    big = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_nothing_refers_outside_the_repository():
    """The starting design lived outside the repository; docs/design.md replaced it."""
    root = PACKAGE.parent
    tracked = [*PACKAGE.rglob("*.py"), *root.glob("tests/**/*.py"), *root.glob("benchmarks/*.py"),
               *root.glob("configs/*.yaml"), root / "README.md", root / "Makefile"]
    offenders = [str(p.relative_to(root)) for p in tracked if p.is_file() and OLD_DESIGN in p.read_text()]
    assert not offenders
    assert (root / "docs" / "design.md").is_file()


def test_config_names_the_mixers_the_registry_builds():
    """config.py cannot import models (the arrow), so its list of mixer kinds is checked against the registry."""
    from seqbench.config import LAYOUT_LETTERS, MIXER_KINDS
    from seqbench.models import MIXERS

    assert set(MIXER_KINDS) == set(MIXERS) == set(LAYOUT_LETTERS.values())
