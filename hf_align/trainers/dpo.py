"""DPOTrainer: direct preference optimisation on top of `transformers.Trainer`, plus preference-pair data.

Choices:
- Rows are ``{prompt, chosen, rejected}`` strings, or conversations: ``chosen`` / ``rejected`` message lists that
  share every turn but the last assistant one (``trl-lib/ultrafeedback_binarized``), or a ``prompt`` message
  list with assistant continuations. Prompt and answer are tokenized separately, so both answers get the same
  prompt ids. Plain answers end in EOS; chat answers end as the chat template ends an assistant turn.
- Truncation (counted and logged): the prompt keeps its LAST ``max_prompt_length`` tokens (the question is
  usually at the end), then each answer keeps its FIRST ``max_length - len(prompt)`` tokens.
- One policy forward per micro-batch over the 2B rows ``[chosen; rejected]`` (``hf_align.losses.dpo``); the
  summed response log-probs come from ``hf_align.logprobs.get_response_log_probs``.
- The reference is a frozen copy (``copy``), the policy itself with its LoRA adapters disabled
  (``adapter_disabled``: no second model in memory), or cached per example before training (``precomputed``:
  computed with ``ref_model`` if given, else the untrained policy, adapters off when it has them).
- DPO is a mean over pairs. The micro-batch loss ``mean_i l_i`` is rescaled to ``sum_i l_i / N`` with N the
  pairs of the whole optimizer step over every accumulation micro-batch and process, times the number of
  processes (DDP averages gradients): the gradient is the same for 8x1, 4x2 or 1x8 splits.
- Dropout is off by default, so policy and reference log-probs of the same weights agree exactly.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from hf_align.config import DPOConfig
from hf_align.data import (
    DataError,
    OnError,
    _load_rows,
    _require_str,
    build_shifted_sequences,
    format_prompt,
    resolve_prompt_template,
)
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.dpo import dpo_loss, sequence_logps, split_concatenated
from hf_align.trainers.metrics import global_sum, merge_metrics
from hf_align.trainers.safety import SafeTrainingMixin

logger = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def _messages(value: Any, field: str, loc: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{loc}: field {field!r} must be a string or a non-empty list of {{role, content}}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{loc}: field '{field}[{i}]' must be an object, got {type(message).__name__}")
        where = f"{loc}: {field}[{i}]"
        content = _require_str(message, "content", where, allow_empty=True)
        out.append({"role": _require_str(message, "role", where), "content": content})
    return out


def load_preference_rows(
    source: str | Path,
    split: str = "train",
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    on_error: OnError = "raise",
    max_rows: int | None = None,
) -> list[dict]:
    """Rows ``{"prompt", "chosen", "rejected"}``: three strings, or three message lists (prompt turns, then the
    chosen / rejected continuation). Bad rows raise ``DataError`` naming file:line and field (or are skipped)."""

    def convert(row: dict, loc: str) -> dict:
        chosen, rejected = row.get(chosen_field), row.get(rejected_field)
        if isinstance(chosen, str) or isinstance(rejected, str):
            prompt = _require_str(row, prompt_field, loc, allow_empty=True)
            return {
                "prompt": prompt,
                "chosen": _require_str(row, chosen_field, loc),
                "rejected": _require_str(row, rejected_field, loc),
            }
        if chosen is None or rejected is None:
            missing = chosen_field if chosen is None else rejected_field
            raise DataError(f"{loc}: field {missing!r} is missing")
        chosen = _messages(chosen, chosen_field, loc)
        rejected = _messages(rejected, rejected_field, loc)
        if row.get(prompt_field) is not None:
            prompt = _messages(row[prompt_field], prompt_field, loc)
        else:  # full conversations: the shared turns are the prompt
            if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
                raise DataError(
                    f"{loc}: {chosen_field!r} and {rejected_field!r} must share the turns before their last one "
                    f"(the prompt), or give a {prompt_field!r} field"
                )
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        for field, turns in ((chosen_field, chosen), (rejected_field, rejected)):
            if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
                raise DataError(f"{loc}: field {field!r} must end with a non-empty assistant message")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return _load_rows(source, split, convert, on_error, max_rows)


def _chat_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], list[int]]:
    prompt_ids = list(
        tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"]
    )
    full_ids = list(tokenizer.apply_chat_template(prompt + answer, tokenize=True)["input_ids"])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template renders the prompt differently once an answer follows it")
    return prompt_ids, full_ids[len(prompt_ids) :]


def _pair_ids(row: dict, tokenizer, template: str | None, use_chat_template: bool) -> list[list[int]]:
    """[prompt_ids, chosen_ids, rejected_ids] of one preference row, untruncated."""
    prompt = row["prompt"]
    if isinstance(prompt, str) and template is not None:
        prompt = format_prompt(template, prompt)
    if isinstance(prompt, list) or use_chat_template:
        prompt_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        out = []
        for answer in (row["chosen"], row["rejected"]):
            turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
            prompt_ids, answer_ids = _chat_ids(tokenizer, prompt_msgs, turns)
            out.append(answer_ids)
        return [prompt_ids, *out]
    suffix = template.partition("{response}")[2] if template is not None else ""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers = [
        tokenizer(a + suffix, add_special_tokens=False)["input_ids"] + eos
        for a in (row["chosen"], row["rejected"])
    ]
    return [tokenizer(prompt, add_special_tokens=False)["input_ids"], *answers]


def tokenize_preference_dataset(
    rows: Sequence[dict],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    prompt_template: str | None = None,
    use_chat_template: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Examples ``{prompt_ids, chosen_ids, rejected_ids}`` and counts of truncated prompts / answers, logged."""
    template = resolve_prompt_template(prompt_template) if prompt_template else None
    examples, stats = [], {"prompts_truncated": 0, "answers_truncated": 0}
    for row in rows:
        prompt_ids, chosen_ids, rejected_ids = _pair_ids(row, tokenizer, template, use_chat_template)
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]  # keep the end: the question is usually last
            stats["prompts_truncated"] += 1
        budget = max_length - len(prompt_ids)
        stats["answers_truncated"] += (len(chosen_ids) > budget) + (len(rejected_ids) > budget)
        examples.append(
            {
                "prompt_ids": prompt_ids,
                "chosen_ids": chosen_ids[:budget],
                "rejected_ids": rejected_ids[:budget],
            }
        )
    log = logger.warning if any(stats.values()) else logger.info
    log(
        "preference tokenization: %d pairs; %d prompts cut to their last %d tokens; %d answers cut to fit "
        "max_length=%d",
        len(examples),
        stats["prompts_truncated"],
        max_prompt_length,
        stats["answers_truncated"],
        max_length,
    )
    return examples, stats


