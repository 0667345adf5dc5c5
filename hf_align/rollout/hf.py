"""`HFEngine`: rollouts with `transformers`' `model.generate`, on the policy itself (no second copy).

Choices:
- Prompts are tokenized without padding, checked against the context window, then left-padded by hand into
  micro-batches of at most `batch_size` sequences (prompts x n). The tokenizer is never mutated, so its
  `padding_side` needs no restoring.
- A prompt whose length plus `max_new_tokens` exceeds the model's `max_position_embeddings` is a ValueError
  naming the prompt's index, raised before anything is generated: silently cutting the start of a math
  problem would make its evaluation meaningless.
- Sampling log-probs are recorded on the fly by a logits processor placed after temperature, top-k and top-p
  (which we pass ourselves, in that order, with `generate`'s own warpers switched off), so it sees exactly the
  distribution the token is drawn from. It keeps one (rows, V) step, not the (steps, rows, V) stack that
  `output_scores=True` would hold (40 GB for 128 rows x 512 tokens at Qwen's vocabulary).
  Repetition penalties and n-gram blocking from the model's generation config are switched off so that the
  sampler is the model at the given temperature, which is what the trainers' log-prob recomputation assumes.
- Stop strings are found by decoding, after generation (the rule in `rollout/base.py`). When
  `min_new_tokens` is 0 they are also given to `generate` as a `StopStringCriteria`, so a finished sequence
  stops consuming compute; the decoded search stays the single source of truth for where it ends.
- A `seed` reseeds torch inside `torch.random.fork_rng`: the same call gives the same samples, and the
  caller's random stream (dropout, data order) is left untouched. Results depend on `batch_size`.
- The model runs under `torch.no_grad()` in eval mode; every submodule's train/eval flag is restored after.
- `sync_weights(model)` is a no-op when `model` is the engine's own model object (the usual case: the engine
  generates with the live policy); another model's state dict is copied in otherwise.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_align.rollout.base import FinishReason, Rollout, SamplingConfig, check_prompt_lengths, prompt_seed

logger = logging.getLogger(__name__)


class _SampledLogprobRecorder(LogitsProcessor):
    """The last logits processor: remembers log_softmax of the final scores of step t and, at step t + 1
    (or in `finish`), gathers the log-prob of the token that was drawn from them."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.last_logp_RV: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last_logp_RV is not None:
            self.steps.append(self.last_logp_RV.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last_logp_RV = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens_RT: torch.Tensor) -> torch.Tensor:
        """Log-probs (rows, T_new) of the generated tokens."""
        num_new = new_tokens_RT.shape[1]
        if len(self.steps) < num_new and self.last_logp_RV is not None:
            self.steps.append(self.last_logp_RV.gather(-1, new_tokens_RT[:, -1:]).squeeze(-1))
        self.last_logp_RV = None
        if num_new == 0:
            return new_tokens_RT.new_zeros(new_tokens_RT.shape, dtype=torch.float32)
        return torch.stack(self.steps[:num_new], dim=1)  # (rows, T_new)


class _CompletionStopStrings(StoppingCriteria):
    """`StopStringCriteria` over the generated tokens only: on the whole row it would also match a stop string
    that begins inside the prompt, and stop a sequence whose completion holds no stop string."""

    def __init__(self, inner: StopStringCriteria, prompt_width: int) -> None:
        self.inner = inner
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.inner(input_ids[:, self.prompt_width :], scores, **kwargs)


