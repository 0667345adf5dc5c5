"""hf_align's import graph has no cycle and no module imports another's private names (scripts/check_imports.py)."""

from __future__ import annotations

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
