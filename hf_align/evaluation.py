"""Evaluate a policy on question/answer rows: accuracy, format rate and mean reward, plus per-example output.

Choices:
- Each row is formatted with the prompt template, sampled ``sampling.n`` times by a ``RolloutEngine`` and each
  sample graded by a ``hf_align.rewards.Grader`` against the row's ``answer``. Rows go to the engine in chunks
  (its ``batch_size``, or 64) so a progress bar moves; with a ``seed``, chunk k samples with ``seed + k``.
- Metrics are means over samples (accuracy: answer_reward, format_rate: format_reward, mean_reward: reward);
  ``pass_at_n`` is the mean over examples of the best answer_reward of its n samples; ``truncated_fraction``
  counts samples that ran out of ``max_new_tokens``. ``by_subject`` / ``by_level`` repeat them per group.
- No rows gives n = 0 and metrics 0.0, not an error: a rank's shard of a small eval set may be empty.
- With ``output_dir``: ``examples.jsonl`` (one line per sample; the summary can be recomputed from it) and
  ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hf_align.data import format_prompt, resolve_prompt_template
from hf_align.rollout.base import RolloutEngine, SamplingConfig


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _metrics(records: list[dict]) -> dict[str, float]:
    names = {"accuracy": "answer_reward", "format_rate": "format_reward", "mean_reward": "reward"}
    return {name: _mean([r["rewards"][key] for r in records]) for name, key in names.items()}


def summarize(records: list[dict]) -> dict[str, Any]:
    """Summary metrics of per-sample records (the lines of `examples.jsonl`)."""
    best: dict[int, float] = defaultdict(float)
    for r in records:
        best[r["index"]] = max(best[r["index"]], float(r["rewards"]["answer_reward"]))
    summary: dict[str, Any] = {
        "n": len(best),
        "n_samples": len(records),
        **_metrics(records),
        "pass_at_n": _mean(list(best.values())),
        "mean_response_tokens": _mean([r["n_tokens"] for r in records]),
        "truncated_fraction": _mean([float(r["finish_reason"] == "length") for r in records]),
    }
    for key in ("subject", "level"):
        groups: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if r.get(key) is not None:
                groups[str(r[key])].append(r)
        if groups:
            summary[f"by_{key}"] = {
                name: {"n": len({r["index"] for r in group}), **_metrics(group)}
                for name, group in sorted(groups.items())
            }
    return summary


def _record(index: int, sample: int, row: dict, prompt: str, rollout, rewards: dict) -> dict[str, Any]:
    return {
        "index": index,
        "sample": sample,
        "unique_id": row.get("unique_id"),
        "question": row["question"],
        "prompt": prompt,
        "response": rollout.text,
        "ground_truth": row["answer"],
        "rewards": {k: float(rewards[k]) for k in ("format_reward", "answer_reward", "reward")},
        "finish_reason": rollout.finish_reason,
        "n_tokens": len(rollout.completion_ids),
        **{key: row[key] for key in ("subject", "level") if row.get(key) is not None},
    }


def evaluate(
    engine: RolloutEngine,
    rows: list[dict],
    prompt_template: str,
    grader,
    sampling: SamplingConfig,
    output_dir: str | Path | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Generate, grade and summarise; see the module docstring for the metrics and files.

    `prompt_template` is template text holding `{question}` or a template name / path ("r1_zero").
    `grader` is a `hf_align.rewards.Grader` (anything with `.grade(responses, ground_truths)` and `.stats`).
    `metadata` (model name, dataset, ...) is put at the top of the summary.
    """
    template = resolve_prompt_template(prompt_template)
    prompts = [format_prompt(template, row["question"]) for row in rows]
    batch = getattr(engine, "batch_size", None)
    chunk = max(1, batch // sampling.n) if isinstance(batch, int) else 64
    stats_before = dict(getattr(grader, "stats", {}) or {})
    records: list[dict] = []
    start = time.perf_counter()
    with tqdm(total=len(rows), desc="evaluate", unit="example", disable=not progress) as bar:
        for k, lo in enumerate(range(0, len(rows), chunk)):
            seed = None if sampling.seed is None else sampling.seed + k
            groups = engine.generate(prompts[lo : lo + chunk], dataclasses.replace(sampling, seed=seed))
            flat = [(lo + i, s, rollout) for i, group in enumerate(groups) for s, rollout in enumerate(group)]
            graded = grader.grade([r.text for _, _, r in flat], [rows[i]["answer"] for i, _, _ in flat])
            for (i, s, rollout), rewards in zip(flat, graded):
                records.append(_record(i, s, rows[i], prompts[i], rollout, rewards))
            bar.update(len(groups))
    stats_after = dict(getattr(grader, "stats", {}) or {})
    summary = {**(metadata or {}), **summarize(records)}
    summary.update(
        samples_per_example=sampling.n,
        grader_timeouts=int(stats_after.get("timeouts", 0) - stats_before.get("timeouts", 0)),
        grader_errors=int(stats_after.get("errors", 0) - stats_before.get("errors", 0)),
        wall_time_s=round(time.perf_counter() - start, 3),
        sampling=dataclasses.asdict(sampling),
    )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (output_dir / "examples.jsonl").write_text(lines, encoding="utf-8")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
