"""Runs one TRL documentation example twice, once with `trl` and once with `hf_align`, and compares the logs.

An example is a plain function `example(lib, env) -> trainer` written from a snippet of TRL 1.16's documentation:
it uses only `lib.SFTTrainer`, `lib.SFTConfig`, ... so the two runs execute the same code and differ only in the
module bound to `lib` (what `from trl import X` versus `from hf_align import X` changes in a user's script).

`@example(...)` declares what the two runs must agree on:
  - `compare`: log keys of the first logged step whose values must match TRL's, each with a relative tolerance
    (`rel`) and an absolute one (`abs`, for values that are zero by construction, like the on-policy GRPO loss);
  - `compare_calls`: the example records what its reward functions received in `env.calls`; the records must match;
  - `why`: when nothing (or only part) can be compared, the reason, printed in the assertion messages;
  - `require`: log keys hf_align must log (TRL's metric names) where their values cannot be compared;
  - `step`: the logged optimizer step compared (default 1; a later one where the feature acts after step 1).
Every example must also log a finite `loss` on its first step with both libraries.

A GRPO run in which no optimizer step had anything to learn ends in hf_align's `NoLearningError` where TRL returns
(README, "Coming from TRL"); the tiny models and one-step runs here often are such runs. The hf_align half keeps that
error on the trainer instead of raising it, so the same example code returns the trainer, and checks it: the error
comes only where hf_align's own gradient norm was exactly 0 at every step and, when both libraries scored the same
completions (`compare_calls`), TRL's too.

The TRL result of each example is computed once per session and reused by the hf_align run (the hf_align tests
are the slow half anyway, and the TRL run validates the example itself).

Self-test of the harness: `COMPAT_SELF_TEST=1 pytest tests/compat -k hf_align` runs the comparison half with `trl`
in place of `hf_align`, i.e. TRL against a second TRL run: it must pass (the compared values are deterministic, so
a failure of the hf_align half is hf_align's, not noise).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

LIBS = ("trl", "hf_align")

# What both libraries need to run a documentation snippet on this machine, identical for both runs: TRL's configs
# default to bf16 and refuse to start without a bf16-capable accelerator, the docs' runs are many steps long and log
# every 10 steps, and nothing may be reported to a tracker. One or two steps, logged from the first.
CPU = dict(use_cpu=True, bf16=False, max_steps=1, logging_steps=1, report_to="none", save_strategy="no")


@dataclasses.dataclass
class Env:
    """What an example may use besides its library: saved tiny model folders and a place to write."""

    model_path: str  # causal LM (tiny Qwen2) + tokenizer with a chat template
    ref_model_path: str  # another causal LM with the same tokenizer and different weights (DPO reference)
    reward_model_path: str  # 1-label sequence-classification copy of model_path + tokenizer
    output_dir: str = ""
    calls: list = dataclasses.field(default_factory=list)  # what reward functions received, in call order


@dataclasses.dataclass(frozen=True)
class Spec:
    fn: Callable[[Any, Env], Any]
    compare: dict[str, tuple[float, float]]  # key -> (rel, abs)
    compare_calls: bool
    why: str | None
    require: tuple[
        str, ...
    ] = ()  # keys hf_align must log on the first step (TRL's names), values not compared
    step: int = 1  # the optimizer step whose log entry is compared

    @property
    def name(self) -> str:
        return self.fn.__name__


def example(
    compare=("loss",),
    rel=1e-5,
    abs_tol=0.0,
    compare_calls=False,
    why=None,
    tolerances=None,
    require=(),
    step=1,
):
    """Register an example. `tolerances` overrides (rel, abs) per key, e.g. {"loss": (0.0, 1e-6)}."""

    def wrap(fn):
        table = {key: (rel, abs_tol) for key in compare}
        table.update(tolerances or {})
        fn.spec = Spec(fn, table, compare_calls, why, tuple(require), step)
        return fn

    return wrap


@dataclasses.dataclass
class Run:
    lib: str
    logs: list[dict]
    calls: list
    seconds: float
    no_learning: str | None = None  # hf_align's NoLearningError, kept (see the module docstring)

    @property
    def first(self) -> dict:
        """The first log entry that holds a training loss (step 1 with logging_steps=1)."""
        return self.at(None)

    def at(self, step: int | None) -> dict:
        """The first log entry that holds a training loss, at optimizer ``step`` (None: any)."""
        for entry in self.logs:
            if "loss" in entry and step in (None, entry.get("step")):
                return entry
        raise AssertionError(
            f"{self.lib}: no training loss was logged at step {step}; log_history = {self.logs}"
        )


class _KeepsNoLearning:
    """``lib`` with a GRPOTrainer whose ``train`` stores a ``NoLearningError`` in ``trainer.no_learning``."""

    def __init__(self, lib):
        from hf_align.trainers.safety import NoLearningError

        class GRPOTrainer(lib.GRPOTrainer):
            no_learning = None

            def train(self, *args, **kwargs):
                try:
                    return super().train(*args, **kwargs)
                except NoLearningError as e:
                    self.no_learning = e

        self._lib, self.GRPOTrainer = lib, GRPOTrainer

    def __getattr__(self, name: str):
        return getattr(self._lib, name)


def run_example(spec: Spec, lib_name: str, env: Env, tmp_path) -> Run:
    import transformers

    lib = importlib.import_module(lib_name)
    lib = _KeepsNoLearning(lib) if lib_name == "hf_align" else lib
    env = dataclasses.replace(env, output_dir=str(tmp_path / f"{spec.name}-{lib_name}"), calls=[])
    transformers.set_seed(0)  # same global RNG state at the start of both runs
    start = time.perf_counter()
    trainer = spec.fn(lib, env)
    seconds = time.perf_counter() - start
    no_learning = getattr(trainer, "no_learning", None)
    return Run(
        lib_name, list(trainer.state.log_history), env.calls, seconds, no_learning and str(no_learning)
    )


def check_finite(run: Run) -> None:
    loss = run.first["loss"]
    assert isinstance(loss, (int, float)) and math.isfinite(loss), f"{run.lib}: first logged loss is {loss!r}"


def compare_runs(spec: Spec, ref: Run, got: Run) -> None:
    """Assert `got` (hf_align) agrees with `ref` (TRL) on what the example declares comparable."""
    check_finite(got)
    note = f" ({spec.why})" if spec.why else ""
    first_ref, first_got = ref.at(spec.step), got.at(spec.step)
    for key, (rel, abs_tol) in spec.compare.items():
        assert key in first_ref, f"the TRL run of {spec.name} did not log {key!r}: {first_ref}"
        assert key in first_got, (
            f"hf_align did not log {key!r} on the first step (TRL does: {first_ref[key]!r}); logged: {first_got}"
        )
        assert first_got[key] == pytest.approx(first_ref[key], rel=rel, abs=abs_tol), (
            f"{spec.name}: first-step {key!r} differs: hf_align {first_got[key]!r} vs trl {first_ref[key]!r}{note}"
        )
    for key in spec.require:
        assert key in first_ref, f"the TRL run of {spec.name} did not log {key!r}: {first_ref}"
        assert key in first_got and math.isfinite(first_got[key]), (
            f"hf_align did not log a finite {key!r} on the first step (TRL's name; values not compared{note}); "
            f"logged: {first_got}"
        )
    if got.no_learning is not None:
        norms = [h["grad_norm"] for h in got.logs if "grad_norm" in h]
        assert norms and all(n == 0 for n in norms), f"{spec.name}: {got.no_learning}, yet grad norms {norms}"
        if spec.compare_calls:  # the same completions and rewards: TRL learned nothing either
            trl_norms = [h["grad_norm"] for h in ref.logs if "grad_norm" in h]
            assert all(n == 0 for n in trl_norms), f"{spec.name}: TRL's grad norms {trl_norms}"
    if spec.compare_calls:
        assert got.calls == ref.calls, (
            f"{spec.name}: the reward functions received different arguments.\n"
            f"trl:      {ref.calls}\nhf_align: {got.calls}"
        )


def check_example(spec: Spec, lib_name: str, env: Env, trl_runs, tmp_path) -> None:
    """The body of every parametrized test: TRL validates the example, hf_align must match TRL."""
    ref = trl_runs(spec)  # runs TRL once per session; also asserts its first loss is finite
    if lib_name == "trl":
        print(f"{spec.name}: trl {ref.seconds:.1f}s, first log {ref.first}")
        return
    if os.environ.get("COMPAT_SELF_TEST") == "1":
        lib_name = "trl"  # see the module docstring
    got = run_example(spec, lib_name, env, tmp_path)
    print(
        f"{spec.name}: {lib_name} {got.seconds:.1f}s, no learning: {got.no_learning is not None}, first log {got.first}"
    )
    compare_runs(spec, ref, got)


def parametrized(examples):
    """One slow test per (example, library); the ids read `sft_quickstart-trl`, `sft_quickstart-hf_align`."""
    specs = [fn.spec for fn in examples]

    @pytest.mark.slow
    @pytest.mark.parametrize("lib_name", LIBS)
    @pytest.mark.parametrize("spec", specs, ids=[s.name for s in specs])
    def test_example(spec, lib_name, compat_env, trl_runs, tmp_path):
        check_example(spec, lib_name, compat_env, trl_runs, tmp_path)

    return test_example
