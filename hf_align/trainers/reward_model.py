"""RewardTrainer: a Bradley-Terry reward model on TRL's preference formats, on top of `transformers.Trainer`.

Choices:
- The constructor is TRL 1.16's (``hf_align.trainers.base.DatasetTrainer``): a model given by name is loaded as
  ``AutoModelForSequenceClassification`` with ``num_labels=1`` (a fresh score head, seeded with ``args.seed``);
  transformers reads its score at the last non-padding token of each row, so ``model.config.pad_token_id`` is set
  from the tokenizer.
- Rows (explicit or implicit prompt, standard or conversational) become ``prompt + chosen`` and ``prompt +
  rejected``, each tokenized whole by ``hf_align.formats.prepare_preference_dataset``; plain answers end in EOS,
  and pairs with an answer longer than ``max_length`` are dropped (counted, logged), as in TRL, already tokenized
  rows too. A ``margin`` column is honoured; a row whose margin is not a finite number is an error naming it.
- Each micro-batch is ONE forward over the 2B rows ``[prompt + chosen; prompt + rejected]``. The loss is
  ``hf_align.losses.reward_model.bradley_terry_loss`` (plus reward centring when ``center_rewards_coefficient``
  is set), a mean over pairs made exact under any accumulation / process split as in the DPO trainer.
- ``evaluate`` reports held-out pair accuracy as ``eval_accuracy`` (averaged over eval batches, as TRL does);
  ``prediction_step`` hands ``compute_metrics`` the (B, 2) rewards of each pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForSequenceClassification

from hf_align.config import RewardConfig
from hf_align.formats import prepare_preference_dataset
from hf_align.losses.dpo import split_concatenated
from hf_align.losses.reward_model import bradley_terry_loss
from hf_align.trainers.base import DatasetTrainer, global_sum


@dataclass
class RewardCollator:
    """B pairs -> 2B right-padded rows ``[chosen; rejected]`` with an attention mask (and ``margin`` (B,))."""

    tokenizer: object
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [{"input_ids": f[key]} for key in ("chosen_ids", "rejected_ids") for f in features]
        batch = self.tokenizer.pad(
            rows, pad_to_multiple_of=self.pad_to_multiple_of, padding_side="right", return_tensors="pt"
        )
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}  # (2B, T) each
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)  # (B,)
        return batch


class RewardTrainer(DatasetTrainer):
    config_class, suffix = RewardConfig, "Reward"
    load_kwargs = {"auto_class": AutoModelForSequenceClassification, "num_labels": 1}

    def prepare_model(self, model, args, tokenizer):
        if model.config.num_labels != 1:
            raise ValueError(
                f"a reward model has one output: load it with num_labels=1 (got {model.config.num_labels})"
            )
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
        return model

    def prepare_dataset(self, dataset, name, args, tokenizer):
        return prepare_preference_dataset(dataset, tokenizer, args, name=name, full_sequences=True)

    def default_collator(self, args, tokenizer):
        return RewardCollator(tokenizer, args.pad_to_multiple_of)

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
