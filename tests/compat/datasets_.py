"""Tiny stand-ins for the Hub datasets of TRL's documentation, one builder per format of the dataset-formats page
(https://huggingface.co/docs/trl/v1.16.0/dataset_formats). Built in code: nothing is downloaded."""

from __future__ import annotations

from datasets import Dataset

TEXTS = [
    "The sky is blue.",
    "What is 12 + 7? The answer is 19.",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "The Assistant first thinks about the reasoning process and then provides the answer.",
]

QA = [
    ("What color is the sky?", "It is blue."),
    ("What is 12 + 7?", "The answer is 19."),
    ("Solve for x: 2x + 3 = 11.", "x = 4."),
    ("Say hello.", "Hello world!"),
]

# (prompt, chosen, rejected)
PREFS = [
    ("What color is the sky?", "It is blue.", "It is green."),
    ("What is 12 + 7?", "The answer is 19.", "The answer is 100."),
    ("Solve for x: 2x + 3 = 11.", "x = 4.", "x = 7, because I did not check."),
    ("Say hello.", "Hello world!", "No."),
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def language_modeling_conversational() -> Dataset:
    """trl-lib/Capybara: `messages`, some rows multi-turn."""
    rows = []
    for i, (q, a) in enumerate(QA):
        messages = user(q) + assistant(a)
        if i % 2 == 0:
            messages += user("Why?") + assistant("Because 12 + 7 = 19.")
        rows.append({"messages": messages})
    return Dataset.from_list(rows)


def language_modeling_standard(column: str = "text") -> Dataset:
    return Dataset.from_dict({column: TEXTS})


def prompt_completion_standard() -> Dataset:
    return Dataset.from_dict({"prompt": [q + " " for q, _ in QA], "completion": [a for _, a in QA]})


def prompt_completion_conversational() -> Dataset:
    return Dataset.from_dict(
        {"prompt": [user(q) for q, _ in QA], "completion": [assistant(a) for _, a in QA]}
    )


def preference_standard_explicit() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [p + " " for p, _, _ in PREFS],
            "chosen": [c for _, c, _ in PREFS],
            "rejected": [r for *_, r in PREFS],
        }
    )


def preference_standard_implicit() -> Dataset:
    return Dataset.from_dict(
        {"chosen": [f"{p} {c}" for p, c, _ in PREFS], "rejected": [f"{p} {r}" for p, _, r in PREFS]}
    )


def preference_conversational_explicit() -> Dataset:
    return Dataset.from_dict(
        {
            "prompt": [user(p) for p, _, _ in PREFS],
            "chosen": [assistant(c) for _, c, _ in PREFS],
            "rejected": [assistant(r) for *_, r in PREFS],
        }
    )


def preference_conversational_implicit() -> Dataset:
    """trl-lib/ultrafeedback_binarized: chosen / rejected conversations sharing the user turn, plus score columns."""
    return Dataset.from_dict(
        {
            "chosen": [user(p) + assistant(c) for p, c, _ in PREFS],
            "rejected": [user(p) + assistant(r) for p, _, r in PREFS],
            "score_chosen": [8.0, 9.0, 7.5, 6.0],
            "score_rejected": [2.0, 1.0, 3.5, 5.0],
        }
    )


def prompt_only_standard(n: int = 2) -> Dataset:
    """trl-lib/tldr-like prompt-only rows (a `prompt` string)."""
    return Dataset.from_dict({"prompt": [q for q, _ in QA[:n]]})


def prompt_only_conversational(n: int = 2) -> Dataset:
    return Dataset.from_dict({"prompt": [user(q) for q, _ in QA[:n]]})
