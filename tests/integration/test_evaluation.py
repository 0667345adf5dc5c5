"""evaluate(): hand-derived metrics from a scripted engine, files and recomputation on the tiny model, and the
recipes/evaluate.py script end to end in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_align.evaluation import evaluate
from hf_align.rewards import Grader
from hf_align.rollout import HFEngine, Rollout, SamplingConfig

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"question": "What is 1+1?", "answer": "2", "subject": "Algebra", "level": 1, "unique_id": "a/1"},
    {"question": "What is 2+3?", "answer": "5", "subject": "Algebra", "level": 2, "unique_id": "a/2"},
    {
        "question": "Half of 1?",
        "answer": "\\frac{1}{2}",
        "subject": "Prealgebra",
        "level": 2,
        "unique_id": "p/1",
    },
]
# Per row, two samples: (response, finish_reason, number of tokens) and the r1_zero (format, answer) rewards.
SCRIPT = [
    [
        ("ok </think> <answer> 2 </answer>", "stop", 10, 1, 1),
        ("ok </think> <answer> 3 </answer>", "stop", 6, 1, 0),
    ],
    [("no tags here", "length", 20, 0, 0), ("x </think> <answer>5</answer>", "stop", 4, 1, 1)],
    [("y </think> <answer> 0.5 </answer>", "stop", 8, 1, 1), ("<answer>", "length", 20, 0, 0)],
]


class ScriptedEngine:
    """A RolloutEngine that returns SCRIPT's responses in row order and records the sampling it was given."""

    batch_size = 2  # with n = 2: one prompt per generate() call

    def __init__(self) -> None:
        self.cursor = 0
        self.calls: list[tuple[list[str], SamplingConfig]] = []

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        self.calls.append((prompts, sampling))
        groups = []
        for i in range(len(prompts)):
            script = SCRIPT[self.cursor + i][: sampling.n]
            groups.append(
                [
                    Rollout(self.cursor + i, [], list(range(k)), text, None, reason)
                    for text, reason, k, _, _ in script
                ]
            )
        self.cursor += len(prompts)
        return groups

    def sync_weights(self, model) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def grader():
    with Grader("r1_zero", timeout_s=10.0, num_workers=1) as g:
        yield g


def _recompute(records: list[dict]) -> dict:
    """Naive summary from examples.jsonl lines."""

    def mean(xs):
        return sum(xs) / len(xs)

    by_index: dict[int, list[dict]] = {}
    for r in records:
        by_index.setdefault(r["index"], []).append(r)
    return {
        "n": len(by_index),
        "n_samples": len(records),
        "accuracy": mean([r["rewards"]["answer_reward"] for r in records]),
        "format_rate": mean([r["rewards"]["format_reward"] for r in records]),
        "mean_reward": mean([r["rewards"]["reward"] for r in records]),
        "pass_at_n": mean([max(s["rewards"]["answer_reward"] for s in group) for group in by_index.values()]),
        "mean_response_tokens": mean([r["n_tokens"] for r in records]),
        "truncated_fraction": mean([r["finish_reason"] == "length" for r in records]),
    }


def test_hand_derived_metrics(grader, tmp_path):
    engine = ScriptedEngine()
    sampling = SamplingConfig(n=2, max_new_tokens=32, temperature=1.0, seed=5)
    summary = evaluate(engine, ROWS, "r1_zero", grader, sampling, output_dir=tmp_path, progress=False)
    assert [call[1].seed for call in engine.calls] == [5, 6, 7]  # one chunk per prompt, seed + chunk index
    assert engine.calls[0][0][0].endswith("User: What is 1+1?\nAssistant: <think>")
    expected = {
        "n": 3,
        "n_samples": 6,
        "accuracy": 3 / 6,
        "format_rate": 4 / 6,
        "mean_reward": 3 / 6,
        "pass_at_n": 1.0,
        "mean_response_tokens": 68 / 6,
        "truncated_fraction": 2 / 6,
        "samples_per_example": 2,
        "grader_timeouts": 0,
        "grader_errors": 0,
    }
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert summary["by_subject"] == (  # exact binary fractions
        {
            "Algebra": {"n": 2, "accuracy": 0.5, "format_rate": 0.75, "mean_reward": 0.5},
            "Prealgebra": {"n": 1, "accuracy": 0.5, "format_rate": 0.5, "mean_reward": 0.5},
        }
    )
    assert summary["by_level"] == (
        {
            "1": {"n": 1, "accuracy": 0.5, "format_rate": 1.0, "mean_reward": 0.5},
            "2": {"n": 2, "accuracy": 0.5, "format_rate": 0.5, "mean_reward": 0.5},
        }
    )
    lines = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    got = [
        (r["index"], r["sample"], r["rewards"]["format_reward"], r["rewards"]["answer_reward"]) for r in lines
    ]
    assert got == [(i, s, fmt, ans) for i, row in enumerate(SCRIPT) for s, (*_, fmt, ans) in enumerate(row)]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_model_files_and_recomputation(n, tiny_model, tokenizer, grader, tmp_path):
    engine = HFEngine(tiny_model, tokenizer, batch_size=4)
    sampling = SamplingConfig(
        n=n, max_new_tokens=8, temperature=0.0 if n == 1 else 1.0, seed=0, stop=["</answer>"]
    )
    summary = evaluate(engine, ROWS, "r1_zero", grader, sampling, output_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "examples.jsonl").read_text().splitlines()]
    assert len(records) == len(ROWS) * n
    keys = {"index", "sample", "unique_id", "question", "prompt", "response", "ground_truth", "rewards"}
    keys |= {"finish_reason", "n_tokens", "subject", "level"}
    assert all(set(r) == keys for r in records)
    assert [r["unique_id"] for r in records] == [row["unique_id"] for row in ROWS for _ in range(n)]
    assert all(r["n_tokens"] <= 8 and r["prompt"].endswith("Assistant: <think>") for r in records)
    recomputed = _recompute(records)
    assert {k: summary[k] for k in recomputed} == pytest.approx(recomputed)
    assert summary["by_subject"]["Algebra"]["n"] == 2 and summary["by_level"]["2"]["n"] == 2
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_empty_rows_give_n_zero(grader):
    # A rank's shard of a small eval set can be empty; callers weight summaries by n.
    summary = evaluate(ScriptedEngine(), [], "r1_zero", grader, SamplingConfig(), progress=False)
    assert summary["n"] == 0 and summary["n_samples"] == 0 and summary["accuracy"] == 0.0


@pytest.mark.slow
def test_recipe_script(tiny_model_dir, tmp_path):
    data = tmp_path / "math500.jsonl"
    with data.open("w") as f:
        for i, row in enumerate(ROWS):
            record = {"problem": row["question"], "answer": row["answer"], "subject": row["subject"]}
            f.write(json.dumps({**record, "level": row["level"], "unique_id": f"test/{i}.json"}) + "\n")
    out = tmp_path / "eval"
    cmd = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", str(tiny_model_dir)]
    cmd += ["--dataset", str(data), "--max_examples", "2", "--max_new_tokens", "6", "--batch_size", "2"]
    cmd += ["--grader_workers", "1", "--output_dir", str(out), "--no_progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["model"] == str(tiny_model_dir)
    assert len((out / "examples.jsonl").read_text().splitlines()) == 2
    assert '"accuracy"' in proc.stdout
