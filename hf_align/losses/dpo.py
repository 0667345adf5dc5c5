"""DPO-family preference losses as pure functions of sequence log-probabilities.

Choices:
- Inputs are SUMMED response log-probs ``log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t)`` of the chosen and the
  rejected answer under the policy and the frozen reference, one number per pair (shape (B,)). The trainer
  gets them from one concatenated forward over ``[chosen; rejected]`` (2B rows): ``sequence_logps`` masks and
  sums the per-token log-probs from ``hf_align.logprobs`` and ``split_concatenated`` cuts the 2B rows back
  into (chosen, rejected).
- Every variant is a function of the implicit reward margin (Rafailov et al. 2023, eq. 7)
  ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``, chosen by name from ``DPO_LOSSES``:
  ``sigmoid`` (DPO; with ``label_smoothing`` eps > 0 the conservative cDPO of Mitchell 2023), ``robust``
  (rDPO, Chowdhury et al. 2024), ``hinge`` (SLiC, Zhao et al. 2023), ``ipo`` (Azar et al. 2023, eq. 17) and
  ``bco_pair`` (Jung et al. 2024; a function of each log-ratio rather than only of h).
- IPO alone uses per-token AVERAGED log-ratios ``h' = (lr_c / |y_c|) - (lr_r / |y_r|)``: its squared loss
  targets a fixed margin ``1 / (2 beta)``, which a length-dependent sum would make meaningless. This is also
  what TRL does and what the IPO authors used. An empty response counts as length 1 (as in
  ``masked_mean_or_zero``, a padding row gives 0, never NaN).
- The loss is the plain mean over the B pairs of this batch. Metrics follow TRL's names: ``rewards/*`` are the
  implicit rewards ``beta * (log pi - log ref)`` of the summed log-probs (for every variant, IPO included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_align.logprobs import masked_normalize

# (chosen_logratios_B, rejected_logratios_B, beta, label_smoothing, chosen_lengths_B, rejected_lengths_B)
#   -> per-pair losses_B
DPOLossFn = Callable[
    [torch.Tensor, torch.Tensor, float, float, torch.Tensor | None, torch.Tensor | None], torch.Tensor
]

# ------------------------------------------------------------------------------------------------------------
# Helpers for the trainer: per-token -> per-sequence, concatenated batch -> (chosen, rejected)
# ------------------------------------------------------------------------------------------------------------


def sequence_logps(logps_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Summed response log-prob per sequence, ``sum_t m_t logp_t``, (B, T) -> (B,). A fully masked row is 0."""
    return masked_normalize(logps_BT, mask_BT, dim=-1)


def split_concatenated(x_2B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a concatenated ``[chosen; rejected]`` batch along dim 0: (2B, ...) -> ((B, ...), (B, ...)).

    The first half holds the chosen answers, the second half the rejected ones, pair i at rows i and B + i.
    """
    if x_2B.dim() == 0 or x_2B.shape[0] % 2 != 0:
        raise ValueError(
            f"a concatenated [chosen; rejected] batch needs an even first dimension, got shape {tuple(x_2B.shape)}"
        )
    half = x_2B.shape[0] // 2
    return x_2B[:half], x_2B[half:]


# ------------------------------------------------------------------------------------------------------------
# Variants: per-pair losses (B,) from the chosen / rejected log-ratios log pi - log ref
# ------------------------------------------------------------------------------------------------------------


def _no_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    if label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            "set it to 0 or use loss_type='sigmoid' (cDPO) or 'robust'"
        )


def sigmoid_loss(
    chosen_logratios_B: torch.Tensor,
    rejected_logratios_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) and conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO"):

    ``l = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, ``h = lr_c - lr_r``: the binary cross-entropy
    against a preference label that is flipped with probability eps. eps = 0 is DPO.
    """
    logits_B = beta * (chosen_logratios_B - rejected_logratios_B)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits_B) - label_smoothing * F.logsigmoid(-logits_B)


