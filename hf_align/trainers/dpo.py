"""DPOTrainer: direct preference optimisation on TRL's preference formats, on top of `transformers.Trainer`.

Choices:
- The constructor is TRL 1.16's. Rows (explicit or implicit prompt, standard or conversational) are tokenized by
  ``hf_align.formats.prepare_preference_dataset`` into ``{prompt_ids, chosen_ids, rejected_ids}``; the collator
  cuts ``prompt + answer`` to ``max_length`` (``truncation_mode``) per row.
- One policy forward per micro-batch over the 2B rows ``[chosen; rejected]`` (``hf_align.losses.dpo``); the
  summed response log-probs come from ``hf_align.logprobs.get_response_log_probs``, with each pair's prompt run
  through the decoder once where that is exact (``share_prompt_prefix``).
- The reference is a frozen copy of the initial model (or ``ref_model``), the policy itself with its LoRA
  adapters disabled (the default under LoRA: no second model in memory), or log-probs computed once before
  training (``precompute_ref_log_probs``); ``sync_ref_model`` moves a copy towards the policy (TR-DPO,
  ``trainers/base.py``).
- ``loss_type`` is a list: the loss is ``sum_k loss_weights[k] * mean_i l_k(i)``. The micro-batch mean is
  rescaled to ``sum_i l_i / N`` with N the pairs of the whole optimizer step over every accumulation micro-batch
  and process, times the number of processes (DDP averages gradients): the gradient is the same for 8x1, 4x2 or
  1x8 splits (with one process and no accumulation this is TRL's loss).
- Dropout is off by default, so policy and reference log-probs of the same weights agree exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from hf_align.config import DPOConfig
from hf_align.data import build_shifted_sequences
from hf_align.formats import prepare_preference_dataset, truncate_pair
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.dpo import dpo_loss, sequence_log_probs, split_concatenated
from hf_align.modeling import create_reference_model, wrap_lora
from hf_align.trainers.base import DatasetTrainer, disable_dropout, global_sum, load_model

logger = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceCollator:
    """B pairs -> 2B shifted rows ``[chosen; rejected]`` (``build_shifted_sequences``), each ``prompt + answer``
    cut to ``max_length``, padded to a multiple of ``pad_to_multiple_of`` (as TRL's collator), plus cached
    reference log-probs (B,) when the examples carry them."""

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pairs = [
            truncate_pair(f["prompt_ids"], f[key], self.max_length, self.truncation_mode)
            for key in ("chosen_ids", "rejected_ids")
            for f in features
        ]
        batch = build_shifted_sequences(
            [p for p, _ in pairs], [a for _, a in pairs], self.pad_token_id
        )  # (2B, T)
        extra = -batch["input_ids"].shape[1] % (self.pad_to_multiple_of or 1)
        if extra:  # (2B, T) -> (2B, T + extra): padding ids, masks off
            fill = {"input_ids": self.pad_token_id, "labels": self.pad_token_id}
            batch = {
                k: torch.cat([v, v.new_full((v.shape[0], extra), fill.get(k, 0))], 1)
                for k, v in batch.items()
            }
        if all(key in features[0] for key in REF_KEYS):
            for key in REF_KEYS:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)  # (B,)
        return batch


class DPOTrainer(DatasetTrainer):
    config_class, suffix = DPOConfig, "DPO"

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        # LoRA is applied by prepare_model, after the reference copy is made (the copy needs no adapters)
        self.ref_model, self._peft_config = ref_model, peft_config
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
            callbacks, optimizers, quantization_config=quantization_config,
        )  # fmt: skip
        self._add_reference_sync()
        self._precomputing = False
        if self.args.precompute_ref_log_probs:
            self.train_dataset = self._precompute_reference(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self._precompute_reference(v) for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self._precompute_reference(self.eval_dataset)
            self.ref_model = None  # the cache replaces it

    def prepare_model(self, model, args: DPOConfig, tokenizer):
        """The LoRA-wrapped policy (when asked); ``self.ref_model`` becomes the reference model (None: the policy
        with adapters disabled, or the precomputed cache)."""
        ref_model, lora = self.ref_model, self._peft_config is not None or hasattr(model, "disable_adapter")
        if args.ref_mode is None:
            args.ref_mode = "adapter_disabled" if lora and ref_model is None else "copy"
        if args.ref_mode == "adapter_disabled" and not lora:
            raise ValueError("ref_mode='adapter_disabled' needs a LoRA model: pass peft_config (or use_peft)")
        if args.ref_mode == "adapter_disabled" and ref_model is not None:
            raise ValueError("ref_mode='adapter_disabled' uses the policy itself: do not pass ref_model")
        if isinstance(ref_model, str):
            ref_model = load_model(ref_model, args)
        if args.ref_mode == "copy" and ref_model is None and not args.precompute_ref_log_probs:
            ref_model = create_reference_model(model)  # before LoRA: the copy needs no adapters
        if self._peft_config is not None:
            model = wrap_lora(model, self._peft_config)
        for m in (model, ref_model):
            if args.disable_dropout and m is not None:
                disable_dropout(m)
        self.ref_model = ref_model
        return model

    def prepare_dataset(self, dataset, name, args, tokenizer):
        return prepare_preference_dataset(dataset, tokenizer, args, name=name)

    def default_collator(self, args, tokenizer):
        return PreferenceCollator(
            tokenizer.pad_token_id, args.max_length, args.truncation_mode, args.pad_to_multiple_of
        )

    def _pair_log_probs(self, model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the chosen and the rejected answers, (B,) each, from one 2B forward."""
        log_probs_BT = get_response_log_probs(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs["attention_mask"],
            chunk_tokens=self.args.logprob_chunk_tokens,
            logprob_mask=inputs["response_mask"],  # the output layer skips prompt and padding positions
            share_prompts=self.args.share_prompt_prefix,  # a pair's prompt goes through the decoder once
        )["log_probs"]
        return split_concatenated(sequence_log_probs(log_probs_BT, inputs["response_mask"]))

    @torch.no_grad()
    def _reference_log_probs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if all(key in inputs for key in REF_KEYS):
            return inputs[REF_KEYS[0]], inputs[REF_KEYS[1]]
        if self.ref_model is not None:  # precomputing: before training, the reference is not sharded yet
            ref = self.ref_model.to(self.args.device).eval() if self._precomputing else self._reference()
            return self._pair_log_probs(ref, inputs)
        policy = self.accelerator.unwrap_model(self.model)
        if hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                return self._pair_log_probs(policy, inputs)
        if not self._precomputing:
            raise RuntimeError("no reference log-probs: this batch lacks the precomputed cache")
        return self._pair_log_probs(policy, inputs)  # before any step the policy is its own reference

    def _precompute_reference(self, dataset):
        """The rows of ``dataset`` with their reference log-probs; each process computes every ``world``-th row
        (on the model before it is wrapped: no collective) and all processes get every row."""
        if dataset is None:
            return None
        from accelerate.utils import gather_object

        acc, rows = self.accelerator, [dict(row) for row in dataset]
        policy = acc.unwrap_model(self.model)
        was_training, self._precomputing = policy.training, True
        policy.eval()
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        mine, values = list(range(acc.process_index, len(rows), acc.num_processes)), []
        for start in range(0, len(mine), size):
            chunk = [rows[i] for i in mine[start : start + size]]
            batch = {k: v.to(self.args.device) for k, v in self.data_collator(chunk).items()}
            with self.compute_loss_context_manager():
                chosen_B, rejected_B = self._reference_log_probs(batch)
            values += zip(mine[start : start + size], chosen_B.tolist(), rejected_B.tolist())
        for i, c, r in gather_object(values) if acc.num_processes > 1 else values:
            rows[i][REF_KEYS[0]], rows[i][REF_KEYS[1]] = c, r
        policy.train(was_training)
        self._precomputing = False
        logger.info("precomputed reference log-probs for %d pairs (%d here)", len(rows), len(mine))
        return rows

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Preference pairs in this optimizer step (each batch holds 2B rows), over all processes."""
        return global_sum(self.accelerator, sum(b["input_ids"].shape[0] // 2 for b in batch_samples), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Reference first: its no-grad temporaries are gone before the policy's activations are held.
        ref_chosen_B, ref_rejected_B = self._reference_log_probs(inputs)
        policy_chosen_B, policy_rejected_B = self._pair_log_probs(model, inputs)
        chosen_len_B, rejected_len_B = split_concatenated(inputs["response_mask"].sum(-1))
        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        loss, metrics = 0.0, None
        for loss_type, weight in zip(self.args.loss_type, weights):
            term, term_metrics = dpo_loss(
                policy_chosen_B,
                policy_rejected_B,
                ref_chosen_B,
                ref_rejected_B,
                beta=self.args.beta,
                loss_type=loss_type,
                label_smoothing=self.args.label_smoothing if loss_type in ("sigmoid", "robust") else 0.0,
                chosen_lengths_B=chosen_len_B,
                rejected_lengths_B=rejected_len_B,
            )
            loss, metrics = loss + weight * term, metrics or term_metrics
        if model.training and num_items_in_batch is not None:
            # mean over these B pairs -> their sum / pairs in the whole step; x processes undoes DDP's average
            loss = loss * policy_chosen_B.shape[0] / num_items_in_batch * self.accelerator.num_processes
        self.record(metrics, model.training)
        return (loss, {"chosen_logps": policy_chosen_B}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
