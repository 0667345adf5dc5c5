"""Expert iteration: sample from the current policy, keep what the rewards call right, fine-tune on it, repeat.

Iteration i takes the next ``questions_per_iteration`` rows of endless seeded permutations of the train rows,
samples ``num_generations`` completions per prompt from the CURRENT weights and scores them with GRPO's reward
functions (``RewardRunner``: built-in graders such as ``"r1_zero"``, ``"module:function"``, TRL-protocol callables).
Completions with reward ``>= keep_threshold`` (1.0: a right answer for the graders) become prompt-completion rows
on which ``SFTTrainer`` fine-tunes the same model (fresh optimizer and schedule). An iteration that keeps nothing
is not fine-tuned; a run in which none was raises ``NoLearningError``.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from hf_align.config import ExpertIterationConfig
from hf_align.data import IGNORE_INDEX
from hf_align.logprobs import get_response_log_probs
from hf_align.rollout import SamplingConfig, make_engine
from hf_align.trainers.base import load_processing_class
from hf_align.trainers.grpo_rewards import RewardRunner
from hf_align.trainers.safety import NoLearningError
from hf_align.trainers.sft import SFTTrainer

logger = logging.getLogger(__name__)


def keep_mask(rewards: list[float], keep_threshold: float) -> list[bool]:
    """A completion is kept when its reward reaches the threshold; an unscored one (NaN) never is."""
    return [r >= keep_threshold for r in rewards]


def _mean(values) -> float:
    values = [0.0 if v != v else float(v) for v in values]  # NaN (no reward) counts as 0, as GRPO logs it
    return sum(values) / len(values) if values else 0.0


@torch.no_grad()
def _kept_entropy(trainer: SFTTrainer) -> float:
    """Token-mean entropy of the next-token distribution over the trained tokens of the trainer's rows."""
    model, total, count = trainer.model.eval(), 0.0, 0
    for batch in trainer.get_eval_dataloader(trainer.train_dataset):
        labels = batch.pop("labels")  # labels_BT[:, t] is predicted at t, as in SFTTrainer.compute_loss
        labels_BT = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        mask_BT = labels_BT != IGNORE_INDEX
        ids = batch.pop("input_ids")
        out = get_response_log_probs(
            model, ids, labels_BT, return_token_entropy=True, logprob_mask=mask_BT, **batch
        )
        total, count = total + float((out["token_entropy"] * mask_BT).sum()), count + int(mask_BT.sum())
    return total / max(count, 1)


