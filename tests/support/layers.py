"""The import arrows of src/imagegen, read from the source (nothing is imported), checked against the
layers of the house (docs/architecture.md), lowest first:

    ground    config, errors, generation, metrics, logging_setup, retry (and the package root)
    storage   storage/
    backends  backends/
    engine    engine/
    services  services.py (builds, starts and stops one instance's services; routes receive them)
    api       api/ (the HTTP edge; the browser page's routes live in api/web.py)
    app       main, cli, commands/, preflight

A module may import its own layer and the layers below it. Every import counts, the ones inside
functions too (a lazy import still ties the two modules together); imports under `if TYPE_CHECKING:`
are told apart, since they tie the types only.

    python -m tests.support.layers          # upward arrows and import cycles; exit status 1 if any
                                            # (upward arrows for type checkers only are just listed)
    python -m tests.support.layers DIR      # the same for another checkout's src/ folder
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "imagegen"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ground", ("imagegen", "config", "errors", "generation", "metrics", "logging_setup", "retry")),
    ("storage", ("storage",)),
    ("backends", ("backends",)),
    ("engine", ("engine",)),
    ("services", ("services",)),
    ("api", ("api", "web")),
    ("app", ("main", "cli", "commands", "preflight")),
)


@dataclass(frozen=True)
class Arrow:
    """`source` imports `target` (both dotted module names) at `line`."""

    source: str
    target: str
    line: int
    type_only: bool

    def __str__(self) -> str:
        kind = " (TYPE_CHECKING)" if self.type_only else ""
        return f"{self.source} -> {self.target}  [{layer_of(self.source)} -> {layer_of(self.target)}]{kind}"


def layer_of(module: str) -> str:
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else PACKAGE
    for name, members in LAYERS:
        if first in members:
            return name
    raise ValueError(f"{module} is in no layer: add it to LAYERS in tests/support/layers.py")


def rank(module: str) -> int:
    layer = layer_of(module)
    return [name for name, _ in LAYERS].index(layer)


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__)."""
    found: dict[str, Path] = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _imports(node, type_only)


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module of the package that `name` (a module or something defined in one) lives in."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def arrows(src: Path = SRC) -> list[Arrow]:
    """Every import of one module of the package by another."""
    known = modules(src)
    found: list[Arrow] = []
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, type_only in _imports(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from imagegen.storage import metadata` imports the module imagegen.storage.metadata.
                names = [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                if name != PACKAGE and not name.startswith(PACKAGE + "."):
                    continue
                target = _resolve(name, known)
                if target is not None and target != module:
                    found.append(Arrow(module, target, node.lineno, type_only))
    return found


def upward(found: list[Arrow]) -> list[Arrow]:
    """Arrows from a lower layer to a higher one."""
    return [arrow for arrow in found if rank(arrow.source) < rank(arrow.target)]


def cycles(found: list[Arrow]) -> list[list[str]]:
    """Groups of modules that import each other (directly or round a loop): Tarjan's strongly
    connected components of more than one module."""
    graph: dict[str, set[str]] = {}
    for arrow in found:
        graph.setdefault(arrow.source, set()).add(arrow.target)
        graph.setdefault(arrow.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def mutual(found: list[Arrow]) -> list[tuple[str, str]]:
    """Pairs of modules that import each other directly."""
    edges = {(arrow.source, arrow.target) for arrow in found}
    return sorted((a, b) for a, b in edges if a < b and (b, a) in edges)


def report(found: list[Arrow]) -> list[str]:
    lines: list[str] = []
    runtime = [arrow for arrow in found if not arrow.type_only]
    typed = [arrow for arrow in found if arrow.type_only]
    up = upward(runtime)
    up_typed = upward(typed)
    lines.append(f"upward import arrows: {len(up)}")
    lines.extend(f"  {arrow}  (line {arrow.line})" for arrow in up)
    lines.append(f"upward arrows under TYPE_CHECKING only: {len(up_typed)}")
    lines.extend(f"  {arrow}  (line {arrow.line})" for arrow in up_typed)
    groups = cycles(runtime)
    lines.append(f"import cycles: {len(groups)}")
    lines.extend(f"  {' <-> '.join(group)}" for group in groups)
    typed_groups = [group for group in cycles(found) if group not in groups]
    lines.append(f"import cycles closed only by TYPE_CHECKING imports: {len(typed_groups)}")
    lines.extend(f"  {' <-> '.join(group)}" for group in typed_groups)
    pairs = mutual(found)
    lines.append(f"modules that import each other directly (TYPE_CHECKING included): {len(pairs)}")
    lines.extend(f"  {a} <-> {b}" for a, b in pairs)
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    found = arrows(Path(args[0]) if args else SRC)
    lines = report(found)
    print("\n".join(lines))
    runtime = [arrow for arrow in found if not arrow.type_only]
    # Upward arrows for type checkers only are reported above but do not fail the run; cycles do,
    # whatever closes them.
    return 1 if upward(runtime) or cycles(found) else 0


if __name__ == "__main__":
    raise SystemExit(main())
