"""The house's rules, read from the source: which top-level package may import which, and no import
circles anywhere (imports inside functions count). No sockets."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
PACKAGES = ("imgsearch", "imgsearch_server", "encoder_service", "index_service", "web", "tools", "bench")
# Who may import whom, beyond itself. The client knows no server; the server plumbing knows no service;
# the services know neither each other nor the gateway; tools and the benchmark may use anything.
ALLOWED = {
    "imgsearch": set(),
    "imgsearch_server": {"imgsearch"},
    "encoder_service": {"imgsearch", "imgsearch_server"},
    "index_service": {"imgsearch", "imgsearch_server"},
    "web": {"imgsearch", "imgsearch_server"},
    "tools": set(PACKAGES),
    "bench": set(PACKAGES),
}
GENERATED = "imgsearch.v1"


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            if not name.startswith(GENERATED):
                found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in names:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    assert len(found) > 50 and "imgsearch.cli" in found and "index_service.faiss_store" in found
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def test_each_package_imports_only_what_it_may() -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if (top := target.split(".")[0]) != (own := name.split(".")[0]) and top not in ALLOWED[own]
    )
    assert wrong == []


def test_there_are_no_import_circles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert circles == []
