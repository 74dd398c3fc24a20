"""The package's shape: every module imports, imports run downward only (quant → formats → train, eval → deploy →
commands → cli, with io, its pickle_scan and machine at the bottom and the plan and config above formats), there is
no import circle, and no file or function outgrows its room."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "yolo_tq"
# bottom to top; a module may import from its own layer or any layer below it
LAYERS = [("io", "pickle_scan", "machine"), ("quant",), ("formats",), ("plan", "config"), ("train", "eval"),
          ("deploy",), ("commands", "report"), ("cli", "__main__")]
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 50
FILE_LIMITS = {"formats/packed.py": 450}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """The package modules `name` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("yolo_tq"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs or [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("yolo_tq."))
    return {m for m in found if m in MODULES and m != name}


def layer_of(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{name} belongs to no layer of {LAYERS}: add it to LAYERS")


GRAPH = {name: imports_of(name) for name in MODULES}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name if name != "yolo_tq.__main__" else "yolo_tq.cli")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
            for a, deps in graph.items() if a != "yolo_tq" for b in sorted(deps) if layer_of(b) > layer_of(a)]


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk, as the circle it closes."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join((path + [node])[(path + [node]).index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    return cycles


def test_imports_run_downward_only():
    assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_import_circle():
    assert not import_cycles(GRAPH), "\n".join(import_cycles(GRAPH))


def test_the_checks_catch_a_circle_and_an_upward_import():
    """A hand-made graph with a circle and an upward import is caught; the real graph is read as intended."""
    fake = {"yolo_tq.io": {"yolo_tq.cli"}, "yolo_tq.cli": {"yolo_tq.train.stages"},
            "yolo_tq.train.stages": {"yolo_tq.io"}}
    assert import_cycles(fake) == ["yolo_tq.cli -> yolo_tq.train.stages -> yolo_tq.io -> yolo_tq.cli"]
    assert upward_imports(fake) == ["yolo_tq.io (layer 0) imports yolo_tq.cli (layer 7)"]
    assert "yolo_tq.quant.spec" in GRAPH["yolo_tq.quant.apply"]  # relative imports are resolved
    assert "yolo_tq.plan" not in GRAPH["yolo_tq.quant.apply"]  # a TYPE_CHECKING import does not count
    assert "yolo_tq.train.preflight" in GRAPH["yolo_tq.train.stages"]


def test_files_and_functions_fit_their_rooms():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(PACKAGE).as_posix()
        limit = FILE_LIMITS.get(rel, MAX_FILE_LINES)
        if len(text.splitlines()) > limit:
            too_long.append(f"{rel}: {len(text.splitlines())} lines (at most {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)
