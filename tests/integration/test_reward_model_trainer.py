"""RewardTrainer end to end on a tiny Qwen2 sequence classifier: it ranks held-out pairs of a separable toy set,
and its gradients do not depend on how a step is split."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2ForSequenceClassification

from hf_align.config import RewardConfig
from hf_align.trainers.reward_model import RewardTrainer
from tests.conftest import build_model, grad_capture

SUBJECTS = [
    "the cat",
    "the dog",
    "the sky",
    "this answer",
    "the fox",
    "the number 12",
    "the world",
    "the colour",
]
HELD_OUT = ["the red fox", "the number 19", "the blue sky", "the lazy dog"]


def _pairs(subjects: list[str]) -> list[dict]:
    """Separable: the chosen answer calls its subject good / true, the rejected one bad / false."""
    rows = []
    for s in subjects:
        rows.append({"prompt": f"Is {s} good?", "chosen": f" {s} is good", "rejected": f" {s} is bad"})
        rows.append({"prompt": f"Is {s} true?", "chosen": f" yes, true: {s}", "rejected": f" no, false: {s}"})
    return rows


def _reward_model(tokenizer, seed: int = 0) -> Qwen2ForSequenceClassification:
    config = copy.deepcopy(build_model(tokenizer).config)
    config.num_labels = 1
    torch.manual_seed(seed)
    return Qwen2ForSequenceClassification(config).float()


def _config(tmp_path, **kw) -> RewardConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=64,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return RewardConfig(**defaults)


def test_held_out_pair_accuracy(tmp_path, tokenizer):
    train, held_out = _pairs(SUBJECTS), _pairs(HELD_OUT)
    trainer = RewardTrainer(
        _reward_model(tokenizer),
        args=_config(tmp_path, max_steps=15),
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert after["eval_accuracy"] >= 0.9, (before, after)
    assert {"eval_margin", "eval_rewards/chosen"} <= set(after) and not any("eval_batch" in k for k in after)
    assert after["eval_loss"] < before["eval_loss"]
    assert losses[-1] < losses[0]


def test_gradient_accumulation_splits_give_identical_gradients(tmp_path, tokenizer):
    train = _pairs(SUBJECTS[:4])
    grads = {}
    for micro, accum in [(8, 1), (4, 2), (1, 8)]:
        cap = grad_capture()
        cfg = _config(
            tmp_path, per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_grad_norm=0
        )
        RewardTrainer(
            _reward_model(tokenizer),
            args=cfg,
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[cap],
        ).train()
        grads[(micro, accum)] = cap.grads
    ref = grads[(8, 1)]
    assert ref and any(g.abs().sum() > 0 for g in ref.values())
    for split, g in grads.items():
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], atol=1e-6, rtol=1e-5, msg=f"{split} {name}")


def test_pad_token_id_from_tokenizer_and_one_output_required(tmp_path, tokenizer):
    model = _reward_model(tokenizer)
    model.config.pad_token_id = None
    trainer = RewardTrainer(
        model, args=_config(tmp_path), train_dataset=_pairs(SUBJECTS[:1]), processing_class=tokenizer
    )
    assert (
        trainer.model.config.pad_token_id == tokenizer.pad_token_id
    )  # the score is read at the last non-pad
    model.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardTrainer(
            model, args=_config(tmp_path), train_dataset=_pairs(SUBJECTS[:1]), processing_class=tokenizer
        )


def test_recipe_trains_from_a_jsonl(tmp_path, tiny_model_dir):
    import importlib.util
    import json
    from pathlib import Path

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _pairs(SUBJECTS[:2])))
    path = Path(__file__).resolve().parents[2] / "recipes" / "reward_model.py"
    spec = importlib.util.spec_from_file_location("recipe_reward_model", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--eval_dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--max_length", "64", "--gradient_checkpointing", "false",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip
    trainer = recipe.main(argv)
    assert type(trainer.model).__name__ == "Qwen2ForSequenceClassification"
    assert (tmp_path / "out" / "config.json").is_file()
