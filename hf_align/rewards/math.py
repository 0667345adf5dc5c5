"""Reward functions for math answers: `fn(response, ground_truth) -> {"format_reward", "answer_reward", "reward"}`.

All values are floats in {0.0, 1.0}. `ground_truth` may be a string, an int/float, or a list/tuple of
acceptable answers. Choices:

- `r1_zero_reward_fn`: the response is the continuation of a prompt that ends in `<think>`. Format is
  correct iff the literal `</think> <answer>` occurs, followed later by `</answer>`, and the last
  `<answer>...</answer>` is non-empty. The answer is that last tag's text, with a `\\boxed{}` inside
  unwrapped (an unclosed `\\boxed{` grades wrong). `reward = answer_reward` when the format is correct,
  else 0, so reward 1 needs both.
- `r1_zero_format_reward_fn`: the same checks, but `reward = format_reward` (a reward a small model can
  learn before it can do the math); `answer_reward` is still reported.
- `question_only_reward_fn`: no tags. The answer is the last `\\boxed{}`, else the text after the last
  "answer is"/"answer:", else the last number. `format_reward` = 1 iff a `\\boxed{}` was found (the
  format the question-only prompt asks for); `reward = answer_reward`, whatever the format.
- `gsm8k_reward_fn`: last number in the response against the number after `####` in the ground truth
  (or the ground truth itself); `format_reward` = 1 iff the response has a number; `reward = answer_reward`.

`REWARD_FUNCTIONS` maps names (used by configs and by `Grader`) to these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any

from hf_align.rewards.extract import (
    MAX_RESPONSE_CHARS,
    extract_boxed,
    extract_final_answer,
    parse_gsm8k_response,
)
from hf_align.rewards.grader import math_answers_equal

RewardDict = dict[str, float]

_THINK_ANSWER = "</think> <answer>"
_OPEN, _CLOSE = "<answer>", "</answer>"


def _rewards(format_ok: bool, answer_ok: bool, reward: bool) -> RewardDict:
    return {"format_reward": float(format_ok), "answer_reward": float(answer_ok), "reward": float(reward)}


def _r1_zero_parts(response: str, ground_truth: Any) -> tuple[bool, bool]:
    """(format ok, answer ok) for the R1-Zero `</think> <answer> ... </answer>` format."""
    if not isinstance(response, str):
        return False, False
    text = response[-MAX_RESPONSE_CHARS:]
    end = text.rfind(_CLOSE)
    start = text.rfind(_OPEN, 0, end) if end != -1 else -1
    think = text.find(_THINK_ANSWER)
    if start == -1 or think == -1 or think > start:
        return False, False
    answer = text[start + len(_OPEN) : end].strip()
    if not answer:
        return False, False
    if "\\boxed" in answer or "\\fbox" in answer:
        answer = extract_boxed(answer)
        if answer is None:
            return True, False
    return True, math_answers_equal(answer, ground_truth)


def r1_zero_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero reward: 1 iff the `</think> <answer>X</answer>` format holds and X equals the ground truth."""
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    return _rewards(format_ok, format_ok and answer_ok, format_ok and answer_ok)


def r1_zero_format_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero format only: `reward` is the format reward; `answer_reward` is reported for logging."""
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    return _rewards(format_ok, format_ok and answer_ok, format_ok)


def r1_zero_format_shaped_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero format with partial credit, for models that never produce the full format at first.

    `reward` = 0.25 for a `</think>`, + 0.25 for an `<answer>` after it, + 0.25 for a non-empty `</answer>`-closed
    answer after that, + 0.25 when the exact R1-Zero format holds (so the maximum, 1, is the binary format
    reward). A group whose completions all score 0 gives no learning signal; partial credit breaks such ties.
    `format_reward` / `answer_reward` are the strict R1-Zero ones, for logging.
    """
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    text = response[-MAX_RESPONSE_CHARS:] if isinstance(response, str) else ""
    credit = 0.0
    think = text.find("</think>")
    if think != -1:
        credit += 0.25
        opened = text.find(_OPEN, think)
        if opened != -1:
            credit += 0.25
            closed = text.find(_CLOSE, opened)
            if closed != -1 and text[opened + len(_OPEN) : closed].strip():
                credit += 0.25
    if format_ok:
        credit = 1.0
    return {
        "format_reward": float(format_ok),
        "answer_reward": float(format_ok and answer_ok),
        "reward": credit,
    }


def question_only_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """Free-form reward: last `\\boxed{}` (else "answer is ..." / last number) against the ground truth.

    `format_reward` is 1 iff a `\\boxed{}` answer was found; `reward` equals `answer_reward` either way.
    """
    answer, boxed = extract_final_answer(response)
    answer_ok = answer is not None and math_answers_equal(answer, ground_truth)
    return _rewards(boxed, answer_ok, answer_ok)


def _gsm8k_gold(ground_truth: Any) -> list[str]:
    items = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    out = []
    for g in items:
        text = str(g)
        if "####" in text:
            text = text.split("####")[-1]
        number = parse_gsm8k_response(text)
        if number is not None:
            out.append(number)
    return out


def _same_number(a: str, b: str) -> bool:
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a == b


def gsm8k_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """GSM8K reward: the response's last number equals the ground truth's (after `####`) exactly."""
    prediction = parse_gsm8k_response(response) if isinstance(response, str) else None
    answer_ok = prediction is not None and any(_same_number(prediction, g) for g in _gsm8k_gold(ground_truth))
    return _rewards(prediction is not None, answer_ok, answer_ok)


REWARD_FUNCTIONS: dict[str, Callable[[str, Any], RewardDict]] = {
    "r1_zero": r1_zero_reward_fn,
    "r1_zero_format": r1_zero_format_reward_fn,
    "r1_zero_format_shaped": r1_zero_format_shaped_reward_fn,
    "question_only": question_only_reward_fn,
    "gsm8k": gsm8k_reward_fn,
}


def get_reward_fn(name_or_fn: str | Callable[[str, Any], RewardDict]) -> Callable[[str, Any], RewardDict]:
    """Look a reward function up by name in `REWARD_FUNCTIONS`, import it from a ``"package.module:function"``
    path (your own reward in a YAML config), or return a callable unchanged."""
    if callable(name_or_fn):
        return name_or_fn
    if isinstance(name_or_fn, str) and ":" in name_or_fn:
        import importlib

        module_name, _, attr = name_or_fn.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import reward function {name_or_fn!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward function {name_or_fn!r} is not callable")
        return fn
    try:
        return REWARD_FUNCTIONS[name_or_fn]
    except KeyError:
        raise ValueError(
            f"unknown reward function {name_or_fn!r}; choose one of {sorted(REWARD_FUNCTIONS)} or pass a callable"
        ) from None
