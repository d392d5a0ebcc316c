"""The import rule of docs/design.md, checked on the code: the core imports no stage, a stage
imports no other stage, no module imports itself back through others, and click stays with
the commands (and `meli.command`, their shared helper)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"meli": ROOT / "meli", "meli.train": ROOT / "train", "meli.export": ROOT / "export",
            "meli.score": ROOT / "score"}
STAGES = ("meli.train", "meli.export", "meli.score")


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(path) if m in known and m != name} for name, path in known.items()}


def stage_of(module: str) -> str | None:
    return next((s for s in STAGES if module == s or module.startswith(s + ".")), None)


def test_the_core_imports_no_stage_and_no_stage_imports_another():
    wrong = [(a, b) for a, targets in graph().items() for b in targets
             if stage_of(b) is not None and stage_of(b) != stage_of(a)]
    assert wrong == []


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            assert visit(start, []) is None


def test_click_stays_with_the_commands():
    users = sorted(name for name, path in modules().items() if "click" in {m.split(".")[0] for m in imports(path)})
    assert users == ["meli.command", "meli.export.cli", "meli.score.cli", "meli.train.cli"]
