"""The package's shape: no import cycles, and data flowing down the pipeline's stages, read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import optimizer

PACKAGE = Path(optimizer.__file__).parent
# The pipeline's stages in the order data flows; a stage imports only from stages before it and from the
# top-level helpers (errors, paths, interrupts). cli and doctor sit above everything.
STAGES = ("model", "config", "serving", "measurement", "study", "output", "report")
HELPERS = ("optimizer.errors", "optimizer.paths", "optimizer.interrupts")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The optimizer modules ``path`` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("optimizer"))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").startswith("optimizer")
        ):
            module = node.module or ""
            for alias in node.names:  # `from optimizer.model import examples` imports a module
                candidate = f"{module}.{alias.name}"
                found.add(candidate if candidate in MODULES else module)
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "backends" not in p.parts)
MODULES = {_module_name(p) for p in SOURCES}
GRAPH = {_module_name(p): _imports(p) & MODULES for p in SOURCES}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in STAGES else None


def _cycle_from(start: str) -> list[str] | None:
    """An import cycle through ``start`` (a list of modules), or None."""
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        module, path = stack.pop()
        for imported in sorted(GRAPH.get(module, ())):
            if imported == start:
                return path + [start]
            if imported not in seen:
                seen.add(imported)
                stack.append((imported, path + [imported]))
    return None


def test_no_module_of_optimizer_is_part_of_an_import_cycle():
    cycles = [cycle for module in sorted(GRAPH) if (cycle := _cycle_from(module))]
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_stage_imports_only_from_the_stages_before_it_and_the_helpers():
    backwards = []
    for module, imported in sorted(GRAPH.items()):
        stage = _stage(module)
        if stage is None:
            continue
        for other in sorted(imported):
            other_stage = _stage(other)
            if other in HELPERS or other_stage == stage:
                continue
            if other_stage is None or STAGES.index(other_stage) > STAGES.index(stage):
                backwards.append(f"{module} imports {other}")
    assert backwards == []


def test_the_stage_packages_exist_as_the_readme_lists_them():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} >= set(STAGES)
