"""SFTTrainer: completion-only supervised fine-tuning on top of `transformers.Trainer`.

Choices:
- Inputs are tokenized rows ``{"input_ids", "labels"}`` with -100 on prompt tokens (``hf_align.data``);
  the trainer shifts them (position t predicts labels[t + 1]) and computes per-token log-probs with
  ``hf_align.logprobs.get_response_log_probs`` (chunked; never a full-vocabulary log-softmax).
- ``token_mean`` normalization divides by the number of response tokens in the whole optimizer step, counted
  over every accumulation micro-batch and summed across processes before the first backward. Each process
  multiplies its loss by the number of processes because DDP averages gradients. Result: the gradient of a
  step is the same for 8x1, 4x2 or 1x8 micro-batch x accumulation splits and for 1 or 2 processes.
- ``sequence_sum`` is the seed's per-sequence normalization; it is exact under any split when micro-batches
  have equal sizes (the usual case: it averages over local sequences, divides by accumulation steps, and
  DDP's gradient average handles processes).
- Packing concatenates samples into one row with ``position_ids`` restarting per sample; transformers builds
  a block-diagonal causal mask from those, so samples never attend to each other.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import Trainer

from hf_align.config import SFTConfig
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.sft import sft_loss
from hf_align.trainers.metrics import global_sum, merge_metrics
from hf_align.trainers.safety import SafeTrainingMixin


class SFTTrainer(SafeTrainingMixin, Trainer):
    # compute_loss already normalizes by the optimizer step's token count: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: SFTConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        peft_config=None,
        **kwargs,
    ):
        if peft_config is not None:
            from hf_align.modeling import wrap_lora

            model = wrap_lora(model, peft_config)
        if data_collator is None:
            from hf_align.data import PackedCollator, SFTCollator

            if processing_class is None:
                raise ValueError("SFTTrainer needs processing_class (the tokenizer) or a data_collator")
            pad_id = processing_class.pad_token_id
            data_collator = PackedCollator(pad_id) if args.packing else SFTCollator(pad_id)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Response tokens (shifted labels != -100) in this optimizer step, over all processes."""
        return global_sum(
            self.accelerator, sum((b["labels"][:, 1:] != -100).sum() for b in batch_samples), device
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids = inputs["input_ids"][:, :-1]
        labels_BT = inputs["labels"][:, 1:]
        mask_BT = labels_BT != -100
        model_kwargs = {}
        if "position_ids" in inputs:
            model_kwargs["position_ids"] = inputs["position_ids"][:, :-1]
        attention_mask = inputs["attention_mask"][:, :-1] if "attention_mask" in inputs else None
        logps_BT = get_response_log_probs(
            model,
            input_ids,
            labels_BT,
            attention_mask=attention_mask,
            chunk_tokens=self.args.logprob_chunk_tokens,
            **model_kwargs,
        )["log_probs"]

        training = model.training and num_items_in_batch is not None
        if self.args.loss_normalization == "token_mean":
            loss, metrics = sft_loss(
                logps_BT, mask_BT, "token_mean", num_tokens=num_items_in_batch if training else None
            )
            if training:
                loss = loss * self.accelerator.num_processes
        else:
            steps = self.current_gradient_accumulation_steps if training else 1
            loss, metrics = sft_loss(
                logps_BT, mask_BT, "sequence_sum", normalize_constant=self.args.normalize_constant
            )
            loss = loss / steps

        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.item())
        return (loss, {"log_probs": logps_BT}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(merge_metrics(self.accelerator, self._metrics[mode], "eval_" if mode == "eval" else ""))
        super().log(logs, start_time)