@contextmanager
def _eval_mode(model: torch.nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed style `.module` wrappers (they do not forward `generate`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


class HFEngine:
    """A `RolloutEngine` over `model.generate`.

    `batch_size` is the number of sequences (prompts x `sampling.n`) generated together; a prompt's n samples
    always share a micro-batch, so at least one prompt is generated at a time.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}
        self._closed = False
        gen_eos = getattr(getattr(_unwrap(model), "generation_config", None), "eos_token_id", None)
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        eos |= set(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos]) - {None}
        if not eos:
            raise ValueError("the tokenizer and the model's generation config define no EOS token")
        self.eos_token_ids: list[int] = sorted(eos)
        self.pad_token_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        if self._closed:
            raise RuntimeError("this HFEngine was closed")
        prompt_ids = [
            list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        ]
        self._check_lengths(prompt_ids, sampling.max_new_tokens)
        per_batch = max(1, self.batch_size // sampling.n)
        results: list[list[Rollout]] = []
        model = _unwrap(self.model)
        device = next(model.parameters()).device
        seeded = sampling.seed is not None or sampling.prompt_seeds is not None
        rng = (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            if seeded
            else nullcontext()
        )
        if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompt_ids):
            raise ValueError(f"{len(sampling.prompt_seeds)} prompt_seeds for {len(prompt_ids)} prompts")
        with rng, torch.no_grad(), _eval_mode(self.model):
            if sampling.prompt_seeds is not None:
                # generate's sampler draws from one global RNG for the whole batch: per-prompt seeds mean one
                # prompt (its n samples) per call.
                for i, ids in enumerate(prompt_ids):
                    torch.manual_seed(prompt_seed(sampling, i))
                    results.extend(self._generate_batch(model, device, [ids], i, sampling))
                return results
            if seeded:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(prompt_ids), per_batch):
                batch = prompt_ids[start : start + per_batch]
                results.extend(self._generate_batch(model, device, batch, start, sampling))
        return results

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Generate with `model`'s weights from now on. No-op when `model` is the engine's own model."""
        if model is self.model or _unwrap(model) is _unwrap(self.model):
            return
        try:
            _unwrap(self.model).load_state_dict(_unwrap(model).state_dict())
        except RuntimeError as e:
            raise RuntimeError(
                "sync_weights: the model's state dict does not match the engine's (a PEFT model must be "
                "merged first, or given to HFEngine itself)"
            ) from e

    def close(self) -> None:
        self._closed = True
        self._stop_criteria.clear()

    # ------------------------------------------------------------------ internals

    def _check_lengths(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        config = _unwrap(self.model).config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        check_prompt_lengths(prompt_ids, max_new_tokens, limit, "model's max_position_embeddings")

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        kwargs = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=sampling.min_new_tokens,
            num_return_sequences=sampling.n,
            do_sample=not sampling.greedy,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            use_cache=True,
            num_beams=1,
            # The sampler must be the model at `temperature`: no penalties from the model's generation config.
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            renormalize_logits=False,
        )
        if not sampling.greedy:
            # generate()'s own warpers would run after our recorder: switch them off, we pass our own.
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)
            kwargs.update(epsilon_cutoff=0.0, eta_cutoff=0.0)
        return GenerationConfig(**kwargs)

    def _processors(self, sampling: SamplingConfig, recorder: _SampledLogprobRecorder) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if sampling.repetition_penalty != 1.0:  # before the warpers, as generate() orders them
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if not sampling.greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(recorder)
        return processors

    def _stopping_criteria(self, sampling: SamplingConfig, prompt_width: int) -> StoppingCriteriaList | None:
        if not sampling.stop or sampling.min_new_tokens > 0:
            return None
        key = tuple(sampling.stop)
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(tokenizer=self.tokenizer, stop_strings=list(key))
        return StoppingCriteriaList([_CompletionStopStrings(self._stop_criteria[key], prompt_width)])

    def _generate_batch(
        self,
        model: torch.nn.Module,
        device: torch.device,
        batch: list[list[int]],
        offset: int,
        sampling: SamplingConfig,
    ) -> list[list[Rollout]]:
        width = max(len(ids) for ids in batch)
        input_ids_BP = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask_BP = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding: the last prompt token sits at column width - 1
            input_ids_BP[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask_BP[row, width - len(ids) :] = 1
        recorder = _SampledLogprobRecorder()
        out = model.generate(
            input_ids=input_ids_BP.to(device),
            attention_mask=attention_mask_BP.to(device),
            generation_config=self._generation_config(sampling),
            logits_processor=self._processors(sampling, recorder),
            stopping_criteria=self._stopping_criteria(sampling, width),
        )
        new_tokens_RT = out.sequences[:, width:]  # (len(batch) * n, T_new), rows grouped by prompt
        logps_RT = recorder.finish(new_tokens_RT).cpu().tolist()
        new_tokens = new_tokens_RT.cpu().tolist()
        rollouts: list[list[Rollout]] = []
        for b, ids in enumerate(batch):
            group = []
            for s in range(sampling.n):
                r = b * sampling.n + s
                completion, text, reason = self._finish(new_tokens[r], sampling)
                group.append(
                    Rollout(
                        prompt_index=offset + b,
                        prompt_ids=list(ids),
                        completion_ids=completion,
                        text=text,
                        logprobs=logps_RT[r][: len(completion)],
                        finish_reason=reason,
                    )
                )
            rollouts.append(group)
        return rollouts

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _finish(self, ids: list[int], sampling: SamplingConfig) -> tuple[list[int], str, FinishReason]:
        """Cut one generated row at its end: (completion_ids, text, finish_reason)."""
        eos = set(self.eos_token_ids)
        eos_at = next((i for i, t in enumerate(ids) if t in eos), None)
        body = ids if eos_at is None else ids[:eos_at]
        stop = find_stop(body, sampling.stop, sampling.min_new_tokens, self._decode)
        if stop is not None:
            k, text = stop
            return body[:k], text, "stop"
        if eos_at is not None:
            return ids[: eos_at + 1], self._decode(body), "eos"
        return ids, self._decode(ids), "length"


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
    if not stop or not ids:
        return None
    first = max(min_new_tokens, 1)
    if first > len(ids):
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
