"""Check hf_align's import graph: no cycle, and no module importing another module's private (`_name`) names.

    python scripts/check_imports.py [package_dir]

Every `import` / `from ... import` counts, including the lazy ones inside functions: a cycle hidden in a function
body is still a cycle for a reader. Prints each cycle and each private import and exits 1 if there is any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> list[tuple[str, str]]:
    """(imported module, imported name) pairs of one file, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full, "") if full in modules else (base, alias.name))
    root = next(iter(modules)).split(".")[0]
    return [(m, n) for m, n in found if m == root or m.startswith(root + ".")]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a self-import), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def check(package_dir: Path) -> list[str]:
    files = {module_name(p, package_dir): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    problems = []
    for name, path in files.items():
        graph[name] = set()
        for module, imported in imports_of(path, name, set(files)):
            if module in files and module != name:
                # A package's __init__ importing its own submodules is how packages work, not a cycle.
                if not (path.name == "__init__.py" and module.startswith(name + ".")):
                    graph[name].add(module)
            if imported.startswith("_") and not imported.startswith("__") and module != name:
                problems.append(f"private import: {name} imports {module}.{imported}")
    problems += [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(graph)]
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    package_dir = Path(argv[0] if argv else Path(__file__).resolve().parents[1] / "hf_align")
    problems = check(package_dir)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {package_dir}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
