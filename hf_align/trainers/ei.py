"""Expert iteration: sample from the current policy, keep what the rewards call right, fine-tune on it, repeat.

Iteration i takes the next ``questions_per_iteration`` rows of an endless sequence of seeded permutations of the
train rows, samples ``num_generations`` completions per prompt from the CURRENT weights (the engine is synced
first) and scores them with GRPO's reward functions (``RewardRunner``: built-in graders such as ``"r1_zero"``,
``"module:function"``, TRL-protocol callables, reward models). Completions with reward ``>= keep_threshold`` (1.0:
a right answer for the built-in graders) are kept, each its own prompt-completion row, and ``SFTTrainer`` fine-tunes
the same model on them in ``{output_dir}/iter_{i}``. An iteration that keeps nothing is logged and not fine-tuned; a
run in which none fine-tuned raises ``NoLearningError``. Accuracy is the fraction of completions the rule keeps.
Not a ``transformers.Trainer``: each iteration is a whole SFTTrainer run (its own optimizer and schedule), so expert
iteration has no training loop of its own; it keeps GRPOTrainer's constructor, ``train``, ``evaluate`` and ``close``.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_align.config import SFTConfig
from hf_align.data import IGNORE_INDEX
from hf_align.logprobs import get_response_log_probs
from hf_align.rollout import SamplingConfig, make_engine
from hf_align.trainers.base import load_processing_class
from hf_align.trainers.grpo_rewards import RewardRunner, check_some_reward
from hf_align.trainers.grpo_rollouts import total_rewards
from hf_align.trainers.safety import NoLearningError
from hf_align.trainers.sft import SFTTrainer

logger = logging.getLogger(__name__)


@dataclass
class ExpertIterationConfig(SFTConfig):
    """SFTConfig (each iteration's fine-tuning) plus sampling and keep rule; sampling fields are GRPOConfig's."""

    n_iterations: int = field(default=5, metadata={"help": "Iterations (sample, keep, fine-tune)."})
    questions_per_iteration: int = field(default=512, metadata={"help": "Prompts sampled per iteration."})
    num_generations: int = field(default=8, metadata={"help": "Completions sampled per prompt."})
    max_completion_length: int = field(default=1024, metadata={"help": "Maximum new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    stop_strings: list[str] = field(default_factory=lambda: ["</answer>"], metadata={"help": "Stop strings."})
    keep_threshold: float = field(default=1.0, metadata={"help": "Keep completions with reward >= this."})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weights of the rewards."})
    reward_timeout_s: float = field(default=600.0, metadata={"help": "Time limit of one reward call."})
    grader_timeout_s: float = field(default=5.0, metadata={"help": "Time limit per completion of a grader."})
    grader_num_workers: int = field(default=2, metadata={"help": "Built-in grader processes (0: inline)."})
    use_vllm: bool = field(default=False, metadata={"help": "Sample with a colocated vLLM engine."})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "GPU memory share of vLLM."})
    hf_generate_batch_size: int = field(default=64, metadata={"help": "Sequences per model.generate call."})
    eval_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature for evaluation."})

    def __post_init__(self):
        for name in ("n_iterations", "questions_per_iteration", "num_generations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if min(self.temperature, self.eval_temperature) < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"temperature and eval_temperature must be >= 0 (0: greedy) and top_p in (0, 1], got "
                f"{self.temperature}, {self.eval_temperature} and {self.top_p}"
            )
        super().__post_init__()


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
        out = get_response_log_probs(model, ids, labels_BT, True, logprob_mask=mask_BT, **batch)
        total, count = total + float((out["token_entropy"] * mask_BT).sum()), count + int(mask_BT.sum())
    return total / max(count, 1)


class ExpertIterationTrainer:
    """Rows hold a string ``prompt`` (templated) and what the reward functions read (``answer`` for graders)."""

    def __init__(self, model, reward_funcs, args, train_dataset, eval_dataset=None, processing_class=None):
        self.rows, self.eval_rows = list(train_dataset), list(eval_dataset or [])
        if args.world_size > 1:  # every process would sample and train on the same rows
            raise ValueError("expert iteration runs in one process: launch it with --num_processes 1")
        if not self.rows or not all(isinstance(r.get("prompt"), str) for r in self.rows + self.eval_rows):
            raise ValueError("expert iteration needs rows with a string 'prompt' (not conversational ones)")
        self.model, self.args = model.to(args.device), args
        self.processing_class = load_processing_class(model, processing_class, args)
        self.rewards = RewardRunner(reward_funcs, None, args.reward_weights, args, args.device)
        kwargs = {"batch_size": args.hf_generate_batch_size}
        if args.use_vllm:
            kwargs = {"gpu_memory_utilization": args.vllm_gpu_memory_utilization, "seed": args.seed}
        self.engine = make_engine(
            "vllm" if args.use_vllm else "hf", self.model, self.processing_class, **kwargs
        )

    def close(self) -> None:
        """Stop the grader workers (they restart when needed) and a vLLM engine (for good)."""
        self.rewards.close()
        if self.args.use_vllm:
            self.engine.close()

    def _sample_and_score(self, rows: list[dict], n: int, temperature: float, seed: int):
        """``[(row index, rollout)]`` from the current weights, and their summed rewards (NaN: none scored it)."""
        a = self.args
        self.engine.sync_weights(self.model)
        sampling = SamplingConfig(
            n, a.max_completion_length, temperature, a.top_p, stop=a.stop_strings, seed=seed
        )
        groups = self.engine.generate([row["prompt"] for row in rows], sampling)
        flat = [(q, rollout) for q, group in enumerate(groups) for rollout in group]
        columns = {k: [rows[q][k] for q, _ in flat] for k in rows[0] if k != "prompt"}  # as GRPO: answer, ...
        prompts, texts, ids = zip(*((rows[q]["prompt"], r.text, r.completion_ids) for q, r in flat))
        rewards_NF, failures = self.rewards(list(prompts), list(texts), list(ids), columns, None)
        check_some_reward(rewards_NF, failures, "")
        return flat, total_rewards(rewards_NF, self.rewards.weights)

    def evaluate(self) -> dict[str, float]:
        """One completion per eval row at ``eval_temperature``: accuracy, mean reward, format rate (graders)."""
        _, rewards = self._sample_and_score(self.eval_rows, 1, self.args.eval_temperature, self.args.seed)
        metrics = {"eval_accuracy": _mean(keep_mask(rewards, self.args.keep_threshold))}
        metrics["eval_mean_reward"] = _mean(rewards)
        for grader in self.rewards.graders()[:1]:
            metrics["eval_format_rate"] = _mean(d.get("format_reward", 0.0) for d in grader.last_details)
        return metrics

    def _iteration(self, i: int, questions: list[dict]) -> dict:
        """Sample -> score -> keep -> fine-tune; returns the iteration's log record."""
        a, out = self.args, Path(self.args.output_dir) / f"iter_{i}"
        flat, rewards = self._sample_and_score(questions, a.num_generations, a.temperature, a.seed + i)
        keep = keep_mask(rewards, a.keep_threshold)
        kept = [(q, r) for (q, r), k in zip(flat, keep) if k]
        rows = [{"prompt": questions[q]["prompt"], "completion": r.text} for q, r in kept]
        record = {
            "iteration": i, "questions": len(questions), "samples": len(flat),
            "train_accuracy": _mean(keep), "train_mean_reward": _mean(rewards),
            "kept": len(kept), "questions_with_kept": len({q for q, _ in kept}),
            "mean_response_tokens": _mean([len(r.completion_ids) for _, r in flat]),
            "kept_mean_response_tokens": _mean([len(r.completion_ids) for _, r in kept]),
            "kept_entropy": None, "sft_loss": None, "fine_tuned": False,
        }  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "kept.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        sft_args = copy.deepcopy(a)
        sft_args.output_dir = str(out)
        trainer = rows and SFTTrainer(
            self.model, sft_args, train_dataset=rows, processing_class=self.processing_class
        )
        if trainer and len(trainer.train_dataset):  # empty: no kept token within max_length
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
