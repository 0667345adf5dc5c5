"""Supervised fine-tuning loss: the negative log-likelihood of response tokens only, from per-token log-probs.

Normalizations, by name from ``SFT_NORMALIZATIONS``: ``token_mean`` divides by the number of response tokens
of the whole optimizer step (all micro-batches and processes), so the gradient does not depend on how the step
is split; ``sequence_sum`` is the course assignment's ``sft_microbatch_train_step``: every sequence counts the same however
long its response is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_align.logprobs import masked_mean_or_zero, masked_normalize


def token_mean_nll(
    log_probs_BT, mask_BT, num_tokens=None, num_sequences=None, normalize_constant=1.0
) -> torch.Tensor:
    """``L = (1/N_tok) sum_i sum_t m_it (-log p_it)``, N_tok = ``num_tokens`` (default: this batch's, >= 1)."""
    if num_tokens is None:
        return -masked_mean_or_zero(log_probs_BT, mask_BT)
    return -masked_normalize(log_probs_BT, mask_BT, normalize_constant=max(float(num_tokens), 1.0))


def sequence_sum_nll(
    log_probs_BT, mask_BT, num_tokens=None, num_sequences=None, normalize_constant=1.0
) -> torch.Tensor:
    """``L = (1/N_seq) sum_i (1/c) sum_t m_it (-log p_it)``, c = ``normalize_constant``, N_seq = ``num_sequences``
    (default: this batch's B)."""
    per_seq_B = -masked_normalize(log_probs_BT, mask_BT, normalize_constant=normalize_constant, dim=-1)
    n = log_probs_BT.shape[0] if num_sequences is None else num_sequences
    return per_seq_B.sum() / max(float(n), 1.0)


SFT_NORMALIZATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": token_mean_nll,
    "sequence_sum": sequence_sum_nll,
}


def sft_loss(
    log_probs_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalization: str = "token_mean",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Completion-only NLL under ``SFT_NORMALIZATIONS[normalization]``; metrics (detached): ``nll_per_token``
    over this batch, ``response_tokens``."""
    if normalization not in SFT_NORMALIZATIONS:
        raise ValueError(
            f"unknown SFT normalization {normalization!r}; choose from {sorted(SFT_NORMALIZATIONS)}"
        )
    loss = SFT_NORMALIZATIONS[normalization](
        log_probs_BT, mask_BT, num_tokens, num_sequences, normalize_constant
    )
    with torch.no_grad():
        metrics = {
            "nll_per_token": -masked_mean_or_zero(log_probs_BT.detach(), mask_BT),
            "response_tokens": mask_BT.sum().to(torch.float32),
        }
    return loss, metrics


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The course assignment's SFT micro-step: ``sequence_sum`` / ``gradient_accumulation_steps``, then ``backward()``
    (gradients accumulate across calls)."""
    loss, metrics = sft_loss(
        policy_log_probs, response_mask, "sequence_sum", normalize_constant=normalize_constant
    )
    loss = loss / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), metrics
