"""Configuration dataclasses: what a recipe's YAML and command line can set.

Each trainer has one config, a `transformers.TrainingArguments` subclass that adds only its own fields, so
everything `TrainingArguments` offers (save_steps, push_to_hub, report_to, lr schedules, ...) works as usual.
`SFTConfig`, `DPOConfig`, `RewardConfig` and `GRPOConfig` take TRL 1.16's field names and defaults; what they
share is written once (`_Config` for all four, `_DatasetConfig` for the three that prepare TRL's dataset
formats, `_ReferenceFields` for the two with a reference policy). Fields only hf_align has are extras; the
README's "Coming from TRL" table lists every deliberate difference. `bf16=None` means bf16 when a CUDA device
supports it, fp32 otherwise, so the same YAML runs on a GPU and on a laptop. `__post_init__` checks two small
tables (value ranges, allowed choices) and the rules tying fields together, and names the field to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments
from transformers.utils import logging

from hf_align.losses.dpo import LOSS_TYPES as DPO_LOSS_TYPES

logger = logging.get_logger(__name__)


def arg(default, help: str, **metadata):
    """A dataclass field with its ``--help`` text; a list default is copied for each instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


TRUNCATION = ["keep_start", "keep_end"]
PACKING = ["bfd", "bfd_split"]
# Range rules, field -> (test, what the value must be); a None value always passes.
POSITIVE = (lambda v: v > 0, "> 0")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")


