"""DPO-family preference losses as pure functions of summed sequence log-probabilities.

Inputs are SUMMED response log-probs ``log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)`` (B,) of the chosen and
the rejected answer under the policy and the frozen reference; the trainer gets them from one forward over
``[chosen; rejected]`` (2B rows) with ``sequence_log_probs`` and ``split_concatenated``. Every variant in
``DPO_LOSSES`` is a per-pair function of the log-ratios ``lr = log pi - log ref``, mostly of the implicit
reward margin ``h = lr_c - lr_r`` (Rafailov et al. 2023, eq. 7). IPO alone uses per-token AVERAGED log-ratios
(an empty response counts as length 1): its squared loss targets a fixed margin ``1 / (2 beta)`` that a
length-dependent sum would make meaningless (as in TRL and the IPO paper). The loss is the mean over the
batch's pairs; metrics follow TRL's names, ``rewards/*`` being ``beta * lr`` of the summed log-probs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from hf_align.logprobs import masked_normalize


def sequence_log_probs(log_probs_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Summed response log-prob per sequence, ``sum_t m_t logp_t``, (B, T) -> (B,). A fully masked row is 0."""
    return masked_normalize(log_probs_BT, mask_BT, dim=-1)


def split_concatenated(x_2B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[chosen; rejected]`` along dim 0 (pair i at rows i and B + i): (2B, ...) -> ((B, ...), (B, ...))."""
    if x_2B.dim() == 0 or x_2B.shape[0] % 2 != 0:
        raise ValueError(
            f"a concatenated [chosen; rejected] batch needs an even first dimension, got shape {tuple(x_2B.shape)}"
        )
    return x_2B[: x_2B.shape[0] // 2], x_2B[x_2B.shape[0] // 2 :]


class Pairs(NamedTuple):
    """B preference pairs, each field (B,): summed log-probs under the policy and the frozen reference, and the
    response token counts (read by ``ipo`` and ``sft``). The field names are ``dpo_loss``'s arguments."""

    policy_chosen_log_probs_B: torch.Tensor
    policy_rejected_log_probs_B: torch.Tensor
    ref_chosen_log_probs_B: torch.Tensor
    ref_rejected_log_probs_B: torch.Tensor
    chosen_lengths_B: torch.Tensor | None = None
    rejected_lengths_B: torch.Tensor | None = None

    @property
    def chosen_logratios_B(self) -> torch.Tensor:  # lr_c = log pi(y_c) - log ref(y_c); no gradient to ref
        return self.policy_chosen_log_probs_B - self.ref_chosen_log_probs_B.detach()

    @property
    def rejected_logratios_B(self) -> torch.Tensor:
        return self.policy_rejected_log_probs_B - self.ref_rejected_log_probs_B.detach()

    @property
    def margins_B(self) -> torch.Tensor:  # h = lr_c - lr_r
        return self.chosen_logratios_B - self.rejected_logratios_B


def sigmoid_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), conservative with eps > 0 (Mitchell 2023, cDPO): the cross-entropy
    ``-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`` against a label flipped with probability eps."""
    logits_B = beta * p.margins_B
    return -(1.0 - eps) * F.logsigmoid(logits_B) - eps * F.logsigmoid(-logits_B)


def robust_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, sec. 3): ``[-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] /
    (1 - 2 eps)``, unbiased for the clean DPO loss under labels flipped with known probability eps < 1/2."""
    logits_B = beta * p.margins_B
    return (-(1.0 - eps) * F.logsigmoid(logits_B) + eps * F.logsigmoid(-logits_B)) / (1.0 - 2.0 * eps)


def hinge_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """SLiC's calibration hinge (Zhao et al. 2023, sec. 2) on log-ratios, as TRL's: ``max(0, 1 - beta h)``."""
    return torch.relu(1.0 - beta * p.margins_B)


