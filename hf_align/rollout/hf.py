"""`HFEngine`: rollouts with `transformers`' `model.generate`, on the policy itself (no second copy).

Choices (the shared contract and the completion-cutting rule are `rollout/base.py`'s):
- Prompts are left-padded by hand into micro-batches of at most `batch_size` sequences (prompts x n); the
  tokenizer is never mutated. Prompt length is checked against `max_position_embeddings`.
- Sampling log-probs are recorded on the fly by a logits processor placed after temperature, top-k and top-p
  (which we pass ourselves, in that order, with `generate`'s own warpers switched off), so it sees exactly the
  distribution the token is drawn from. It keeps one (rows, V) step, not the (steps, rows, V) stack that
  `output_scores=True` would hold (40 GB for 128 rows x 512 tokens at Qwen's vocabulary). Penalties and
  n-gram blocking from the model's generation config are switched off: the sampler is the model at the given
  temperature (and `repetition_penalty`), which is what the trainers' log-prob recomputation assumes.
- When `min_new_tokens` is 0, stop strings also go to `generate` as a `StopStringCriteria`, so a finished
  sequence stops consuming compute; the decoded search after generation stays the source of truth.
- A seed reseeds torch inside `torch.random.fork_rng`: the same call gives the same samples and the caller's
  random stream (dropout, data order) is untouched. Results depend on `batch_size`.
- The model runs under `torch.no_grad()` in eval mode; every submodule's train/eval flag is restored after.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_align.rollout.base import EngineBase, Rollout, SamplingConfig, prompt_seed, unwrap


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


# generate() applies these warpers after our log-prob recorder: the recorded log-probs would not be the sampler's.
UNRECORDED_WARPERS = frozenset({"typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"})


def check_generation_kwargs(extra: dict) -> None:
    """Refuse extra generation arguments that GenerationConfig does not know or that our recorder cannot see."""
    known = GenerationConfig().to_dict()
    if unknown := sorted(k for k in extra if k not in known or k in UNRECORDED_WARPERS):
        raise ValueError(
            f"generation_kwargs {unknown}: not GenerationConfig fields that model.generate sampling supports here "
            f"({sorted(UNRECORDED_WARPERS)} are applied after the sampling log-probs are recorded)"
        )


class HFEngine(EngineBase):
    """A `RolloutEngine` over `model.generate`.

    `batch_size` is the number of sequences (prompts x `sampling.n`) generated together; a prompt's n samples
    always share a micro-batch, so at least one prompt is generated at a time.
    """

    max_model_len_name = "model's max_position_embeddings"

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        super().__init__(tokenizer, model)
        self.model = model
        self.batch_size = batch_size
        self.max_model_len = getattr(unwrap(model).config.get_text_config(), "max_position_embeddings", None)
        self.pad_token_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        prompt_ids = self._prompt_ids(prompts, sampling)
        model = unwrap(self.model)
        device = next(model.parameters()).device
        per_prompt = sampling.prompt_seeds is not None
        # generate's sampler draws from one global RNG for the whole batch: per-prompt seeds mean one prompt
        # (its n samples) per call.
        per_batch = 1 if per_prompt else max(1, self.batch_size // sampling.n)
        seeded = per_prompt or sampling.seed is not None
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seeded)
        results: list[list[Rollout]] = []
        with rng, torch.no_grad(), _eval_mode(self.model):
            for start in range(0, len(prompt_ids), per_batch):
                if per_prompt or (seeded and start == 0):  # each prompt's seed, or the call's seed once
                    torch.manual_seed(prompt_seed(sampling, start))
                batch = prompt_ids[start : start + per_batch]
                results.extend(self._generate_batch(model, device, batch, start, sampling))
        return results

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Generate with `model`'s weights from now on: a no-op when `model` is the engine's own model (the usual
        case: the engine generates with the live policy); another model's state dict is copied in otherwise."""
        if model is self.model or unwrap(model) is unwrap(self.model):
            return
        try:
            unwrap(self.model).load_state_dict(unwrap(model).state_dict())
        except RuntimeError as e:
            raise RuntimeError(
                "sync_weights: the model's state dict does not match the engine's (a PEFT model must be "
                "merged first, or given to HFEngine itself)"
            ) from e

    def close(self) -> None:
        super().close()
        self._stop_criteria.clear()

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
        check_generation_kwargs(sampling.extra)
        return GenerationConfig(**kwargs, **sampling.extra)

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
            if sampling.min_p > 0.0:  # after top-p, as generate() orders them (vLLM: before top-k / top-p)
                processors.append(MinPLogitsWarper(sampling.min_p))
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
        self, model, device, batch: list[list[int]], offset: int, sampling
    ) -> list[list[Rollout]]:
        """Rollouts of prompts `offset`, `offset + 1`, ... (their ids: `batch`) from one `generate` call."""
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
            # generate would keep sharded processes in lockstep, but they call it different numbers of times;
            # under FSDP2 / ZeRO-3 the trainer gathers the weights around rollouts instead (trainers/sharding.py)
            synced_gpus=False,
        )
        new_tokens_RT = out.sequences[:, width:]  # (len(batch) * n, T_new), rows grouped by prompt
        log_probs_RT = recorder.finish(new_tokens_RT).cpu().tolist()
        new_tokens = new_tokens_RT.cpu().tolist()
        n = sampling.n
        return [
            [
                self._rollout(offset + b, ids, new_tokens[r], log_probs_RT[r], sampling)
                for r in range(b * n, b * n + n)
            ]
            for b, ids in enumerate(batch)
        ]
