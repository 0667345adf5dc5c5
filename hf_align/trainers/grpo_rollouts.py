"""One GRPO generation batch, from prompts and sampled groups with their rewards to training micro-batches.

No model, engine or reward function in here (they stay in hf_align/trainers/grpo.py and grpo_rewards.py, whose
``RewardRunner.score_groups`` calls ``reward_inputs`` and ``total_rewards``); functions come in the order a step
uses them. Choices:
- Prompts come from the dataset's ``prompt`` column: a string goes to the engine as is, a conversation (list of
  messages) is rendered with the tokenizer's chat template and its completions are message lists.
- Rewards of several reward functions are summed with weights, skipping a function that gave no reward (None /
  NaN) for a completion, as TRL does; a completion with no reward from any function is unscorable: it is left out
  of its group's mean and std and gets advantage 0.
- Dynamic sampling (DAPO, Yu et al. 2025) drops groups whose rewards are all equal (zero advantage: no learning
  signal) and samples more prompts; when the rounds run out the batch is completed with such groups, so that
  every step has the same shape.
- Every optimizer step's sequence and token counts (summed over processes) are attached to each of its
  micro-batches, so each micro-batch's loss is normalised exactly as the full batch would be.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from hf_align.data import build_shifted_sequences
from hf_align.formats import is_conversational
from hf_align.losses.grpo import group_normalize_rewards
from hf_align.rollout.base import Rollout, SamplingConfig

logger = logging.getLogger(__name__)


def render_prompt(prompt, tokenizer, chat_template_kwargs: dict | None = None) -> str:
    """The text the engine continues: a string prompt as is, a conversation through the chat template."""
    if is_conversational({"prompt": prompt}):
        text = tokenizer.apply_chat_template(
            prompt, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
        # The engines tokenize with the tokenizer's special tokens; a template that writes BOS itself (Llama 3,
        # Gemma, Mistral) would then start with two. TRL tokenizes in apply_chat_template, which adds none.
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            added = tokenizer("", add_special_tokens=True)["input_ids"]
            text = text[len(bos) :] if added[:1] == [tokenizer.bos_token_id] else text
        return text
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
    return prompt


def prompt_rows(dataset, name: str):
    """A prompt-only dataset with random access: an iterable one (``IterableDataset``) is read into memory (prompts
    are drawn by a seeded permutation, for an exact resume; a stream that never ends cannot be used for GRPO)."""
    if dataset is None:
        return None
    if not hasattr(dataset, "__len__"):
        dataset = list(dataset)
        logger.info("read an iterable dataset of %d prompts into memory", len(dataset))
    if not len(dataset):
        raise ValueError(f"{name} is empty: GRPO needs rows with a 'prompt' column")
    if "prompt" not in dataset[0]:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {sorted(dataset[0])}): GRPO takes TRL's prompt-only format. "
            "For question/answer rows, build the prompt from the question (recipes/grpo.py does it with a template)"
        )
    return dataset


class PromptStream:
    """This process's endless stream of prompts: a seeded permutation of the rows per pass, strided over processes.

    Position ``p = cursor x world + rank`` is row ``perm_epoch[p mod n]`` with ``epoch = p div n``, so the prompt
    order depends only on the seed (not on the number of processes), and ``p`` doubles as the prompt's sampling
    seed offset (``shuffle=False``: the rows in order). Prompts longer than ``max_prompt_length`` tokens (when
    set) are skipped, counted and logged.
    """

    def __init__(self, rows, tokenizer, max_prompt_length: int | None, seed: int, shuffle: bool = True,
                 chat_template_kwargs: dict | None = None):  # fmt: skip
        self.rows, self.tokenizer, self.chat_template_kwargs = rows, tokenizer, chat_template_kwargs
        self.max_prompt_length, self.seed, self.shuffle = max_prompt_length, seed, shuffle
        self.cursor = 0
        self.dropped = 0

    def take(self, count: int, rank: int, world: int) -> list[dict]:
        n, out = len(self.rows), []
        in_a_row = 0  # prompts dropped since the last one kept
        while len(out) < count:
            position = self.cursor * world + rank
            epoch, index = divmod(position, n)
            if self.shuffle:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                index = perm[index].item()
            row = self.rows[index]
            self.cursor += 1
            text = render_prompt(row["prompt"], self.tokenizer, self.chat_template_kwargs)
            limit = self.max_prompt_length
            if limit is not None and len(self.tokenizer(text, add_special_tokens=True)["input_ids"]) > limit:
                self.dropped, in_a_row = self.dropped + 1, in_a_row + 1
                logger.warning(
                    "prompt longer than max_prompt_length=%d dropped (%d so far): %.60r",
                    limit, self.dropped, text,
                )  # fmt: skip
                if in_a_row > 10 * n:  # ten passes' worth without one that fits
                    raise ValueError(
                        "every prompt exceeds max_prompt_length: raise it or shorten the prompts"
                    )
                continue
            out.append({"text": text, "row": row, "position": position})
        return out

    def state_dict(self) -> dict[str, int]:
        return {"prompt_cursor": self.cursor, "dropped": self.dropped}

    def load_state_dict(self, state: dict) -> None:
        self.cursor, self.dropped = state["prompt_cursor"], state["dropped"]


def sampling_for(args, positions: list[int] | None = None) -> SamplingConfig:
    """Sampling settings of a GRPOConfig; with ``positions`` (global prompt positions) each prompt gets its own
    seed, so the rollouts are the same whatever the number of processes or the generation batch size."""
    seeds = None if positions is None else [args.seed * 1_000_003 + p for p in positions]
    return SamplingConfig(
        n=args.num_generations,
        max_new_tokens=args.max_completion_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        min_p=args.min_p or 0.0,
        min_new_tokens=args.min_completion_length,
        stop=list(args.stop_strings),
        seed=args.seed,
        prompt_seeds=seeds,
        extra=dict(args.generation_kwargs or {}),
    )


@dataclass
class ScoredGroups:
    """Completions of whole groups, flattened group-major (prompt 0's G samples, then prompt 1's, ...)."""

    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # weighted sum over functions; NaN: unscorable
    logprobs: list[list[float] | None] = field(default_factory=list)  # the sampler's, per completion token

    def extend(self, other: ScoredGroups, start: int, stop: int) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name)[start:stop])

    def __len__(self) -> int:
        return len(self.rewards)


def reward_inputs(prompts: list[dict], groups: list[list[Rollout]]) -> dict:
    """TRL's reward-function arguments for these groups: prompts, completions (message lists for conversations),
    completion ids, and every other dataset column as a list, one entry per completion."""
    rows = [p["row"] for p, group in zip(prompts, groups) for _ in group]
    flat = [r for group in groups for r in group]
    conversational = bool(rows) and is_conversational({"prompt": rows[0]["prompt"]})
    return {
        "prompts": [row["prompt"] for row in rows],
        "completions": [
            [{"role": "assistant", "content": r.text}] if conversational else r.text for r in flat
        ],
        "completion_ids": [list(r.completion_ids) for r in flat],
        "columns": {k: [row[k] for row in rows] for k in (rows[0] if rows else {}) if k != "prompt"},
    }


def total_rewards(rewards_NF: torch.Tensor, weights: list[float]) -> list[float]:
    """Weighted sum over the functions that gave a reward (TRL's nansum); NaN where none did."""
    weighted_NF = rewards_NF * torch.tensor(weights, dtype=rewards_NF.dtype)
    totals_N = weighted_NF.nansum(dim=1)
    totals_N[torch.isnan(rewards_NF).all(dim=1)] = float("nan")
    return totals_N.tolist()


def scored_groups(groups: list[list[Rollout]], rewards: list[float]) -> ScoredGroups:
    flat = [r for group in groups for r in group]
    return ScoredGroups(
        prompt_ids=[r.prompt_ids for r in flat],
        completion_ids=[r.completion_ids for r in flat],
        finish_reasons=[r.finish_reason for r in flat],
        rewards=list(rewards),
        logprobs=[r.logprobs for r in flat],
    )


def rollout_metrics(
    rewards_NF: torch.Tensor, names: list[str], scored: ScoredGroups, group_size: int
) -> dict[str, float]:
    """TRL's metric names for one generation round, plus ``rewards/<name>/invalid`` (completions it gave no reward)."""
    out = {}
    for k, name in enumerate(names):
        column = rewards_NF[:, k]
        out[f"rewards/{name}/mean"] = column.nanmean().item()  # NaN when no completion got one
        out[f"rewards/{name}/std"] = rewards_std(column)
        out[f"rewards/{name}/invalid"] = column.isnan().sum().item()
    rewards = torch.tensor(scored.rewards, dtype=torch.float64)
    groups = rewards.view(-1, group_size)  # (num_groups, G); NaN (unscorable) is left out of the spread
    spread = groups.nan_to_num(-math.inf).max(1).values > groups.nan_to_num(math.inf).min(1).values
    lengths = torch.tensor([len(c) for c in scored.completion_ids], dtype=torch.float32)
    ended = lengths[torch.tensor([r != "length" for r in scored.finish_reasons], dtype=torch.bool)]
    ended = ended if len(ended) else torch.zeros(1)  # TRL's: 0 when every completion was cut
    out.update({
        "reward": rewards.nanmean().item(),
        "reward_std": rewards_std(rewards),
        "frac_reward_zero_std": (~spread).float().mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(r == "length" for r in scored.finish_reasons) / max(len(scored), 1),
        "completions/mean_terminated_length": ended.mean().item(),
        "completions/min_terminated_length": ended.min().item(),
        "completions/max_terminated_length": ended.max().item(),
    })  # fmt: skip
    return out


def select_groups(
    scored: ScoredGroups, group_size: int, keep: ScoredGroups, want: int, filler: ScoredGroups, dynamic: bool
) -> None:
    """Move whole groups into ``keep`` until it has ``want`` groups; with ``dynamic``, a group whose scorable
    rewards are all equal goes to ``filler`` instead (to be used only if the rounds run out)."""
    for start in range(0, len(scored), group_size):
        if len(keep) >= want * group_size:
            return
        group = [r for r in scored.rewards[start : start + group_size] if r == r]  # NaN: unscorable
        signal = len(group) > 1 and max(group) > min(group)
        (keep if signal or not dynamic else filler).extend(scored, start, start + group_size)


def advantages_for(
    scored: ScoredGroups, group_size: int, eps: float, scale: str, batch_std: float | None = None
):
    """Rewards minus their group's mean, divided by the group's std (``scale="group"``), by ``batch_std`` (the
    std of the whole generation batch, all processes: ``"batch"``) or by nothing (``"none"``). Unscorable
    completions (NaN) are left out of their group's statistics and get advantage 0; returns rewards with 0 there."""
    rewards_B = torch.tensor(scored.rewards, dtype=torch.float32)
    valid_B = ~torch.isnan(rewards_B)
    by_group = scale == "group"
    if valid_B.all():
        advantages_B = group_normalize_rewards(rewards_B, group_size, eps, by_group)
    else:
        advantages_B = torch.zeros_like(rewards_B)
        for start in range(0, len(rewards_B), group_size):
            idx = valid_B[start : start + group_size].nonzero().flatten() + start
            if len(idx):
                advantages_B[idx] = group_normalize_rewards(rewards_B[idx], len(idx), eps, by_group)
    if scale == "batch":
        advantages_B = advantages_B / (batch_std + eps)
    return rewards_B.nan_to_num(0.0), advantages_B


def rewards_std(rewards: torch.Tensor) -> float:
    """Unbiased std of the finite values (0 with fewer than two)."""
    valid = rewards[~torch.isnan(rewards)]
    return valid.std().item() if valid.numel() > 1 else 0.0


def build_micro_batches(
    scored: ScoredGroups,
    rewards_B: torch.Tensor,
    advantages_B: torch.Tensor,
    pad_token_id: int,
    micro_batch_size: int,
    micro_batches_per_step: int,
    mask_truncated: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Split this process's rollout batch into micro-batches (in order), each trimmed to its own length.

    Each carries ``step_index``: which optimizer step (within one pass over the rollout batch) it belongs to,
    and ``sampling_log_probs`` (B, T), the engine's log-probs aligned with ``labels`` (0 where not in
    ``response_mask``), when the engine gave them for every completion of the micro-batch.
    """
    batches = []
    for i, start in enumerate(range(0, len(scored), micro_batch_size)):
        sl = slice(start, start + micro_batch_size)
        seqs = build_shifted_sequences(scored.prompt_ids[sl], scored.completion_ids[sl], pad_token_id)
        if mask_truncated:  # TRL's mask_truncated_completions: cut completions leave the loss
            cut = torch.tensor([f == "length" for f in scored.finish_reasons[sl]])
            seqs["response_mask"] = seqs["response_mask"] * ~cut[:, None]
        logprobs = scored.logprobs[sl]
        if len(logprobs) == len(seqs["labels"]) and all(lp is not None for lp in logprobs):
            rows = [torch.tensor([0.0] * len(p) + lp) for p, lp in zip(scored.prompt_ids[sl], logprobs)]
            padded_BL = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # as build_shifted_sequences
            seqs["sampling_log_probs"] = padded_BL[:, 1:] * seqs["response_mask"]  # (B, L-1), like labels
        seqs["advantages"] = advantages_B[sl]
        seqs["raw_rewards"] = rewards_B[sl]
        seqs["step_index"] = torch.tensor(i // micro_batches_per_step)
        batches.append(seqs)
    return batches


def attach_global_counts(micro: list[dict], accelerator, optimizer_batch_size: int) -> None:
    """Move each micro-batch to the device (the rollout buffer lives there) and give it its optimizer step's
    sequence count and response-token count summed over processes, so the loss of every reduction is normalised
    exactly as over the whole step."""
    device = accelerator.device
    tokens = torch.zeros(max(b["step_index"].item() for b in micro) + 1, dtype=torch.float64, device=device)
    for b in micro:
        b.update({k: v.to(device) for k, v in b.items()})
        tokens[b["step_index"]] += b["response_mask"].sum()
    if accelerator.num_processes > 1:
        tokens = accelerator.reduce(tokens, reduction="sum")
    for b in micro:
        b["num_tokens"] = tokens[b["step_index"]].float()
        b["num_sequences"] = torch.tensor(float(optimizer_batch_size), device=device)


class RolloutQueue:
    """Generation batches made ahead of training (``async_rollouts``) on one background thread, in the order they
    were queued, each tagged with the policy version (optimizer step) whose weights sample it. One thread: the
    engine runs one job at a time, so a weight push queued as part of a job never overlaps a generation."""

    def __init__(self) -> None:
        self.pending: deque[tuple[int, Future]] = deque()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, version: int, job) -> None:
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="hf_align-rollouts")
        self.pending.append((version, self._pool.submit(job)))

    def idle(self) -> bool:
        return all(f.done() for _, f in self.pending)

    def pop(self) -> tuple:
        """(version, *job result) of the oldest batch, waiting for it; a job's exception is raised here."""
        version, future = self.pending.popleft()
        return version, *future.result()

    def state_dict(self) -> list[tuple]:
        """The queued batches, finished first (a checkpoint holds them: their stale weights are gone)."""
        return [(version, future.result()) for version, future in self.pending]

    def load_state_dict(self, items: list[tuple]) -> None:
        self.pending.clear()
        for version, result in items:
            future = Future()
            future.set_result(result)
            self.pending.append((version, future))

    def close(self) -> None:
        """Wait for the running job and drop the queue (a later ``submit`` starts a new thread)."""
        for _, future in self.pending:
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.pending.clear()
        self._pool = None
