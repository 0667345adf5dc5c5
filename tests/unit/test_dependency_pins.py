"""The transformers range in pyproject.toml is the tested one: the NaN guard hooks Trainer._get_grad_norm, a private
method, so the dependency must carry an upper bound and the installed version must lie inside it."""

from __future__ import annotations

from importlib.metadata import requires, version

from packaging.requirements import Requirement


def test_transformers_is_pinned_to_the_tested_range():
    (req,) = [r for r in map(Requirement, requires("hf_align")) if r.name == "transformers" and not r.marker]
    assert any(s.operator == "<" for s in req.specifier), f"{req}: needs an upper bound"
    assert req.specifier.contains(version("transformers")), (
        f"installed {version('transformers')} outside {req}"
    )
    from transformers import Trainer

    assert callable(getattr(Trainer, "_get_grad_norm", None)), (
        "Trainer._get_grad_norm is gone: re-test the guard"
    )
