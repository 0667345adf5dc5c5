"""SFTTrainer: supervised fine-tuning on TRL's SFT dataset formats, on top of `transformers.Trainer`.

Choices:
- The constructor is TRL 1.16's (``hf_align.trainers.base.DatasetTrainer``); rows in
  any TRL SFT format are prepared by ``hf_align.formats.prepare_sft_dataset`` (tokenization, loss masks,
  truncation, best-fit-decreasing packing) and batched by ``formats.SFTCollator``.
- The model runs on the whole row and position t predicts ``labels[t + 1]``; per-token log-probs come from
  ``hf_align.logprobs.get_response_log_probs`` (chunked; never a full-vocabulary log-softmax).
- ``token_mean`` normalization divides by the number of trained tokens in the whole optimizer step, counted
  over every accumulation micro-batch and summed across processes before the first backward. Each process
  multiplies its loss by the number of processes because DDP averages gradients. Result: the gradient of a
  step is the same for 8x1, 4x2 or 1x8 micro-batch x accumulation splits and for 1 or 2 processes (with one
  process and no accumulation this is TRL's loss).
- ``sequence_sum`` is the course assignment's per-sequence normalization, exact under any split when micro-batches have
  equal sizes.
- With packing or ``padding_free`` a batch is one flattened row whose positions restart per sample (plus the
  flash-attention boundaries); transformers turns that into a block-diagonal mask, so samples never attend to
  each other.
"""

from __future__ import annotations

import torch

from hf_align.config import SFTConfig
from hf_align.data import IGNORE_INDEX
from hf_align.formats import SFTCollator, column_names, is_conversational, prepare_sft_dataset
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.sft import sft_loss
from hf_align.trainers.base import DatasetTrainer, global_sum


class SFTTrainer(DatasetTrainer):
    config_class, suffix = SFTConfig, "SFT"

    def __init__(
        self,
        model,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
    ):
        if compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported: subclass SFTTrainer and override compute_loss"
            )
        self.formatting_func = formatting_func
        # the train set's format decides completion_only_loss for every set (TRL: on for prompt-completion rows)
        self._first_row = next(iter(train_dataset)) if train_dataset is not None else {}
        super().__init__(
            model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
            callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics, quantization_config,
            peft_config,
        )  # fmt: skip

    def prepare_dataset(self, dataset, name, args, tokenizer):
        """``formatting_func`` (its text replaces the row, as TRL's text column), then
        ``hf_align.formats.prepare_sft_dataset`` unless ``dataset_kwargs["skip_prepare_dataset"]``."""
        first, formatting_func = self._first_row, self.formatting_func
        if args.assistant_only_loss and not is_conversational(first) and "input_ids" not in first:
            raise ValueError(
                "assistant_only_loss=True needs conversational rows (messages or prompt/completion lists)"
            )
        completion_only = args.completion_only_loss
        if completion_only is None:
            completion_only = "prompt" in first and "completion" in first
        if formatting_func is not None and completion_only:
            raise ValueError(
                "formatting_func makes text rows, so completion_only_loss cannot apply: set it to False"
            )
        if formatting_func is not None:
            to_text = lambda row: {args.dataset_text_field: formatting_func(row)}  # noqa: E731
            if isinstance(dataset, list | tuple):
                dataset = [to_text(row) for row in dataset]
            else:
                dataset = dataset.map(to_text, remove_columns=column_names(dataset))
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            return dataset
        packing = args.packing if name == "train" or args.eval_packing is None else args.eval_packing
        return prepare_sft_dataset(
            dataset, tokenizer, args, packing=packing, completion_only_loss=completion_only, name=name
        )

    def default_collator(self, args, tokenizer):
        return SFTCollator(tokenizer.pad_token_id, args.padding_free or args.packing, args.pad_to_multiple_of)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Trained tokens (shifted labels != -100) in this optimizer step, over all processes."""
        return global_sum(
            self.accelerator, sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in batch_samples), device
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # labels_BT[:, t] is the token predicted at position t; the last position predicts nothing
        labels_BT = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        mask_BT = labels_BT != IGNORE_INDEX
        model_kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels", "attention_mask")}
        log_probs_BT = get_response_log_probs(
            model,
            inputs["input_ids"],
            labels_BT,
            attention_mask=inputs.get("attention_mask"),
            chunk_tokens=self.args.logprob_chunk_tokens,
            logprob_mask=mask_BT,
            **model_kwargs,  # position_ids (and flash-attention boundaries) of a flattened batch
        )["log_probs"]

        training = model.training and num_items_in_batch is not None
        if self.args.loss_normalization == "token_mean":
            loss, metrics = sft_loss(
                log_probs_BT, mask_BT, "token_mean", num_tokens=num_items_in_batch if training else None
            )
            if training:
                loss = loss * self.accelerator.num_processes
        else:
            steps = self.current_gradient_accumulation_steps if training else 1
            loss, metrics = sft_loss(
                log_probs_BT, mask_BT, "sequence_sum", normalize_constant=self.args.normalize_constant
            )
            loss = loss / steps
        self.record(metrics, model.training)
        return (loss, {"log_probs": log_probs_BT}) if return_outputs else loss
