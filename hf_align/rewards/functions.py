"""The built-in graders as reward functions of TRL's protocol, still time-bounded in worker processes.

``GraderReward("r1_zero")(prompts, completions, answer=[...])`` returns one float per completion, or None where the
grader raised or returned something unusable (TRL: "no reward from this function for this completion"); a
completion that overruns ``timeout_s`` scores 0, like a wrong answer; one whose row has no ground truth (None, NaN,
blank, empty list) gets None and is left out of accuracy. The ground truth is the dataset's ``answer``
column (or TRL's ``solution``); the full result dicts of the last call stay in ``last_details`` (format / answer
rewards, for the accuracy metrics). Workers start on the first call and stop with ``close()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hf_align.rewards.pool import ERROR_FLAG, Grader


def completion_text(completion: Any) -> str:
    """A completion as text: itself, or the content of the last message of a conversational completion."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return completion


NO_ANSWER = "no_ground_truth"  # in ``last_details``: the row had no answer to grade against


def _missing(truth: Any) -> bool:
    """No ground truth: None, NaN, an empty or blank string, an empty list."""
    if isinstance(truth, float):
        return truth != truth
    if isinstance(truth, str):
        return not truth.strip()
    return truth is None or (isinstance(truth, list | tuple) and not truth)


class GraderReward:
    def __init__(self, grader: str | Callable = "r1_zero", timeout_s: float = 5.0, num_workers: int = 2):
        self.grader, self.timeout_s, self.num_workers = grader, timeout_s, num_workers
        self.__name__ = grader if isinstance(grader, str) else getattr(grader, "__name__", "grader")
        self._pool: Grader | None = None
        self.stats: dict[str, int] = {}
        self.last_details: list[dict[str, float]] = []

    def __call__(self, prompts, completions, completion_ids=None, answer=None, solution=None, **kwargs):
        truths = answer if answer is not None else solution
        if truths is None:
            raise ValueError(
                f"the built-in grader {self.__name__!r} needs the ground truth in an 'answer' (or 'solution') column"
            )
        if self._pool is None:
            self._pool = Grader(self.grader, self.timeout_s, self.num_workers)
        truths = list(truths)
        known = [i for i, t in enumerate(truths) if not _missing(t)]
        graded = self._pool.grade(
            [completion_text(completions[i]) for i in known], [truths[i] for i in known]
        )
        self.last_details = [{NO_ANSWER: 1.0} for _ in truths]  # no ground truth: no reward (TRL's None)
        for i, details in zip(known, graded):
            self.last_details[i] = details
        self.stats = dict(self._pool.stats)
        return [None if d.get(ERROR_FLAG) or NO_ANSWER in d else d.get("reward") for d in self.last_details]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __repr__(self) -> str:
        return f"GraderReward({self.__name__!r}, timeout_s={self.timeout_s}, num_workers={self.num_workers})"
