"""GRPO and policy-gradient losses as pure functions: group advantages, per-token losses, reductions.

Choices:
- Advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2 "outcome supervision"): each rollout's reward minus
  its group's mean, optionally divided by the group's *unbiased* standard deviation plus ``advantage_eps``,
  or (MaxRL, Tajwar et al. 2026) by the group's mean reward plus ``advantage_eps``.
  A group whose rewards are all equal (``max == min``) gets advantage exactly 0, whatever ``advantage_eps``,
  so a zero-std group never yields NaN or float noise. A NaN / inf / None reward raises instead of
  propagating.
- Per-token losses (B, T) come from a table ``POLICY_GRADIENT_LOSSES``: REINFORCE without baseline, with a
  baseline (the group-normalized advantage), the PPO / GRPO clipped surrogate (Schulman et al. 2017, eq. 7;
  Shao et al. 2024, eq. 3) with optional asymmetric "clip-higher" ranges (DAPO, Yu et al. 2025, sec. 3.1),
  and the unclipped importance-weighted surrogate ``-r * A``.
- The importance ratio is itself a table ``RATIO_LEVELS``: per token ``r_t = pi/pi_old``, or GSPO's sequence
  ratio (Zheng et al. 2025, sec. 4.1) ``s_i = exp(mean_t log(pi/pi_old))`` written per token as
  ``sg(s_i) * exp(logp_t - sg(logp_t))`` (GSPO-token, sec. 4.3), whose value is ``s_i`` at every token and
  whose gradient, after a per-sequence token mean, is GSPO's.
- An optional KL penalty to a reference policy uses the k3 estimator (Schulman 2020, "Approximating KL
  divergence"), added per token as ``beta * k3``, as in GRPO eq. 3-4.
- Reducing (B, T) token losses to a scalar is its own table ``LOSS_REDUCTIONS``: per-sequence mean (GRPO),
  global token mean (DAPO, sec. 3.3) or a constant normalizer (Dr. GRPO, Liu et al. 2025, sec. 3.2). Each
  divides a *sum* by a normalizer the caller may pass as a GLOBAL count over the whole optimizer step (all
  micro-batches, all processes), so the sum of ``backward()`` over micro-batches gives the full-batch gradient
  exactly however the batch is split. Under DDP / FSDP, which *average* gradients over processes, multiply
  the loss by the world size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import torch

from hf_align.logprobs import masked_mean_or_zero, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]
Reduction = Literal["sequence_mean", "token_mean", "constant"]
RatioLevel = Literal["token", "sequence"]
AdvantageScale = Literal["none", "std", "mean"]
Count = int | float | torch.Tensor

# ------------------------------------------------------------------------------------------------------------
# Advantages
# ------------------------------------------------------------------------------------------------------------


def _group_stats(
    rewards_B: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centered rewards (N, G), mean (N, 1), unbiased std (N, 1) and a zero-spread flag (N, 1) for N groups."""
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards must be 1-D (rollout_batch_size,), got shape {tuple(rewards_B.shape)}")
    if group_size < 1 or rewards_B.numel() % group_size != 0:
        raise ValueError(
            f"rollout batch of {rewards_B.numel()} rewards is not a whole number of groups of {group_size}"
        )
    bad_B = ~torch.isfinite(rewards_B)
    if bad_B.any():
        i = int(bad_B.nonzero()[0, 0])
        raise ValueError(f"reward at index {i} is {rewards_B[i].item()} (must be finite)")
    rewards_NG = rewards_B.reshape(-1, group_size)  # (n_groups, G): consecutive rollouts share a prompt
    mean_N1 = rewards_NG.mean(dim=-1, keepdim=True)
    centered_NG = rewards_NG - mean_N1
    # Unbiased (Bessel) variance; a group of one has no spread, so its divisor is irrelevant.
    var_N1 = centered_NG.pow(2).sum(dim=-1, keepdim=True) / max(group_size - 1, 1)
    zero_N1 = rewards_NG.amax(dim=-1, keepdim=True) == rewards_NG.amin(dim=-1, keepdim=True)
    std_N1 = torch.where(zero_N1, torch.zeros_like(var_N1), var_N1.sqrt())
    return torch.where(zero_N1, torch.zeros_like(centered_NG), centered_NG), mean_N1, std_N1, zero_N1


