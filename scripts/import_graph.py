"""The import graph of src/ditlab, read with the stdlib `ast` (nothing is imported): every
intra-package import, at module level or inside a function or an `if TYPE_CHECKING:` block, as an
arrow between modules; the cycles among modules and among the top-level packages; and the arrows
the layout forbids (see FORBIDDEN). String-based lazy exports (`ditlab.lazy`) are not imports.

    python scripts/import_graph.py [--src src] [--edges]

Exits 1 when there is a module cycle or a forbidden arrow (tests/test_layout.py runs `check`)."""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "ditlab"
# (importer package, imported package) pairs that must not exist; "*" matches any package.
TRAINING_IMPORTERS = ("cli", "demo", "study", "training")
FORBIDDEN = (
    ("evaluation", "sampling"),
    ("sampling", "evaluation"),
    ("hub", "models"),
    ("hub", "checkpoints"),
    ("hub", "evaluation"),
)


def module_name(path: Path, root: Path) -> str:
    """src/ditlab/sampling/run.py -> ditlab.sampling.run; a package's __init__.py -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` (a module or a name inside one) starts with."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that `module` imports (anywhere in its file)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name, known)
                if target is not None and target != module:
                    found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    known = modules(root)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def package_of(module: str) -> str:
    """ditlab.sampling.run -> sampling; ditlab.hub -> hub; ditlab -> ditlab."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m, targets in edges.items():
        for t in targets:
            a, b = package_of(m), package_of(t)
            if a != b:
                out.setdefault(a, set()).add(b)
    return out


def forbidden_arrows(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Module arrows that cross a forbidden package boundary."""
    bad = []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            a, b = package_of(m), package_of(t)
            if (a, b) in FORBIDDEN or (b == "training" and a not in TRAINING_IMPORTERS):
                bad.append((m, t))
    return bad


def check(root: Path) -> list[str]:
    """Every problem, one line each: module cycles and forbidden arrows (empty: none)."""
    edges = graph(root)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(edges)]
    problems += [f"forbidden arrow: {a} -> {b}" for a, b in forbidden_arrows(edges)]
    return problems


def _lines(title: str, rows: Iterable[str]) -> list[str]:
    rows = list(rows)
    return [f"{title}: {len(rows)}", *(f"  {r}" for r in rows)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"))
    p.add_argument("--edges", action="store_true", help="also print the package-level arrows")
    args = p.parse_args(argv)
    root = Path(args.src)
    edges = graph(root)
    packages = package_edges(edges)
    out = [f"modules: {len(edges)}, intra-package imports: {sum(len(t) for t in edges.values())}"]
    out += _lines("module cycles", (" <-> ".join(c) for c in cycles(edges)))
    out += _lines("package cycles", (" <-> ".join(c) for c in cycles(packages)))
    out += _lines("forbidden arrows", (f"{a} -> {b}" for a, b in forbidden_arrows(edges)))
    if args.edges:
        out += _lines("package arrows", (f"{a} -> {', '.join(sorted(b))}" for a, b in sorted(packages.items())))
    print("\n".join(out))
    return 1 if check(root) else 0


if __name__ == "__main__":
    sys.exit(main())