def ipo_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17, beta = tau): ``(h' - 1 / (2 beta))^2`` with the per-token averaged
    ``h' = lr_c / max(|y_c|, 1) - lr_r / max(|y_r|, 1)``."""
    if p.chosen_lengths_B is None or p.rejected_lengths_B is None:
        raise ValueError("loss_type='ipo' averages per token: pass chosen_lengths_B and rejected_lengths_B")
    dtype = p.chosen_logratios_B.dtype
    chosen_avg_B = p.chosen_logratios_B / p.chosen_lengths_B.to(dtype).clamp(min=1.0)
    rejected_avg_B = p.rejected_logratios_B / p.rejected_lengths_B.to(dtype).clamp(min=1.0)
    return (chosen_avg_B - rejected_avg_B - 1.0 / (2.0 * beta)) ** 2


def bco_pair_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """Binary classifier optimisation on pairs (Jung et al. 2024, eq. 7 without its reward shift), as TRL's
    ``bco_pair``: ``-log sigma(beta lr_c) - log sigma(-beta lr_r)``, each answer classified on its own."""
    return -F.logsigmoid(beta * p.chosen_logratios_B) - F.logsigmoid(-beta * p.rejected_logratios_B)


def chosen_nll_loss(p: Pairs, beta: float, eps: float) -> torch.Tensor:
    """TRL's ``sft`` term (the NLL part of MPO, Wang et al. 2024): ``-sum_i log pi(y_c,i) / sum_i |y_c,i|``,
    the chosen answers' token-mean NLL over the batch, given to every pair. It reads the policy's log-probs."""
    if p.chosen_lengths_B is None:
        raise ValueError(
            "loss_type='sft' is a token mean: pass chosen_lengths_B (response tokens per answer)"
        )
    log_probs_B = p.policy_chosen_log_probs_B
    n_tok = p.chosen_lengths_B.sum().to(log_probs_B.dtype).clamp(min=1.0)
    return (-log_probs_B.sum() / n_tok).expand_as(log_probs_B)


# The variants of the log-ratios; label smoothing eps means something only for the first two.
DPO_LOSSES: dict[str, Callable[[Pairs, float, float], torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "bco_pair": bco_pair_loss,
}
LABEL_SMOOTHED = ("sigmoid", "robust")
# Every loss_type dpo_loss takes.
LOSS_TYPES = {**DPO_LOSSES, "sft": chosen_nll_loss}


def _check(p: Pairs, beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing != 0.0 and loss_type in DPO_LOSSES and loss_type not in LABEL_SMOOTHED:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            "set it to 0 or use loss_type='sigmoid' (cDPO) or 'robust'"
        )
    shape = p.policy_chosen_log_probs_B.shape
    for name, t in p._asdict().items():
        if t is not None and t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like policy_chosen_log_probs_B"
            )


def dpo_loss(
    policy_chosen_log_probs_B: torch.Tensor,
    policy_rejected_log_probs_B: torch.Tensor,
    ref_chosen_log_probs_B: torch.Tensor,
    ref_rejected_log_probs_B: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over the B pairs of ``LOSS_TYPES[loss_type]`` (formulas there), from summed log-probs (B,).

    ``label_smoothing`` (eps in [0, 0.5)) applies to ``sigmoid`` (cDPO) and ``robust``; ``ipo`` and ``sft``
    need the response token counts ``chosen_lengths_B`` / ``rejected_lengths_B``. Metrics, detached 0-dim:
    ``rewards/chosen`` / ``rewards/rejected`` (means of ``beta * lr``), ``rewards/accuracies`` (fraction of
    pairs whose chosen reward is strictly higher), ``rewards/margins``, ``logps/chosen`` / ``logps/rejected``
    (means of the policy's summed log-probs).
    """
    pairs = Pairs(
        policy_chosen_log_probs_B,
        policy_rejected_log_probs_B,
        ref_chosen_log_probs_B,
        ref_rejected_log_probs_B,
        chosen_lengths_B,
        rejected_lengths_B,
    )
    _check(pairs, beta, loss_type, label_smoothing)
    loss = LOSS_TYPES[loss_type](pairs, beta, label_smoothing).mean()
    with torch.no_grad():
        chosen_rewards_B = beta * pairs.chosen_logratios_B
        rejected_rewards_B = beta * pairs.rejected_logratios_B
        metrics = {
            "rewards/chosen": chosen_rewards_B.mean(),
            "rewards/rejected": rejected_rewards_B.mean(),
            "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).to(chosen_rewards_B.dtype).mean(),
            "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean(),
            "logps/chosen": policy_chosen_log_probs_B.detach().mean(),
            "logps/rejected": policy_rejected_log_probs_B.detach().mean(),
        }
    return loss, metrics