class ExpertIterationTrainer:
    """GRPOTrainer's constructor, ``train``, ``evaluate`` and ``close``, but not a ``transformers.Trainer``: each
    iteration is a whole SFTTrainer run, so expert iteration has no training loop of its own. Rows hold a string
    ``prompt`` (templated) and the columns the reward functions read (``answer`` for the built-in graders)."""

    def __init__(
        self,
        model,
        reward_funcs,
        args: ExpertIterationConfig,
        train_dataset,
        eval_dataset=None,
        processing_class=None,
    ):
        self.rows, self.eval_rows = list(train_dataset), list(eval_dataset or [])
        if args.world_size > 1:  # every process would sample and train on the same rows
            raise ValueError("expert iteration runs in one process: launch it with --num_processes 1")
        if not self.rows or not all(isinstance(r.get("prompt"), str) for r in self.rows + self.eval_rows):
            raise ValueError("expert iteration needs rows with a string 'prompt' (not conversational ones)")
        self.model, self.args = model.to(args.device), args
        self.tokenizer = load_processing_class(model, processing_class, args)
        self.rewards = RewardRunner(reward_funcs, None, args.reward_weights, args, args.device)
        hf = {"batch_size": args.hf_generate_batch_size}
        vllm = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization, "seed": args.seed}
        kind, kwargs = ("vllm", vllm) if args.use_vllm else ("hf", hf)
        self.engine = make_engine(kind, self.model, self.tokenizer, **kwargs)

    def close(self) -> None:
        """Stop the grader workers and the rollout engine (for good: a vLLM engine frees its GPU memory)."""
        self.rewards.close()
        self.engine.close()

    def _sample_and_score(self, rows: list[dict], n: int, temperature: float, seed: int):
        """``[(row index, rollout)]`` sampled from the current weights, which ones the keep rule keeps, and their
        mean reward, accuracy and format rate as GRPO logs them (the first built-in grader's answer and format
        rewards, and its timeouts; without a grader, accuracy is the fraction kept)."""
        a = self.args
        self.engine.sync_weights(self.model)
        length, stop = a.max_completion_length, a.stop_strings
        sampling = SamplingConfig(n, length, temperature, a.top_p, stop=stop, seed=seed)
        groups = self.engine.generate([row["prompt"] for row in rows], sampling)
        flat = [(q, rollout) for q, group in enumerate(groups) for rollout in group]
        _, rewards, _ = self.rewards.score_groups([{"row": row} for row in rows], groups, None)
        keep = keep_mask(rewards, a.keep_threshold)
        # the grader's answer accuracy, format rate and timeouts override the keep fraction where there is one
        metrics = {"accuracy": _mean(keep), "mean_reward": _mean(rewards), **self.rewards.grader_metrics()}
        return flat, keep, metrics

    def evaluate(self) -> dict[str, float]:
        """One completion per eval row at ``eval_temperature``: ``eval_accuracy``, ``eval_mean_reward``, ..."""
        _, _, metrics = self._sample_and_score(self.eval_rows, 1, self.args.eval_temperature, self.args.seed)
        return {f"eval_{k}": v for k, v in metrics.items()}

    def _iteration(self, i: int, questions: list[dict]) -> dict:
        """Sample -> score -> keep -> fine-tune; returns the iteration's log record."""
        a, out = self.args, Path(self.args.output_dir) / f"iter_{i}"
        flat, keep, metrics = self._sample_and_score(questions, a.num_generations, a.temperature, a.seed + i)
        kept = [(q, r) for (q, r), k in zip(flat, keep) if k]
        rows = [{"prompt": questions[q]["prompt"], "completion": r.text} for q, r in kept]
        record = {
            "iteration": i, "questions": len(questions), "samples": len(flat),
            **{f"train_{k}": v for k, v in metrics.items()},
            "kept": len(kept), "questions_with_kept": len({q for q, _ in kept}),
            "mean_response_tokens": _mean([len(r.completion_ids) for _, r in flat]),
            "kept_mean_response_tokens": _mean([len(r.completion_ids) for _, r in kept]),
            "kept_entropy": None, "sft_loss": None, "fine_tuned": False,
        }  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "kept.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        sft_args = copy.deepcopy(a)
        sft_args.output_dir = str(out)
        trainer = None
        if rows:
            trainer = SFTTrainer(self.model, sft_args, train_dataset=rows, processing_class=self.tokenizer)
        if trainer is not None and len(trainer.train_dataset):  # empty: no kept token within max_length
            record["kept_entropy"] = _kept_entropy(trainer)  # under the weights that sampled them
            record.update(sft_loss=trainer.train().training_loss, fine_tuned=True)
        else:
            logger.warning("expert iteration %d: nothing kept to train on; fine-tuning skipped", i)
        return record

    def train(self) -> list[dict]:
        """Fine-tune the model in place, one line per iteration in ``{output_dir}/ei_log.jsonl``; returns them."""
        a, n, records = self.args, self.args.questions_per_iteration, []
        epochs = -(-a.n_iterations * n // len(self.rows))  # ceil: permutations needed
        seeded = [torch.Generator().manual_seed(a.seed + e) for e in range(epochs)]
        order = [j for g in seeded for j in torch.randperm(len(self.rows), generator=g).tolist()]
        log = Path(a.output_dir) / "ei_log.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        try:
            for i in range(a.n_iterations):
                records.append(self._iteration(i, [self.rows[j] for j in order[i * n : (i + 1) * n]]))
                records[-1].update(self.evaluate() if self.eval_rows else {})
                logger.info("expert iteration %d: %s", i, records[-1])
                with log.open("a") as f:
                    f.write(json.dumps(records[-1]) + "\n")
        finally:
            self.rewards.close()
        if not any(r["fine_tuned"] for r in records):
            raise NoLearningError(
                f"no iteration of {a.n_iterations} kept a completion to fine-tune on (see {log}): nothing was "
                "learned. Sample more (num_generations, questions_per_iteration), or check rewards / keep_threshold."
            )
        return records
