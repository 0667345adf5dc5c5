"""From sampled groups to training micro-batches: grading, dynamic sampling, advantages, tensors, splitting.

Kept apart from the trainer so each step can be read (and tested) on its own. Nothing here touches the
model except through the log-prob function handed in.

Choices:
- Rewards of several reward functions are summed with weights; the first function's ``format_reward`` and
  ``answer_reward`` feed the format-rate and accuracy metrics.
- No reward, no signal: a completion whose reward function raised, returned None / a non-dict, or returned a
  NaN / inf reward (the grader flags the first cases ``grader_error``) gets reward 0 for the group statistics
  and advantage 0, so it adds nothing to the gradient; it is counted (``reward_invalid`` per step) and the
  grader logs the cause. A grading *timeout* is different: the completion made the grader hang (hostile or
  pathological text), so it is graded 0 like a wrong answer, counted in ``grader_timeouts``.
- Dynamic sampling (DAPO, Yu et al. 2025) drops groups whose rewards are all equal (zero advantage: no
  learning signal) and samples more prompts; after ``max_rounds`` generation rounds the batch is completed
  with zero-std groups so that every step has the same shape.
- Every optimizer step's global sequence and token counts are computed once per rollout batch (token counts
  summed over processes), so each micro-batch's loss is normalised exactly as the full batch would be.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from hf_align.data import build_shifted_sequences, format_prompt
from hf_align.losses.grpo import group_normalize_rewards
from hf_align.rewards.pool import ERROR_FLAG
from hf_align.rollout.base import Rollout, SamplingConfig

logger = logging.getLogger(__name__)


class PromptStream:
    """This process's endless stream of prompts: a seeded permutation of the rows per pass, strided over processes.

    Position ``p = cursor x world + rank`` is row ``perm_epoch[p mod n]`` with ``epoch = p div n``, so the prompt
    order depends only on the seed (not on the number of processes), and ``p`` doubles as the prompt's sampling
    seed offset. Prompts longer than ``max_prompt_length`` tokens are skipped, counted and logged.
    """

    def __init__(self, rows: list[dict], template: str, tokenizer, max_prompt_length: int, seed: int):
        self.rows, self.template, self.tokenizer = rows, template, tokenizer
        self.max_prompt_length, self.seed = max_prompt_length, seed
        self.cursor = 0
        self.dropped = 0

    def take(self, count: int, rank: int, world: int) -> list[dict]:
        n = len(self.rows)
        out = []
        while len(out) < count:
            position = self.cursor * world + rank
            epoch, index = divmod(position, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            row = self.rows[perm[index].item()]
            self.cursor += 1
            prompt = format_prompt(self.template, row["question"])
            if len(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]) > self.max_prompt_length:
                self.dropped += 1
                logger.warning(
                    "prompt longer than max_prompt_length=%d dropped (%d so far): %.60r",
                    self.max_prompt_length, self.dropped, row["question"],
                )  # fmt: skip
                if self.dropped > 10 * n:
                    raise ValueError(
                        "every prompt exceeds max_prompt_length: raise it or shorten the prompts"
                    )
                continue
            out.append({"prompt": prompt, "answer": row["answer"], "position": position})
        return out

    def state_dict(self) -> dict[str, int]:
        return {"prompt_cursor": self.cursor, "dropped": self.dropped}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.dropped = state["prompt_cursor"], state["dropped"]


@dataclass
class ScoredGroups:
    """Completions of whole groups, flattened group-major (prompt 0's G samples, then prompt 1's, ...)."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    format_rewards: list[float] = field(default_factory=list)
    answer_rewards: list[float] = field(default_factory=list)
    valid: list[bool] = field(default_factory=list)  # False where the reward was not finite

    def extend(self, other: ScoredGroups, start: int, stop: int) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name)[start:stop])

    def __len__(self) -> int:
        return len(self.rewards)


def _finite_or_zero(value) -> float:
    value = float(value or 0.0)
    return value if math.isfinite(value) else 0.0


def score_groups(
    groups: list[list[Rollout]], answers: list, graders: list, weights: list[float]
) -> tuple[ScoredGroups, int]:
    """Grade every completion with every grader; returns the scored groups and the non-finite reward count."""
    out = ScoredGroups()
    truths = []
    for group, answer in zip(groups, answers):
        for r in group:
            out.prompt_ids.append(r.prompt_ids)
            out.completion_ids.append(r.completion_ids)
            out.texts.append(r.text)
            out.finish_reasons.append(r.finish_reason)
            truths.append(answer)
    totals = [0.0] * len(out.texts)
    valid = [True] * len(out.texts)
    for k, (grader, weight) in enumerate(zip(graders, weights)):
        graded = grader.grade(out.texts, truths)
        for i, d in enumerate(graded):
            value = d.get("reward") if isinstance(d, dict) else None
            if value is None or d.get(ERROR_FLAG) or not math.isfinite(float(value)):
                valid[i] = False
                continue
            totals[i] += weight * float(value)
        if k == 0:
            out.format_rewards = [_finite_or_zero(d.get("format_reward")) for d in graded]
            out.answer_rewards = [_finite_or_zero(d.get("answer_reward")) for d in graded]
    out.rewards = [t if v else 0.0 for t, v in zip(totals, valid)]
    out.valid = valid
    return out, valid.count(False)