def _scale_none(mean_N1: torch.Tensor, std_N1: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    return torch.ones_like(std_N1)


def _scale_std(mean_N1: torch.Tensor, std_N1: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    return std_N1 + advantage_eps


def _scale_mean(mean_N1: torch.Tensor, std_N1: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    if (mean_N1 < 0).any():
        i = int((mean_N1 < 0).nonzero()[0, 0])
        raise ValueError(
            f"normalize_by='mean' (MaxRL) divides by the group's mean reward, a success rate, so it needs "
            f"rewards with a non-negative group mean; group {i} has mean {mean_N1[i, 0].item()}"
        )
    return mean_N1 + advantage_eps


# How the centered group rewards are scaled (the denominator of the advantage).
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "none": _scale_none,
    "std": _scale_std,
    "mean": _scale_mean,
}


def group_normalize_rewards(
    rewards_B: torch.Tensor,
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
    *,
    normalize_by: AdvantageScale | None = None,
) -> torch.Tensor:
    """Group-relative advantages, (B,) -> (B,), with the denominator chosen from ``ADVANTAGE_SCALES``.

    With ``mean_g`` / ``std_g`` the mean and unbiased std of the group g of ``group_size`` consecutive rollouts
    holding i: ``"std"`` gives GRPO's ``A_i = (r_i - mean_g) / (std_g + advantage_eps)`` (Shao et al. 2024,
    DeepSeekMath, sec. 4.1.2); ``"none"`` gives ``r_i - mean_g`` (Dr. GRPO); ``"mean"`` gives MaxRL's
    ``A_i = (r_i - mean_g) / (mean_g + advantage_eps)`` (Tajwar et al. 2026, arXiv:2602.02710), which weights a
    prompt by about 1/pass-rate and needs a non-negative group mean. ``normalize_by=None`` keeps the seed's
    choice: ``"std"`` if ``normalize_by_std`` else ``"none"``. A group with equal rewards (all wrong, under
    MaxRL the no-success case) has A = 0. Raises ValueError on a non-finite reward (naming its index), a
    ragged last group or an unknown ``normalize_by``.
    """
    scale = normalize_by if normalize_by is not None else ("std" if normalize_by_std else "none")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown normalize_by {scale!r}; valid: {sorted(ADVANTAGE_SCALES)}")
    if not rewards_B.is_floating_point():
        rewards_B = rewards_B.float()
    centered_NG, mean_N1, std_N1, zero_N1 = _group_stats(rewards_B, group_size)
    denom_N1 = ADVANTAGE_SCALES[scale](mean_N1, std_N1, advantage_eps)
    # zero-spread groups are already exactly 0; dividing them by 1 keeps advantage_eps=0 from making 0/0
    denom_N1 = torch.where(zero_N1, torch.ones_like(denom_N1), denom_N1)
    return (centered_NG / denom_N1).reshape(-1)  # (B,)


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], dict[str, float]],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
    *,
    normalize_by: AdvantageScale | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Grade each rollout with ``reward_fn(response, ground_truth)["reward"]``, then group-normalize.

    The advantages are ``group_normalize_rewards(rewards, group_size, advantage_eps, normalize_by_std,
    normalize_by=normalize_by)`` (``normalize_by="mean"`` for MaxRL).

    Returns ``(advantages_B, raw_rewards_B, metadata)``, both float32 tensors of shape (rollout_batch_size,).
    Metadata (python floats): ``reward_mean`` / ``reward_std`` (unbiased over the batch) / ``reward_min`` /
    ``reward_max``, ``zero_std_group_fraction``, and ``format_reward_mean`` / ``answer_reward_mean`` over the
    rollouts whose reward dict has those keys.
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(
            f"{len(rollout_responses)} rollout_responses but "
            f"{len(repeated_ground_truths)} repeated_ground_truths"
        )
    graded = [reward_fn(resp, gt) for resp, gt in zip(rollout_responses, repeated_ground_truths)]
    for i, info in enumerate(graded):
        if info.get("reward") is None:
            raise ValueError(f"reward_fn returned no reward (None) for rollout index {i}")
    raw_rewards_B = torch.tensor([float(info["reward"]) for info in graded], dtype=torch.float32)
    advantages_B = group_normalize_rewards(
        raw_rewards_B, group_size, advantage_eps, normalize_by_std, normalize_by=normalize_by
    )
    _, _, _, zero_N1 = _group_stats(raw_rewards_B, group_size)
    metadata = {
        "reward_mean": raw_rewards_B.mean().item(),
        "reward_std": raw_rewards_B.std().item() if raw_rewards_B.numel() > 1 else 0.0,
        "reward_min": raw_rewards_B.min().item(),
        "reward_max": raw_rewards_B.max().item(),
        "zero_std_group_fraction": zero_N1.float().mean().item(),
    }
    for key in ("format_reward", "answer_reward"):
        values = [float(info[key]) for info in graded if info.get(key) is not None]
        if values:
            metadata[f"{key}_mean"] = sum(values) / len(values)
    return advantages_B, raw_rewards_B, metadata


