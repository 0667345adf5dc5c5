"""What every rollout engine takes and returns, and `EngineBase`, the part of an engine that is not generation.

Choices (every engine follows them, so trainers and evaluation never branch on the engine):
- Prompts are plain strings, already formatted (prompt template or chat template applied by the caller) and
  tokenized by the engine with the tokenizer's special tokens, as vLLM does for string prompts.
- `generate` returns one list per prompt, in prompt order, holding `sampling.n` completions.
- A completion ends in one of three ways. "eos": the model emitted an end-of-sequence token (the tokenizer's
  or the generation config's); that token is the last of `completion_ids` (the policy must learn to stop)
  and is left out of `text`. "stop": a stop string appeared; `text` ends with the stop string (so a closing
  `</answer>` stays for the grader) and `completion_ids` end with the token that completed it. "length":
  `max_new_tokens` ran out. Stop strings are only looked for once `min_new_tokens` tokens exist, as in vLLM.
- `logprobs[i]` is the log-probability of `completion_ids[i]` under the distribution the token was drawn
  from: logits / temperature, then top-k, top-p and min-p truncation, renormalised. With top_k = 0 and top_p = 1 it
  equals `get_response_log_probs(..., temperature=temperature)` on the same tokens (up to float error).
  Greedy decoding (temperature 0) has no sampling distribution: its logprobs are those of the model at
  temperature 1. While `min_new_tokens` forbids EOS, the EOS-masked distribution is the one recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "eos"]
# What every engine sets itself from SamplingConfig's fields: `SamplingConfig.extra` cannot replace them.
ENGINE_SET_KEYS = frozenset(
    "n num_return_sequences seed logprobs stop stop_token_ids include_stop_str_in_output eos_token_id pad_token_id "
    "max_tokens max_new_tokens min_tokens min_new_tokens do_sample num_beams return_dict_in_generate use_cache "
    "temperature top_p top_k min_p repetition_penalty".split()
)


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
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    min_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # One seed per prompt (overrides `seed`): the samples of a prompt then depend only on that prompt's seed,
    # not on which other prompts share the call, so a trainer gets the same rollouts whatever its process layout.
    prompt_seeds: list[int] | None = None
    # More generation arguments, by the engine's own names (GenerationConfig's for hf, SamplingParams' for vLLM),
    # e.g. suppress_tokens; not those in ENGINE_SET_KEYS.
    extra: dict = field(default_factory=dict)

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
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if taken := sorted(ENGINE_SET_KEYS & set(self.extra)):
            raise ValueError(
                f"generation arguments {taken} are set from the sampling fields; set those instead"
            )
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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed style `.module` wrappers (they forward neither `generate` nor the config)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def eos_token_ids(tokenizer, source: torch.nn.Module | str | list[int] | None = None) -> list[int]:
    """The tokenizer's EOS plus the generation config's, read from a model or a model folder (`source`), or
    given as a list (a server reports its own)."""
    gen = None
    if isinstance(source, torch.nn.Module):
        gen = getattr(unwrap(source), "generation_config", None)
    elif isinstance(source, str):
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):  # a folder without generation_config.json
            pass
    gen_eos = source if isinstance(source, list) else getattr(gen, "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    eos -= {None}
    if not eos:
        raise ValueError("the tokenizer and the model's generation config define no EOS token")
    return sorted(eos)


def _earliest_stop_end(text: str, stop: list[str], after: int) -> int | None:
    """End of the first stop-string occurrence in `text` that ends beyond character `after`."""
    ends = []
    for s in stop:
        i = text.find(s, max(0, after - len(s) + 1))
        if i >= 0:
            ends.append(i + len(s))
    return min(ends) if ends else None


def find_stop(ids: list[int], stop: list[str], min_new_tokens: int, decode) -> tuple[int, str] | None:
    """The shortest prefix `ids[:k]` (k >= max(min_new_tokens, 1)) whose text contains a stop string, with that
    text cut right after the stop string; None when there is none.

    A stop string lying wholly inside the first `min_new_tokens - 1` tokens does not count. Binary search over
    k: decoded prefixes only grow, so "contains a stop string" is monotone in k.
    """
    first = max(min_new_tokens, 1)
    if not stop or first > len(ids):
        return None
    after = len(decode(ids[: first - 1])) if first > 1 else 0
    if _earliest_stop_end(decode(ids), stop, after) is None:
        return None
    lo, hi = first, len(ids)  # invariant: prefix hi contains a stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if _earliest_stop_end(decode(ids[:mid]), stop, after) is not None:
            hi = mid
        else:
            lo = mid + 1
    text = decode(ids[:hi])
    return hi, text[: _earliest_stop_end(text, stop, after)]


class EngineBase:
    """What every engine does the same way around its generator: tokenize and check the prompts, cut and
    decode each generated row by the rule above. `source` (a model or model folder, or the ids themselves) adds
    its generation config's EOS ids to the tokenizer's; subclasses set `max_model_len` (None: no limit)."""

    max_model_len: int | None = None
    max_model_len_name = "engine's max_model_len"

    def __init__(self, tokenizer, source: torch.nn.Module | str | list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids: list[int] = eos_token_ids(tokenizer, source)
        self._closed = False

    def close(self) -> None:
        self._closed = True

    def _prompt_ids(self, prompts: list[str], sampling: SamplingConfig) -> list[list[int]]:
        """The prompts tokenized; an empty prompt or one that cannot fit `max_new_tokens` more is refused before
        generating: silently cutting the start of a math problem would make its evaluation meaningless."""
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} was closed")
        prompt_ids = [
            list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        ]
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompt_ids):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {len(prompt_ids)} prompts")
        limit, max_new_tokens = self.max_model_len, sampling.max_new_tokens
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise ValueError(f"prompt {i} is empty after tokenization")
            if limit is not None and len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                    f"{self.max_model_len_name}={limit}: shorten the prompt or lower max_new_tokens"
                )
        return prompt_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _rollout(self, index: int, prompt_ids: list[int], ids: list[int], logprobs, sampling) -> Rollout:
        """Cut generated row `ids` (and its log-probs) at its end, as the module docstring says."""
        eos = set(self.eos_token_ids)
        eos_at = next((i for i, t in enumerate(ids) if t in eos), None)
        body = ids if eos_at is None else ids[:eos_at]
        stop = find_stop(body, sampling.stop, sampling.min_new_tokens, self._decode)
        if stop is not None:
            (k, text), reason = stop, "stop"
            completion = body[:k]
        elif eos_at is not None:
            completion, text, reason = ids[: eos_at + 1], self._decode(body), "eos"
        else:
            completion, text, reason = ids, self._decode(ids), "length"
        logprobs = None if logprobs is None else logprobs[: len(completion)]
        return Rollout(index, list(prompt_ids), completion, text, logprobs, reason)
