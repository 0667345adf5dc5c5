import pytest
import torch

from hf_align.losses.sft import sft_loss, sft_microbatch_train_step

LOGPS = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
MASK = torch.tensor([[True, True, False], [False, True, True]])


def test_token_mean_by_hand():
    loss, metrics = sft_loss(LOGPS, MASK, "token_mean")
    assert loss.item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    assert metrics["response_tokens"].item() == 4
    # a global token count (e.g. 8 tokens in the whole optimizer step) replaces the local one
    loss, _ = sft_loss(LOGPS, MASK, "token_mean", num_tokens=8)
    assert loss.item() == pytest.approx((1 + 2 + 5 + 6) / 8)


def test_sequence_sum_by_hand():
    loss, _ = sft_loss(LOGPS, MASK, "sequence_sum", normalize_constant=2.0)
    assert loss.item() == pytest.approx(((1 + 2) / 2 + (5 + 6) / 2) / 2)


def test_unknown_normalization():
    with pytest.raises(ValueError, match="token_mean"):
        sft_loss(LOGPS, MASK, "nope")


@pytest.mark.parametrize("mask", [MASK, MASK.long()], ids=["bool", "int"])
def test_microbatch_train_step_value_and_accumulation(mask):
    leaf = LOGPS.clone().requires_grad_(True)
    loss, _ = sft_microbatch_train_step(leaf, mask, gradient_accumulation_steps=4, normalize_constant=2.0)
    assert loss.item() == pytest.approx(((1 + 2) / 2 + (5 + 6) / 2) / 2 / 4)
    # d loss / d logp = -mask / (constant * batch * accumulation)
    expected_grad = -mask.float() / (2.0 * 2 * 4)
    torch.testing.assert_close(leaf.grad, expected_grad)
    # a second call adds to the gradient: nothing zeroes it
    sft_microbatch_train_step(leaf, mask, gradient_accumulation_steps=4, normalize_constant=2.0)
    torch.testing.assert_close(leaf.grad, 2 * expected_grad)


def test_all_masked_rows_and_padding():
    mask = torch.tensor([[False, False, False], [True, False, False]])
    loss, _ = sft_loss(LOGPS, mask, "token_mean")
    assert loss.item() == pytest.approx(4.0)
    loss, _ = sft_loss(LOGPS, torch.zeros_like(mask), "token_mean")
    assert loss.item() == 0.0  # nothing to learn -> 0, not NaN
    padded = torch.cat([LOGPS, torch.full((2, 2), -99.0)], 1)
    pmask = torch.cat([MASK, torch.zeros(2, 2, dtype=torch.bool)], 1)
    for norm in ("token_mean", "sequence_sum"):
        assert sft_loss(padded, pmask, norm)[0].item() == pytest.approx(sft_loss(LOGPS, MASK, norm)[0].item())


@pytest.mark.parametrize("norm", ["token_mean", "sequence_sum"])
def test_split_invariance_with_global_counts(norm):
    """Summing micro-batch losses with global counts gives the full-batch gradient (8x1 == 4x2 == 1x8)."""
    torch.manual_seed(0)
    log_probs = torch.randn(8, 6)
    mask = torch.rand(8, 6) > 0.3
    grads = []
    for micro in (8, 4, 1):
        leaf = log_probs.clone().requires_grad_(True)
        for start in range(0, 8, micro):
            sl = slice(start, start + micro)
            loss, _ = sft_loss(leaf[sl], mask[sl], norm, num_tokens=mask.sum().item(), num_sequences=8)
            loss.backward()
        grads.append(leaf.grad)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-7, rtol=1e-6)
