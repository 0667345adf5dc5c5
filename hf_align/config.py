"""Configuration dataclasses: what a recipe's YAML and command line can set.

Each trainer has one config, a `transformers.TrainingArguments` subclass that adds only its own fields, so
everything `TrainingArguments` offers (save_steps, push_to_hub, report_to, lr schedules, ...) works as
usual. `ModelArguments` and `ScriptArguments` hold what is not about optimisation: which model, which data.
`SFTConfig`, `DPOConfig` and `RewardConfig` use TRL 1.16's field names and defaults (shared ones in `_TRLConfig`);
fields only hf_align has are extras, and the README's "Coming from TRL" table lists every deliberate difference.

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


TRUNCATION = ["keep_start", "keep_end"]
PACKING = ["bfd", "bfd_split"]
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


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


@dataclass
class _TRLConfig(_CPUSafeMixin, TrainingArguments):
    """What TRL 1.16's trainer configs share: its defaults for logging and activation checkpointing (on), how a model given by name
    is loaded, and dataset preparation settings. ``bf16=None`` is ours: bf16 where the hardware has it."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    bf16: bool | None = field(
        default=None, metadata={"help": "bfloat16 mixed precision. None: on when a CUDA device supports it."}
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X optimizer steps (TRL's default)."}
    )
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Off: a NaN loss stops training."})
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "from_pretrained kwargs when the trainer gets the model as a name or path (dtype, ...)."
        },
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for dataset preparation."}
    )
    max_length: int | None = field(
        default=1024, metadata={"help": "Tokens per sequence (prompt + answer); None: no limit."}
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this ('auto' / None: no extra padding)."},
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the prepared columns as they are (the collators pick theirs)."}
    )

    def __post_init__(self):
        self._resolve_precision()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default (its gradient_checkpointing=True)
        if isinstance(self.pad_to_multiple_of, str):
            value = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if value in ("auto", "none", "null") else int(value)
        if self.max_length is not None and self.max_length <= 1:
            raise ValueError(f"max_length must be > 1 (or None), got {self.max_length}.")
        super().__post_init__()


@dataclass
class SFTConfig(_TRLConfig):
    """Supervised fine-tuning on TRL's SFT formats: language modeling, prompt-completion, conversational."""

    learning_rate: float = field(default=2e-5, metadata={"help": "AdamW learning rate."})
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column of language-modeling text rows."}
    )
    dataset_kwargs: dict | None = field(
        default=None,
        metadata={"help": "{'skip_prepare_dataset': True}: rows are already {input_ids, labels}."},
    )
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token (None: the tokenizer's)."}
    )
    truncation_mode: str = field(
        default="keep_start", metadata={"help": "Longer rows keep their start or end.", "choices": TRUNCATION}
    )
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the prepared dataset."})
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack samples into rows of max_length (best-fit decreasing); no attention across samples."
        },
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "bfd: cut samples longer than max_length; bfd_split: split them.",
            "choices": PACKING,
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Flatten each batch into one row without padding (always on with packing)."},
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval data (None: as packing)."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Train on the completion only (None: yes for prompt-completion rows, else all tokens)."
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Train on assistant turns only (the chat template's {% generation %} markers)."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "nll: negative log-likelihood of the trained tokens.", "choices": ["nll"]},
    )
    # --- hf_align only
    loss_normalization: Literal["token_mean", "sequence_sum"] = field(
        default="token_mean",
        metadata={
            "help": "token_mean: sum of -log p over trained tokens / number of trained tokens in the whole "
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

    def __post_init__(self):
        if self.loss_type == "chunked_nll":  # TRL's deprecated alias
            self.loss_type = "nll"
        _choice("loss_type", self.loss_type, ["nll"])
        _choice("truncation_mode", self.truncation_mode, TRUNCATION)
        _choice("packing_strategy", self.packing_strategy, PACKING)
        if self.normalize_constant <= 0:
            raise ValueError(f"normalize_constant must be > 0, got {self.normalize_constant}.")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ValueError(
                "packing needs max_length (the packed row length); set max_length or packing=False."
            )
        if (self.packing or self.padding_free) and self.loss_normalization == "sequence_sum":
            raise ValueError(
                "packing / padding_free put several sequences in a row; use loss_normalization='token_mean'."
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
    logging_nan_inf_filter: bool = field(default=False, metadata={"help": "Off: a NaN loss stops training."})
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
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Penalty on tokens already in prompt or completion (1: off)."}
    )
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
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
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
class DPOConfig(_TRLConfig):
    """Direct preference optimisation (sigmoid, robust, hinge, IPO, BCO-pair; plus an SFT term) on preference pairs."""

    learning_rate: float = field(
        default=1e-6, metadata={"help": "AdamW learning rate (DPO uses small ones)."}
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "prompt + answer longer than max_length keep their start or end.",
            "choices": TRUNCATION,
        },
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Not supported by hf_align's DPO (must be False)."}
    )
    beta: float = field(
        default=0.1, metadata={"help": "Inverse temperature of the implicit reward (KL strength); IPO's tau."}
    )
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Preference loss(es), summed with loss_weights (hf_align.losses.dpo.DPO_LOSSES)."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type (default: all 1)."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Assumed label-flip probability in [0, 0.5): cDPO (sigmoid) or rDPO (robust)."},
    )
    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Set every dropout to 0 so policy and reference log-probs are deterministic."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute reference log-probs once over the data before training (no reference in memory)."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per forward when precomputing (None: per_device_train_batch_size)."},
    )
    # --- hf_align only
    ref_mode: Literal["copy", "adapter_disabled"] | None = field(
        default=None,
        metadata={
            "help": "Reference policy. copy: a frozen copy of the initial model (or ref_model); adapter_disabled: the "
            "policy with its LoRA adapters off (no second model). None: adapter_disabled under LoRA, else copy."
        },
    )
    logprob_chunk_tokens: int = field(
        default=256, metadata={"help": "Tokens per log-prob chunk (memory knob)."}
    )
    share_prompt_prefix: bool = field(
        default=True, metadata={"help": SHARE_PROMPT_HELP + " (the chosen and rejected answers share it)."}
    )

    def __post_init__(self):
        from hf_align.losses.dpo import LOSS_TYPES

        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        for name in self.loss_type:
            _choice("loss_type", name, sorted(LOSS_TYPES))
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss_type"
            )
        _choice("truncation_mode", self.truncation_mode, TRUNCATION)
        if self.padding_free:
            raise ValueError(
                "padding_free=True is not supported by hf_align's DPOTrainer; set padding_free=False."
            )
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if self.label_smoothing and not set(self.loss_type) <= {"sigmoid", "robust"}:
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid or robust; set it to 0 for {self.loss_type}."
            )
        super().__post_init__()


@dataclass
class RewardConfig(_TRLConfig):
    """Bradley-Terry reward model: a sequence classifier with one output scored on chosen vs rejected answers."""

    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate."})
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout of the model to 0."})
    eos_token: str | None = field(
        default=None, metadata={"help": "End-of-turn token (None: the tokenizer's)."}
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of mean((r_c + r_r)^2), which keeps rewards centred (None: off)."},
    )

    def __post_init__(self):
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(
                f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}."
            )
        super().__post_init__()
