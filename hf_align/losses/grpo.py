"""GRPO and policy-gradient losses as pure functions: group advantages, per-token losses, reductions.

Advantages: rewards minus their group's mean, over a scale from ``ADVANTAGE_SCALES`` (a group of equal rewards
gets exactly 0). Per-token losses: ``POLICY_GRADIENT_LOSSES``, with a token or GSPO sequence ratio from
``RATIO_LEVELS`` and an optional k3 KL penalty. ``LOSS_REDUCTIONS`` divide a masked *sum* over the micro-batch
by a normalizer the caller may pass as a GLOBAL count of the optimizer step (all micro-batches and processes),
so the summed ``backward()`` of the micro-batches is the full-batch gradient however the batch is split.
``importance_sampling_weight`` corrects for a sampler that is not the trainer's forward (other kernels,
truncated sampling, stale weights): a detached weight on each token's policy-gradient loss, apart from the
clip ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from hf_align.logprobs import masked_mean_or_zero, masked_normalize

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip", "grpo_no_clip"]
Reduction = Literal["sequence_mean", "token_mean", "constant"]
RatioLevel = Literal["token", "sequence"]
SamplingCorrection = Literal["truncate", "mask"]
AdvantageScale = Literal["none", "std", "mean"]
Count = int | float | torch.Tensor
LossAndMetrics = tuple[torch.Tensor, dict[str, torch.Tensor]]


def _groups(rewards_B: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (N, G): N groups of ``group_size`` consecutive rollouts (one prompt each)."""
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards must be 1-D (rollout_batch_size,), got shape {tuple(rewards_B.shape)}")
    if group_size < 1 or rewards_B.numel() % group_size != 0:
        raise ValueError(f"{rewards_B.numel()} rewards are not a whole number of groups of {group_size}")
    bad_B = ~torch.isfinite(rewards_B)
    if bad_B.any():
        i = int(bad_B.nonzero()[0, 0])
        raise ValueError(f"reward at index {i} is {rewards_B[i].item()} (must be finite)")
    return rewards_B.reshape(-1, group_size)  # (N, G)


def _flat(rewards_NG: torch.Tensor) -> torch.Tensor:
    """(N, 1): the groups whose rewards are all equal (no spread, nothing to learn from)."""
    return rewards_NG.amax(dim=-1, keepdim=True) == rewards_NG.amin(dim=-1, keepdim=True)


def _scale_none(rewards_NG: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, sec. 3.1): no division."""
    return rewards_NG.new_ones(rewards_NG.shape[0], 1)


def _scale_std(rewards_NG: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): the group's unbiased std + eps."""
    # Bessel's correction; a group of one has no spread (its divisor is irrelevant, and 0 would warn)
    return rewards_NG.std(dim=-1, keepdim=True, correction=min(rewards_NG.shape[1] - 1, 1)) + advantage_eps


def _scale_mean(rewards_NG: torch.Tensor, advantage_eps: float) -> torch.Tensor:
    """MaxRL (Tajwar et al. 2026, arXiv:2602.02710): the group's mean reward (a success rate) + eps."""
    mean_N1 = rewards_NG.mean(dim=-1, keepdim=True)
    if (mean_N1 < 0).any():
        i = int((mean_N1 < 0).nonzero()[0, 0])
        m = mean_N1[i, 0].item()
        raise ValueError(f"normalize_by='mean' (MaxRL) needs group mean rewards >= 0; group {i} has mean {m}")
    return mean_N1 + advantage_eps


