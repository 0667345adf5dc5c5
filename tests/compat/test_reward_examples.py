"""RewardTrainer examples from TRL 1.16's documentation, run with `trl` and with `hf_align`; the code is identical.

Each function is one documentation snippet with `from trl import ...` replaced by the `lib` argument, Hub models by
the tiny saved folders, Hub datasets by a few in-code rows of the same format, and `harness.CPU` added (identical for
both libraries). The batch holds the whole toy dataset, so the first-step loss does not depend on the sampler.

Compared: the first logged `loss` at relative 1e-5 (Bradley-Terry: -mean logsigmoid(r_chosen - r_rejected), the
score read at each sequence's last non-padding token) and the logged `mean_reward`.
"""

from __future__ import annotations

from tests.compat.datasets_ import (
    preference_conversational_explicit,
    preference_conversational_implicit,
    preference_standard_explicit,
    preference_standard_implicit,
)
from tests.compat.harness import CPU, example, parametrized

RM = ("loss", "mean_reward")


# https://huggingface.co/docs/trl/v1.16.0/reward_trainer#quick-start : the model is a causal LM given by name; TRL
# loads it with AutoModelForSequenceClassification(num_labels=1), which adds a randomly initialised score head.
# TRL calls set_seed(args.seed) right before loading, so the head is reproducible: comparable as long as hf_align
# seeds the same way before the same `from_pretrained` call.
@example(compare=RM, why="the score head is drawn right after set_seed(args.seed), as TRL does")
def reward_quickstart(lib, env):
    trainer = lib.RewardTrainer(
        model=env.model_path,
        args=lib.RewardConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_implicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dataset_formats#preference : standard, explicit prompt; the model is a
# saved sequence-classification folder given by path.
@example(compare=RM)
def reward_standard_explicit_prompt(lib, env):
    trainer = lib.RewardTrainer(
        model=env.reward_model_path,
        args=lib.RewardConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_standard_explicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dataset_formats#preference : standard, implicit prompt.
@example(compare=RM)
def reward_standard_implicit_prompt(lib, env):
    trainer = lib.RewardTrainer(
        model=env.reward_model_path,
        args=lib.RewardConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_standard_implicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/reward_trainer : a loaded AutoModelForSequenceClassification(num_labels=1),
# conversational preference with an explicit prompt.
@example(compare=RM)
def reward_loaded_model_conversational_explicit(lib, env):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(env.reward_model_path, num_labels=1)
    trainer = lib.RewardTrainer(
        model=model,
        args=lib.RewardConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_explicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/reward_trainer#train-adapters-with-peft : LoRA with task_type="SEQ_CLS"
# (the score head is trained in full via modules_to_save; adapters start as the identity).
@example(compare=RM)
def reward_peft_lora(lib, env):
    from peft import LoraConfig

    trainer = lib.RewardTrainer(
        model=env.reward_model_path,
        args=lib.RewardConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_implicit(),
        peft_config=LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", target_modules="all-linear"),
    )
    trainer.train()
    return trainer


EXAMPLES = [
    reward_quickstart,
    reward_standard_explicit_prompt,
    reward_standard_implicit_prompt,
    reward_loaded_model_conversational_explicit,
    reward_peft_lora,
]

test_example = parametrized(EXAMPLES)
