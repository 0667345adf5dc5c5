"""What every rollout engine takes and returns: `SamplingConfig`, `Rollout`, and the `RolloutEngine` protocol.

Choices (every engine follows them, so trainers and evaluation never branch on the engine):
- Prompts are plain strings, already formatted (prompt template or chat template applied by the caller) and
  tokenized by the engine with the tokenizer's special tokens, as vLLM does for string prompts.
- `generate` returns one list per prompt, in prompt order, holding `sampling.n` completions.
- A completion ends in one of three ways. "eos": the model emitted an end-of-sequence token; that token is
  the last of `completion_ids` (the policy must learn to stop) and is left out of `text`. "stop": a stop string
  appeared; `text` ends with the stop string (so a closing `</answer>` stays for the grader) and
  `completion_ids` end with the token that completed it. "length": `max_new_tokens` ran out.
- `logprobs[i]` is the log-probability of `completion_ids[i]` under the distribution the token was drawn
  from: logits / temperature, then top-k and top-p truncation, renormalised. With top_k = 0 and top_p = 1 it
  equals `get_response_log_probs(..., temperature=temperature)` on the same tokens (up to float error).
  Greedy decoding (temperature 0) has no sampling distribution: its logprobs are those of the model at
  temperature 1. While `min_new_tokens` forbids EOS, the EOS-masked distribution is the one recorded.
- Stop strings are only looked for once `min_new_tokens` tokens exist, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "eos"]


class RolloutEngineError(RuntimeError):
    """The rollout engine failed (engine death, out of memory, server unreachable); the cause is chained."""


@dataclass
class SamplingConfig:
    """How to sample completions; engine-independent."""

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in prompt or completion; 1 = off
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # One seed per prompt (overrides `seed`): the samples of a prompt then depend only on that prompt's seed,
    # not on which other prompts share the call, so a trainer gets the same rollouts whatever its process layout.
    prompt_seeds: list[int] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1 (completions per prompt), got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One completion of one prompt."""

    prompt_index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: FinishReason


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates completions from a policy whose weights can be refreshed between training steps."""

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        """`sampling.n` rollouts per prompt, one list per prompt, in prompt order."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine generate with `model`'s current weights."""
        ...

    def close(self) -> None:
        """Release the engine's resources; it cannot generate afterwards."""
        ...


def prompt_seed(sampling: SamplingConfig, prompt_index: int) -> int | None:
    """The seed every engine uses for prompt ``prompt_index`` of a call: ``prompt_seeds[i]`` when given,
    else ``seed + i * n`` (engines add the sample index within the group where they can), else None."""
    if sampling.prompt_seeds is not None:
        return sampling.prompt_seeds[prompt_index]
    return None if sampling.seed is None else sampling.seed + prompt_index * sampling.n


def check_prompt_lengths(
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    limit: int | None,
    limit_name: str = "engine's max_model_len",
) -> None:
    """Every engine refuses, before generating, an empty prompt or one that cannot fit ``max_new_tokens`` more."""
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        if limit is not None and len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"{limit_name}={limit}: shorten the prompt or lower max_new_tokens"
            )