# normalize_by -> the denominator (N, 1) of the centered group rewards
ADVANTAGE_SCALES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
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
    """Group-relative advantages (B,): ``A_i = (r_i - mean_g) / ADVANTAGE_SCALES[normalize_by]`` over groups
    of ``group_size`` consecutive rollouts; ``normalize_by=None`` keeps the course assignment's flag (``"std"`` if
    ``normalize_by_std`` else ``"none"``). Raises ValueError on a non-finite reward or a ragged last group."""
    scale = normalize_by if normalize_by is not None else ("std" if normalize_by_std else "none")
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown normalize_by {scale!r}; valid: {sorted(ADVANTAGE_SCALES)}")
    rewards_NG = _groups(rewards_B if rewards_B.is_floating_point() else rewards_B.float(), group_size)
    flat_N1 = _flat(rewards_NG)
    centered_NG = rewards_NG - rewards_NG.mean(dim=-1, keepdim=True)
    # equal rewards: exactly 0, not float noise, and no 0/0 when advantage_eps is 0
    denom_N1 = torch.where(flat_N1, 1.0, ADVANTAGE_SCALES[scale](rewards_NG, advantage_eps))
    return torch.where(flat_N1, 0.0, centered_NG / denom_N1).reshape(-1)  # (B,)


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
    """Grade each rollout with ``reward_fn(response, ground_truth)["reward"]``, then ``group_normalize_rewards``.
    Returns float32 ``(advantages_B, raw_rewards_B)`` and float metadata: reward mean / unbiased std / min / max,
    ``zero_std_group_fraction``, and the mean ``format_reward`` / ``answer_reward`` where the grader gives them."""
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(f"{len(rollout_responses)} responses, {len(repeated_ground_truths)} ground truths")
    graded = [reward_fn(resp, gt) for resp, gt in zip(rollout_responses, repeated_ground_truths)]
    for i, info in enumerate(graded):
        if info.get("reward") is None:
            raise ValueError(f"reward_fn returned no reward (None) for rollout index {i}")
    raw_rewards_B = torch.tensor([float(info["reward"]) for info in graded], dtype=torch.float32)
    advantages_B = group_normalize_rewards(
        raw_rewards_B, group_size, advantage_eps, normalize_by_std, normalize_by=normalize_by
    )
    metadata = {
        "reward_mean": raw_rewards_B.mean().item(),
        "reward_std": raw_rewards_B.std().item() if raw_rewards_B.numel() > 1 else 0.0,
        "reward_min": raw_rewards_B.min().item(),
        "reward_max": raw_rewards_B.max().item(),
        "zero_std_group_fraction": _flat(_groups(raw_rewards_B, group_size)).float().mean().item(),
    }
    for key in ("format_reward", "answer_reward"):
        values = [float(info[key]) for info in graded if info.get(key) is not None]
        if values:
            metadata[f"{key}_mean"] = sum(values) / len(values)
    return advantages_B, raw_rewards_B, metadata


def token_importance_ratio(policy_log_probs_BT, old_log_probs_BT, response_mask_BT=None) -> torch.Tensor:
    """PPO's per-token ratio ``r_t = exp(logp_t - logp_old_t)`` (Schulman et al. 2017, eq. 6), (B, T)."""
    return torch.exp(policy_log_probs_BT - old_log_probs_BT)


def sequence_importance_ratio(policy_log_probs_BT, old_log_probs_BT, response_mask_BT=None) -> torch.Tensor:
    """GSPO's sequence ratio (Zheng et al. 2025, sec. 4.1) ``s_i = exp((1/|y_i|) sum_t m_it (logp_it -
    logp_old_it))`` at every token, (B, T), as ``sg(s_i) exp(logp_it - sg(logp_it))`` (GSPO-token, sec. 4.3):
    a per-sequence token mean of ``f(s_i)`` then has GSPO's gradient. A fully masked row has ``s_i = 1``."""
    if response_mask_BT is None:
        raise ValueError("ratio_level='sequence' (GSPO) needs response_mask to average over each sequence")
    log_s_B1 = masked_mean_or_zero(policy_log_probs_BT - old_log_probs_BT, response_mask_BT, dim=-1)[:, None]
    return log_s_B1.exp().detach() * (policy_log_probs_BT - policy_log_probs_BT.detach()).exp()


RATIO_LEVELS: dict[str, Callable[..., torch.Tensor]] = {
    "token": token_importance_ratio,
    "sequence": sequence_importance_ratio,
}