# ------------------------------------------------------------------------------------------------------------
# Importance ratios and KL
# ------------------------------------------------------------------------------------------------------------


def token_importance_ratio(
    policy_log_probs_BT: torch.Tensor,
    old_log_probs_BT: torch.Tensor,
    response_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO's per-token ratio ``r_t = exp(logp_t - logp_old_t)`` (Schulman et al. 2017, eq. 6), (B, T)."""
    return torch.exp(policy_log_probs_BT - old_log_probs_BT)


def sequence_importance_ratio(
    policy_log_probs_BT: torch.Tensor,
    old_log_probs_BT: torch.Tensor,
    response_mask_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """GSPO's length-normalized sequence ratio (Zheng et al. 2025, sec. 4.1), broadcast to tokens, (B, T).

    ``s_i = exp((1/|y_i|) sum_t m_it (logp_it - logp_old_it))``, written per token as
    ``sg(s_i) * exp(logp_it - sg(logp_it))`` (GSPO-token, sec. 4.3): every token's value is ``s_i``, and
    ``(1/|y_i|) sum_t`` of a loss ``f(s_i)`` over these tokens has GSPO's gradient
    ``f'(s_i) s_i (1/|y_i|) sum_t grad logp_it``. A fully masked row has ``s_i = 1``.
    """
    if response_mask_BT is None:
        raise ValueError(
            "ratio_level='sequence' (GSPO) needs response_mask to average over each sequence's tokens"
        )
    log_s_B1 = masked_mean_or_zero(
        policy_log_probs_BT - old_log_probs_BT, response_mask_BT, dim=-1
    ).unsqueeze(-1)
    return torch.exp(log_s_B1).detach() * torch.exp(policy_log_probs_BT - policy_log_probs_BT.detach())


RATIO_LEVELS: dict[str, Callable[..., torch.Tensor]] = {
    "token": token_importance_ratio,
    "sequence": sequence_importance_ratio,
}


def kl_k3(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020, "Approximating KL divergence"; GRPO eq. 4).

    ``k3 = exp(ref - logp) - (ref - logp) - 1``: unbiased for the KL under samples from pi, >= 0 everywhere
    (``e^x >= 1 + x``), and 0 where the two log-probs agree. Same shape as the inputs.
    """
    log_ratio = ref_log_probs - policy_log_probs
    return torch.exp(log_ratio) - log_ratio - 1.0


# ------------------------------------------------------------------------------------------------------------
# Per-token losses
# ------------------------------------------------------------------------------------------------------------


def _column(values: torch.Tensor, name: str, batch: int) -> torch.Tensor:
    """(B,) or (B, 1) -> (B, 1), so it broadcasts over tokens."""
    if values.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"{name} must have shape ({batch},) or ({batch}, 1), got {tuple(values.shape)}")
    return values.reshape(batch, 1)  # (B, 1)


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor, policy_log_probs: torch.Tensor
) -> torch.Tensor:
    """REINFORCE per-token loss ``-A_i * log pi(o_it)`` (Williams 1992), A (B, 1) or (B,) -> (B, T)."""
    A_B1 = _column(raw_rewards_or_advantages, "raw_rewards_or_advantages", policy_log_probs.shape[0])
    return -A_B1.to(policy_log_probs.dtype) * policy_log_probs


def _resolve_clip(
    cliprange: float | None, cliprange_low: float | None, cliprange_high: float | None
) -> tuple[float | None, float | None]:
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    return low, high


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float | None = None,
    *,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    ratio_level: RatioLevel = "token",
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate per token (Schulman et al. 2017, eq. 7; Shao et al. 2024, eq. 3), (B, T).

    ``l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i)`` with ``r`` from ``RATIO_LEVELS``
    (token: PPO; sequence: GSPO). ``eps_low = eps_high = cliprange`` unless ``cliprange_low`` /
    ``cliprange_high`` are given (clip-higher, DAPO, Yu et al. 2025, sec. 3.1).

    Metadata, all detached (B, T): ``ratio``; ``clipped_high`` (A > 0 and r > 1 + eps_high),
    ``clipped_low`` (A < 0 and r < 1 - eps_low), ``clipped`` (either): exactly the tokens where the clipped
    term is the smaller one and differs from the unclipped term, i.e. whose gradient is zero.
    """
    low, high = _resolve_clip(cliprange, cliprange_low, cliprange_high)
    if low is None or high is None:
        raise ValueError("grpo_clip needs cliprange (or both cliprange_low and cliprange_high)")
    A_B1 = _column(advantages, "advantages", policy_log_probs.shape[0]).to(policy_log_probs.dtype)
    ratio_BT = RATIO_LEVELS[ratio_level](policy_log_probs, old_log_probs, response_mask)
    unclipped_BT = ratio_BT * A_B1
    clipped_obj_BT = torch.clamp(ratio_BT, 1.0 - low, 1.0 + high) * A_B1
    loss_BT = -torch.minimum(unclipped_BT, clipped_obj_BT)
    with torch.no_grad():
        clipped_high_BT = (ratio_BT > 1.0 + high) & (A_B1 > 0)
        clipped_low_BT = (ratio_BT < 1.0 - low) & (A_B1 < 0)
    metadata = {
        "ratio": ratio_BT.detach(),
        "clipped": clipped_low_BT | clipped_high_BT,
        "clipped_low": clipped_low_BT,
        "clipped_high": clipped_high_BT,
    }
    return loss_BT, metadata


def compute_grpo_no_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    *,
    ratio_level: RatioLevel = "token",
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Unclipped importance-weighted surrogate ``l_it = -r_it A_i`` (PPO's CPI objective, Schulman et al.
    2017, eq. 6), (B, T). Its gradient at ``pi = pi_old`` is REINFORCE's. Metadata: detached ``ratio`` (B, T).
    """
    A_B1 = _column(advantages, "advantages", policy_log_probs.shape[0]).to(policy_log_probs.dtype)
    ratio_BT = RATIO_LEVELS[ratio_level](policy_log_probs, old_log_probs, response_mask)
    return -ratio_BT * A_B1, {"ratio": ratio_BT.detach()}


class _PGInputs(NamedTuple):
    raw_rewards: torch.Tensor | None
    advantages: torch.Tensor | None
    old_log_probs: torch.Tensor | None
    cliprange_low: float | None
    cliprange_high: float | None
    ratio_level: RatioLevel
    response_mask: torch.Tensor | None


_PGLoss = Callable[[torch.Tensor, _PGInputs], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _no_baseline(logps_BT: torch.Tensor, x: _PGInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_naive_policy_gradient_loss(x.raw_rewards, logps_BT), {}


def _reinforce_with_baseline(
    logps_BT: torch.Tensor, x: _PGInputs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_naive_policy_gradient_loss(x.advantages, logps_BT), {}


def _grpo_clip(logps_BT: torch.Tensor, x: _PGInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_grpo_clip_loss(
        x.advantages,
        logps_BT,
        x.old_log_probs,
        cliprange_low=x.cliprange_low,
        cliprange_high=x.cliprange_high,
        ratio_level=x.ratio_level,
        response_mask=x.response_mask,
    )


def _grpo_no_clip(logps_BT: torch.Tensor, x: _PGInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return compute_grpo_no_clip_loss(
        x.advantages, logps_BT, x.old_log_probs, ratio_level=x.ratio_level, response_mask=x.response_mask
    )


# loss_type -> (per-token loss, the arguments it needs, whether it has an importance ratio)
POLICY_GRADIENT_LOSSES: dict[str, tuple[_PGLoss, tuple[str, ...], bool]] = {
    "no_baseline": (_no_baseline, ("raw_rewards",), False),
    "reinforce_with_baseline": (_reinforce_with_baseline, ("advantages",), False),
    "grpo_clip": (_grpo_clip, ("advantages", "old_log_probs", "cliprange"), True),
    "grpo_no_clip": (_grpo_no_clip, ("advantages", "old_log_probs"), True),
}


def compute_policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: LossType,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
    *,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    ratio_level: RatioLevel = "token",
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy-gradient loss (B, T) and per-token metadata for ``loss_type`` in
    ``POLICY_GRADIENT_LOSSES``: ``no_baseline`` (raw_rewards), ``reinforce_with_baseline`` (advantages),
    ``grpo_clip`` (advantages, old_log_probs, cliprange or cliprange_low + cliprange_high), ``grpo_no_clip``
    (advantages, old_log_probs). ``ratio_level`` ("token" | "sequence", GSPO; the latter needs response_mask)
    applies to the two ratio losses. A missing argument raises ValueError naming it and the loss_type.
    """
    if loss_type not in POLICY_GRADIENT_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(POLICY_GRADIENT_LOSSES)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {sorted(RATIO_LEVELS)}")
    loss_fn, required, has_ratio = POLICY_GRADIENT_LOSSES[loss_type]
    low, high = _resolve_clip(cliprange, cliprange_low, cliprange_high)
    given = {
        "raw_rewards": raw_rewards,
        "advantages": advantages,
        "old_log_probs": old_log_probs,
        "cliprange": None if low is None or high is None else (low, high),
    }
    missing = [name for name in required if given[name] is None]
    if missing:
        raise ValueError(f"loss_type={loss_type!r} needs {', '.join(missing)} (got None)")
    if ratio_level != "token" and not has_ratio:
        raise ValueError(
            f"ratio_level={ratio_level!r} needs a loss_type with an importance ratio, not {loss_type!r}"
        )
    inputs = _PGInputs(raw_rewards, advantages, old_log_probs, low, high, ratio_level, response_mask)
    return loss_fn(policy_log_probs, inputs)


# ------------------------------------------------------------------------------------------------------------
# Reductions (B, T) -> scalar
# ------------------------------------------------------------------------------------------------------------


def reduce_sequence_mean(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """GRPO's reduction (Shao et al. 2024, eq. 3): ``L = (1/N_seq) sum_i (1/|o_i|) sum_t m_it l_it``.

    ``N_seq`` = ``num_sequences``, the number of sequences in the whole optimizer step (all micro-batches and
    processes); default this micro-batch's B. ``|o_i| = sum_t m_it``; a fully masked row adds 0 but still
    counts in N_seq.
    """
    n_seq = loss_BT.shape[0] if num_sequences is None else num_sequences
    return masked_mean_or_zero(loss_BT, mask_BT, dim=-1).sum() / n_seq


def reduce_token_mean(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """DAPO's token-level reduction (Yu et al. 2025, sec. 3.3): ``L = (1/N_tok) sum_i sum_t m_it l_it``.

    ``N_tok`` = ``num_tokens``, the number of unmasked response tokens in the whole optimizer step; default
    ``max(1, sum m)`` over this micro-batch.
    """
    n_tok = mask_BT.to(loss_BT.dtype).sum().clamp(min=1.0) if num_tokens is None else num_tokens
    return masked_normalize(loss_BT, mask_BT, n_tok)


def reduce_constant(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Dr. GRPO's constant normalizer (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2):
    ``L = (1/(N_seq * L_max)) sum_i sum_t m_it l_it``.

    ``N_seq`` as in ``reduce_sequence_mean``; ``L_max`` = ``max_completion_length``, a config constant
    (required: the padded width of a micro-batch would make the loss depend on how the batch is split).
    """
    if max_completion_length is None:
        raise ValueError(
            "reduction='constant' needs max_completion_length (the generation length limit L_max)"
        )
    n_seq = loss_BT.shape[0] if num_sequences is None else num_sequences
    return masked_normalize(loss_BT, mask_BT, n_seq * max_completion_length)


LOSS_REDUCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sequence_mean": reduce_sequence_mean,
    "token_mean": reduce_token_mean,
    "constant": reduce_constant,
}


def reduce_token_losses(
    loss_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    reduction: Reduction,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar with ``LOSS_REDUCTIONS[reduction]`` (formulas there).

    Every reduction is a masked *sum* over this micro-batch divided by a normalizer; with the global
    ``num_sequences`` / ``num_tokens`` of the optimizer step, summing the result over micro-batches (and
    processes) gives the full-batch loss exactly, and masked padding columns change nothing.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {sorted(LOSS_REDUCTIONS)}")
    return LOSS_REDUCTIONS[reduction](
        loss_BT,
        mask_BT,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        max_completion_length=max_completion_length,
    )


# ------------------------------------------------------------------------------------------------------------
# Entry points for trainers
# ------------------------------------------------------------------------------------------------------------


def _ratio_metrics(meta: dict[str, torch.Tensor], mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    ratio_BT = meta["ratio"]
    out = {
        "ratio_mean": masked_mean_or_zero(ratio_BT, mask_BT),
        # ratios are > 0, so 0 at masked tokens leaves the max of the unmasked ones (0 if none)
        "ratio_max": torch.where(mask_BT.bool(), ratio_BT, torch.zeros_like(ratio_BT)).max(),
    }
    if "clipped" in meta:
        for key in ("clipped_low", "clipped_high", "clipped"):
            out[key.replace("clipped", "clip_fraction")] = masked_mean_or_zero(
                meta[key].to(ratio_BT.dtype), mask_BT
            )
    return out


def policy_loss(
    policy_log_probs_BT: torch.Tensor,
    response_mask_BT: torch.Tensor,
    *,
    loss_type: LossType,
    reduction: Reduction = "sequence_mean",
    advantages_B: torch.Tensor | None = None,
    raw_rewards_B: torch.Tensor | None = None,
    old_log_probs_BT: torch.Tensor | None = None,
    ref_log_probs_BT: torch.Tensor | None = None,
    cliprange: float | None = None,
    cliprange_low: float | None = None,
    cliprange_high: float | None = None,
    ratio_level: RatioLevel = "token",
    beta: float = 0.0,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's GRPO-family loss: ``reduce(l^pg_it + beta * k3_it)`` (Shao et al. 2024, eq. 3).

    ``l^pg`` from ``compute_policy_gradient_loss``; ``k3 = kl_k3(policy, ref)`` is added when ``beta > 0``
    (which then needs ``ref_log_probs_BT``); ``reduce`` is ``reduce_token_losses(reduction, num_sequences,
    num_tokens, max_completion_length)``. Pass the optimizer step's global counts to make the sum of
    ``backward()`` over micro-batches exact; without them the loss is normalized over this micro-batch alone.
    This returns the loss unscaled: no division by accumulation steps, no world-size factor.

    Metrics, detached 0-dim tensors: ``loss``, ``policy_loss`` (the pg part, same reduction); ``kl_mean``
    (masked token mean of k3, whenever ref log-probs are given); for ratio losses ``ratio_mean``,
    ``ratio_max`` and for ``grpo_clip`` ``clip_fraction_low`` / ``clip_fraction_high`` / ``clip_fraction``
    (masked token fractions). Token statistics are over this micro-batch.
    """
    if beta > 0 and ref_log_probs_BT is None:
        raise ValueError(f"beta={beta} > 0 needs ref_log_probs_BT for the KL penalty (or set beta=0)")
    pg_BT, meta = compute_policy_gradient_loss(
        policy_log_probs_BT,
        loss_type,
        raw_rewards=raw_rewards_B,
        advantages=advantages_B,
        old_log_probs=old_log_probs_BT,
        cliprange=cliprange,
        cliprange_low=cliprange_low,
        cliprange_high=cliprange_high,
        ratio_level=ratio_level,
        response_mask=response_mask_BT,
    )
    counts: dict[str, Any] = {
        "num_sequences": num_sequences,
        "num_tokens": num_tokens,
        "max_completion_length": max_completion_length,
    }
    metrics: dict[str, torch.Tensor] = {}
    total_BT = pg_BT
    if ref_log_probs_BT is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and beta > 0):
            kl_BT = kl_k3(policy_log_probs_BT, ref_log_probs_BT)
        metrics["kl_mean"] = masked_mean_or_zero(kl_BT.detach(), response_mask_BT)
        if beta > 0:
            total_BT = pg_BT + beta * kl_BT
    loss = reduce_token_losses(total_BT, response_mask_BT, reduction, **counts)
    with torch.no_grad():
        metrics["loss"] = loss.detach()
        metrics["policy_loss"] = reduce_token_losses(pg_BT.detach(), response_mask_BT, reduction, **counts)
        if "ratio" in meta:
            metrics.update(_ratio_metrics(meta, response_mask_BT))
    return loss, metrics


def grpo_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's micro-batch step: ``policy_loss(reduction="sequence_mean")`` over this micro-batch,
    divided by ``gradient_accumulation_steps``, then ``loss.backward()``. Returns the scaled loss and metrics.
    """
    loss, metrics = policy_loss(
        policy_log_probs,
        response_mask,
        loss_type=loss_type,
        reduction="sequence_mean",
        advantages_B=advantages,
        raw_rewards_B=raw_rewards,
        old_log_probs_BT=old_log_probs,
        cliprange=cliprange,
    )
    loss = loss / gradient_accumulation_steps
    loss.backward()
    return loss, metrics
