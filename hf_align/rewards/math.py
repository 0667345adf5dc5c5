"""Reward functions for math answers: `fn(response, ground_truth) -> {"format_reward", "answer_reward", "reward"}`.

Values are floats in {0, 1} (quarters for the shaped format reward); `ground_truth` is a string, a number, or a
list/tuple of acceptable answers. The R1-Zero format: the response continues a prompt that ends in `<think>`;
it holds iff the literal `</think> <answer>` occurs, followed later by `</answer>`, and the last
`<answer>...</answer>` is non-empty. That last tag's text is the answer, a `\\boxed{}` inside unwrapped (an
unclosed `\\boxed{` grades wrong). `REWARD_FUNCTIONS` maps the names configs and `Grader` use to the functions.
"""

from __future__ import annotations

import importlib
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


def _rewards(format_ok: bool, answer_ok: bool, reward: float) -> RewardDict:
    return {"format_reward": float(format_ok), "answer_reward": float(answer_ok), "reward": float(reward)}


def _r1_zero_parts(response: str, ground_truth: Any) -> tuple[bool, bool]:
    """(format ok, answer ok) for the R1-Zero `</think> <answer> ... </answer>` format."""
    if not isinstance(response, str):
        return False, False
    text = response[-MAX_RESPONSE_CHARS:]
    end = text.rfind(_CLOSE)
    start = text.rfind(_OPEN, 0, end) if end != -1 else -1
    think = text.find(_THINK_ANSWER)
    answer = text[start + len(_OPEN) : end].strip()
    if start == -1 or think == -1 or think > start or not answer:
        return False, False
    if "\\boxed" in answer or "\\fbox" in answer:
        answer = extract_boxed(answer)
    return True, answer is not None and math_answers_equal(answer, ground_truth)


def r1_zero_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero reward: 1 iff the `</think> <answer>X</answer>` format holds and X equals the ground truth."""
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    return _rewards(format_ok, answer_ok, answer_ok)


def r1_zero_format_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero format only (a reward a small model learns before the math); `answer_reward` is for logging."""
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    return _rewards(format_ok, answer_ok, format_ok)


def r1_zero_format_shaped_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """R1-Zero format with partial credit, for models that never produce the full format at first.

    `reward` = 0.25 for a `</think>`, + 0.25 for an `<answer>` after it, + 0.25 for a non-empty `</answer>`-closed
    answer after that, + 0.25 when the exact R1-Zero format holds (so the maximum, 1, is the binary format
    reward). A group whose completions all score 0 gives no learning signal; partial credit breaks such ties.
    `format_reward` / `answer_reward` are the strict R1-Zero ones, for logging.
    """
    format_ok, answer_ok = _r1_zero_parts(response, ground_truth)
    text = response[-MAX_RESPONSE_CHARS:] if isinstance(response, str) else ""
    think = text.find("</think>")
    opened = text.find(_OPEN, think) if think != -1 else -1
    closed = text.find(_CLOSE, opened) if opened != -1 else -1
    answered = closed != -1 and bool(text[opened + len(_OPEN) : closed].strip())
    credit = 1.0 if format_ok else 0.25 * ((think != -1) + (opened != -1) + answered)
    return _rewards(format_ok, answer_ok, credit)


def question_only_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """Free-form reward: the last `\\boxed{}` (else "answer is ..." / the last number) against the ground truth.

    `format_reward` is 1 iff a `\\boxed{}` answer was found; `reward` equals `answer_reward` either way.
    """
    answer, boxed = extract_final_answer(response)
    answer_ok = answer is not None and math_answers_equal(answer, ground_truth)
    return _rewards(boxed, answer_ok, answer_ok)


def _same_number(a: str, b: str) -> bool:
    try:
        return Fraction(a) == Fraction(b)
    except ValueError:  # Python's int() refuses strings of more than 4,300 digits
        return a == b


def gsm8k_reward_fn(response: str, ground_truth: Any) -> RewardDict:
    """GSM8K reward: the response's last number equals the ground truth's (after `####`, if any) exactly.

    `format_reward` is 1 iff the response holds a number.
    """
    prediction = parse_gsm8k_response(response)
    golds = ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    golds = [parse_gsm8k_response(str(g).split("####")[-1]) for g in golds]
    answer_ok = prediction is not None and any(g is not None and _same_number(prediction, g) for g in golds)
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
        module_name, _, attr = name_or_fn.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import reward function {name_or_fn!r}: {e}") from e
        if not callable(fn):
            raise ValueError(f"reward function {name_or_fn!r} is not callable")
        return fn
    if name_or_fn not in REWARD_FUNCTIONS:
        raise ValueError(
            f"unknown reward function {name_or_fn!r}; choose one of {sorted(REWARD_FUNCTIONS)} or pass a callable"
        )
    return REWARD_FUNCTIONS[name_or_fn]
