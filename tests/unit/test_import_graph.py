"""hf_align's import graph has no cycle and no module imports another's private names (scripts/check_imports.py);
no function in it is over 60 lines (a reader follows each on one screen)."""

from __future__ import annotations

import ast
from pathlib import Path

from scripts.check_imports import check

REPO = Path(__file__).resolve().parents[2]


def test_hf_align_has_no_cycle_and_no_private_import():
    assert check(REPO / "hf_align") == []


def test_checker_sees_a_lazy_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("from pkg.b import _helper\n\ndef f():\n    return _helper()\n")
    (pkg / "b.py").write_text("def _helper():\n    from pkg import a  # lazy, still a cycle\n    return a\n")
    problems = check(pkg)
    assert "private import: pkg.a imports pkg.b._helper" in problems
    assert "import cycle: pkg.a <-> pkg.b" in problems
    assert len(problems) == 2


def test_no_function_over_60_lines():
    long = []
    for path in sorted((REPO / "hf_align").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # decorators aside, docstring included
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
