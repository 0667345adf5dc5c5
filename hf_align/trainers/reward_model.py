"""RewardTrainer: a Bradley-Terry reward model on TRL's preference formats, on top of `transformers.Trainer`.

Choices:
- The constructor is TRL 1.16's: a model given by name is loaded as ``AutoModelForSequenceClassification`` with
  ``num_labels=1`` (a fresh score head, seeded with ``args.seed``); transformers reads its score at the last
  non-padding token of each row, so ``model.config.pad_token_id`` is set from the tokenizer.
- Rows (explicit or implicit prompt, standard or conversational) become ``prompt + chosen`` and ``prompt +
  rejected``, each tokenized whole by ``hf_align.formats.prepare_preference_dataset``; plain answers end in EOS,
  and pairs with an answer longer than ``max_length`` are dropped (counted, logged), as in TRL. A ``margin``
  column is honoured.
- Each micro-batch is ONE forward over the 2B rows ``[prompt + chosen; prompt + rejected]``. The loss is
  ``hf_align.losses.reward_model.bradley_terry_loss`` (plus reward centring when
  ``center_rewards_coefficient`` is set), a mean over pairs made exact under any accumulation / process split as
  in the DPO trainer.
- ``evaluate`` reports held-out pair accuracy as ``eval_accuracy`` (fraction of pairs with r_chosen >
  r_rejected, averaged over eval batches as TRL does; ``pair_accuracy`` as ``compute_metrics`` gives the exact
  fraction over all pairs); every metric is logged as ``<name>`` in training and ``eval_<name>`` in evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, EvalPrediction, Trainer

from hf_align.config import RewardConfig
from hf_align.formats import pad_right, prepare_preference_dataset
from hf_align.losses.dpo import split_concatenated
from hf_align.losses.reward_model import bradley_terry_loss
from hf_align.trainers.base import MetricsMixin, load_model, prepare_datasets, prepare_trainer_inputs
from hf_align.trainers.metrics import global_sum
from hf_align.trainers.safety import SafeTrainingMixin


@dataclass
class RewardCollator:
    """B pairs -> 2B right-padded rows ``[chosen; rejected]`` with an attention mask (and ``margin`` (B,))."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
        batch = {
            "input_ids": pad_right(seqs, self.pad_token_id, self.pad_to_multiple_of),  # (2B, T)
            "attention_mask": pad_right([[1] * len(s) for s in seqs], 0, self.pad_to_multiple_of),  # (2B, T)
        }
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)  # (B,)
        return batch


def pair_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Fraction of pairs whose chosen reward is strictly above the rejected one; predictions are (B, 2)."""
    rewards = np.asarray(eval_pred.predictions)
    return {"accuracy": float((rewards[:, 0] > rewards[:, 1]).mean())}


class RewardTrainer(MetricsMixin, SafeTrainingMixin, Trainer):
    # compute_loss already divides by the optimizer step's pair count: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: RewardConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
    ):
        if isinstance(model, str):  # a fresh one-output score head on the named model
            from hf_align.trainers.base import resolve_args, set_seed

            args = resolve_args(args, RewardConfig, model, "Reward")
            set_seed(args.seed)  # the head is initialised at random
            quantized = (
                {"quantization_config": quantization_config} if quantization_config is not None else {}
            )
            model = load_model(model, args, AutoModelForSequenceClassification, num_labels=1, **quantized)
        elif getattr(model.config, "num_labels", None) != 1:
            raise ValueError(
                f"a reward model has one output: load it with num_labels=1 (got {model.config.num_labels})"
            )
        model, args, processing_class = prepare_trainer_inputs(
            model, args, processing_class, peft_config, RewardConfig, "Reward"
        )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
        train_dataset, eval_dataset = prepare_datasets(
            train_dataset,
            eval_dataset,
            args,
            lambda ds, name: prepare_preference_dataset(ds, tokenizer, args, name=name, full_sequences=True),
        )
        if data_collator is None:
            data_collator = RewardCollator(tokenizer.pad_token_id, args.pad_to_multiple_of)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._init_metrics()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Preference pairs in this optimizer step (each batch holds 2B rows), over all processes."""
        return global_sum(self.accelerator, sum(b["input_ids"].shape[0] // 2 for b in batch_samples), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards_2B = out.logits.squeeze(-1).float()  # (2B, 1) -> (2B,)
        chosen_B, rejected_B = split_concatenated(rewards_2B)
        loss, metrics = bradley_terry_loss(
            chosen_B,
            rejected_B,
            margin_B=inputs.get("margin"),
            center_rewards_coefficient=self.args.center_rewards_coefficient or 0.0,
        )
        if model.training and num_items_in_batch is not None:
            # mean over these B pairs -> their sum / pairs in the whole step; x processes undoes DDP's average
            loss = loss * chosen_B.shape[0] / num_items_in_batch * self.accelerator.num_processes
        self.record(metrics, model.training)
        return (loss, {"rewards": torch.stack([chosen_B, rejected_B], dim=-1)}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        rewards_B2 = outputs["rewards"].detach()
        # Trainer only calls compute_metrics when there are labels: the label of every pair is "chosen" (0).
        return loss.detach(), rewards_B2, torch.zeros(rewards_B2.shape[0], device=rewards_B2.device)