def group_has_signal(rewards: list[float], start: int, group_size: int) -> bool:
    group = rewards[start : start + group_size]
    return max(group) > min(group)


def select_groups(
    scored: ScoredGroups, group_size: int, keep: ScoredGroups, want: int, filler: ScoredGroups, dynamic: bool
) -> None:
    """Move whole groups into ``keep`` until it has ``want`` groups; zero-signal groups go to ``filler`` when
    ``dynamic`` (to be used only if the rounds run out)."""
    for start in range(0, len(scored), group_size):
        if len(keep) >= want * group_size:
            return
        target = keep if (not dynamic or group_has_signal(scored.rewards, start, group_size)) else filler
        target.extend(scored, start, start + group_size)


def advantages_for(scored: ScoredGroups, group_size: int, eps: float, normalize_by_std: bool):
    rewards_B = torch.tensor(scored.rewards, dtype=torch.float32)
    advantages_B = group_normalize_rewards(rewards_B, group_size, eps, normalize_by_std)
    advantages_B = advantages_B * torch.tensor(
        scored.valid, dtype=torch.float32
    )  # invalid rewards: no signal
    return rewards_B, advantages_B


def build_micro_batches(
    scored: ScoredGroups,
    rewards_B: torch.Tensor,
    advantages_B: torch.Tensor,
    pad_token_id: int,
    micro_batch_size: int,
    micro_batches_per_step: int,
) -> list[dict[str, torch.Tensor]]:
    """Split this process's rollout batch into micro-batches (in order), each trimmed to its own length.

    Each carries ``step_index``: which optimizer step (within one pass over the rollout batch) it belongs to.
    """
    batches = []
    for i, start in enumerate(range(0, len(scored), micro_batch_size)):
        sl = slice(start, start + micro_batch_size)
        seqs = build_shifted_sequences(scored.prompt_ids[sl], scored.completion_ids[sl], pad_token_id)
        seqs["advantages"] = advantages_B[sl]
        seqs["raw_rewards"] = rewards_B[sl]
        seqs["step_index"] = torch.tensor(i // micro_batches_per_step)
        batches.append(seqs)
    return batches


def rollout_metrics(scored: ScoredGroups, group_size: int, max_completion_length: int) -> dict[str, float]:
    rewards = torch.tensor(scored.rewards)
    lengths = torch.tensor([len(c) for c in scored.completion_ids], dtype=torch.float32)
    groups = rewards.view(-1, group_size)  # (num_groups, G)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "format_rate": sum(scored.format_rewards) / max(len(scored), 1),
        "accuracy": sum(scored.answer_rewards) / max(len(scored), 1),
        "zero_std_group_fraction": (groups.max(1).values == groups.min(1).values).float().mean().item(),
        "completion_length_mean": lengths.mean().item(),
        "completion_length_max": lengths.max().item(),
        "truncated_fraction": sum(r == "length" for r in scored.finish_reasons) / max(len(scored), 1),
    }


def sampling_for(args, positions: list[int] | None = None) -> SamplingConfig:
    """Sampling settings of a GRPOConfig; with ``positions`` (global prompt positions) each prompt gets its own
    seed, so the rollouts are the same whatever the number of processes or the generation batch size."""
    seeds = None if positions is None else [args.seed * 1_000_003 + p for p in positions]
    return SamplingConfig(
        n=args.group_size,
        max_new_tokens=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_new_tokens=args.min_completion_length,
        stop=list(args.stop_strings),
        seed=args.seed,
        prompt_seeds=seeds,
    )


def attach_global_counts(micro: list[dict], accelerator, optimizer_batch_size: int) -> None:
    """Give each micro-batch its optimizer step's sequence count and response-token count summed over
    processes, so the loss of every reduction is normalised exactly as over the whole step."""
    steps = max(b["step_index"].item() for b in micro) + 1
    tokens = torch.zeros(steps, dtype=torch.float64, device=accelerator.device)
    for b in micro:
        tokens[b["step_index"]] += b["response_mask"].sum()
    if accelerator.num_processes > 1:
        tokens = accelerator.reduce(tokens, reduction="sum")
    for b in micro:
        b["num_tokens"] = tokens[b["step_index"]].float().cpu()
        b["num_sequences"] = torch.tensor(float(optimizer_batch_size))