@dataclass
class ModelArguments:
    model_name_or_path: str = arg("HuggingFaceTB/SmolLM2-135M-Instruct", "Hub id or local folder.")
    gguf_file: str | None = arg(None, "A .gguf file inside model_name_or_path, dequantized at load.")
    tokenizer_name_or_path: str | None = arg(None, "Tokenizer id or folder, if not the model's.")
    revision: str | None = arg(None, "Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "Weights dtype. 'auto': bfloat16 on a CUDA device that supports it, float32 otherwise."
    )
    attn_implementation: str | None = arg(None, "Attention kernel: 'sdpa', 'eager', 'flash_attention_2', ...")
    use_peft: bool = arg(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA branch.")
    lora_target_modules: list[str] = arg(["all-linear"], "Modules with adapters (all-linear: not the head).")

    def __post_init__(self):
        if self.use_peft and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive when use_peft is set, got {self.lora_r}.")


@dataclass
class ScriptArguments:
    dataset_name: str | None = arg(None, "Training data: a local .jsonl path or a Hub dataset id.")
    dataset_split: str = arg("train", "Split to read when dataset_name is a Hub id.")
    dataset_kind: str = arg("auto", "Row format for question/answer data: auto, math, math500, gsm8k or qa.")
    eval_dataset_name: str | None = arg(None, "Held-out data (path or Hub id).")
    eval_dataset_split: str = arg("test", "Split of eval_dataset_name to read.")
    eval_dataset_kind: str = arg("auto", "Row format of the eval data (as dataset_kind).")
    max_train_samples: int | None = arg(None, "Use at most this many training rows.")
    max_eval_samples: int | None = arg(None, "Use at most this many eval rows.")
    on_bad_rows: Literal["raise", "skip"] = arg(
        "raise", "Malformed rows: 'raise' names file:line and field; 'skip' drops them, counted and logged."
    )


@dataclass
class _Config(TrainingArguments):
    """What every config here changes in TrainingArguments: TRL's logging default, every column kept, how a
    model given by name is loaded, and ``bf16=None`` (ours: bf16 where the hardware has it)."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]
    _RANGES = {}  # field -> (test, requirement), as POSITIVE; class attributes (no annotation), not fields
    _CHOICES = {}  # field -> allowed values (of each item when the value is a list)

    bf16: bool | None = arg(None, "bfloat16 mixed precision. None: on when a CUDA device supports it.")
    logging_steps: float = arg(10, "Log every X optimizer steps (TRL's default).")
    logging_nan_inf_filter: bool = arg(False, "Off: a NaN loss stops training instead of being skipped.")
    remove_unused_columns: bool = arg(False, "Keep every dataset column (collators, reward functions pick).")
    model_init_kwargs: dict | str | None = arg(None, "from_pretrained kwargs for a model given by name.")
    trust_remote_code: bool = arg(
        False,
        "Run modeling code shipped with a Hub repo (models, tokenizers, reward models; off: it is code).",
    )

    def __post_init__(self):
        import torch

        mps, xpu = getattr(torch.backends, "mps", None), getattr(torch, "xpu", None)
        other = (mps is not None and mps.is_available()) or (xpu is not None and xpu.is_available())
        if not self.use_cpu and not torch.cuda.is_available() and not other:
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        for name, (ok, requirement) in self._RANGES.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise ValueError(f"{name} must be {requirement}, got {value!r}.")
        for name, choices in self._CHOICES.items():
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if item not in choices:
                    raise ValueError(f"{name}={item!r} is not supported; choose one of {list(choices)}")
        super().__post_init__()


@dataclass
class _DatasetConfig(_Config):
    """TRL's dataset preparation settings and its activation-checkpointing default (on)."""

    _RANGES = {"max_length": (lambda v: v > 1, "> 1 (or None)"), "pad_to_multiple_of": POSITIVE}

    dataset_num_proc: int | None = arg(None, "Processes for dataset preparation.")
    max_length: int | None = arg(1024, "Tokens per sequence (prompt + answer); None: no limit.")
    pad_to_multiple_of: int | str | None = arg("auto", "Pad batches to a multiple of this (auto: no).")

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default (its gradient_checkpointing=True)
        if isinstance(self.pad_to_multiple_of, str):
            value = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if value in ("auto", "none", "null") else int(value)
        super().__post_init__()


@dataclass
class _ReferenceFields:
    """What the two trainers comparing the policy with a reference policy share (DPO, GRPO): TRL's TR-DPO
    reference update and hf_align's reference extras."""

    sync_ref_model: bool = arg(
        False,
        "TR-DPO: every ref_model_sync_steps optimizer steps, ref <- alpha * policy + (1 - alpha) * ref.",
    )
    ref_model_mixup_alpha: float = arg(0.6, "TR-DPO's alpha: the policy's share in each reference update.")
    ref_model_sync_steps: int = arg(512, "TR-DPO's tau: optimizer steps between reference updates.")
    ref_mode: Literal["copy", "adapter_disabled"] | None = arg(
        None, "copy: a frozen copy (or ref_model); adapter_disabled: LoRA off. None: the latter under LoRA."
    )
    logprob_chunk_tokens: int = arg(256, "Tokens per log-prob chunk (memory knob).")
    share_prompt_prefix: bool = arg(
        True,
        "Forward each distinct prompt once, its answers on its KV cache (sdpa/eager, no DeepSpeed/FSDP).",
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.sync_ref_model:
            return
        if not 0 <= self.ref_model_mixup_alpha <= 1 or self.ref_model_sync_steps < 1:
            raise ValueError(
                f"sync_ref_model needs ref_model_mixup_alpha in [0, 1] and ref_model_sync_steps >= 1, got "
                f"{self.ref_model_mixup_alpha} and {self.ref_model_sync_steps}"
            )
        # (refused setting, why there is no reference model to update)
        without_reference = [
            (self.ref_mode == "adapter_disabled", "ref_mode='adapter_disabled' (the reference is the policy "
             "with its LoRA adapters off): set ref_mode: copy"),
            (getattr(self, "precompute_ref_log_probs", False), "precompute_ref_log_probs (reference "
             "log-probs fixed before training): set precompute_ref_log_probs: false"),
            (getattr(self, "beta", 1) == 0, "beta=0 (no KL term, no reference model): set beta > 0"),
        ]  # fmt: skip
        for refused, why in without_reference:
            if refused:
                raise ValueError(f"sync_ref_model needs a reference model to update; there is none with {why}, "
                                 "or sync_ref_model: false")  # fmt: skip


@dataclass
class SFTConfig(_DatasetConfig):
    """Supervised fine-tuning on TRL's SFT formats: language modeling, prompt-completion, conversational."""

    _RANGES = {**_DatasetConfig._RANGES, "normalize_constant": POSITIVE}
    _CHOICES = {"loss_type": ["nll"], "truncation_mode": TRUNCATION, "packing_strategy": PACKING}
    _VALID_DICT_FIELDS = _DatasetConfig._VALID_DICT_FIELDS + ["dataset_kwargs"]

    learning_rate: float = arg(2e-5, "AdamW learning rate.")
    dataset_text_field: str = arg("text", "Column of language-modeling text rows.")
    dataset_kwargs: dict | str | None = arg(
        None, "{'skip_prepare_dataset': True}: rows are already tokenized."
    )
    eos_token: str | None = arg(None, "End-of-turn token (None: the tokenizer's).")
    truncation_mode: str = arg("keep_start", "Longer rows keep their start or end.", choices=TRUNCATION)
    shuffle_dataset: bool = arg(False, "Shuffle the prepared dataset.")
    packing: bool = arg(False, "Pack samples into rows of max_length (best-fit decreasing).")
    packing_strategy: str = arg("bfd", "bfd: cut longer samples; bfd_split: split them.", choices=PACKING)
    padding_free: bool = arg(False, "Flatten each batch into one row without padding (always with packing).")
    eval_packing: bool | None = arg(None, "Pack the eval data (None: as packing).")
    completion_only_loss: bool | None = arg(None, "Train on completions only (None: if the rows have them).")
    assistant_only_loss: bool = arg(False, "Train on assistant turns only (the template's {% generation %}).")
    loss_type: str = arg("nll", "nll: negative log-likelihood of the trained tokens.", choices=["nll"])
    # --- hf_align only
    loss_normalization: Literal["token_mean", "sequence_sum"] = arg(
        "token_mean", "token_mean: over the optimizer step's tokens; sequence_sum: sum / normalize_constant."
    )
    normalize_constant: float = arg(1.0, "Divisor of each sequence's sum (loss_normalization=sequence_sum).")
    logprob_chunk_tokens: int = arg(256, "Tokens per log-prob chunk (memory knob).")

    def __post_init__(self):
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias
            self.loss_type = "nll"
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError("packing needs max_length (the packed row length); set it or packing=False.")
        if (self.packing or self.padding_free) and self.loss_normalization == "sequence_sum":
            raise ValueError("packing / padding_free share rows between sequences: use token_mean.")
        super().__post_init__()


@dataclass
class ExpertIterationConfig(SFTConfig):
    """Expert iteration: SFTConfig (each iteration's fine-tuning) plus sampling (GRPOConfig's names) and a keep rule."""

    _RANGES = {
        **SFTConfig._RANGES,
        **dict.fromkeys(
            ("n_iterations", "questions_per_iteration", "num_generations", "max_completion_length"),
            (lambda v: v >= 1, ">= 1"),
        ),
        "temperature": NON_NEGATIVE,
        "eval_temperature": NON_NEGATIVE,
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "reward_timeout_s": POSITIVE,
    }

    n_iterations: int = arg(5, "Iterations (sample, keep, fine-tune).")
    questions_per_iteration: int = arg(512, "Prompts sampled per iteration.")
    num_generations: int = arg(8, "Completions sampled per prompt.")
    max_completion_length: int = arg(1024, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature (0: greedy).")
    top_p: float = arg(1.0, "Nucleus sampling threshold.")
    stop_strings: list[str] = arg(["</answer>"], "Generation also stops after any of these strings (kept).")
    keep_threshold: float = arg(1.0, "Keep completions with reward >= this.")
    reward_weights: list[float] | None = arg(None, "One weight per reward function (default: all 1).")
    reward_timeout_s: float = arg(600.0, "Time limit of one reward function call.")
    grader_timeout_s: float = arg(5.0, "Per-completion time limit of the built-in graders.")
    grader_num_workers: int = arg(2, "Built-in grader worker processes (0: in-process).")
    use_vllm: bool = arg(False, "Sample with a colocated vLLM engine (else model.generate).")
    vllm_gpu_memory_utilization: float = arg(0.3, "Fraction of GPU memory the vLLM engine may take.")
    hf_generate_batch_size: int = arg(64, "Sequences per model.generate call.")
    eval_temperature: float = arg(0.0, "Sampling temperature for evaluation.")


@dataclass
class DPOConfig(_ReferenceFields, _DatasetConfig):
    """Direct preference optimisation (sigmoid, robust, hinge, IPO, BCO-pair, plus an SFT term)."""

    _RANGES = {
        **_DatasetConfig._RANGES,
        "beta": POSITIVE,
        "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    }
    _CHOICES = {"loss_type": sorted(DPO_LOSS_TYPES), "truncation_mode": TRUNCATION, "padding_free": [False]}

    learning_rate: float = arg(1e-6, "AdamW learning rate (DPO uses small ones).")
    truncation_mode: str = arg("keep_start", "Longer pairs keep their start or end.", choices=TRUNCATION)
    padding_free: bool = arg(False, "Not supported by hf_align's DPO (must be False).")
    beta: float = arg(0.1, "Inverse temperature of the implicit reward (KL strength); IPO's tau.")
    loss_type: list[str] = arg(["sigmoid"], "Preference loss(es), summed with loss_weights.")
    loss_weights: list[float] | None = arg(None, "One weight per loss_type (default: all 1).")
    label_smoothing: float = arg(0.0, "Label-flip probability in [0, 0.5): cDPO (sigmoid), rDPO (robust).")
    disable_dropout: bool = arg(True, "Set every dropout to 0 (deterministic log-probs).")
    precompute_ref_log_probs: bool = arg(False, "Reference log-probs computed once before training.")
    precompute_ref_batch_size: int | None = arg(None, "Pairs per precomputing forward (None: train batch).")

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss_type"
            )
        if self.label_smoothing and not set(self.loss_type) <= {"sigmoid", "robust"}:
            raise ValueError(f"label_smoothing is for sigmoid or robust: set it to 0 for {self.loss_type}.")
        super().__post_init__()


@dataclass
class RewardConfig(_DatasetConfig):
    """Bradley-Terry reward model: a one-output sequence classifier scored on chosen vs rejected."""

    _RANGES = {**_DatasetConfig._RANGES, "center_rewards_coefficient": NON_NEGATIVE}

    learning_rate: float = arg(1e-4, "AdamW learning rate.")
    disable_dropout: bool = arg(True, "Set every dropout of the model to 0.")
    eos_token: str | None = arg(None, "End-of-turn token (None: the tokenizer's).")
    center_rewards_coefficient: float | None = arg(None, "Weight of mean((r_c + r_r)^2) (None: off).")


IS_MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]  # TRL's: level_correction
# TRL's loss_type -> (our reduction, whether its normalizer spans the whole optimizer step). bnpo normalizes
# by the tokens of each LOCAL micro-batch, as TRL does (it depends on the split; dapo is the exact global one).
GRPO_LOSS_TYPES = {
    "grpo": ("sequence_mean", True),
    "dapo": ("token_mean", True),
    "dr_grpo": ("constant", True),
    "bnpo": ("token_mean", False),
}


@dataclass
class GRPOConfig(_ReferenceFields, _Config):
    """Group-relative policy optimisation with TRL 1.16's field names and defaults, plus hf_align's extras.

    One *generation step* samples ``generation_batch_size`` completions (``num_generations`` per prompt,
    shared over processes), scores them and computes advantages; then ``num_iterations`` passes over them
    make ``generation_batch_size / optimizer_batch_size`` optimizer steps each. ``max_steps`` counts
    optimizer steps.
    """

    _VALID_DICT_FIELDS = _Config._VALID_DICT_FIELDS + ["chat_template_kwargs", "generation_kwargs"]
    _RANGES = {
        "num_generations": (lambda v: v >= 2, ">= 2 to compare completions of a prompt"),
        "num_generations_eval": (lambda v: v >= 1, ">= 1 (or None: num_generations)"),
        "num_iterations": (lambda v: v >= 1, ">= 1"),
        "max_completion_length": (lambda v: v >= 1, ">= 1"),
        "min_completion_length": NON_NEGATIVE,
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": NON_NEGATIVE,
        "entropy_coef_delta": NON_NEGATIVE,
        "epsilon": OPEN_UNIT,
        "epsilon_high": OPEN_UNIT,
        "beta": NON_NEGATIVE,
        "temperature": (lambda v: v > 0, "> 0 for training rollouts (log-probs are taken at it)"),
        "repetition_penalty": (lambda v: v > 0, "> 0 (1: off)"),
        "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "reward_timeout_s": POSITIVE,
        "scale_rewards": (lambda v: v in ("group", "batch", "none"), "'group', 'batch', 'none' (or a bool)"),
        "max_staleness": NON_NEGATIVE,
        "top_entropy_quantile": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "delta": POSITIVE,
        "vllm_importance_sampling_clip_max": POSITIVE,
        "vllm_importance_sampling_clip_min": NON_NEGATIVE,
        "vllm_server_timeout": POSITIVE,
        "vllm_request_timeout": POSITIVE,
    }
    _CHOICES = {
        "loss_type": sorted(GRPO_LOSS_TYPES),
        "vllm_importance_sampling_mode": IS_MODES,
        "vllm_weight_sync": ["auto", "file", "group"],
    }

    learning_rate: float = arg(1e-6, "AdamW learning rate.")
    disable_dropout: bool = arg(False, "Set every dropout probability to 0.")
    # --- generation (TRL)
    num_generations: int = arg(8, "Completions per prompt (the group of GRPO).")
    num_generations_eval: int | None = arg(
        None, "Completions per eval prompt (None: num_generations; one when eval_temperature is 0, greedy)."
    )
    generation_batch_size: int | None = arg(None, "Completions per generation, all processes.")
    steps_per_generation: int | None = arg(None, "Micro-batches per generation (None: accumulation steps).")
    max_completion_length: int = arg(512, "Maximum new tokens per completion.")
    temperature: float = arg(1.0, "Sampling temperature (log-probs too).")
    top_p: float = arg(1.0, "Nucleus sampling threshold.")
    top_k: int = arg(0, "Top-k sampling (0: off).")
    repetition_penalty: float = arg(1.0, "Penalty on tokens already in prompt or completion (1: off).")
    min_p: float | None = arg(None, "Drop tokens below min_p x the top token's probability (None: off).")
    generation_kwargs: dict | str | None = arg(
        None, "More GenerationConfig (hf) / SamplingParams (vLLM) arguments; sampling fields here override."
    )
    shuffle_dataset: bool = arg(True, "Visit the prompts in a seeded order.")
    chat_template_kwargs: dict | str | None = arg(None, "Extra apply_chat_template arguments.")
    use_vllm: bool = arg(False, "Generate with vLLM (else model.generate).")
    vllm_mode: Literal["colocate", "server"] = arg(
        "colocate", "colocate: vLLM in the training process; server: hf_align/rollout/vllm_server.py."
    )
    vllm_server_base_url: str | None = arg(None, "vLLM server URL (None: from host and port).")
    vllm_server_host: str = arg("0.0.0.0", "vLLM server host (without base URL).")
    vllm_server_port: int = arg(8000, "vLLM server port (without base URL).")
    vllm_server_timeout: float = arg(240.0, "Seconds to wait for the vLLM server to be up (GET /health).")
    vllm_group_port: int = arg(51216, "Port the trainer opens for the weight group with a server elsewhere.")
    vllm_weight_sync: Literal["auto", "file", "group"] = arg(
        "auto", "Weights to the server: file (/dev/shm), group (torch.distributed), auto (file if same host)."
    )
    vllm_request_timeout: float = arg(600.0, "Seconds to wait for one vLLM server generation or weight sync.")
    vllm_gpu_memory_utilization: float = arg(0.3, "Fraction of GPU memory a colocated vLLM engine may take.")
    vllm_enable_sleep_mode: bool = arg(False, "Colocated vLLM sleeps during training (GPU only).")
    async_rollouts: bool = arg(False, "Generate (and score) the next batches on a thread while training.")
    max_staleness: int = arg(1, "async_rollouts: batches sampled ahead, from weights this many batches old.")
    log_completions: bool = arg(False, "Log a few (prompt, completion, reward) rows.")
    num_completions_to_print: int | None = arg(None, "How many (None: 4).")
    # --- loss (TRL)
    beta: float = arg(0.0, "Weight of the k3 KL penalty to the reference policy.")
    num_iterations: int = arg(1, "Passes over each generation batch; > 1 is off-policy (needs a ratio).")
    epsilon: float = arg(0.2, "Lower clip range of the importance ratio.")
    epsilon_high: float | None = arg(None, "Upper clip range (DAPO's clip-higher, e.g. 0.28). None: epsilon.")
    delta: float | None = arg(
        None, "Two-sided clip (INTELLECT-2): ratio capped at delta (> 1 + epsilon_high)."
    )
    top_entropy_quantile: float = arg(
        1.0, "Policy gradient on the top quantile of tokens by entropy (1: all)."
    )
    entropy_coef: float = arg(
        0.0,
        "Entropy bonus: loss - coef x mean token entropy, the same for every loss_type (initial coef when "
        "adaptive).",
    )
    use_adaptive_entropy: bool = arg(
        False, "Skywork-OR1: each optimizer step, coef += entropy_coef_delta when the step's entropy is at or "
        "below entropy_target, else -= (clamped); the bonus applies only while entropy is at or below it.",
    )  # fmt: skip
    entropy_coef_min: float = arg(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = arg(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = arg(0.005, "Step of the adaptive entropy coefficient per optimizer step.")
    entropy_target: float = arg(
        0.2, "Target mean token entropy (nats) of adaptive control, over the tokens the policy loss uses."
    )
    importance_sampling_level: Literal["token", "sequence"] = arg(
        "token", "Importance ratio per token (GRPO) or per sequence (GSPO)."
    )
    reward_weights: list[float] | None = arg(None, "One weight per reward function (default: all 1).")
    scale_rewards: str = arg("group", "Divide advantages by the std of the group, the batch, or none.")
    loss_type: str = arg("dapo", "Token reduction: grpo, dapo, dr_grpo or bnpo (see GRPO_LOSS_TYPES).")
    mask_truncated_completions: bool = arg(False, "Leave completions cut by the length limit out of loss.")
    vllm_importance_sampling_correction: bool = arg(
        True,
        "Weigh each token's loss by trainer / sampler probability (truncated or masked) where the sampler "
        "is not the trainer's forward: vLLM, or generate with top_p/top_k/min_p/penalty/min length/kwargs.",
    )
    vllm_importance_sampling_mode: str | None = arg(
        None,
        "token_ or sequence_ ratio (a sequence's is exp of its summed log-ratio), then _truncate (clamp to "
        "[clip_min, clip_max]) or _mask (0 outside it). None: sequence_mask (TRL's), token_truncate with "
        "async_rollouts.",
    )
    vllm_importance_sampling_clip_max: float | None = arg(3.0, "Upper bound C_max of the ratio (None: open).")
    vllm_importance_sampling_clip_min: float | None = arg(
        None, "Lower bound C_min of the ratio (None: open)."
    )
    # --- hf_align extras
    policy_loss: Literal["grpo_clip", "grpo_no_clip", "reinforce_with_baseline", "no_baseline"] = arg(
        "grpo_clip", "PPO clipped ratio (TRL's), unclipped ratio, -A log p, or -r log p."
    )
    advantage_eps: float = arg(1e-4, "Added to the reward std before dividing.")
    dynamic_sampling: bool = arg(False, "DAPO: drop groups with equal rewards, refill from next prompts.")
    max_dynamic_sampling_rounds: int = arg(4, "Generation rounds per step before accepting them.")
    max_prompt_length: int | None = arg(None, "Longer prompts are skipped (counted, logged). None: no limit.")
    min_completion_length: int = arg(0, "Minimum new tokens per completion.")
    stop_strings: list[str] = arg([], "Generation also stops after any of these strings (kept).")
    hf_generate_batch_size: int = arg(32, "Sequences per model.generate call (use_vllm false).")
    reward_timeout_s: float = arg(600.0, "Time limit of one reward function call; past it training stops.")
    grader_timeout_s: float = arg(5.0, "Per-completion time limit of the built-in graders.")
    grader_num_workers: int = arg(2, "Built-in grader worker processes (0: in-process).")
    eval_max_examples: int | None = arg(None, "Evaluate on at most this many rows.")
    eval_temperature: float = arg(0.0, "Sampling temperature for evaluation.")
    plot_curves: bool = arg(True, "Write reward / accuracy curves as a PNG at the end.")

    def __post_init__(self):
        bools = {True: "group", False: "none", "true": "group", "false": "none"}
        self.scale_rewards = bools.get(self.scale_rewards, self.scale_rewards)
        self._fold_generation_kwargs()
        if self.vllm_importance_sampling_mode is None:
            # Against a stale sampler a sequence's ratio is a product of T token ratios: in benchmarks/grpo_async.py
            # it stalled learning in 1 of 3 seeds, token truncation in none (BENCHMARKS.md); TRL's own async
            # trainer also weighs tokens.
            stale = self.stale_rollouts
            self.vllm_importance_sampling_mode = "token_truncate" if stale else "sequence_mask"
        super().__post_init__()  # the tables above, then TrainingArguments (which sets world_size)
        self._resolve_generation_batch()
        ratio = self.policy_loss in ("grpo_clip", "grpo_no_clip")
        if self.num_iterations > 1 and not ratio:
            raise ValueError(
                f"num_iterations={self.num_iterations} is off-policy: use policy_loss='grpo_clip' (or "
                f"grpo_no_clip), not {self.policy_loss!r}"
            )
        if self.delta is not None and self.policy_loss != "grpo_clip":
            raise ValueError(
                f"delta (two-sided clipping) needs policy_loss='grpo_clip', not {self.policy_loss!r}"
            )
        if self.importance_sampling_level == "sequence" and not ratio:
            raise ValueError("importance_sampling_level='sequence' (GSPO) needs policy_loss grpo_(no_)clip")
        if self.async_rollouts and (self.rollout_engine == "vllm" or self.world_size > 1):
            raise ValueError(
                "async_rollouts needs a rollout engine apart from training (use_vllm: false, or vllm_mode: server) "
                f"and one process (got engine {self.rollout_engine!r}, {self.world_size} processes): a colocated "
                "vLLM shares the training device, and several processes would need their collectives ordered "
                "across threads; set async_rollouts: false"
            )
        corrected = self.stale_rollouts and self.vllm_importance_sampling_correction
        if corrected and self.vllm_importance_sampling_mode.startswith("sequence"):
            logger.warning(
                "async_rollouts with vllm_importance_sampling_mode=%r: each sequence is weighted by the product of its "
                "token ratios to a policy one update older; in benchmarks/grpo_async.py (BENCHMARKS.md) this stalled "
                "learning in 1 of 3 seeds, while token_truncate (the async default) learned as fast as synchronous "
                "training per second",
                self.vllm_importance_sampling_mode,
            )
        if self.min_completion_length > self.max_completion_length:
            raise ValueError(
                f"min_completion_length ({self.min_completion_length}) must be <= max_completion_length "
                f"({self.max_completion_length})"
            )
        if (self.num_generations_eval or 1) > 1 and self.eval_temperature == 0:
            logger.warning(
                "num_generations_eval=%d with eval_temperature=0: greedy copies would be equal, so evaluation "
                "samples one completion per prompt; set eval_temperature > 0 to sample %d",
                self.num_generations_eval, self.num_generations_eval,
            )  # fmt: skip
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(f"vllm_importance_sampling_clip_min ({low}) must be < clip_max ({high})")
        if low is None and high is None and self.vllm_importance_sampling_mode.endswith("truncate"):
            raise ValueError("a *_truncate vllm_importance_sampling_mode needs clip_min or clip_max")

    def _fold_generation_kwargs(self) -> None:
        """As TRL, sampling fields in ``generation_kwargs`` override the config's: they move into those fields (the
        trainer's log-probs are taken at ``temperature``); the rest must be arguments the engine can take."""
        from hf_align.rollout.base import SamplingConfig

        extra = self.generation_kwargs or {}
        extra = dict(json.loads(extra) if isinstance(extra, str) else extra)  # from the command line: JSON
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if name in extra:
                setattr(self, name, extra.pop(name))
        SamplingConfig(
            extra=extra
        )  # refuses what the engines set themselves (n, seed, stop, max_tokens, ...)
        if not self.use_vllm:
            from hf_align.rollout.hf import check_generation_kwargs

            check_generation_kwargs(extra)
        self.generation_kwargs = extra or None

    def _resolve_generation_batch(self) -> None:
        """generation_batch_size and steps_per_generation from each other (as TRL); they must split evenly."""
        per_step = self.per_device_train_batch_size * self.world_size  # completions per micro-batch
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("set generation_batch_size or steps_per_generation, not both")
        gbs = self.generation_batch_size
        if gbs is None:
            gbs = per_step * (self.steps_per_generation or self.gradient_accumulation_steps)
        elif gbs % per_step:
            raise ValueError(
                f"generation_batch_size ({gbs}) must be a multiple of per_device_train_batch_size x "
                f"processes = {per_step}"
            )
        self.generation_batch_size, self.steps_per_generation = gbs, gbs // per_step
        if gbs % self.optimizer_batch_size:
            raise ValueError(
                f"generation_batch_size ({gbs}) must be a whole number of optimizer steps of "
                f"per_device_train_batch_size x gradient_accumulation_steps x processes = "
                f"{self.optimizer_batch_size} completions"
            )
        if gbs % (self.num_generations * self.world_size):
            raise ValueError(
                f"generation_batch_size ({gbs}) must split into whole groups per process: make it a "
                f"multiple of num_generations x processes = {self.num_generations * self.world_size}"
            )

    @property
    def optimizer_batch_size(self) -> int:
        """Completions per optimizer step, over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps made from one generation batch."""
        return self.num_iterations * (self.generation_batch_size // self.optimizer_batch_size)

    @property
    def stale_rollouts(self) -> bool:
        """Whether rollouts are sampled by older weights than the trainer's (async_rollouts running ahead)."""
        return self.async_rollouts and self.max_staleness > 0

    @property
    def corrects_sampling(self) -> bool:
        """Whether rollouts get the importance-sampling correction: it is on and the sampler is not the
        trainer's forward at ``temperature``: vLLM (other kernels), or generate reshaping the distribution
        (top_p, top_k, min_p, repetition penalty, a minimum length, generation_kwargs), or stale weights
        (async_rollouts). TRL: vLLM only."""
        reshaped = self.top_p < 1 or self.top_k > 0 or bool(self.min_p) or self.repetition_penalty != 1
        reshaped = reshaped or self.min_completion_length > 0 or bool(self.generation_kwargs)
        return self.vllm_importance_sampling_correction and (self.use_vllm or reshaped or self.stale_rollouts)

    @property
    def rollout_engine(self) -> str:
        """Our engine name: hf (model.generate), vllm (colocated) or vllm_server."""
        if not self.use_vllm:
            return "hf"
        return "vllm" if self.vllm_mode == "colocate" else "vllm_server"

    @property
    def vllm_server_url(self) -> str:
        return self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}"
