"""GRPOTrainer examples from TRL 1.16's documentation, run with `trl` and with `hf_align`; the code is identical.

Each function is one documentation snippet with `from trl import ...` replaced by the `lib` argument, Hub models by
the tiny saved folders, Hub datasets by a few in-code prompt rows of the same format, and `harness.CPU` plus tiny
lengths added (identical for both libraries). Every generation batch holds all prompts of the toy set, so nothing
depends on the order a sampler draws them in.

What can be compared, and why (each library samples completions from its own RNG stream, so sampled completions,
their rewards and any loss that weighs them differently are not comparable):
  - Greedy examples (`top_k=1`, a TRL sampling field: sampling from the single most likely token) make both
    libraries generate the same completions from the same prompts. Then the reward functions must receive the same
    arguments (`env.calls`: prompts, completions, completion_ids, extra columns), and the logged `reward`,
    `rewards/<name>/mean` and completion lengths must match.
  - With `loss_type="grpo"` and `beta=0.0`, the first step is on-policy (ratio 1), so its loss is -mean over
    sequences of the advantages, which is 0 when every group of `num_generations` completions sits in the batch
    (advantages are centred per group), whatever was sampled: compared at absolute 1e-6.
  - Otherwise (sampled completions with dapo / dr_grpo / masked truncations / several generations per step) the
    test only checks that hf_align trains, logs a finite loss and logs TRL's metric names.
  - The importance-sampling correction (on by default in both): TRL applies it to vLLM rollouts only, hf_align
    also to `model.generate` with `top_k > 0`, `top_p < 1`, `min_p` or a repetition penalty (README, "Coming
    from TRL"). The greedy examples (`top_k=1`) are such a case, yet their compared loss stays 0: the weights
    multiply advantages that are all 0. The default-sampling examples get no correction in either library.
"""

from __future__ import annotations

import asyncio
import re

from tests.compat.datasets_ import QA, user
from tests.compat.harness import CPU, example, parametrized

# HF's repetition penalty, a GRPOConfig sampling field, used by some greedy examples (same for both libraries).
VARIED = dict(repetition_penalty=1.3)
ZERO_LOSS = {"loss": (0.0, 1e-6)}  # on-policy grpo loss at beta 0 is -mean(advantages) = 0
SAMPLED_KEYS = ("reward", "reward_std", "rewards/reward_function/mean", "completions/mean_length")
SAMPLED = "sampled completions come from each library's own RNG, so rewards and this loss_type's value differ"


def tiny(**overrides):
    """GRPOConfig fields the docs leave at defaults that are too large for this machine: 2 prompts x 4 generations
    of at most 8 tokens, one step."""
    return dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=8, **CPU) | overrides


def record(env, prompts, completions, completion_ids, kwargs):
    """What a reward function received, order-free: one sorted row per completion, extra columns included.
    TRL's own helpers in kwargs (trainer_state, log_extra, log_metric) are left out: they are not data."""
    extra = {
        k: v
        for k, v in kwargs.items()
        if k not in ("trainer_state", "log_extra", "log_metric", "environments")
    }
    rows = [
        (repr(p), repr(c), tuple(ids), tuple((k, repr(v[i])) for k, v in sorted(extra.items())))
        for i, (p, c, ids) in enumerate(zip(prompts, completions, completion_ids))
    ]
    env.calls.append(sorted(rows))


def prompts_standard():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [q for q, _ in QA[:2]]})


def prompts_conversational(**columns):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [user(q) for q, _ in QA[:2]], **columns})


def completion_text(completion):
    """Completions are strings for standard prompts and [{"role": "assistant", "content": ...}] for conversational."""
    return completion if isinstance(completion, str) else completion[0]["content"]


# https://huggingface.co/docs/trl/v1.16.0/quickstart#group-relative-policy-optimization (reward: count unique
# characters, as in the quickstart's custom reward function); model as a path string, default loss_type ("dapo").
def reward_function(completions, **kwargs):
    return [float(len(set(completion.lower()))) for completion in completions]