def build_preference_dataset(
    source: str, split: str, cfg, tokenizer, on_error: str, max_rows: int | None
) -> list[dict]:
    """Preference rows from a jsonl path or Hub id, tokenized and truncated as ``cfg`` (DPO / reward config) says."""
    rows = load_preference_rows(
        source,
        split=split,
        prompt_field=cfg.prompt_field,
        chosen_field=cfg.chosen_field,
        rejected_field=cfg.rejected_field,
        on_error=on_error,
        max_rows=max_rows,
    )
    examples, stats = tokenize_preference_dataset(
        rows, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.prompt_template, cfg.use_chat_template
    )
    logger.info("%s: %d pairs (%s)", source, len(examples), stats)
    return examples


@dataclass
class PreferenceCollator:
    """B pairs -> 2B shifted rows ``[chosen; rejected]`` (``build_shifted_sequences``), plus cached reference
    log-probs (B,) when the examples carry them."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [f["prompt_ids"] for f in features]
        answers = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        batch = build_shifted_sequences(prompts + prompts, answers, self.pad_token_id)  # each (2B, T)
        if all(key in features[0] for key in REF_KEYS):
            for key in REF_KEYS:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)  # (B,)
        return batch


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class DPOTrainer(SafeTrainingMixin, Trainer):
    # compute_loss already divides by the optimizer step's pair count: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: DPOConfig,
        ref_model: torch.nn.Module | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        peft_config=None,
        **kwargs,
    ):
        if args.ref_mode == "copy" and ref_model is None:
            from hf_align.modeling import create_reference_model

            ref_model = create_reference_model(model)  # before LoRA: the copy needs no adapters
        if peft_config is not None:
            from hf_align.modeling import wrap_lora

            model = wrap_lora(model, peft_config)
        if args.ref_mode == "adapter_disabled" and not hasattr(model, "disable_adapter"):
            raise ValueError("ref_mode='adapter_disabled' needs a LoRA model: set use_peft (or peft_config)")
        if args.ref_mode == "adapter_disabled" and ref_model is not None:
            raise ValueError("ref_mode='adapter_disabled' uses the policy itself: do not pass ref_model")
        for m in (model, ref_model):
            if args.disable_dropout and m is not None:
                _disable_dropout(m)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("DPOTrainer needs processing_class (the tokenizer) or a data_collator")
            data_collator = PreferenceCollator(processing_class.pad_token_id)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self.ref_model = ref_model.to(self.args.device).eval() if ref_model is not None else None
        self._precomputing = False
        if args.ref_mode == "precomputed":
            self.train_dataset = self._precompute_reference(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_reference(v) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._precompute_reference(self.eval_dataset)
            self.ref_model = None  # the cache replaces it
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _pair_logps(self, model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the chosen and the rejected answers, (B,) each, from one 2B forward."""
        logps_BT = get_response_log_probs(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs["attention_mask"],
            chunk_tokens=self.args.logprob_chunk_tokens,
            logprob_mask=inputs["response_mask"],  # the output layer skips prompt and padding positions
            share_prompts=self.args.share_prompt_prefix,  # a pair's prompt goes through the decoder once
        )["log_probs"]
        return split_concatenated(sequence_logps(logps_BT, inputs["response_mask"]))

    @torch.no_grad()
    def _reference_logps(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if all(key in inputs for key in REF_KEYS):
            return inputs[REF_KEYS[0]], inputs[REF_KEYS[1]]
        if self.ref_model is not None:
            return self._pair_logps(self.ref_model, inputs)
        policy = self.accelerator.unwrap_model(self.model)
        if hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                return self._pair_logps(policy, inputs)
        if not self._precomputing:
            raise RuntimeError("no reference log-probs: this batch lacks the precomputed cache")
        return self._pair_logps(policy, inputs)  # before any step the policy is its own reference

    def _precompute_reference(self, dataset):
        if dataset is None:
            return None
        rows = [dict(row) for row in dataset]
        policy = self.accelerator.unwrap_model(self.model)
        was_training, self._precomputing = policy.training, True
        policy.eval()
        size = self.args.precompute_batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            batch = {k: v.to(self.args.device) for k, v in self.data_collator(chunk).items()}
            with self.compute_loss_context_manager():
                chosen_B, rejected_B = self._reference_logps(batch)
            for row, c, r in zip(chunk, chosen_B.tolist(), rejected_B.tolist()):
                row[REF_KEYS[0]], row[REF_KEYS[1]] = c, r
        policy.train(was_training)
        self._precomputing = False
        logger.info("precomputed reference log-probs for %d pairs", len(rows))
        return rows

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Preference pairs in this optimizer step (each batch holds 2B rows), over all processes."""
        return global_sum(self.accelerator, sum(b["input_ids"].shape[0] // 2 for b in batch_samples), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Reference first: its no-grad temporaries are gone before the policy's activations are held.
        ref_chosen_B, ref_rejected_B = self._reference_logps(inputs)
        policy_chosen_B, policy_rejected_B = self._pair_logps(model, inputs)
        chosen_len_B, rejected_len_B = split_concatenated(inputs["response_mask"].sum(-1))
        loss, metrics = dpo_loss(
            policy_chosen_B,
            policy_rejected_B,
            ref_chosen_B,
            ref_rejected_B,
            beta=self.args.beta,
            loss_type=self.args.loss_type,
            label_smoothing=self.args.label_smoothing,
            chosen_lengths_B=chosen_len_B,
            rejected_lengths_B=rejected_len_B,
        )
        if model.training and num_items_in_batch is not None:
            # mean over these B pairs -> their sum / pairs in the whole step; x processes undoes DDP's average
            loss = loss * policy_chosen_B.shape[0] / num_items_in_batch * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.item())
        return (loss, {"chosen_logps": policy_chosen_B}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(merge_metrics(self.accelerator, self._metrics[mode], "eval_" if mode == "eval" else ""))
        super().log(logs, start_time)