def kl_k3(policy_log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref) (Schulman 2020, "Approximating KL divergence"; GRPO eq. 4):
    ``exp(ref - logp) - (ref - logp) - 1``, unbiased under samples from pi and >= 0 everywhere."""
    log_ratio = ref_log_probs - policy_log_probs
    return torch.exp(log_ratio) - log_ratio - 1.0


# Per-token losses: (log-probs (B, T), weights A (B, 1), ratio (B, T) or None, eps_low, eps_high)
#   -> (loss (B, T), per-token metadata)


def reinforce_loss(log_probs_BT, A_B1, ratio_BT, low, high) -> LossAndMetrics:
    """REINFORCE (Williams 1992): ``l_it = -A_i log pi(o_it)``, A a raw reward or an advantage."""
    return -A_B1 * log_probs_BT, {}


def clipped_surrogate_loss(log_probs_BT, A_B1, ratio_BT, low, high, delta=None) -> LossAndMetrics:
    """PPO / GRPO clipped surrogate (Schulman et al. 2017, eq. 7; Shao et al. 2024, eq. 3), DAPO's clip-higher
    (Yu et al. 2025, sec. 3.1): ``l_it = -min(r_it A_i, clip(r_it, 1 - low, 1 + high) A_i)``; with ``delta``,
    INTELLECT-2's two-sided clip (2025, sec. 3.2): the first ``r_it`` becomes ``min(r_it, delta)``, which bounds
    the loss of a negative-advantage token whose ratio ran away. Metadata: the detached ``ratio``;
    ``clipped_high`` / ``clipped_low`` / ``clipped``: the tokens the clip gives zero gradient."""
    unclipped_BT = ratio_BT if delta is None else ratio_BT.clamp(max=delta)
    loss_BT = -torch.minimum(unclipped_BT * A_B1, torch.clamp(ratio_BT, 1.0 - low, 1.0 + high) * A_B1)
    with torch.no_grad():
        clipped_high_BT = (ratio_BT > 1.0 + high) & (A_B1 > 0)
        clipped_low_BT = (ratio_BT < 1.0 - low) & (A_B1 < 0)
    return loss_BT, {
        "ratio": ratio_BT.detach(),
        "clipped": clipped_low_BT | clipped_high_BT,
        "clipped_low": clipped_low_BT,
        "clipped_high": clipped_high_BT,
    }


def ratio_surrogate_loss(log_probs_BT, A_B1, ratio_BT, low, high) -> LossAndMetrics:
    """PPO's unclipped CPI surrogate (Schulman et al. 2017, eq. 6): ``l_it = -r_it A_i``."""
    return -ratio_BT * A_B1, {"ratio": ratio_BT.detach()}


# loss_type -> (per-token loss, the arguments it needs; the first one is its weight A)
POLICY_GRADIENT_LOSSES: dict[str, tuple[Callable[..., LossAndMetrics], tuple[str, ...]]] = {
    "no_baseline": (reinforce_loss, ("raw_rewards",)),
    "reinforce_with_baseline": (reinforce_loss, ("advantages",)),
    "grpo_clip": (clipped_surrogate_loss, ("advantages", "old_log_probs", "cliprange")),
    "grpo_no_clip": (ratio_surrogate_loss, ("advantages", "old_log_probs")),
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
    delta: float | None = None,
) -> LossAndMetrics:
    """Per-token loss (B, T) and metadata of ``POLICY_GRADIENT_LOSSES[loss_type]``, given the arguments that
    table names (rewards / advantages (B,) or (B, 1); ``cliprange`` or both ``cliprange_low`` and
    ``cliprange_high``). Ratio losses use ``RATIO_LEVELS[ratio_level]`` ("sequence" needs response_mask);
    ``delta`` (two-sided clip) is for ``grpo_clip``."""
    if loss_type not in POLICY_GRADIENT_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(POLICY_GRADIENT_LOSSES)}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {sorted(RATIO_LEVELS)}")
    loss_fn, required = POLICY_GRADIENT_LOSSES[loss_type]
    low = cliprange if cliprange_low is None else cliprange_low
    high = cliprange if cliprange_high is None else cliprange_high
    given = {"raw_rewards": raw_rewards, "advantages": advantages, "old_log_probs": old_log_probs}
    given["cliprange"] = None if low is None or high is None else (low, high)
    missing = [name for name in required if given[name] is None]
    if missing:
        raise ValueError(f"loss_type={loss_type!r} needs {', '.join(missing)} (got None)")
    ratio_BT = None
    if "old_log_probs" in required:
        ratio_BT = RATIO_LEVELS[ratio_level](policy_log_probs, old_log_probs, response_mask)
    elif ratio_level != "token":
        raise ValueError(f"ratio_level={ratio_level!r} needs an importance-ratio loss, not {loss_type!r}")
    B = policy_log_probs.shape[0]
    weights = given[required[0]]
    if weights.shape not in ((B,), (B, 1)):
        raise ValueError(f"{required[0]} must have shape ({B},) or ({B}, 1), got {tuple(weights.shape)}")
    A_B1 = weights.reshape(B, 1).to(policy_log_probs.dtype)  # broadcasts over tokens
    if delta is None:
        return loss_fn(policy_log_probs, A_B1, ratio_BT, low, high)
    if loss_fn is not clipped_surrogate_loss:
        raise ValueError(f"delta (two-sided clipping) is for loss_type='grpo_clip', not {loss_type!r}")
    return loss_fn(policy_log_probs, A_B1, ratio_BT, low, high, delta)


