"""per_instance_dpo_loss: log 2 at the reference, and equal to a naive full-log-softmax computation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_align.data import format_prompt, load_prompt_template
from hf_align.dpo_instance import per_instance_dpo_loss
from tests.conftest import build_model

PROMPT = "What is 12 + 7?"
CHOSEN = "The answer is 19."
REJECTED = "The answer is 20, I think."


def _naive_response_logp(model, tokenizer, prompt: str, response: str) -> torch.Tensor:
    """Sum of log p(response token) from a full (T, V) log_softmax of one unpadded sequence."""
    template = load_prompt_template("alpaca_sft")
    p_ids = tokenizer(format_prompt(template, prompt), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p_ids + r_ids])
    logp_TV = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = range(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1)  # position t predicts token t + 1
    return sum(logp_TV[t, ids[0, t + 1]] for t in positions)


def test_equals_log2_when_policy_is_reference(tokenizer):
    model = build_model(tokenizer, seed=0)
    loss = per_instance_dpo_loss(model, model, tokenizer, 0.5, PROMPT, CHOSEN, REJECTED)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_matches_naive_computation_for_two_models(tokenizer):
    lm, ref = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    beta = 0.7
    loss = per_instance_dpo_loss(lm, ref, tokenizer, beta, PROMPT, CHOSEN, REJECTED)
    with torch.no_grad():
        margin = (
            _naive_response_logp(lm, tokenizer, PROMPT, CHOSEN)
            - _naive_response_logp(ref, tokenizer, PROMPT, CHOSEN)
            - _naive_response_logp(lm, tokenizer, PROMPT, REJECTED)
            + _naive_response_logp(ref, tokenizer, PROMPT, REJECTED)
        )
        expected = -torch.nn.functional.logsigmoid(beta * margin)
    assert abs(loss.item() - math.log(2)) > 1e-3  # two different models: not the trivial value
    torch.testing.assert_close(loss.detach(), expected, atol=1e-5, rtol=1e-5)


def test_gradient_flows_to_policy_only(tokenizer):
    lm, ref = build_model(tokenizer, seed=0), build_model(tokenizer, seed=1)
    per_instance_dpo_loss(lm, ref, tokenizer, 0.1, PROMPT, CHOSEN, REJECTED).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.parameters())
    assert all(p.grad is None for p in ref.parameters())
