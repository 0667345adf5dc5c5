"""GRPO's prompt stream: seeded order independent of the process layout; over-long prompts dropped, counted, logged."""

from __future__ import annotations

import logging

import pytest

from hf_align.trainers.grpo_rollouts import PromptStream

ROWS = [{"prompt": f"Q: q{i}", "answer": str(i)} for i in range(6)]


def test_order_is_the_same_for_one_or_two_processes(tokenizer):
    one = PromptStream(ROWS, tokenizer, 64, seed=3).take(12, rank=0, world=1)
    a = PromptStream(ROWS, tokenizer, 64, seed=3).take(6, rank=0, world=2)
    b = PromptStream(ROWS, tokenizer, 64, seed=3).take(6, rank=1, world=2)
    merged = sorted(a + b, key=lambda p: p["position"])
    assert [p["text"] for p in merged] == [p["text"] for p in one]
    assert [p["position"] for p in one] == list(range(12))
    # each pass over the rows is a permutation; the second pass is shuffled differently
    assert sorted(p["row"]["answer"] for p in one[:6]) == [str(i) for i in range(6)]
    assert [p["row"]["answer"] for p in one[:6]] != [p["row"]["answer"] for p in one[6:]]
    # shuffle_dataset=False: the rows in order, pass after pass
    ordered = PromptStream(ROWS, tokenizer, None, seed=3, shuffle=False).take(8, rank=0, world=1)
    assert [p["row"]["answer"] for p in ordered] == ["0", "1", "2", "3", "4", "5", "0", "1"]


def test_conversational_prompts_go_through_the_chat_template(tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "hi"}]}]
    (taken,) = PromptStream(rows, tokenizer, None, seed=0).take(1, rank=0, world=1)
    assert taken["text"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert taken["row"] is rows[0]


def test_long_prompts_are_dropped_counted_and_logged(tokenizer, caplog):
    rows = ROWS + [{"prompt": "Q: " + "blue " * 200, "answer": "x"}]
    stream = PromptStream(rows, tokenizer, 32, seed=0)
    with caplog.at_level(logging.WARNING):
        taken = stream.take(12, rank=0, world=1)
    assert len(taken) == 12 and all(p["row"]["answer"] != "x" for p in taken)
    assert stream.dropped == 2  # the long row came up once in each of the two passes needed
    assert sum("longer than max_prompt_length=32 dropped" in r.getMessage() for r in caplog.records) == 2
    state = stream.state_dict()
    again = PromptStream(rows, tokenizer, 32, seed=0)
    again.load_state_dict(state)
    assert again.take(3, 0, 1) == stream.take(3, 0, 1)


def test_every_prompt_too_long_is_an_error(tokenizer):
    stream = PromptStream([{"prompt": "Q: " + "pad " * 100}], tokenizer, 8, seed=0)
    with pytest.raises(ValueError, match="every prompt exceeds max_prompt_length"):
        stream.take(1, 0, 1)
