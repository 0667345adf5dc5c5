"""Crash safety on real processes: exact resume after SIGKILL, atomic checkpoints, and the non-finite stop.

Every run below is a subprocess of ``_train_driver.py`` (4 steps, a checkpoint every 2) that really dies of
SIGKILL (return code -9) where the test says, then a second process resumes with
``train(resume_from_checkpoint=True)``. The toy tasks are built so that a resume that is not exact shows:
attention dropout draws from the global RNG at every step, SFT batches of 3 over 8 rows put checkpoint-2 in the
middle of an epoch (DPO's 2 x 2 puts it at an epoch boundary), and GRPO's rollout batch lasts 3 steps, so
checkpoint-2 holds one step of unused rollouts and step 4 samples anew from the prompt stream.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from hf_align.trainers.safety import NonFiniteError
from tests.integration import _train_driver as driver

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_train_driver.py")
TOL = 1e-6  # CPU, one thread: resumed steps are in fact bit-identical


def _drive(kind: str, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), "--trainer", kind, "--output_dir", str(out), "--max_steps", "4",
           "--save_steps", "2", *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def _records(out: Path, run: str) -> list[dict]:
    lines = (out / "steps.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["run"] == run]


def _steps(out: Path, run: str) -> dict[int, dict]:
    return {r["step"]: r for r in _records(out, run) if "step" in r}


def _final(out: Path, run: str) -> dict:
    (final,) = [r for r in _records(out, run) if r.get("final")]
    return final


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


def _assert_steps_equal(got: dict[int, dict], want: dict[int, dict], steps) -> None:
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=0, abs=TOL), (key, step, got, want)


def _assert_same_weights(out: Path, reference: Path, run: str) -> None:
    got, want = _final(out, run), _final(reference, "fresh")
    for key in ("param_sum", "param_sq_sum"):
        assert got[key] == pytest.approx(want[key], rel=TOL), (key, got, want)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``kind -> output folder`` of an uninterrupted 4-step run, made once per module. It runs the driver in this
    process (one thread, as the subprocesses) to save a process start-up (most of a run's time)."""
    runs: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in runs:
            out = tmp_path_factory.mktemp(f"{kind}_uninterrupted")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                driver.main(
                    ["--trainer", kind, "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2"]
                )
            finally:
                torch.set_num_threads(threads)
            steps = _steps(out, "fresh")
            assert set(steps) == {1, 2, 3, 4}
            assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps.values()), steps
            runs[kind] = out
        return runs[kind]

    return get


@pytest.mark.parametrize("kind", ["sft", "dpo", pytest.param("grpo", marks=pytest.mark.slow)])
def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, uninterrupted, kind):
    """Killed right after checkpoint-2 is complete, resumed in a new process: steps 3-4 (loss, grad norm) and the
    final weights equal the uninterrupted run's."""
    reference = uninterrupted(kind)
    want = _steps(reference, "fresh")
    out = tmp_path / "out"
    killed = _drive(kind, out, "--kill_at_step", "2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert _checkpoints(out) == ["checkpoint-2"]
    assert set(_steps(out, "fresh")) == {1, 2}
    _assert_steps_equal(_steps(out, "fresh"), want, [1, 2])
    if (
        kind == "grpo"
    ):  # the checkpoint is in the middle of a rollout batch: the next step's rollouts are saved
        state = torch.load(out / "checkpoint-2" / "rollout_state_rank0.pt", weights_only=False)
        assert len(state["buffer"]) == 2 and state["prompt_cursor"] == 6

    resumed = _drive(kind, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = _steps(out, "resume")
    assert set(got) == {3, 4}
    _assert_steps_equal(got, want, [3, 4])
    _assert_same_weights(out, reference, "resume")


@pytest.mark.slow
def test_sigkill_during_save_leaves_last_complete_checkpoint(tmp_path, uninterrupted):
    """Killed halfway through writing checkpoint-4 (model, optimizer and RNG files written; trainer state and the
    rename not): the partial folder is never resumed from, and resuming from checkpoint-2 reproduces steps 3-4."""
    reference = uninterrupted("sft")
    out = tmp_path / "out"
    killed = _drive("sft", out, "--kill_during_save_at_step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    _assert_steps_equal(_steps(out, "fresh"), _steps(reference, "fresh"), [1, 2, 3, 4])  # died in the save
    partial = out / ".partial-checkpoint-4" / "checkpoint-4"  # Trainer's own save, its run folder redirected
    assert (partial / "rng_state.pth").is_file() and not (partial / "trainer_state.json").exists()
    assert _checkpoints(out) == [".partial-checkpoint-4", "checkpoint-2"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = _drive("sft", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    got = _steps(out, "resume")
    assert set(got) == {3, 4}
    _assert_steps_equal(got, _steps(reference, "fresh"), [3, 4])
    _assert_same_weights(out, reference, "resume")
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # the leftover was cleared by the next save
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()


class _PoisonAfterSave(TrainerCallback):
    """Once checkpoint-``step`` is written, one weight of the final norm becomes NaN: every logit of the next
    forward is NaN, and so are the loss and the gradients (real propagation, nothing mocked)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")


def test_nonfinite_step_raises_before_the_update(tmp_path, tokenizer):
    out = tmp_path / "out"
    trainer = driver.build_trainer(
        "sft", out, max_steps=4, save_steps=1, callbacks=[_PoisonAfterSave(2)], tokenizer=tokenizer
    )
    with pytest.raises(NonFiniteError, match=r"^optimizer step 3: non-finite loss \(nan\)") as err:
        trainer.train()
    assert str(out / "checkpoint-2") in str(err.value)
    assert trainer.state.global_step == 2
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2"]  # nothing of step 3 was saved

    saved = Qwen2ForCausalLM.from_pretrained(out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    # The optimizer never applied step 3: every weight but the poisoned one is still checkpoint-2's.
    for (name, p), q in zip(trainer.model.named_parameters(), saved.parameters()):
        if name != "model.norm.weight":
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
