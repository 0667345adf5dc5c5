"""Pairwise reward-model loss as a pure function of scalar rewards.

Bradley-Terry (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT, eq. 1): ``P(c > r) = sigma(r_c - r_r)``
for a chosen and a rejected answer to one prompt; the loss is the NLL of the observed preference, averaged over
the batch's pairs. An optional per-pair margin is subtracted inside the sigmoid (Llama 2, Touvron et al. 2023,
eq. 2). The likelihood only sees reward differences, so the rewards' offset drifts freely: an optional
``coef * mean((r_c + r_r)^2)`` (Eisenstein et al. 2023, "Helping or Herding?") pulls each pair to mean zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards_B: torch.Tensor,
    rejected_rewards_B: torch.Tensor,
    margin_B: torch.Tensor | None = None,
    center_rewards_coefficient: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = mean_i[-log sigma(r_c,i - r_r,i - m_i)] + coef * mean_i[(r_c,i + r_r,i)^2]``, rewards (B,) -> scalar,
    ``m_i`` = ``margin_B`` (0 when None). Metrics, detached 0-dim: ``accuracy`` (fraction with ``r_c > r_r``),
    ``margin`` (mean ``r_c - r_r``, without ``m``), ``rewards/chosen`` / ``rewards/rejected``, and TRL's
    ``min_reward`` / ``mean_reward`` / ``max_reward`` over all 2B rewards.
    """
    if chosen_rewards_B.shape != rejected_rewards_B.shape:
        raise ValueError(
            f"chosen_rewards_B has shape {tuple(chosen_rewards_B.shape)} but rejected_rewards_B has "
            f"{tuple(rejected_rewards_B.shape)}; squeeze a (B, 1) reward head output to (B,)"
        )
    if margin_B is not None and margin_B.shape != chosen_rewards_B.shape:
        raise ValueError(
            f"margin_B has shape {tuple(margin_B.shape)}, expected {tuple(chosen_rewards_B.shape)}"
        )
    if center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient must be >= 0, got {center_rewards_coefficient}")

    diff_B = chosen_rewards_B - rejected_rewards_B
    logits_B = diff_B if margin_B is None else diff_B - margin_B
    loss = -F.logsigmoid(logits_B).mean()
    if center_rewards_coefficient > 0:
        loss = loss + center_rewards_coefficient * (chosen_rewards_B + rejected_rewards_B).pow(2).mean()

    with torch.no_grad():
        metrics = {
            "accuracy": (chosen_rewards_B > rejected_rewards_B).to(diff_B.dtype).mean(),
            "margin": diff_B.mean(),
            "rewards/chosen": chosen_rewards_B.detach().mean(),
            "rewards/rejected": rejected_rewards_B.detach().mean(),
        }
        all_2B = torch.cat([chosen_rewards_B, rejected_rewards_B]).detach()  # (2B,)
        metrics.update(min_reward=all_2B.min(), mean_reward=all_2B.mean(), max_reward=all_2B.max())
    return loss, metrics
