"""The package's shape, checked so that it stays easy to change: modules a reader can take in,
functions a reader can hold in mind, dependencies that point one way, and comments that make sense
to anyone who clones the repository (no issue numbers, no documents outside it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gemma3n"
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
NATIVE = sorted(p for p in (PACKAGE / "kernels").glob("*") if p.suffix in (".cpp", ".h"))
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80  # statements after the docstring; the signature and docstring are free
# Modules of the optional extras (audio, vision, video, the server): imported where used, so that
# text-only use needs none of their dependencies.
OPTIONAL = {"audio", "audio_encoder", "speech", "vad", "live", "pcm", "image", "vision", "server"}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> list[str]:
    """The package modules an import statement names (`from . import x`: the module x, not the package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("gemma3n")]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("gemma3n"):
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]


def _imports() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Every internal import edge (module level or not), and the imports inside functions."""
    modules = {_module(p): p for p in SOURCES}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    inner = []
    for m, path in modules.items():
        tree = ast.parse(path.read_text())
        in_function = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = [t for t in _targets(node, m, path.name == "__init__.py", modules) if t in modules and t != m]
                graph[m].update(found)
                if id(node) in in_function:
                    inner += [(m, t, node.lineno) for t in found]
    return graph, inner


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_modules_are_small_enough_to_read():
    long = {}
    for path in SOURCES + NATIVE:
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES:
            long[str(path.relative_to(PACKAGE))] = n
    assert not long, f"split these modules by concept (over {MAX_MODULE_LINES} lines): {long}"


def test_functions_fit_in_mind():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    body = body[1:] or body
                lines = node.end_lineno - body[0].lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these functions by what they do: {long}"


def test_dependencies_point_one_way():
    graph, inner = _imports()
    assert _cycles(graph) == [], "an import cycle (counting imports inside functions)"
    hidden = [
        f"{m} imports {t} at line {line}"
        for m, t, line in inner
        if t.split(".")[1] not in OPTIONAL and not t.startswith("gemma3n.kernels")
    ]
    assert not hidden, f"imports inside functions are for the optional extras only: {hidden}"


def test_the_towers_do_not_reach_into_the_text_decoder():
    graph, _ = _imports()
    for tower in ("gemma3n.audio_encoder", "gemma3n.vision"):
        seen, todo = set(), [tower]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        assert "gemma3n.text" not in seen, f"{tower} depends on the text decoder"


# Citations of documents outside the repository, issue numbers and this team's machines.
OUTSIDE = re.compile(r"(?:text-decoder|audio-vision|matformer|architecture)\.md §|shared/reference|§[A-Z]?\d")
ISSUE = re.compile(r"\b[Ii]ssue #?\d+|\(#\d+\)")
PLACES = re.compile(r"/work/|/root/|development machine|shared box")


@pytest.mark.parametrize("pattern", [OUTSIDE, ISSUE, PLACES], ids=["outside-docs", "issue-numbers", "our-machines"])
def test_comments_speak_to_anyone_who_clones_the_repo(pattern):
    found = []
    for path in SOURCES + NATIVE:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "RFC" not in line:
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, found
