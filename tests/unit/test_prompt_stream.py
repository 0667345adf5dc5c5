"""GRPO's prompt stream: seeded order independent of the process layout; over-long prompts dropped, counted, logged."""

from __future__ import annotations

import copy
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


def test_half_the_prompts_too_long_never_reads_as_all_of_them(tokenizer):
    """The drops of a whole run add up past 10 x the rows; only drops in a row mean that nothing fits."""
    rows = [{"prompt": "Q: red"}, {"prompt": "Q: " + "cat dog " * 40}]
    stream = PromptStream(rows, tokenizer, 16, seed=0)
    for _ in range(40):
        assert stream.take(1, 0, 1)[0]["row"] is rows[0]
    assert stream.dropped > 10 * len(rows)


def test_a_template_that_writes_bos_gets_one_bos_as_trl(tokenizer):
    """A tokenizer that adds BOS with a chat template that writes it too (Llama 3, Gemma, Mistral): the prompt ids
    the engines make from the rendered text equal TRL's apply_chat_template(tokenize=True)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from hf_align.rollout.base import EngineBase, SamplingConfig

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.add_special_tokens(["<bos>"])
    bos = backend.token_to_id("<bos>")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    llama_like = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
        chat_template="{{ bos_token }}" + tokenizer.chat_template,
    )  # fmt: skip
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    trl = llama_like.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    (taken,) = PromptStream([{"prompt": messages}], llama_like, None, seed=0).take(1, rank=0, world=1)
    (ids,) = EngineBase(llama_like, [])._prompt_ids([taken["text"]], SamplingConfig(max_new_tokens=1))
    assert list(trl["input_ids"]) == ids and ids.count(bos) == 1
    # a plain string prompt still gets the tokenizer's BOS, as TRL's processing_class(text=prompts)
    (plain,) = EngineBase(llama_like, [])._prompt_ids(["Q: hi"], SamplingConfig(max_new_tokens=1))
    assert plain == llama_like("Q: hi")["input_ids"] and plain[0] == bos
