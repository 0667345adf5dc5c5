"""RewardTrainer: a Bradley-Terry reward model on top of `transformers.Trainer`.

Choices:
- The model is a sequence classifier with one output (``AutoModelForSequenceClassification``,
  ``num_labels=1``); transformers reads its score at the last non-padding token of each row, so
  ``model.config.pad_token_id`` must be set. Plain answers end in EOS, so that token sees the whole answer.
- Data is the DPO trainer's: preference rows, tokenized with the same truncation (prompt keeps its end, answers
  their start), and each micro-batch is ONE forward over the 2B rows ``[prompt + chosen; prompt + rejected]``.
- The loss is ``hf_align.losses.reward_model.bradley_terry_loss`` (optionally with reward centring), a mean over
  pairs made exact under any accumulation / process split as in the DPO trainer: the micro-batch mean is
  rescaled to ``sum / pairs in the optimizer step``, times the number of processes.
- ``evaluate`` reports held-out pair accuracy (fraction of pairs with r_chosen > r_rejected) through
  ``compute_metrics``; predictions are the (B, 2) rewards ``[r_chosen, r_rejected]``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from transformers import EvalPrediction, Trainer

from hf_align.config import RewardConfig
from hf_align.losses.dpo import split_concatenated
from hf_align.losses.reward_model import bradley_terry_loss
from hf_align.trainers.metrics import global_sum, merge_metrics
from hf_align.trainers.safety import SafeTrainingMixin


@dataclass
class RewardCollator:
    """B pairs -> 2B right-padded rows ``[prompt + chosen; prompt + rejected]`` with an attention mask."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs = [f["prompt_ids"] + f["chosen_ids"] for f in features]
        seqs += [f["prompt_ids"] + f["rejected_ids"] for f in features]
        length = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)  # (2B, T)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_accuracy(eval_pred: EvalPrediction) -> dict[str, float]:
    """Fraction of pairs whose chosen reward is strictly above the rejected one; predictions are (B, 2)."""
    rewards = np.asarray(eval_pred.predictions)
    return {"accuracy": float((rewards[:, 0] > rewards[:, 1]).mean())}


class RewardTrainer(SafeTrainingMixin, Trainer):
    # compute_loss already divides by the optimizer step's pair count: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: RewardConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        peft_config=None,
        compute_metrics=pair_accuracy,
        **kwargs,
    ):
        if getattr(model.config, "pad_token_id", None) is None:
            raise ValueError(
                "the reward model reads its score at the last non-pad token: set model.config.pad_token_id "
                "(e.g. to tokenizer.pad_token_id)"
            )
        if peft_config is not None:
            from hf_align.modeling import wrap_lora

            model = wrap_lora(model, peft_config)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("RewardTrainer needs processing_class (the tokenizer) or a data_collator")
            data_collator = RewardCollator(processing_class.pad_token_id)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            compute_metrics=compute_metrics,
            **kwargs,
        )
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Preference pairs in this optimizer step (each batch holds 2B rows), over all processes."""
        return global_sum(self.accelerator, sum(b["input_ids"].shape[0] // 2 for b in batch_samples), device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        rewards_2B = out.logits.squeeze(-1).float()  # (2B, 1) -> (2B,)
        chosen_B, rejected_B = split_concatenated(rewards_2B)
        loss, metrics = bradley_terry_loss(
            chosen_B, rejected_B, center_rewards_coefficient=self.args.center_rewards_coefficient
        )
        if model.training and num_items_in_batch is not None:
            # mean over these B pairs -> their sum / pairs in the whole step; x processes undoes DDP's average
            loss = loss * chosen_B.shape[0] / num_items_in_batch * self.accelerator.num_processes
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][key].append(value.item())
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(
            merge_metrics(self.accelerator, self._metrics[mode], "eval_batch_" if mode == "eval" else "")
        )
        super().log(logs, start_time)
