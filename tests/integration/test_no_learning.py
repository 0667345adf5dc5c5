"""A step with something to learn but an exactly zero gradient stops training (never a run that "succeeds"
without learning); GRPO steps whose advantages are all zero are not errors."""

from __future__ import annotations

import pytest
import torch

from hf_align import SFTConfig, SFTTrainer
from hf_align.trainers.safety import NoLearningError

ROWS = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}"} for i in range(4)]


def test_zero_gradient_with_trainable_tokens_is_an_error(tmp_path, tiny_model, tokenizer):
    # The loss is real, but every gradient reaching the weights is zeroed (as when an engine hands the loss
    # empty shards of the weights): the gradient norm is exactly 0.
    for p in tiny_model.parameters():
        p.register_hook(torch.zeros_like)
    args = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none",
        logging_steps=1, save_strategy="no", gradient_checkpointing=False,
    )  # fmt: skip
    trainer = SFTTrainer(tiny_model, args=args, train_dataset=ROWS, processing_class=tokenizer)
    with pytest.raises(NoLearningError, match=r"optimizer step 1: the gradient norm is exactly 0"):
        trainer.train()
    assert trainer.state.global_step == 0
