"""Graders for math answers: extraction, equivalence (`grader`), reward functions (`math`), time-bounded pool.

Importing this package is cheap and has no side effects: sympy and math_verify load on the first comparison,
and worker processes start only when a `Grader` is built. Nothing here imports torch.
"""

from hf_align.rewards.extract import (
    extract_boxed,
    extract_final_answer,
    parse_gsm8k_response,
    parse_mmlu_response,
)
from hf_align.rewards.grader import math_answers_equal, normalize_answer
from hf_align.rewards.math import (
    REWARD_FUNCTIONS,
    get_reward_fn,
    gsm8k_reward_fn,
    question_only_reward_fn,
    r1_zero_format_reward_fn,
    r1_zero_reward_fn,
)
from hf_align.rewards.pool import ZERO_REWARDS, Grader

__all__ = [
    "REWARD_FUNCTIONS",
    "ZERO_REWARDS",
    "Grader",
    "extract_boxed",
    "extract_final_answer",
    "get_reward_fn",
    "gsm8k_reward_fn",
    "math_answers_equal",
    "normalize_answer",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "question_only_reward_fn",
    "r1_zero_format_reward_fn",
    "r1_zero_reward_fn",
]
