"""hf_align: align language models with Hugging Face tools.

The functional core (log-probs, losses, tokenization, graders) is importable from here. Trainers and configs
load lazily (``hf_align.SFTTrainer``) so that ``import hf_align`` stays light and has no side effects.
"""

from hf_align.data import tokenize_prompt_and_output
from hf_align.logprobs import compute_entropy, get_response_log_probs, masked_mean, masked_normalize
from hf_align.losses.grpo import (
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    grpo_microbatch_train_step,
)
from hf_align.losses.sft import sft_microbatch_train_step
from hf_align.rewards import (
    parse_gsm8k_response,
    parse_mmlu_response,
    question_only_reward_fn,
    r1_zero_reward_fn,
)

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        (
            "SFTConfig",
            "DPOConfig",
            "GRPOConfig",
            "RewardConfig",
            "ExpertIterationConfig",
            "ModelArguments",
            "ScriptArguments",
        ),
        "hf_align.config",
    ),
    "SFTTrainer": "hf_align.trainers.sft",
    "GRPOTrainer": "hf_align.trainers.grpo",
    "DPOTrainer": "hf_align.trainers.dpo",
    "RewardTrainer": "hf_align.trainers.reward_model",
    "ExpertIterationTrainer": "hf_align.trainers.ei",
    "GraderReward": "hf_align.rewards.functions",
    "per_instance_dpo_loss": "hf_align.dpo_instance",
    "load_model_and_tokenizer": "hf_align.modeling",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_align' has no attribute {name!r}")


__all__ = [
    "compute_entropy",
    "compute_grpo_clip_loss",
    "compute_group_normalized_rewards",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "get_response_log_probs",
    "grpo_microbatch_train_step",
    "masked_mean",
    "masked_normalize",
    "parse_gsm8k_response",
    "parse_mmlu_response",
    "question_only_reward_fn",
    "r1_zero_reward_fn",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
    *_LAZY,
]
