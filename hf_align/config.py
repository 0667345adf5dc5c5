"""Configuration dataclasses: what a recipe's YAML and command line can set.

Each trainer has one config, a `transformers.TrainingArguments` subclass that adds only its own fields, so
everything `TrainingArguments` offers (save_steps, push_to_hub, report_to, lr schedules, ...) works as
usual. `ModelArguments` and `ScriptArguments` hold what is not about optimisation: which model, which data.

CPU-safe defaults are chosen automatically: `bf16=None` means "bf16 when a CUDA device supports it,
otherwise fp32", so the same YAML runs on a GPU and on a laptop. Validation in `__post_init__` fails early
with a message that says which field to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments


def _cuda_bf16_available() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _other_accelerator_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return bool((mps is not None and mps.is_available()) or (xpu is not None and xpu.is_available()))


SHARE_PROMPT_HELP = (
    "Run each distinct prompt of a micro-batch through the decoder once and its answers on its key/value cache "
    "(same numbers up to float rounding). Used with sdpa/eager attention and no gradient checkpointing, DeepSpeed "
    "or FSDP; elsewhere, or when false, every row runs whole"
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="HuggingFaceTB/SmolLM2-135M-Instruct",
        metadata={
            "help": "Hub model id or local folder. With gguf_file: the folder (or Hub repo) holding it."
        },
    )
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "Name of a .gguf file inside model_name_or_path to load and dequantize."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder, when it differs from the model's."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata={
            "help": "Weights dtype. 'auto': bfloat16 on a CUDA device that supports it, float32 otherwise."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: 'sdpa', 'eager', 'flash_attention_2', ... (None: default)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run modeling code shipped with a Hub repo. Off by default: it is code."},
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules that get adapters; 'all-linear' targets every linear layer but the output head."
        },
    )

    def __post_init__(self):
        if self.use_peft and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive when use_peft is set, got {self.lora_r}.")


@dataclass
class ScriptArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Training data: a local .jsonl path or a Hub dataset id."}
    )
    dataset_split: str = field(
        default="train", metadata={"help": "Split to read when dataset_name is a Hub id."}
    )
    dataset_kind: str = field(
        default="auto",
        metadata={"help": "Row format for question/answer data: auto, math, math500, gsm8k or qa."},
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Held-out data (path or Hub id)."})
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name to read."})
    eval_dataset_kind: str = field(
        default="auto", metadata={"help": "Row format of the eval data (as dataset_kind)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many training rows."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval rows."})
    on_bad_rows: Literal["raise", "skip"] = field(
        default="raise",
        metadata={
            "help": "Malformed data rows: 'raise' names file:line and field; 'skip' drops them, counted and logged."
        },
    )


class _CPUSafeMixin:
    """Picks CPU when there is no accelerator and resolves `bf16=None` to what the hardware supports."""

    def _resolve_precision(self) -> None:
        import torch

        if not self.use_cpu and not torch.cuda.is_available() and not _other_accelerator_available():
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = (not self.use_cpu) and _cuda_bf16_available()


@dataclass
class SFTConfig(_CPUSafeMixin, TrainingArguments):
    """Supervised fine-tuning with a completion-only loss (prompt tokens never contribute)."""

    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision. None: on when a CUDA device supports it."}
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per example (or per packed row)."})
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column of prompt/response data."})
    response_field: str = field(
        default="response", metadata={"help": "Response column of prompt/response data."}
    )
    messages_field: str = field(
        default="messages", metadata={"help": "Column holding chat messages, if any."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Template name in data/prompts (e.g. r1_zero) or a file, applied to plain prompts."
        },
    )
    use_chat_template: bool = field(
        default=False,
        metadata={"help": "Format rows with the tokenizer's chat template; train on assistant turns."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several examples per row of max_length, with no attention across them."},
    )
    loss_normalization: Literal["token_mean", "sequence_sum"] = field(
        default="token_mean",
        metadata={
            "help": "token_mean: sum of -log p over response tokens / number of response tokens in the whole "
            "optimizer step (exact under any accumulation split). sequence_sum: per sequence, sum / "
            "normalize_constant, averaged over sequences (the seed's sft_microbatch_train_step)."
        },
    )
    normalize_constant: float = field(
        default=1.0,
        metadata={"help": "Divisor of each sequence's summed loss when loss_normalization=sequence_sum."},
    )
    logprob_chunk_tokens: int = field(
        default=256,
        metadata={"help": "Tokens per chunk when turning hidden states into log-probs (memory knob)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep our tokenized columns as they are."}
    )

    def __post_init__(self):
        self._resolve_precision()
        if self.max_length <= 1:
            raise ValueError(f"max_length must be > 1, got {self.max_length}.")
        if self.normalize_constant <= 0:
            raise ValueError(f"normalize_constant must be > 0, got {self.normalize_constant}.")
        if self.packing and self.loss_normalization == "sequence_sum":
            raise ValueError(
                "packing=True mixes several sequences per row; use loss_normalization='token_mean' with packing."
            )
        super().__post_init__()


# TRL's loss_type names -> (our reduction, whether its normalizer spans the whole optimizer step). bnpo normalizes
# by the tokens of each LOCAL micro-batch, as TRL does (so it depends on the split; dapo is the exact global one).
GRPO_LOSS_TYPES = {
    "grpo": ("sequence_mean", True),
    "dapo": ("token_mean", True),
    "dr_grpo": ("constant", True),
    "bnpo": ("token_mean", False),
}
_TRL_ONLY_LOSSES = ("cispo", "sapo", "luspo", "vespo")


@dataclass
class GRPOConfig(_CPUSafeMixin, TrainingArguments):
    """Group-relative policy optimisation with TRL 1.16's field names and defaults, plus hf_align's extras.

    One *generation step* samples ``generation_batch_size`` completions (``generation_batch_size /
    num_generations`` prompts, ``num_generations`` samples each, shared over processes), scores them and computes
    advantages; then ``num_iterations`` passes over them make ``generation_batch_size / (per_device_train_batch_size
    x gradient_accumulation_steps x processes)`` optimizer steps each. ``max_steps`` counts optimizer steps.
    Defaults are TRL's except those listed in the README's "Coming from TRL" table.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "chat_template_kwargs"]

    # --- TrainingArguments defaults that differ (TRL: logging_steps 10, learning_rate 1e-6)
    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision. None: on when a CUDA device supports it."}
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: they reach the reward functions."}
    )
    # --- model
    model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "from_pretrained keyword arguments when `model` is a string."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    # --- generation (TRL)
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (the group of GRPO)."})
    generation_batch_size: int | None = field(
        default=None, metadata={"help": "Completions per generation, all processes (None: from the next)."}
    )
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-batches per generation (None: gradient_accumulation_steps)."}
    )
    max_completion_length: int = field(default=512, metadata={"help": "Maximum new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (log-probs too)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    shuffle_dataset: bool = field(default=True, metadata={"help": "Visit the prompts in a seeded order."})
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra apply_chat_template arguments (conversational prompts)."}
    )
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (else model.generate)."})
    vllm_mode: Literal["colocate", "server"] = field(
        default="colocate",
        metadata={
            "help": "colocate: a vLLM engine in the training process; server: `python -m hf_align.rollout.vllm_server`."
        },
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of the vLLM server (None: http://vllm_server_host:vllm_server_port)."},
    )
    vllm_server_host: str = field(
        default="0.0.0.0", metadata={"help": "vLLM server host (without base URL)."}
    )
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port (without base URL)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory a colocated vLLM engine may take."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Put the colocated vLLM engine to sleep during training (GPU only)."}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "Log a few (prompt, completion, reward) rows."}
    )
    num_completions_to_print: int | None = field(default=None, metadata={"help": "How many (None: 4)."})
    # --- loss (TRL)
    beta: float = field(
        default=0.0, metadata={"help": "Weight of the k3 KL penalty to the reference policy."}
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Passes over each generation batch; > 1 is off-policy (needs a ratio loss)."},
    )
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range of the importance ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clip range (DAPO's clip-higher, e.g. 0.28). None: epsilon."}
    )
    importance_sampling_level: Literal["token", "sequence"] = field(
        default="token", metadata={"help": "Importance ratio per token (GRPO) or per sequence (GSPO)."}
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function (default: all 1); rewards are summed."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Divide advantages by the std of the group, of the whole generation batch, or none."
        },
    )
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "grpo: mean over each sequence's tokens, then over sequences; dapo: mean over all tokens of the "
            "optimizer step (exact, global); dr_grpo: sum / (sequences x max_completion_length); bnpo: token mean "
            "of each micro-batch."
        },
    )
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions cut by max_completion_length out of the loss."}
    )
    # --- hf_align extras
    policy_loss: Literal["grpo_clip", "grpo_no_clip", "reinforce_with_baseline", "no_baseline"] = field(
        default="grpo_clip",
        metadata={
            "help": "Per-token objective: grpo_clip (PPO clipped ratio, TRL's), grpo_no_clip, "
            "reinforce_with_baseline (-A log p), no_baseline (-r log p)."
        },
    )
    advantage_eps: float = field(default=1e-4, metadata={"help": "Added to the reward std before dividing."})
    dynamic_sampling: bool = field(
        default=False,
        metadata={"help": "DAPO: drop groups whose rewards are all equal and refill from the next prompts."},
    )
    max_dynamic_sampling_rounds: int = field(
        default=4, metadata={"help": "Generation rounds per step before accepting zero-std groups."}
    )
    ref_mode: Literal["copy", "adapter_disabled"] | None = field(
        default=None,
        metadata={
            "help": "Reference policy for beta > 0. copy: a frozen copy of the initial model (or ref_model); "
            "adapter_disabled: the policy with its LoRA adapters off. None: adapter_disabled under LoRA, else copy."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Prompts with more tokens are skipped (counted and logged). None: no limit."},
    )
    min_completion_length: int = field(default=0, metadata={"help": "Minimum new tokens per completion."})
    stop_strings: list[str] = field(
        default_factory=list, metadata={"help": "Generation also stops after any of these strings (kept)."}
    )
    hf_generate_batch_size: int = field(
        default=32, metadata={"help": "Sequences per model.generate call (use_vllm false)."}
    )
    reward_timeout_s: float = field(
        default=600.0,
        metadata={
            "help": "Wall-clock limit of one call of a reward function or model; past it training stops."
        },
    )
    grader_timeout_s: float = field(
        default=5.0, metadata={"help": "Per-completion time limit of the built-in graders (killed past it)."}
    )
    grader_num_workers: int = field(
        default=2, metadata={"help": "Built-in grader worker processes (0: in-process)."}
    )
    logprob_chunk_tokens: int = field(
        default=256, metadata={"help": "Tokens per log-prob chunk (memory knob)."}
    )
    share_prompt_prefix: bool = field(
        default=True,
        metadata={"help": SHARE_PROMPT_HELP + " (saves 1 - 1/num_generations of the prompt's work)."},
    )
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Evaluate on at most this many rows."}
    )
    eval_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature for evaluation."})
    plot_curves: bool = field(
        default=True, metadata={"help": "Write reward / accuracy curves as a PNG at the end."}
    )

    def __post_init__(self):
        self._resolve_precision()
        super().__post_init__()
        self.scale_rewards = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards, self.scale_rewards
        )
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(
                f"scale_rewards must be 'group', 'batch' or 'none' (or a bool), got {self.scale_rewards!r}"
            )
        if self.loss_type not in GRPO_LOSS_TYPES:
            hint = " (a TRL loss hf_align does not implement)" if self.loss_type in _TRL_ONLY_LOSSES else ""
            raise ValueError(
                f"loss_type={self.loss_type!r}{hint}: choose one of {sorted(GRPO_LOSS_TYPES)}; "
                "dapo (the default) is the exact global token mean"
            )
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 to compare completions of a prompt, got {self.num_generations}"
            )
        per_step = (
            self.per_device_train_batch_size * self.world_size
        )  # completions per micro-batch, all processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("set generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is None:
            self.steps_per_generation = self.steps_per_generation or self.gradient_accumulation_steps
            self.generation_batch_size = per_step * self.steps_per_generation
        elif self.generation_batch_size % per_step:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be a multiple of per_device_train_batch_size "
                f"x processes = {per_step}"
            )
        self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be a whole number of optimizer steps of "
                f"per_device_train_batch_size x gradient_accumulation_steps x processes = "
                f"{per_step * self.gradient_accumulation_steps} completions"
            )
        if self.generation_batch_size % (self.num_generations * self.world_size):
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must split into whole groups per process: "
                f"make it a multiple of num_generations x processes = {self.num_generations * self.world_size}"
            )
        ratio = self.policy_loss in ("grpo_clip", "grpo_no_clip")
        if self.num_iterations > 1 and not ratio:
            raise ValueError(
                f"num_iterations={self.num_iterations} is off-policy: use policy_loss='grpo_clip' (or grpo_no_clip), "
                f"not {self.policy_loss!r}"
            )
        if self.importance_sampling_level == "sequence" and not ratio:
            raise ValueError(
                "importance_sampling_level='sequence' (GSPO) needs policy_loss='grpo_clip' or 'grpo_no_clip'"
            )
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 for training rollouts (log-probs are taken at it)")
        if self.reward_timeout_s <= 0:
            raise ValueError(f"reward_timeout_s must be > 0, got {self.reward_timeout_s}")

    @property
    def optimizer_batch_size(self) -> int:
        """Completions per optimizer step, over all processes."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps made from one generation batch."""
        return self.num_iterations * (self.generation_batch_size // self.optimizer_batch_size)

    @property
    def loss_reduction(self) -> str:
        return GRPO_LOSS_TYPES[self.loss_type][0]

    @property
    def rollout_engine(self) -> str:
        """Our engine name: hf (model.generate), vllm (colocated) or vllm_server."""
        if not self.use_vllm:
            return "hf"
        return "vllm" if self.vllm_mode == "colocate" else "vllm_server"

    @property
    def vllm_server_url(self) -> str:
        return self.vllm_server_base_url or f"http://{self.vllm_server_host}:{self.vllm_server_port}"


@dataclass
class _PreferenceDataArgs:
    """Fields shared by the trainers that read preference pairs (DPO, reward model)."""

    max_length: int = field(default=1024, metadata={"help": "Tokens of prompt + response, per answer."})
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts longer than this keep their LAST max_prompt_length tokens."}
    )
    prompt_field: str = field(default="prompt", metadata={"help": "Prompt column (a string or messages)."})
    chosen_field: str = field(default="chosen", metadata={"help": "Preferred answer column."})
    rejected_field: str = field(default="rejected", metadata={"help": "Dispreferred answer column."})
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Template name in data/prompts (e.g. alpaca_sft) or a file, applied to plain prompts."
        },
    )
    use_chat_template: bool = field(
        default=False, metadata={"help": "Format rows with the tokenizer's chat template."}
    )

    def _check_preference_lengths(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < max_prompt_length ({self.max_prompt_length}) < max_length ({self.max_length}) "
                "so that every answer keeps at least one token."
            )