def compute_naive_policy_gradient_loss(
    raw_rewards_or_advantages: torch.Tensor, policy_log_probs: torch.Tensor
) -> torch.Tensor:
    """The course assignment's REINFORCE per-token loss ``-A_i * log pi(o_it)``, A (B, 1) or (B,) -> (B, T)."""
    return compute_policy_gradient_loss(policy_log_probs, "no_baseline", raw_rewards_or_advantages)[0]


def compute_grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    cliprange: float | None = None,
    **options,
) -> LossAndMetrics:
    """The course assignment's clipped surrogate (B, T) and metadata; ``options`` as in ``compute_policy_gradient_loss``."""
    return compute_policy_gradient_loss(
        policy_log_probs, "grpo_clip", None, advantages, old_log_probs, cliprange, **options
    )


# Reductions (B, T) -> scalar. N_seq, N_tok: sequences and unmasked tokens of the optimizer step (all
# micro-batches and processes); L_max: the generation length limit.
def reduce_sequence_mean(loss_BT, mask_BT, n_seq, n_tok, l_max) -> torch.Tensor:
    """GRPO (Shao et al. 2024, eq. 3): ``L = (1/N_seq) sum_i (1/|o_i|) sum_t m_it l_it``; an empty row adds 0."""
    return masked_mean_or_zero(loss_BT, mask_BT, dim=-1).sum() / n_seq


def reduce_token_mean(loss_BT, mask_BT, n_seq, n_tok, l_max) -> torch.Tensor:
    """DAPO's token-level mean (Yu et al. 2025, sec. 3.3): ``L = (1/N_tok) sum_i sum_t m_it l_it``."""
    return masked_normalize(loss_BT, mask_BT, n_tok)


