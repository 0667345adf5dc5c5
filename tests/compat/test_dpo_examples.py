"""DPOTrainer examples from TRL 1.16's documentation, run with `trl` and with `hf_align`; the code is identical.

Each function is one documentation snippet with `from trl import ...` replaced by the `lib` argument, Hub models by
the tiny saved folders, Hub datasets by a few in-code rows of the same format, and `harness.CPU` added (identical for
both libraries). The batch holds the whole toy dataset, so the first-step loss does not depend on the sampler.

Compared at relative 1e-5: the first logged `loss` (DPO sigmoid: -mean logsigmoid(beta * (chosen log-ratio -
rejected log-ratio)), log-probs summed over completion tokens) and `logps/chosen`, `logps/rejected` (mean over pairs
of the policy's summed completion log-probs). The loss alone is a weak witness of the data pipeline: with the
reference equal to the initial policy every log-ratio is 0 on step 1 and the loss is log 2 whatever the tokenization,
and even with another reference (the examples passing `ref_model` use one with other weights) tokens that chosen and
rejected share after the prompt cancel in the difference, so moving the prompt/completion boundary barely changes
it. The summed log-probs see every completion token, EOS included.
"""

from __future__ import annotations

from tests.compat.datasets_ import (
    preference_conversational_explicit,
    preference_conversational_implicit,
    preference_standard_explicit,
    preference_standard_implicit,
)
from tests.compat.harness import CPU, example, parametrized

LOGPS = ("loss", "logps/chosen", "logps/rejected")
SAME_REF = (
    "reference = initial policy: the first-step loss is log 2 in both, the log-probs carry the comparison"
)


# https://huggingface.co/docs/trl/v1.16.0/quickstart#direct-preference-optimization : model and ref_model given
# (TRL 1.16 takes ref_model as a loaded model), ultrafeedback_binarized = conversational preference, implicit prompt.
@example(compare=LOGPS)
def dpo_quickstart(lib, env):
    from transformers import AutoModelForCausalLM

    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_implicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dpo_trainer#quick-start : a loaded model, processing_class omitted,
# standard preference rows with an explicit prompt.
@example(compare=LOGPS, why=SAME_REF)
def dpo_standard_explicit_prompt(lib, env):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env.model_path)
    training_args = lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU)
    trainer = lib.DPOTrainer(model=model, args=training_args, train_dataset=preference_standard_explicit())
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dataset_formats#preference : standard, implicit prompt (TRL extracts the
# shared prefix as the prompt).
@example(compare=LOGPS)
def dpo_standard_implicit_prompt(lib, env):
    from transformers import AutoModelForCausalLM

    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_standard_implicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dataset_formats#preference : conversational, explicit prompt.
@example(compare=LOGPS)
def dpo_conversational_explicit_prompt(lib, env):
    from transformers import AutoModelForCausalLM

    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_explicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dpo_trainer#loss-functions (MPO): a list of loss types with loss_weights.
# The sft term (NLL of the chosen completions) is not zero at step 1, so the total is informative even with the
# default reference.
@example(compare=LOGPS)
def dpo_loss_type_list_mpo(lib, env):
    training_args = lib.DPOConfig(
        output_dir=env.output_dir,
        loss_type=["sigmoid", "bco_pair", "sft"],
        loss_weights=[0.8, 0.2, 1.0],
        per_device_train_batch_size=4,
        **CPU,
    )
    trainer = lib.DPOTrainer(
        model=env.model_path, args=training_args, train_dataset=preference_conversational_implicit()
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dpo_trainer#train-adapters-with-peft : the reference is the base model
# (adapters disabled), equal to the policy at step 1 since LoRA's B starts at zero.
@example(compare=LOGPS, why=SAME_REF)
def dpo_peft_lora(lib, env):
    from peft import LoraConfig

    trainer = lib.DPOTrainer(
        model=env.model_path,
        args=lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_conversational_explicit(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/reducing_memory#truncation : DPOConfig(max_length=...) truncates each
# prompt+completion sequence (truncation_mode="keep_start"). With 20 tokens every prompt fits (9-17 tokens) and
# two rows have a completion cut short.
@example(compare=LOGPS)
def dpo_max_length(lib, env):
    from transformers import AutoModelForCausalLM

    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(output_dir=env.output_dir, max_length=20, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_standard_explicit(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dpo_trainer (train_dataset may be an IterableDataset).
@example(compare=LOGPS)
def dpo_iterable_dataset(lib, env):
    from transformers import AutoModelForCausalLM

    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(output_dir=env.output_dir, per_device_train_batch_size=4, **CPU),
        train_dataset=preference_standard_explicit().to_iterable_dataset(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/dpo_trainer (TR-DPO: sync_ref_model, ref_model_mixup_alpha,
# ref_model_sync_steps) with another reference than the initial policy, synced after every step: step 2's loss and
# log-probs see the mixed reference (alpha * policy after step 1 + (1 - alpha) * ref_model).
@example(compare=LOGPS, rel=1e-4, step=2)
def dpo_tr_dpo_sync_ref_model(lib, env):
    from transformers import AutoModelForCausalLM

    cpu = {**CPU, "max_steps": 2}
    trainer = lib.DPOTrainer(
        model=env.model_path,
        ref_model=AutoModelForCausalLM.from_pretrained(env.ref_model_path),
        args=lib.DPOConfig(
            output_dir=env.output_dir,
            per_device_train_batch_size=4,
            learning_rate=1e-3,
            sync_ref_model=True,
            ref_model_mixup_alpha=0.6,
            ref_model_sync_steps=1,
            **cpu,
        ),  # fmt: skip
        train_dataset=preference_standard_explicit(),
    )
    trainer.train()
    return trainer


EXAMPLES = [
    dpo_quickstart,
    dpo_standard_explicit_prompt,
    dpo_standard_implicit_prompt,
    dpo_conversational_explicit_prompt,
    dpo_loss_type_list_mpo,
    dpo_peft_lora,
    dpo_max_length,
    dpo_iterable_dataset,
    dpo_tr_dpo_sync_ref_model,
]

test_example = parametrized(EXAMPLES)
