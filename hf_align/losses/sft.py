"""Supervised fine-tuning loss: negative log-likelihood of response tokens only.

Two normalizations, chosen by name from ``SFT_NORMALIZATIONS``:

- ``token_mean``:   L = (1 / N_tok) * sum_i sum_t m_it * (-log p_it), where N_tok is the number of response
  tokens in the whole optimizer step (all micro-batches, all processes). Passing the global N_tok makes the
  gradient identical whatever the split into micro-batches / accumulation steps / processes.
- ``sequence_sum``: L = (1 / N_seq) * sum_i [ (1 / c) * sum_t m_it * (-log p_it) ], c = normalize_constant,
  N_seq the number of sequences in the optimizer step: the seed's ``sft_microbatch_train_step``, where each
  sequence counts equally however long its response is.

The functions take per-token log-probs, never a model: see ``hf_align.logprobs`` for how those are made.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hf_align.logprobs import masked_mean_or_zero, masked_normalize


def token_mean_nll(
    logps_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: float | None = None, **_
) -> torch.Tensor:
    """sum of -log p over masked tokens / num_tokens (default: this batch's masked-token count)."""
    if num_tokens is None:
        return -masked_mean_or_zero(logps_BT, mask_BT)
    return -masked_normalize(logps_BT, mask_BT, normalize_constant=max(float(num_tokens), 1.0))


def sequence_sum_nll(
    logps_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_sequences: float | None = None,
    normalize_constant: float = 1.0,
    **_,
) -> torch.Tensor:
    """Per sequence: sum of -log p / normalize_constant; then summed and divided by num_sequences."""
    per_seq_B = -masked_normalize(logps_BT, mask_BT, normalize_constant=normalize_constant, dim=-1)
    n = logps_BT.shape[0] if num_sequences is None else num_sequences
    return per_seq_B.sum() / max(float(n), 1.0)


SFT_NORMALIZATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token_mean": token_mean_nll,
    "sequence_sum": sequence_sum_nll,
}


def sft_loss(
    logps_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    normalization: str = "token_mean",
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Completion-only NLL under the chosen normalization. Returns ``(loss, metrics)`` (metrics detached)."""
    if normalization not in SFT_NORMALIZATIONS:
        raise ValueError(
            f"unknown SFT normalization {normalization!r}; choose from {sorted(SFT_NORMALIZATIONS)}"
        )
    loss = SFT_NORMALIZATIONS[normalization](
        logps_BT,
        mask_BT,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        normalize_constant=normalize_constant,
    )
    with torch.no_grad():
        metrics = {
            "nll_per_token": -masked_mean_or_zero(logps_BT.detach(), mask_BT),
            "response_tokens": mask_BT.sum().to(torch.float32),
        }
    return loss, metrics


def sft_microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The seed's SFT micro-step: per-sequence masked sum of -log p / normalize_constant, mean over the batch,
    divided by gradient_accumulation_steps, then ``backward()``. Gradients accumulate across calls.
    """
    loss, metrics = sft_loss(
        policy_log_probs, response_mask, normalization="sequence_sum", normalize_constant=normalize_constant
    )
    loss = loss / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), metrics