def robust_loss(
    chosen_logratios_B: torch.Tensor,
    rejected_logratios_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", sec. 3, the de-biased loss):

    ``l = [-(1 - eps) log sigma(beta h) + eps log sigma(-beta h)] / (1 - 2 eps)``: an unbiased estimate of the
    clean DPO loss when labels are flipped with known probability eps < 1/2. eps = 0 is DPO.
    """
    logits_B = beta * (chosen_logratios_B - rejected_logratios_B)
    clean_B = -(1.0 - label_smoothing) * F.logsigmoid(logits_B)
    flipped_B = -label_smoothing * F.logsigmoid(-logits_B)
    return (clean_B - flipped_B) / (1.0 - 2.0 * label_smoothing)


def hinge_loss(
    chosen_logratios_B: torch.Tensor,
    rejected_logratios_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLiC's rank-calibration hinge (Zhao et al. 2023, "SLiC-HF", sec. 2), on reference log-ratios:

    ``l = max(0, 1 - beta h)``, i.e. a margin of ``1 / beta`` in h, as in TRL's ``hinge``.
    """
    _no_label_smoothing("hinge", label_smoothing)
    return torch.relu(1.0 - beta * (chosen_logratios_B - rejected_logratios_B))


def ipo_loss(
    chosen_logratios_B: torch.Tensor,
    rejected_logratios_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17, with beta the regularizer tau):

    ``l = (h' - 1 / (2 beta))^2``, ``h' = lr_c / max(|y_c|, 1) - lr_r / max(|y_r|, 1)``: the summed log-ratios
    averaged over each response's tokens, so the target margin does not depend on response length.
    """
    _no_label_smoothing("ipo", label_smoothing)
    if chosen_lengths_B is None or rejected_lengths_B is None:
        raise ValueError(
            "loss_type='ipo' averages log-ratios per token: pass chosen_lengths_B and rejected_lengths_B "
            "(the number of response tokens of each answer, e.g. mask_BT.sum(-1))"
        )
    for name, lengths_B in (
        ("chosen_lengths_B", chosen_lengths_B),
        ("rejected_lengths_B", rejected_lengths_B),
    ):
        if lengths_B.shape != chosen_logratios_B.shape:
            raise ValueError(
                f"{name} has shape {tuple(lengths_B.shape)}, expected {tuple(chosen_logratios_B.shape)}"
            )
    dtype = chosen_logratios_B.dtype
    chosen_avg_B = chosen_logratios_B / chosen_lengths_B.to(dtype).clamp(min=1.0)
    rejected_avg_B = rejected_logratios_B / rejected_lengths_B.to(dtype).clamp(min=1.0)
    return (chosen_avg_B - rejected_avg_B - 1.0 / (2.0 * beta)) ** 2


def bco_pair_loss(
    chosen_logratios_B: torch.Tensor,
    rejected_logratios_B: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary classifier optimisation on pairs (Jung et al. 2024, "Binary Classifier Optimization for Large
    Language Model Alignment", eq. 7 without its reward shift), as TRL's ``bco_pair``:

    ``l = -log sigma(beta lr_c) - log sigma(-beta lr_r)``: each answer classified on its own (chosen up,
    rejected down) instead of through their margin.
    """
    _no_label_smoothing("bco_pair", label_smoothing)
    return -F.logsigmoid(beta * chosen_logratios_B) - F.logsigmoid(-beta * rejected_logratios_B)


DPO_LOSSES: dict[str, DPOLossFn] = {
    "sigmoid": sigmoid_loss,
    "bco_pair": bco_pair_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}


def chosen_nll_loss(policy_chosen_logps_B: torch.Tensor, chosen_lengths_B: torch.Tensor) -> torch.Tensor:
    """TRL's ``sft`` term (the NLL part of MPO, Wang et al. 2024): ``-sum_i log pi(y_c,i) / sum_i |y_c,i|``, the
    chosen answers' negative log-likelihood as a token mean over the batch, given to every pair (B,). It needs the
    policy's log-probs, not log-ratios, so it is not in ``DPO_LOSSES``."""
    if chosen_lengths_B is None:
        raise ValueError(
            "loss_type='sft' is a token mean: pass chosen_lengths_B (response tokens per answer)"
        )
    nll = -policy_chosen_logps_B.sum() / chosen_lengths_B.sum().to(policy_chosen_logps_B.dtype).clamp(min=1.0)
    return nll.expand_as(policy_chosen_logps_B)


LOSS_TYPES = [*DPO_LOSSES, "sft"]


# ------------------------------------------------------------------------------------------------------------
# Entry point for the trainer
# ------------------------------------------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps_B: torch.Tensor,
    policy_rejected_logps_B: torch.Tensor,
    ref_chosen_logps_B: torch.Tensor,
    ref_rejected_logps_B: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths_B: torch.Tensor | None = None,
    rejected_lengths_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over the B pairs of ``DPO_LOSSES[loss_type]`` (formulas there), from summed log-probs (B,).

    ``label_smoothing`` (eps in [0, 0.5)) applies to ``sigmoid`` (cDPO) and ``robust`` only. ``ipo`` needs
    ``chosen_lengths_B`` / ``rejected_lengths_B``, the response token counts. Reference log-probs carry no
    gradient. Metrics, detached 0-dim tensors: ``rewards/chosen`` and ``rewards/rejected`` (means of
    ``beta * (log pi - log ref)``), ``rewards/accuracies`` (fraction of pairs with chosen reward strictly
    above rejected), ``rewards/margins`` (mean of their difference), ``logps/chosen`` and ``logps/rejected``
    (means of the policy's summed log-probs).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {sorted(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    shape = policy_chosen_logps_B.shape
    for name, t in (
        ("policy_rejected_logps_B", policy_rejected_logps_B),
        ("ref_chosen_logps_B", ref_chosen_logps_B),
        ("ref_rejected_logps_B", ref_rejected_logps_B),
    ):
        if t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like policy_chosen_logps_B"
            )

    chosen_logratios_B = policy_chosen_logps_B - ref_chosen_logps_B.detach()
    rejected_logratios_B = policy_rejected_logps_B - ref_rejected_logps_B.detach()
    if loss_type == "sft":
        losses_B = chosen_nll_loss(policy_chosen_logps_B, chosen_lengths_B)
    else:
        losses_B = DPO_LOSSES[loss_type](
            chosen_logratios_B,
            rejected_logratios_B,
            beta,
            label_smoothing,
            chosen_lengths_B,
            rejected_lengths_B,
        )
    loss = losses_B.mean()

    with torch.no_grad():
        chosen_rewards_B = beta * chosen_logratios_B.detach()
        rejected_rewards_B = beta * rejected_logratios_B.detach()
        metrics = {
            "rewards/chosen": chosen_rewards_B.mean(),
            "rewards/rejected": rejected_rewards_B.mean(),
            "rewards/accuracies": (chosen_rewards_B > rejected_rewards_B).to(chosen_rewards_B.dtype).mean(),
            "rewards/margins": (chosen_rewards_B - rejected_rewards_B).mean(),
            "logps/chosen": policy_chosen_logps_B.detach().mean(),
            "logps/rejected": policy_rejected_logps_B.detach().mean(),
        }
    return loss, metrics