@dataclass
class DPOConfig(_PreferenceDataArgs, _CPUSafeMixin, TrainingArguments):
    """Direct preference optimisation (and its sigmoid / robust / hinge / IPO variants) on preference pairs."""

    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision. None: on when a CUDA device supports it."}
    )
    learning_rate: float = field(
        default=5e-7, metadata={"help": "AdamW learning rate (DPO uses small ones)."}
    )
    beta: float = field(
        default=0.1, metadata={"help": "Inverse temperature of the implicit reward (KL strength); IPO's tau."}
    )
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo"] = field(
        default="sigmoid", metadata={"help": "Preference loss (hf_align.losses.dpo.DPO_LOSSES)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed label-flip probability in [0, 0.5): cDPO (sigmoid) or rDPO (robust)."},
    )
    ref_mode: Literal["copy", "adapter_disabled", "precomputed"] = field(
        default="copy",
        metadata={
            "help": "Reference policy. copy: a frozen copy of the initial model (or ref_model); adapter_disabled: "
            "the policy with its LoRA adapters off (no second model; needs use_peft); precomputed: reference "
            "log-probs computed once over the data before training and stored in the examples."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout to 0 so policy and reference log-probs are deterministic."},
    )
    precompute_batch_size: int = field(
        default=8, metadata={"help": "Pairs per forward when ref_mode=precomputed fills the reference cache."}
    )
    logprob_chunk_tokens: int = field(
        default=256, metadata={"help": "Tokens per log-prob chunk (memory knob)."}
    )
    share_prompt_prefix: bool = field(
        default=True, metadata={"help": SHARE_PROMPT_HELP + " (the chosen and rejected answers share it)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep our tokenized columns as they are."}
    )

    def __post_init__(self):
        self._resolve_precision()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid or robust; set it to 0 for {self.loss_type!r}."
            )
        self._check_preference_lengths()
        super().__post_init__()


@dataclass
class RewardConfig(_PreferenceDataArgs, _CPUSafeMixin, TrainingArguments):
    """Bradley-Terry reward model: a sequence classifier with one output scored on chosen vs rejected answers."""

    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision. None: on when a CUDA device supports it."}
    )
    center_rewards_coefficient: float = field(
        default=0.0, metadata={"help": "Weight of mean((r_c + r_r)^2), which keeps rewards centred (0: off)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep our tokenized columns as they are."}
    )

    def __post_init__(self):
        self._resolve_precision()
        self._check_preference_lengths()
        if self.center_rewards_coefficient < 0:
            raise ValueError(
                f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}."
            )
        super().__post_init__()