@example(compare=(), why=SAMPLED, require=SAMPLED_KEYS)
def grpo_quickstart(lib, env):
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=lib.GRPOConfig(output_dir=env.output_dir, **tiny()),
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# The same quickstart made greedy (top_k=1) with loss_type="grpo", beta=0.0: rewards and the zero loss compared.
@example(
    compare=("reward", "rewards/reward_function/mean", "completions/mean_length"),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_quickstart_greedy(lib, env):
    def reward_function(prompts, completions, completion_ids, **kwargs):
        record(env, prompts, completions, completion_ids, kwargs)
        return [float(len(set(completion.lower()))) for completion in completions]

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#example-2-reward-completions-with-a-specific-format :
# conversational prompts, completions arrive as [{"role": "assistant", "content": ...}]. A random tiny model never
# produces the format, so a second, length-in-tokens reward (Example 1, reward longer completions) is listed too.
@example(
    compare=(
        "reward",
        "rewards/format_reward_func/mean",
        "rewards/len_reward/mean",
        "completions/mean_length",
    ),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_format_reward_conversational(lib, env):
    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    def len_reward(prompts, completions, completion_ids, **kwargs):
        record(env, prompts, completions, completion_ids, kwargs)
        return [float(len(set(completion_text(c)))) for c in completions]

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=[format_reward_func, len_reward],
        args=lib.GRPOConfig(
            output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **VARIED, **tiny()
        ),
        train_dataset=prompts_conversational(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#example-3-reward-completions-based-on-a-reference : an extra
# dataset column (`ground_truth`) reaches the reward function as a keyword list aligned with the completions.
@example(
    compare=("reward", "rewards/reward_func/mean"),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_extra_column_ground_truth(lib, env):
    def reward_func(prompts, completions, completion_ids, ground_truth, **kwargs):
        record(env, prompts, completions, completion_ids, {"ground_truth": ground_truth, **kwargs})
        # The docs compare a \boxed{} answer to the ground truth; a random model never boxes anything, so this
        # scores the share of ground-truth characters present in the completion (same arguments, graded values).
        return [
            sum(ch in completion_text(c) for ch in gt) / len(gt) for c, gt in zip(completions, ground_truth)
        ]

    dataset = prompts_conversational(ground_truth=[a for _, a in QA[:2]])
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_func,
        args=lib.GRPOConfig(
            output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **VARIED, **tiny()
        ),
        train_dataset=dataset,
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#using-multiple-reward-functions (reward_weights) with the
# callable kinds a user writes: a module-level function, a closure, a lambda.
def count_digits(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in completion_text(c))) for c in completions]


@example(
    compare=(
        "reward",
        "reward_std",
        "rewards/count_digits/mean",
        "rewards/vowels/mean",
        "completions/mean_length",
    ),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_multiple_weighted_rewards(lib, env):
    weight_per_vowel = 0.5

    def vowels(prompts, completions, completion_ids, **kwargs):  # a closure over weight_per_vowel and env
        record(env, prompts, completions, completion_ids, kwargs)
        return [weight_per_vowel * sum(ch in "aeiou" for ch in completion_text(c)) for c in completions]

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=[count_digits, vowels, lambda completions, **kw: [float(len(c)) for c in completions]],
        args=lib.GRPOConfig(
            output_dir=env.output_dir,
            reward_weights=[2.0, 1.0, 0.1],
            scale_rewards="batch",
            top_k=1,
            loss_type="grpo",
            beta=0.0,
            **VARIED,
            **tiny(),
        ),
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#example-4-multi-task-reward-functions : each reward returns
# None for the rows of the other task; the `task` column is passed as a keyword list. Logged means ignore the Nones.
@example(
    compare=("reward", "rewards/math_reward_func/mean", "rewards/coding_reward_func/mean"),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_multi_task_none_rewards(lib, env):
    def math_reward_func(prompts, completions, completion_ids, task, **kwargs):
        record(env, prompts, completions, completion_ids, {"task": task, **kwargs})
        rewards = []
        for completion, t in zip(completions, task):
            if t == "math":
                rewards.append(float(sum(ch.isdigit() for ch in completion_text(completion))))
            else:
                rewards.append(None)  # None for non-math tasks
        return rewards

    def coding_reward_func(prompts, completions, task, **kwargs):
        rewards = []
        for completion, t in zip(completions, task):
            if t == "coding":
                rewards.append(float(len(completion_text(completion))))
            else:
                rewards.append(None)  # None for non-coding tasks
        return rewards

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=[math_reward_func, coding_reward_func],
        args=lib.GRPOConfig(
            output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **VARIED, **tiny()
        ),
        train_dataset=prompts_conversational(task=["math", "coding"]),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#asynchronous-reward-functions : an `async def` reward
# (e.g. one calling a remote judge); TRL awaits all async rewards of a step together.
@example(
    compare=("reward", "rewards/async_reward_func/mean"),
    tolerances=ZERO_LOSS,
    compare_calls=True,
)
def grpo_async_reward(lib, env):
    async def async_reward_func(prompts, completions, completion_ids, **kwargs):
        await asyncio.sleep(0.01)  # stands for the remote call
        record(env, prompts, completions, completion_ids, kwargs)
        return [float(len(set(completion_text(c)))) for c in completions]

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=async_reward_func,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_conversational(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#using-a-reward-model : a sequence-classification reward model
# given by path (reward_processing_classes omitted: the tokenizer loads from it). Conversational prompts: the reward
# model scores the chat-templated prompt + completion. Its metric is named after the folder: rewards/reward/mean.
@example(compare=("reward", "rewards/reward/mean"), tolerances=ZERO_LOSS)
def grpo_reward_model_path(lib, env):
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=env.reward_model_path,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_conversational(),
    )
    trainer.train()
    return trainer


# Same page: the reward model as a loaded object next to a function, with reward_processing_classes (None for the
# function, the reward model's tokenizer for the model), standard prompts.
@example(compare=("reward", "rewards/reward/mean", "rewards/count_digits/mean"), tolerances=ZERO_LOSS)
def grpo_reward_model_object(lib, env):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_model = AutoModelForSequenceClassification.from_pretrained(env.reward_model_path, num_labels=1)
    reward_tokenizer = AutoTokenizer.from_pretrained(env.reward_model_path)
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=[count_digits, reward_model],
        reward_processing_classes=[None, reward_tokenizer],
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer#train-adapters-with-peft (peft_config=LoraConfig(...)).
@example(compare=("reward", "rewards/reward_function/mean"), tolerances=ZERO_LOSS)
def grpo_peft_lora(lib, env):
    from peft import LoraConfig

    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_standard(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/paper_index#dapo (DAPO's GRPOConfig: loss_type="dapo", epsilon_high=0.28,
# mask_truncated_completions=True, beta=0.0), greedy so that the completions, their truncation and rewards match.
# All completions of a group are equal, so advantages and the first-step loss are 0 as well.
@example(
    compare=(
        "reward",
        "rewards/reward_function/mean",
        "completions/clipped_ratio",
        "completions/mean_length",
    ),
    tolerances=ZERO_LOSS,
)
def grpo_dapo_greedy(lib, env):
    training_args = lib.GRPOConfig(
        output_dir=env.output_dir,
        loss_type="dapo",
        epsilon_high=0.28,
        mask_truncated_completions=True,
        beta=0.0,
        top_k=1,
        **tiny(),
    )
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=training_args,
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/paper_index#group-sequence-policy-optimization (GSPO's GRPOConfig:
# importance_sampling_level="sequence", loss_type="grpo", beta=0.0, epsilon=3e-4, epsilon_high=4e-4,
# steps_per_generation=4), plus num_iterations=2 and generation sampling fields. Sampled, and each optimizer step
# sees a quarter of the generation batch (groups split), so nothing is comparable: trains, finite, TRL's names.
@example(
    compare=(),
    why=SAMPLED + "; steps see partial groups, so even the grpo loss is not zero",
    require=SAMPLED_KEYS,
)
def grpo_gspo_sampled(lib, env):
    training_args = lib.GRPOConfig(
        output_dir=env.output_dir,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.0,
        epsilon=3e-4,
        epsilon_high=4e-4,
        gradient_accumulation_steps=1,
        steps_per_generation=4,
        num_iterations=2,
        temperature=0.9,
        top_p=0.95,
        top_k=50,
        repetition_penalty=1.1,
        **tiny(per_device_train_batch_size=2, max_steps=2),
    )
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=training_args,
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/paper_index#dr-grpo (loss_type="dr_grpo", scale_rewards="none"), with
# generation_batch_size set instead of steps_per_generation; sampled.
@example(compare=(), why=SAMPLED, require=SAMPLED_KEYS)
def grpo_dr_grpo_sampled(lib, env):
    training_args = lib.GRPOConfig(
        output_dir=env.output_dir,
        loss_type="dr_grpo",
        scale_rewards="none",
        generation_batch_size=8,
        **tiny(),
    )
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=training_args,
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


# GRPOTrainer's train_dataset may be an IterableDataset (streamed prompts); greedy, compared.
@example(compare=("reward", "rewards/reward_function/mean"), tolerances=ZERO_LOSS)
def grpo_iterable_dataset(lib, env):
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", beta=0.0, **tiny()),
        train_dataset=prompts_standard().to_iterable_dataset(),
    )
    trainer.train()
    return trainer


# https://huggingface.co/docs/trl/v1.16.0/grpo_trainer (entropy_coef: an entropy bonus on the mean token entropy,
# whatever the loss_type). Greedy (top_k=1): equal completions in each group, advantages 0, so the first-step loss
# is -entropy_coef x the mean token entropy of the same completions in both libraries.
@example(compare=("loss", "entropy", "reward"), rel=1e-4)
def grpo_entropy_bonus_greedy(lib, env):
    trainer = lib.GRPOTrainer(
        model=env.model_path,
        reward_funcs=reward_function,
        args=lib.GRPOConfig(output_dir=env.output_dir, top_k=1, loss_type="grpo", entropy_coef=0.1, **tiny()),
        train_dataset=prompts_standard(),
    )
    trainer.train()
    return trainer


EXAMPLES = [
    grpo_quickstart,
    grpo_quickstart_greedy,
    grpo_format_reward_conversational,
    grpo_extra_column_ground_truth,
    grpo_multiple_weighted_rewards,
    grpo_multi_task_none_rewards,
    grpo_async_reward,
    grpo_reward_model_path,
    grpo_reward_model_object,
    grpo_peft_lora,
    grpo_dapo_greedy,
    grpo_gspo_sampled,
    grpo_dr_grpo_sampled,
    grpo_iterable_dataset,
    grpo_entropy_bonus_greedy,
]

test_example = parametrized(EXAMPLES)
