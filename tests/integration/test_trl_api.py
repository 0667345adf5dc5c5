"""TRL 1.16's calling conventions on the three dataset trainers: a model given as a path with no tokenizer, every
dataset format of TRL's dataset-formats page, and a Dataset / IterableDataset / list giving the same run."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from hf_align.config import DPOConfig, RewardConfig, SFTConfig
from hf_align.data import DataError
from hf_align.trainers.dpo import DPOTrainer
from hf_align.trainers.reward_model import RewardTrainer
from hf_align.trainers.sft import SFTTrainer

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731
Q = ["What is 12 + 7?", "Say hello.", "Solve 2x + 3 = 11.", "Name a fox."]
R = [" The answer is 19.", " Hello world!", " x = 4.", " The quick brown fox."]
B = [" 20", " no", " x = 5, I think.", " a dog"]

SFT_FORMATS = {
    "text": [{"text": q + r} for q, r in zip(Q, R)],
    "messages": [{"messages": [U(q), A(r)]} for q, r in zip(Q, R)],
    "prompt_completion": [{"prompt": q, "completion": r} for q, r in zip(Q, R)],
    "conversational_prompt_completion": [{"prompt": [U(q)], "completion": [A(r)]} for q, r in zip(Q, R)],
}
PREFERENCE_FORMATS = {
    "explicit": [{"prompt": q, "chosen": r, "rejected": b} for q, r, b in zip(Q, R, B)],
    "implicit": [{"chosen": q + r, "rejected": q + b} for q, r, b in zip(Q, R, B)],
    "conversational_explicit": [
        {"prompt": [U(q)], "chosen": [A(r)], "rejected": [A(b)]} for q, r, b in zip(Q, R, B)
    ],
    "conversational_implicit": [
        {"chosen": [U(q), A(r)], "rejected": [U(q), A(b)]} for q, r, b in zip(Q, R, B)
    ],
}
TRAINERS = {
    "sft": (SFTTrainer, SFTConfig),
    "dpo": (DPOTrainer, DPOConfig),
    "reward": (RewardTrainer, RewardConfig),
}


def _args(kind, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True, max_length=64,
                gradient_checkpointing=False)  # fmt: skip
    return TRAINERS[kind][1](**{**base, **kw})


def _first_loss(kind, model, args, rows, **kw) -> float:
    trainer = TRAINERS[kind][0](model, args=args, train_dataset=rows, **kw)
    trainer.train()
    return next(h["loss"] for h in trainer.state.log_history if "loss" in h)


CASES = [("sft", f) for f in SFT_FORMATS] + [(k, f) for k in ("dpo", "reward") for f in PREFERENCE_FORMATS]


@pytest.mark.parametrize("kind, fmt", CASES)
def test_every_format_from_a_model_path_without_tokenizer(tmp_path, tiny_model_dir, kind, fmt):
    rows = (SFT_FORMATS if kind == "sft" else PREFERENCE_FORMATS)[fmt]
    trainer = TRAINERS[kind][0](str(tiny_model_dir), args=_args(kind, tmp_path), train_dataset=rows)
    assert trainer.processing_class is not None and trainer.processing_class.eos_token == "<|im_end|>"
    prepared = trainer.train_dataset[0]
    if kind == "sft" and "prompt" in rows[0]:  # completion-only by default for prompt-completion rows
        assert prepared["labels"][0] == -100 and prepared["labels"][-1] != -100
    if kind == "dpo":
        assert prepared["prompt_ids"] and prepared["chosen_ids"] != prepared["rejected_ids"]
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert math.isfinite(loss)
    if kind == "dpo":
        assert loss == pytest.approx(math.log(2), abs=1e-6)  # frozen copy: policy == reference at step 0
    if kind == "reward":
        assert type(trainer.model).__name__ == "Qwen2ForSequenceClassification"


def test_model_init_kwargs_are_honoured(tmp_path, tiny_model_dir):
    args = _args("sft", tmp_path, model_init_kwargs={"dtype": "bfloat16"})
    trainer = SFTTrainer(str(tiny_model_dir), args=args, train_dataset=SFT_FORMATS["text"])
    assert next(trainer.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["sft", "dpo", "reward"])
def test_dataset_iterable_dataset_and_list_give_the_same_run(tmp_path, tiny_model_dir, kind):
    rows = SFT_FORMATS["prompt_completion"] if kind == "sft" else PREFERENCE_FORMATS["explicit"]
    # DPO: a reference other than the policy, so the loss is not log 2 whatever the data
    extra = {"ref_model": str(tiny_model_dir)} if kind == "dpo" else {}
    losses = []
    for data in (
        rows,
        datasets.Dataset.from_list(rows),
        datasets.IterableDataset.from_generator(lambda: iter(rows)),
    ):
        model = str(tiny_model_dir)
        if kind == "dpo":
            from tests.conftest import build_model, build_tokenizer

            model = build_model(build_tokenizer(), seed=1)
            extra["processing_class"] = build_tokenizer()
        losses.append(_first_loss(kind, model, _args(kind, tmp_path), data, **extra))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] == pytest.approx(losses[2], rel=1e-6)
    if kind == "dpo":
        assert abs(losses[0] - math.log(2)) > 1e-3


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_bad_row_is_named_at_construction(tmp_path, tiny_model_dir, kind):
    rows = SFT_FORMATS["prompt_completion"] if kind == "sft" else PREFERENCE_FORMATS["explicit"]
    field = "completion" if kind == "sft" else "rejected"
    bad = [dict(r) for r in rows]
    del bad[3][field]
    with pytest.raises(DataError, match=f"train dataset row 3: field '{field}' is missing"):
        TRAINERS[kind][0](str(tiny_model_dir), args=_args(kind, tmp_path), train_dataset=bad)


def test_formatting_func_equals_text_rows(tmp_path, tiny_model_dir):
    raw = [{"q": q, "a": r} for q, r in zip(Q, R)]
    formatted = _first_loss(
        "sft", str(tiny_model_dir), _args("sft", tmp_path), raw, formatting_func=lambda x: x["q"] + x["a"]
    )
    plain = _first_loss("sft", str(tiny_model_dir), _args("sft", tmp_path), SFT_FORMATS["text"])
    assert formatted == pytest.approx(plain, rel=1e-6)
    with pytest.raises(ValueError, match="completion_only_loss"):
        SFTTrainer(str(tiny_model_dir), args=_args("sft", tmp_path), train_dataset=SFT_FORMATS["prompt_completion"],
                   formatting_func=lambda x: x["prompt"])  # fmt: skip