def reduce_constant(loss_BT, mask_BT, n_seq, n_tok, l_max) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, sec. 3.2): ``L = (1/(N_seq L_max)) sum_i sum_t m_it l_it``; ``L_max`` is a
    constant (a micro-batch's padded width would make the loss depend on the split)."""
    if l_max is None:
        raise ValueError("reduction='constant' needs max_completion_length (the generation limit L_max)")
    return masked_normalize(loss_BT, mask_BT, n_seq * l_max)


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
    """(B, T) -> scalar with ``LOSS_REDUCTIONS[reduction]``: ``N_seq`` = ``num_sequences`` (default: this
    micro-batch's B), ``N_tok`` = ``num_tokens`` (default: its unmasked tokens, at least 1), ``L_max`` =
    ``max_completion_length``."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {sorted(LOSS_REDUCTIONS)}")
    n_seq = loss_BT.shape[0] if num_sequences is None else num_sequences
    n_tok = mask_BT.to(loss_BT.dtype).sum().clamp(min=1.0) if num_tokens is None else num_tokens
    return LOSS_REDUCTIONS[reduction](loss_BT, mask_BT, n_seq, n_tok, max_completion_length)


def truncate_is_ratio(ratio, clip_min, clip_max) -> torch.Tensor:
    """TIS (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the
    ratio clamped to [clip_min, clip_max] (a None bound is open)."""
    return ratio.clamp(min=clip_min, max=clip_max)


def mask_is_ratio(ratio, clip_min, clip_max) -> torch.Tensor:
    """MIS (Liu et al. 2025, "When Speed Kills Stability"): 0 where the ratio is outside [clip_min, clip_max]
    (a None bound is open)."""
    low, high = -math.inf if clip_min is None else clip_min, math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


SAMPLING_CORRECTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "truncate": truncate_is_ratio,
    "mask": mask_is_ratio,
}


def _masked_extremes(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` where ``valid``, 0 and 0 when nothing is (no host sync)."""
    any_valid = valid.any()
    low = torch.where(valid, x, torch.full_like(x, math.inf)).amin()
    high = torch.where(valid, x, torch.full_like(x, -math.inf)).amax()
    return torch.where(any_valid, low, 0.0), torch.where(any_valid, high, 0.0)


def importance_sampling_weight(
    old_log_probs_BT: torch.Tensor,
    sampling_log_probs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    level: RatioLevel = "sequence",
    mode: SamplingCorrection = "mask",
    clip_max: float | None = 3.0,
    clip_min: float | None = None,
) -> LossAndMetrics:
    """Detached weight of each token's policy-gradient loss for rollouts drawn from a sampler pi_s that is not
    the trainer's pi_old: ``rho_it = exp(logp_old_it - logp_s_it)`` (``level="token"``, (B, T)), or one ratio
    per sequence ``rho_i = exp(sum_t m_it (logp_old_it - logp_s_it))`` (``"sequence"``, (B, 1): a sum, as
    TRL's, not GSPO's mean), then ``SAMPLING_CORRECTIONS[mode]`` with [clip_min, clip_max]. Masked tokens, and
    NaN sampler log-probs (TRL: "unavailable"), have ratio 1. Metrics over valid tokens (sequences with a
    token): the raw ratio's ``is_ratio_min`` / ``_mean`` / ``_max``, ``is_clipped_fraction`` (truncated or
    masked), and ``logp_diff_mean`` / ``_max`` of ``|logp_old - logp_s|``."""
    if level not in RATIO_LEVELS or mode not in SAMPLING_CORRECTIONS:
        raise ValueError(f"unknown level / mode {level!r} / {mode!r}; valid: {sorted(RATIO_LEVELS)} x "
                         f"{sorted(SAMPLING_CORRECTIONS)}")  # fmt: skip
    with torch.no_grad():
        m_BT = mask_BT.bool()
        diff_BT = old_log_probs_BT.float() - sampling_log_probs_BT.float()
        diff_BT = torch.where(m_BT & ~diff_BT.isnan(), diff_BT, 0.0)  # NaN: no sampler log-prob, ratio 1
        log_rho, valid = diff_BT, m_BT
        if level == "sequence":
            log_rho, valid = diff_BT.sum(-1, keepdim=True), m_BT.any(-1, keepdim=True)  # (B, 1)
        rho = log_rho.exp()
        weight = SAMPLING_CORRECTIONS[mode](rho, clip_min, clip_max)
        abs_diff_BT = diff_BT.abs()
        rho_min, rho_max = _masked_extremes(rho, valid)
        metrics = {
            "is_ratio_min": rho_min,
            "is_ratio_mean": masked_mean_or_zero(rho, valid),
            "is_ratio_max": rho_max,
            "is_clipped_fraction": masked_mean_or_zero((weight != rho).float(), valid),
            "logp_diff_mean": masked_mean_or_zero(abs_diff_BT, m_BT),
            "logp_diff_max": _masked_extremes(abs_diff_BT, m_BT)[1],
        }
    return weight, metrics


def _ratio_metrics(meta: dict[str, torch.Tensor], mask_BT: torch.Tensor) -> dict[str, torch.Tensor]:
    if "ratio" not in meta:
        return {}
    ratio_BT = meta["ratio"]
    out = {
        "ratio_mean": masked_mean_or_zero(ratio_BT, mask_BT),
        "ratio_max": _masked_extremes(ratio_BT, mask_BT.bool())[1],  # 0 if no token counts
    }
    for key in ("clipped_low", "clipped_high", "clipped"):
        if key in meta:
            fraction = masked_mean_or_zero(meta[key].to(ratio_BT.dtype), mask_BT)
            out[key.replace("clipped", "clip_fraction")] = fraction
    return out


def high_entropy_mask(entropy_BT, mask_BT, quantile: float, pool: torch.Tensor | None = None) -> torch.Tensor:
    """ "Beyond the 80/20 rule" (Wang et al. 2025): only the top ``quantile`` of valid tokens by the entropy of
    their next-token distribution keep a policy gradient. A valid token is kept when its entropy reaches the
    ``1 - quantile`` quantile of ``pool`` (1-D: the entropies that share the threshold, e.g. every process's
    valid tokens as in TRL; default: this batch's valid ones). ``quantile=0``: the highest only; 1: all.
    Returns a float (B, T) mask, 0 at invalid tokens."""
    valid = mask_BT.bool()
    pool = entropy_BT[valid] if pool is None else pool
    if pool.numel() == 0:
        return torch.zeros_like(entropy_BT)
    threshold = torch.quantile(pool.float(), 1.0 - quantile)
    return ((entropy_BT >= threshold) & valid).to(entropy_BT.dtype)


def entropy_bonus(entropy_BT, mask_BT, coef: float, num_tokens: Count | None = None) -> LossAndMetrics:
    """Entropy regularization (TRL's ``entropy_coef``): ``L_H = -coef * (1/N_tok) sum_it m_it H_it``, added to the
    policy loss, with ``H_it`` the entropy of token t's next-token distribution and N_tok = ``num_tokens`` (default:
    this micro-batch's tokens in ``mask_BT``, at least 1): a token mean whatever the policy loss's reduction.
    Metrics: ``entropy_mean`` (the detached mean)."""
    mean_H = reduce_token_losses(entropy_BT, mask_BT, "token_mean", num_tokens=num_tokens)
    return -coef * mean_H, {"entropy_mean": mean_H.detach()}


def adaptive_entropy_coef(
    coef: float, entropy: float, target: float, delta: float, low: float, high: float
) -> float:
    """Skywork-OR1's adaptive entropy control (He et al. 2025, sec. 3.2.3), one optimizer step: ``coef + delta``
    (at most ``high``) when the step's mean token entropy is at or below ``target``, else ``coef - delta`` (at
    least ``low``). The bonus of the next step uses the new ``coef`` only while entropy is at or below target
    (``applied_entropy_coef``)."""
    return min(coef + delta, high) if entropy <= target else max(coef - delta, low)


def applied_entropy_coef(coef: float, last_entropy: float, target: float) -> float:
    """The coefficient adaptive control applies: ``coef`` if the last step's entropy <= ``target``, else 0 (no
    bonus before a first measurement: ``last_entropy = inf``)."""
    return coef if last_entropy <= target else 0.0


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
    delta: float | None = None,
    beta: float = 0.0,
    is_weight_BT: torch.Tensor | None = None,
    num_sequences: Count | None = None,
    num_tokens: Count | None = None,
    max_completion_length: int | None = None,
) -> LossAndMetrics:
    """One micro-batch's GRPO-family loss ``reduce(l^pg_it + beta * k3_it)`` (Shao et al. 2024, eq. 3), unscaled
    (DDP / FSDP average gradients: the caller multiplies by the world size). Metrics, detached: ``loss``,
    ``policy_loss`` (the pg part), ``kl_mean`` (given ref log-probs); for ratio losses ``ratio_mean``,
    ``ratio_max``, and for ``grpo_clip`` ``clip_fraction_low`` / ``_high`` / ``clip_fraction``.
    ``is_weight_BT`` ((B, T) or (B, 1): ``importance_sampling_weight``, ``high_entropy_mask``, or their product)
    multiplies ``l^pg`` only, not the KL term (as TRL)."""
    if beta > 0 and ref_log_probs_BT is None:
        raise ValueError(f"beta={beta} > 0 needs ref_log_probs_BT for the KL penalty (or set beta=0)")
    pg_BT, meta = compute_policy_gradient_loss(
        policy_log_probs_BT,
        loss_type,
        raw_rewards_B,
        advantages_B,
        old_log_probs_BT,
        cliprange,
        cliprange_low=cliprange_low,
        cliprange_high=cliprange_high,
        ratio_level=ratio_level,
        response_mask=response_mask_BT,
        delta=delta,
    )
    counts = (num_sequences, num_tokens, max_completion_length)
    metrics: dict[str, torch.Tensor] = {}
    if is_weight_BT is not None:
        pg_BT = pg_BT * is_weight_BT.to(pg_BT.dtype)
    total_BT = pg_BT
    if ref_log_probs_BT is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and beta > 0):
            kl_BT = kl_k3(policy_log_probs_BT, ref_log_probs_BT)
        metrics["kl_mean"] = masked_mean_or_zero(kl_BT.detach(), response_mask_BT)
        if beta > 0:
            total_BT = pg_BT + beta * kl_BT
    loss = reduce_token_losses(total_BT, response_mask_BT, reduction, *counts)
    with torch.no_grad():
        metrics["loss"] = loss.detach()
        metrics["policy_loss"] = reduce_token_losses(pg_BT.detach(), response_mask_BT, reduction, *counts)
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
) -> LossAndMetrics:
    """The course assignment's step: ``policy_loss`` (sequence mean) / ``gradient_accumulation_steps``, then ``backward()``."""
    loss, metrics = policy_loss(
        policy_log_probs,
        response_mask,
        loss_type=loss_type,
        advantages_B=advantages,
        raw_rewards_B=raw_rewards,
        old_log_probs_BT=old_log_probs,
        cliprange=cliprange,
    )
    loss = loss / gradient_accumulation_steps
    loss.backward()
    return loss, metrics
