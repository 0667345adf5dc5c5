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
