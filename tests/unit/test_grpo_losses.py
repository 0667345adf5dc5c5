"""GRPO / policy-gradient losses against hand-derived values and naive references, plus split invariances."""

from __future__ import annotations

import math

import pytest
import torch

from hf_align.losses.grpo import (
    LOSS_REDUCTIONS,
    POLICY_GRADIENT_LOSSES,
    adaptive_entropy_coef,
    applied_entropy_coef,
    compute_group_normalized_rewards,
    compute_grpo_clip_loss,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    entropy_bonus,
    group_normalize_rewards,
    grpo_microbatch_train_step,
    high_entropy_mask,
    kl_k3,
    policy_loss,
    reduce_token_losses,
)

# ------------------------------------------------------------------------------------------------------------
# Group-normalized advantages
# ------------------------------------------------------------------------------------------------------------

REWARDS_B = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])


def test_group_normalize_by_hand() -> None:
    # group 1: mean 1/4, centered (3/4, -1/4, -1/4, -1/4), unbiased var (9/16 + 3/16) / 3 = 1/4, std 1/2
    # group 2: mean 1/2, centered (1/2, 1/2, -1/2, -1/2), unbiased var 1 / 3, std 1/sqrt(3)
    centered = group_normalize_rewards(REWARDS_B, 4, advantage_eps=1e-6, normalize_by_std=False)
    torch.testing.assert_close(centered, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]))
    adv = group_normalize_rewards(REWARDS_B, 4, advantage_eps=0.0, normalize_by_std=True)
    s3 = math.sqrt(3) / 2
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, s3, s3, -s3, -s3]))


def test_group_normalize_eps_effect() -> None:
    adv = group_normalize_rewards(REWARDS_B[:4], 4, advantage_eps=0.5, normalize_by_std=True)
    # std 1/2 + eps 1/2 = 1: the centered rewards come back unchanged
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25]))


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("normalize_by_std", [True, False])
def test_zero_std_group_gives_zero(eps: float, normalize_by_std: bool) -> None:
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.0])
    adv = group_normalize_rewards(rewards, 3, advantage_eps=eps, normalize_by_std=normalize_by_std)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.isfinite(adv).all()
    # group of one: no spread, advantage 0
    assert torch.equal(group_normalize_rewards(torch.tensor([3.0, 5.0]), 1, 0.0, True), torch.zeros(2))


def test_maxrl_mean_normalizer_by_hand() -> None:
    # MaxRL: A = (r - mean) / (mean + eps).
    # group 1: mean 1/4, centered (3/4, -1/4, -1/4, -1/4) / (1/4) = (3, -1, -1, -1)
    # group 2: mean 1/2, centered (1/2, 1/2, -1/2, -1/2) / (1/2) = (1, 1, -1, -1)
    adv = group_normalize_rewards(REWARDS_B, 4, 0.0, False, normalize_by="mean")
    torch.testing.assert_close(adv, torch.tensor([3.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0]))
    # eps 1/4 on group 1: denominator 1/2 -> (3/2, -1/2, -1/2, -1/2); normalize_by wins over normalize_by_std
    adv = group_normalize_rewards(REWARDS_B[:4], 4, 0.25, True, normalize_by="mean")
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    # an all-wrong group (mean 0) and an all-right group give 0, even with eps 0
    adv = group_normalize_rewards(torch.tensor([0.0, 0.0, 1.0, 1.0]), 2, 0.0, False, normalize_by="mean")
    assert torch.equal(adv, torch.zeros(4))
    # a harder prompt weighs more: one success in 4 gets A = 3, one failure in 4 gets A = -1/3
    adv = group_normalize_rewards(torch.tensor([0.0, 1.0, 1.0, 1.0]), 4, 0.0, False, normalize_by="mean")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1 / 3, 1 / 3, 1 / 3]))
    # rewards in a non-binary range: [2, 4] -> mean 3, A = (-1/3, 1/3)
    adv = group_normalize_rewards(torch.tensor([2.0, 4.0]), 2, 0.0, False, normalize_by="mean")
    torch.testing.assert_close(adv, torch.tensor([-1 / 3, 1 / 3]))


def test_normalize_by_names_match_the_seed_flag() -> None:
    for flag, name in ((True, "std"), (False, "none")):
        want = group_normalize_rewards(REWARDS_B, 4, 1e-6, flag)
        assert torch.equal(group_normalize_rewards(REWARDS_B, 4, 1e-6, not flag, normalize_by=name), want)
    with pytest.raises(ValueError, match="unknown normalize_by 'max'"):
        group_normalize_rewards(REWARDS_B, 4, 1e-6, True, normalize_by="max")
    with pytest.raises(ValueError, match="group 1 has mean -0.5"):
        group_normalize_rewards(torch.tensor([1.0, 0.0, -1.0, 0.0]), 2, 1e-6, False, normalize_by="mean")


def test_compute_group_normalized_rewards_maxrl() -> None:
    responses = ["<a", "b", "c", "d", "<e", "<e", "x", "y"]
    truths = ["<a"] * 4 + ["<e"] * 4
    adv, raw, _ = compute_group_normalized_rewards(
        _reward_fn, responses, truths, 4, 0.0, True, normalize_by="mean"
    )
    torch.testing.assert_close(raw, REWARDS_B)
    torch.testing.assert_close(adv, torch.tensor([3.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0]))


def test_group_normalize_errors() -> None:
    with pytest.raises(ValueError, match="index 2"):
        group_normalize_rewards(torch.tensor([1.0, 0.0, float("nan"), 0.0]), 2, 1e-6, True)
    with pytest.raises(ValueError, match="groups of 3"):
        group_normalize_rewards(torch.zeros(4), 3, 1e-6, True)


def _reward_fn(response: str, ground_truth: str) -> dict[str, float]:
    answer = float(response == ground_truth)
    fmt = float(response.startswith("<"))
    return {"reward": answer, "format_reward": fmt, "answer_reward": answer}


def test_compute_group_normalized_rewards_and_metadata() -> None:
    responses = ["<a", "b", "c", "d", "<e", "<e", "x", "y"]
    truths = ["<a"] * 4 + ["<e"] * 4
    adv, raw, meta = compute_group_normalized_rewards(_reward_fn, responses, truths, 4, 0.0, True)
    torch.testing.assert_close(raw, REWARDS_B)
    s3 = math.sqrt(3) / 2
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, s3, s3, -s3, -s3]))
    assert raw.dtype == adv.dtype == torch.float32 and adv.shape == (8,)
    assert meta["reward_mean"] == pytest.approx(3 / 8)
    # unbiased over the batch: sum (r - 3/8)^2 = 3 (5/8)^2 + 5 (3/8)^2 = 120/64, / 7
    assert meta["reward_std"] == pytest.approx(math.sqrt(120 / 64 / 7))
    assert meta["reward_min"] == 0.0 and meta["reward_max"] == 1.0
    assert meta["zero_std_group_fraction"] == 0.0
    assert meta["format_reward_mean"] == pytest.approx(3 / 8)
    assert meta["answer_reward_mean"] == pytest.approx(3 / 8)
    _, _, meta = compute_group_normalized_rewards(
        _reward_fn, ["a", "b", "<c", "<c"], ["z", "z", "<c", "<c"], 2, 0, 1
    )
    assert meta["zero_std_group_fraction"] == 1.0


def test_compute_group_normalized_rewards_rejects_none_and_nan() -> None:
    def none_fn(response: str, gt: str) -> dict[str, float | None]:
        return {"reward": None if response == "bad" else 1.0}

    with pytest.raises(ValueError, match="index 1"):
        compute_group_normalized_rewards(none_fn, ["ok", "bad"], ["", ""], 2, 1e-6, True)

    def nan_fn(response: str, gt: str) -> dict[str, float]:
        return {"reward": float("nan") if response == "bad" else 1.0}

    with pytest.raises(ValueError, match="index 3"):
        compute_group_normalized_rewards(nan_fn, ["ok", "ok", "ok", "bad"], [""] * 4, 2, 1e-6, True)


# ------------------------------------------------------------------------------------------------------------
# Per-token losses
# ------------------------------------------------------------------------------------------------------------


def test_naive_loss_by_hand() -> None:
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    expected = torch.tensor([[2.0, 4.0], [-0.25, -1.5]])  # -A * logp with A = (2, -0.5)
    for A in (torch.tensor([[2.0], [-0.5]]), torch.tensor([2.0, -0.5])):
        torch.testing.assert_close(compute_naive_policy_gradient_loss(A, log_probs), expected)


# ratios r = (1.5, 1.1, 0.5) in both rows, advantages A = (2, -1), eps = 0.2:
#   A = 2:  r = 1.5 -> min(3.0, 1.2*2) = 2.4 (clipped);  r = 1.1 -> 2.2;  r = 0.5 -> min(1.0, 1.6) = 1.0
#   A = -1: r = 1.5 -> min(-1.5, -1.2) = -1.5;  r = 1.1 -> -1.1;  r = 0.5 -> min(-0.5, -0.8) = -0.8 (clipped)
RATIOS = torch.tensor([[1.5, 1.1, 0.5], [1.5, 1.1, 0.5]])
ADV = torch.tensor([[2.0], [-1.0]])


def _clip_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.7], [-0.3, -1.2, -2.5]])
    log_probs = (old + RATIOS.log()).requires_grad_(True)
    return log_probs, old


def test_clip_loss_both_boundaries() -> None:
    log_probs, old = _clip_inputs()
    loss, meta = compute_grpo_clip_loss(ADV, log_probs, old, 0.2)
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -2.2, -1.0], [1.5, 1.1, 0.8]]))
    assert torch.equal(meta["clipped"], torch.tensor([[True, False, False], [False, False, True]]))
    assert torch.equal(meta["clipped_high"], torch.tensor([[True, False, False], [False, False, False]]))
    assert torch.equal(meta["clipped_low"], torch.tensor([[False, False, False], [False, False, True]]))
    torch.testing.assert_close(meta["ratio"], RATIOS)
    # d(-r A)/dlogp = -r A on unclipped tokens, 0 on clipped ones
    loss.sum().backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.0, -2.2, -1.0], [1.5, 1.1, 0.0]]))


def test_clip_mask_is_where_clipped_term_is_taken() -> None:
    torch.manual_seed(0)
    old = -torch.rand(4, 7) * 3
    log_probs = old + torch.randn(4, 7) * 0.4
    A = torch.randn(4, 1)
    loss, meta = compute_grpo_clip_loss(A, log_probs, old, cliprange_low=0.1, cliprange_high=0.3)
    r = torch.exp(log_probs - old)
    unclipped, clipped = r * A, torch.clamp(r, 0.9, 1.3) * A
    assert torch.equal(meta["clipped"], clipped < unclipped)
    assert meta["clipped"].any() and not meta["clipped"].all()
    torch.testing.assert_close(loss, -torch.minimum(unclipped, clipped))


def test_asymmetric_clipping() -> None:
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[1.25, 1.35, 0.85], [1.25, 0.85, 0.75]]).log()
    A = torch.tensor([1.0, -1.0])
    # eps_low 0.2, eps_high 0.28: A > 0 clips above 1.28 only; A < 0 clips below 0.8 only
    loss, meta = compute_grpo_clip_loss(A, log_probs, old, cliprange_low=0.2, cliprange_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.25, -1.28, -0.85], [1.25, 0.85, 0.8]]))
    assert torch.equal(meta["clipped_high"], torch.tensor([[False, True, False], [False, False, False]]))
    assert torch.equal(meta["clipped_low"], torch.tensor([[False, False, False], [False, False, True]]))
    # cliprange sets both; a given side overrides it
    sym, _ = compute_grpo_clip_loss(A, log_probs, old, 0.2)
    torch.testing.assert_close(sym[0, 0], torch.tensor(-1.2))
    one_sided, _ = compute_grpo_clip_loss(A, log_probs, old, 0.2, cliprange_high=0.28)
    torch.testing.assert_close(one_sided, loss)


def test_grpo_no_clip_is_ratio_times_advantage() -> None:
    log_probs, old = _clip_inputs()
    loss, meta = compute_policy_gradient_loss(log_probs, "grpo_no_clip", advantages=ADV, old_log_probs=old)
    torch.testing.assert_close(loss, -RATIOS * ADV)
    loss.sum().backward()
    torch.testing.assert_close(log_probs.grad, -RATIOS * ADV)
    # on-policy (ratio 1) its gradient is REINFORCE's
    lp = torch.randn(2, 3, requires_grad=True)
    g1 = torch.autograd.grad(
        compute_policy_gradient_loss(lp, "grpo_no_clip", advantages=ADV, old_log_probs=lp.detach())[0].sum(),
        lp,
    )
    g2 = torch.autograd.grad(
        compute_policy_gradient_loss(lp, "reinforce_with_baseline", advantages=ADV)[0].sum(), lp
    )
    torch.testing.assert_close(g1[0], g2[0])


def test_dispatch_matches_direct_functions() -> None:
    log_probs, old = _clip_inputs()
    raw = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(
        compute_policy_gradient_loss(log_probs, "no_baseline", raw_rewards=raw)[0],
        compute_naive_policy_gradient_loss(raw, log_probs),
    )
    torch.testing.assert_close(
        compute_policy_gradient_loss(log_probs, "reinforce_with_baseline", advantages=ADV)[0],
        compute_naive_policy_gradient_loss(ADV, log_probs),
    )
    torch.testing.assert_close(
        compute_policy_gradient_loss(
            log_probs, "grpo_clip", advantages=ADV, old_log_probs=old, cliprange=0.2
        )[0],
        compute_grpo_clip_loss(ADV, log_probs, old, 0.2)[0],
    )
    assert set(POLICY_GRADIENT_LOSSES) == {
        "no_baseline",
        "reinforce_with_baseline",
        "grpo_clip",
        "grpo_no_clip",
    }


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "missing"),
    [
        ("no_baseline", {"advantages": ADV}, "raw_rewards"),
        ("reinforce_with_baseline", {"raw_rewards": ADV}, "advantages"),
        ("grpo_clip", {"old_log_probs": torch.zeros(2, 3), "cliprange": 0.2}, "advantages"),
        ("grpo_clip", {"advantages": ADV, "cliprange": 0.2}, "old_log_probs"),
        ("grpo_clip", {"advantages": ADV, "old_log_probs": torch.zeros(2, 3)}, "cliprange"),
        (
            "grpo_clip",
            {"advantages": ADV, "old_log_probs": torch.zeros(2, 3), "cliprange_low": 0.2},
            "cliprange",
        ),
        ("grpo_no_clip", {"advantages": ADV}, "old_log_probs"),
    ],
)
def test_missing_argument_errors(loss_type: str, kwargs: dict, missing: str) -> None:
    with pytest.raises(ValueError, match=rf"{loss_type}.*{missing}"):
        compute_policy_gradient_loss(torch.zeros(2, 3), loss_type, **kwargs)


def test_unknown_names_list_valid_ones() -> None:
    with pytest.raises(ValueError, match="grpo_clip.*no_baseline"):
        compute_policy_gradient_loss(torch.zeros(2, 3), "ppo", advantages=ADV)
    with pytest.raises(ValueError, match="constant.*sequence_mean.*token_mean"):
        reduce_token_losses(torch.zeros(2, 3), torch.ones(2, 3), "sum")
    with pytest.raises(ValueError, match="ratio_level"):
        compute_policy_gradient_loss(
            torch.zeros(2, 3), "reinforce_with_baseline", advantages=ADV, ratio_level="sequence"
        )


# ------------------------------------------------------------------------------------------------------------
# GSPO sequence ratio
# ------------------------------------------------------------------------------------------------------------


def _naive_gspo_loss(log_probs, old, mask, A, eps_low, eps_high):
    """GSPO written directly per sequence (Zheng et al. 2025): mean_i -min(s_i A_i, clip(s_i) A_i)."""
    losses = []
    for i in range(log_probs.shape[0]):
        m = mask[i]
        n = m.sum()
        log_s = ((log_probs[i] - old[i]) * m).sum() / n if n > 0 else log_probs.new_zeros(())
        s = torch.exp(log_s)
        losses.append(-torch.minimum(s * A[i], torch.clamp(s, 1 - eps_low, 1 + eps_high) * A[i]))
    return torch.stack(losses).mean()


def test_gspo_sequence_ratio_value_and_gradient() -> None:
    torch.manual_seed(1)
    old = -torch.rand(4, 5) * 2
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool
    )
    delta = torch.tensor(
        [[0.3, -0.1, 0.1, 5.0, 5.0], [0.0, 0.1, 0.0, 0.0, 0.0], [-0.6, 9, 9, 9, 9], [0.1, 0.1, 0, 0, 0]]
    )
    A = torch.tensor([1.0, -1.0, -2.0, 0.5])
    log_probs = (old + delta).requires_grad_(True)
    # s = exp(0.1), exp(0.02), exp(-0.6), exp(0.1); masked tokens (5.0, 9) must not enter
    _, meta = compute_grpo_clip_loss(A, log_probs, old, 0.2, ratio_level="sequence", response_mask=mask)
    s = torch.tensor([0.1, 0.02, -0.6, 0.1]).exp()
    torch.testing.assert_close(meta["ratio"], s[:, None].expand(4, 5))
    # row 2: A < 0 and s = 0.549 < 0.8 -> every token clipped; the others inside [0.8, 1.2]
    assert torch.equal(meta["clipped"], mask.new_tensor([[0], [0], [1], [0]]).expand(4, 5))

    loss, _ = policy_loss(
        log_probs,
        mask,
        loss_type="grpo_clip",
        advantages_B=A,
        old_log_probs_BT=old,
        cliprange=0.2,
        ratio_level="sequence",
    )
    (grad,) = torch.autograd.grad(loss, log_probs)
    ref_log_probs = log_probs.detach().clone().requires_grad_(True)
    ref = _naive_gspo_loss(ref_log_probs, old, mask, A, 0.2, 0.2)
    (ref_grad,) = torch.autograd.grad(ref, ref_log_probs)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[2].abs().sum() == 0 and grad[0].abs().sum() > 0

    # wider clip: nothing clipped, grad = -A s / |o_i| on each unmasked token
    loss, _ = policy_loss(
        log_probs,
        mask,
        loss_type="grpo_clip",
        advantages_B=A,
        old_log_probs_BT=old,
        cliprange=0.5,
        ratio_level="sequence",
    )
    (grad,) = torch.autograd.grad(loss, log_probs)
    expected = -(A * s / mask.sum(-1))[:, None] * mask / 4
    torch.testing.assert_close(grad, expected)


def test_gspo_needs_mask() -> None:
    with pytest.raises(ValueError, match="response_mask"):
        compute_grpo_clip_loss(ADV, torch.zeros(2, 3), torch.zeros(2, 3), 0.2, ratio_level="sequence")


# ------------------------------------------------------------------------------------------------------------
# KL penalty
# ------------------------------------------------------------------------------------------------------------


def test_kl_k3_values() -> None:
    torch.manual_seed(2)
    log_probs, ref = torch.randn(16, 32) * 3, torch.randn(16, 32) * 3
    assert (kl_k3(log_probs, ref) >= 0).all()
    assert torch.equal(kl_k3(log_probs, log_probs), torch.zeros(16, 32))
    # ref - logp = 1: e - 2;  ref - logp = -1: 1/e
    torch.testing.assert_close(
        kl_k3(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])), torch.tensor([math.e - 2, 1 / math.e])
    )


def test_kl_penalty_added_and_beta_without_ref_raises() -> None:
    log_probs, old = _clip_inputs()
    mask = torch.ones(2, 3, dtype=torch.bool)
    ref = old - 0.5
    base, m0 = policy_loss(
        log_probs, mask, loss_type="reinforce_with_baseline", advantages_B=ADV, ref_log_probs_BT=ref
    )
    with_kl, m1 = policy_loss(
        log_probs, mask, loss_type="reinforce_with_baseline", advantages_B=ADV, ref_log_probs_BT=ref, beta=0.1
    )
    k3 = kl_k3(log_probs, ref)
    torch.testing.assert_close(with_kl - base, 0.1 * k3.mean(-1).mean())
    torch.testing.assert_close(m0["kl_mean"], k3.mean().detach())
    torch.testing.assert_close(m1["policy_loss"], m0["loss"])
    with pytest.raises(ValueError, match="ref_log_probs"):
        policy_loss(log_probs, mask, loss_type="reinforce_with_baseline", advantages_B=ADV, beta=0.1)


# ------------------------------------------------------------------------------------------------------------
# Reductions
# ------------------------------------------------------------------------------------------------------------


def _naive_reduce(loss, mask, reduction, n_seq=None, n_tok=None, l_max=None):
    B, T = loss.shape
    n_seq = B if n_seq is None else n_seq
    n_tok = max(1, int(mask.sum())) if n_tok is None else n_tok
    total = 0.0
    for i in range(B):
        row = [float(loss[i, t]) for t in range(T) if mask[i, t]]
        if reduction == "sequence_mean":
            total += (sum(row) / len(row) if row else 0.0) / n_seq
        elif reduction == "token_mean":
            total += sum(row) / n_tok
        else:
            total += sum(row) / (n_seq * l_max)
    return total


REDUCTIONS = sorted(LOSS_REDUCTIONS)


def _loss_and_mask(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(5, 6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 3, 0, 1, 4])  # row 2 fully masked
    mask = torch.arange(6)[None, :] < lengths[:, None]
    return loss, mask


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reductions_vs_naive_loop(reduction: str) -> None:
    loss, mask = _loss_and_mask()
    got = reduce_token_losses(loss, mask, reduction, max_completion_length=10)
    assert got.item() == pytest.approx(_naive_reduce(loss, mask, reduction, l_max=10), abs=1e-12)
    got = reduce_token_losses(
        loss, mask, reduction, num_sequences=20, num_tokens=50, max_completion_length=10
    )
    assert got.item() == pytest.approx(_naive_reduce(loss, mask, reduction, 20, 50, 10), abs=1e-12)


def test_reductions_by_hand() -> None:
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # sequence_mean: (2 + 4 + 0) / 3;  token_mean: (6 + 4) / 4;  constant: (6 + 4) / (3 * 5)
    assert reduce_token_losses(loss, mask, "sequence_mean").item() == pytest.approx(2.0)
    assert reduce_token_losses(loss, mask, "token_mean").item() == pytest.approx(2.5)
    assert reduce_token_losses(loss, mask, "constant", max_completion_length=5).item() == pytest.approx(
        10 / 15
    )
    with pytest.raises(ValueError, match="max_completion_length"):
        reduce_token_losses(loss, mask, "constant")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_masked_gives_zero_not_nan(reduction: str) -> None:
    loss = torch.randn(3, 4, requires_grad=True)
    out = reduce_token_losses(loss, torch.zeros(3, 4, dtype=torch.bool), reduction, max_completion_length=4)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(loss.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_padding_columns_change_nothing(reduction: str) -> None:
    loss, mask = _loss_and_mask()
    padded_loss = torch.cat([loss, torch.randn(5, 4, dtype=torch.float64) * 100], dim=1)  # (5, 10)
    padded_mask = torch.cat([mask, torch.zeros(5, 4, dtype=torch.bool)], dim=1)
    a = reduce_token_losses(loss, mask, reduction, max_completion_length=10)
    b = reduce_token_losses(padded_loss, padded_mask, reduction, max_completion_length=10)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Invariance of the optimizer-step gradient to how the batch is split
# ------------------------------------------------------------------------------------------------------------

LOSS_CONFIGS = {
    "no_baseline": {"loss_type": "no_baseline"},
    "reinforce_with_baseline": {"loss_type": "reinforce_with_baseline"},
    "grpo_clip": {"loss_type": "grpo_clip", "cliprange_low": 0.2, "cliprange_high": 0.28},
    "grpo_clip_sequence": {"loss_type": "grpo_clip", "cliprange": 0.1, "ratio_level": "sequence"},
    "grpo_no_clip_kl": {"loss_type": "grpo_no_clip", "beta": 0.05},
}
B, T, D, V = 8, 7, 5, 11
L_MAX = 9


def _rollout_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([7, 2, 0, 5, 1, 7, 3, 4])
    return {
        "features": torch.randn(B, T, D, generator=g, dtype=torch.float64),
        "tokens": torch.randint(0, V, (B, T), generator=g),
        "mask": torch.arange(T)[None, :] < lengths[:, None],
        "logps": -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        "old_noise": torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3,
        "ref_noise": torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5,
        "advantages": torch.randn(B, generator=g, dtype=torch.float64),
        "rewards": torch.rand(B, generator=g, dtype=torch.float64),
    }


def _microbatch_loss(log_probs_bT, data, rows, config, reduction, global_counts):
    """Loss of the micro-batch ``rows``, trimmed to its own longest response (as a collator would pad it)."""
    width = max(1, int(data["mask"][rows].sum(-1).max()))
    log_probs_bT = log_probs_bT[:, :width]
    mask = data["mask"][rows, :width]
    extra = {k: v for k, v in config.items() if k != "loss_type"}
    return policy_loss(
        log_probs_bT,
        mask,
        loss_type=config["loss_type"],
        reduction=reduction,
        advantages_B=data["advantages"][rows],
        raw_rewards_B=data["rewards"][rows],
        old_log_probs_BT=(log_probs_bT.detach() + data["old_noise"][rows, :width]),
        ref_log_probs_BT=(log_probs_bT.detach() + data["ref_noise"][rows, :width]),
        max_completion_length=L_MAX,
        **global_counts,
        **extra,
    )[0]


def _global_counts(data) -> dict[str, int]:
    return {"num_sequences": B, "num_tokens": int(data["mask"].sum())}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config_name", sorted(LOSS_CONFIGS))
def test_accumulation_invariance_leaf_log_probs(reduction: str, config_name: str) -> None:
    data, config = _rollout_batch(), LOSS_CONFIGS[config_name]
    grads = {}
    for micro in (8, 4, 2, 1):
        leaf = data["logps"].clone().requires_grad_(True)
        for start in range(0, B, micro):
            rows = slice(start, start + micro)
            _microbatch_loss(leaf[rows], data, rows, config, reduction, _global_counts(data)).backward()
        grads[micro] = leaf.grad
    assert grads[8].abs().sum() > 0
    for micro in (4, 2, 1):
        torch.testing.assert_close(grads[micro], grads[8], atol=1e-6, rtol=0)


def _tiny_policy_log_probs(policy: torch.nn.Linear, data, rows) -> torch.Tensor:
    logits_bTV = policy(data["features"][rows])  # (b, T, V)
    return (
        torch.log_softmax(logits_bTV, dim=-1).gather(-1, data["tokens"][rows, :, None]).squeeze(-1)
    )  # (b, T)


def _fresh_policy() -> torch.nn.Linear:
    torch.manual_seed(5)
    return torch.nn.Linear(D, V, dtype=torch.float64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config_name", sorted(LOSS_CONFIGS))
def test_accumulation_invariance_linear_policy(reduction: str, config_name: str) -> None:
    data, config = _rollout_batch(), LOSS_CONFIGS[config_name]
    grads = {}
    for micro in (8, 4, 2, 1):
        policy = _fresh_policy()
        for start in range(0, B, micro):
            rows = slice(start, start + micro)
            log_probs = _tiny_policy_log_probs(policy, data, rows)
            _microbatch_loss(log_probs, data, rows, config, reduction, _global_counts(data)).backward()
        grads[micro] = torch.cat([policy.weight.grad.flatten(), policy.bias.grad])
    assert grads[8].abs().sum() > 0
    for micro in (4, 2, 1):
        torch.testing.assert_close(grads[micro], grads[8], atol=1e-6, rtol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("config_name", sorted(LOSS_CONFIGS))
def test_two_processes_equal_one(reduction: str, config_name: str) -> None:
    """Each rank: local loss with GLOBAL counts, times world size; DDP then averages gradients over ranks."""
    data, config = _rollout_batch(), LOSS_CONFIGS[config_name]
    counts = _global_counts(data)
    policy = _fresh_policy()
    _microbatch_loss(
        _tiny_policy_log_probs(policy, data, slice(0, B)), data, slice(0, B), config, reduction, counts
    ).backward()
    one_process = torch.cat([policy.weight.grad.flatten(), policy.bias.grad])

    world_size, rank_grads = 2, []
    for rank in range(world_size):
        policy = _fresh_policy()
        # each rank accumulates 2 micro-batches of 2 from its half of the batch
        for start in range(rank * 4, rank * 4 + 4, 2):
            rows = slice(start, start + 2)
            loss = _microbatch_loss(
                _tiny_policy_log_probs(policy, data, rows), data, rows, config, reduction, counts
            )
            (loss * world_size).backward()
        rank_grads.append(torch.cat([policy.weight.grad.flatten(), policy.bias.grad]))
    torch.testing.assert_close(torch.stack(rank_grads).mean(0), one_process, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------------
# Metrics and the seed's micro-batch step
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_all_empty_completions_give_finite_loss_metrics_and_gradient(
    reduction: str, ratio_level: str
) -> None:
    # masked_mean is NaN on an empty slice (the seed's contract); the losses' own reductions must not be
    log_probs, old = _clip_inputs()  # a leaf that requires grad
    mask = torch.zeros_like(log_probs, dtype=torch.bool)
    loss, metrics = policy_loss(
        log_probs,
        mask,
        loss_type="grpo_clip",
        reduction=reduction,
        advantages_B=ADV,
        old_log_probs_BT=old,
        cliprange=0.2,
        ratio_level=ratio_level,
        ref_log_probs_BT=old,
        beta=0.1,
        max_completion_length=3,
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(log_probs.grad, torch.zeros_like(log_probs))
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics


def test_policy_loss_metrics() -> None:
    log_probs, old = _clip_inputs()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)  # masks the clipped (1, 2) token
    loss, metrics = policy_loss(
        log_probs,
        mask,
        loss_type="grpo_clip",
        reduction="token_mean",
        advantages_B=ADV,
        old_log_probs_BT=old,
        cliprange=0.2,
    )
    # tokens kept: -2.4, -2.2, -1.0, 1.5, 1.1 -> mean -3/5; clipped: only (0, 0), a high clip
    torch.testing.assert_close(loss, torch.tensor(-0.6))
    expected = {
        "loss": -0.6,
        "policy_loss": -0.6,
        "clip_fraction": 0.2,
        "clip_fraction_high": 0.2,
        "clip_fraction_low": 0.0,
        "ratio_mean": (1.5 + 1.1 + 0.5 + 1.5 + 1.1) / 5,
        "ratio_max": 1.5,
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad
        assert metrics[key].item() == pytest.approx(value, abs=1e-6), key
    _, metrics = policy_loss(log_probs, mask, loss_type="no_baseline", raw_rewards_B=torch.ones(2))
    assert set(metrics) == {"loss", "policy_loss"}


def test_microbatch_train_step_by_hand_and_accumulates() -> None:
    log_probs, old = _clip_inputs()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # row 0: (-2.4 - 2.2) / 2 = -2.3;  row 1: (1.5 + 1.1 + 0.8) / 3 = 17/15;  batch mean, / 2 accum. steps
    expected = (-2.3 + 17 / 15) / 2 / 2
    loss, metrics = grpo_microbatch_train_step(
        log_probs, mask, 2, "grpo_clip", advantages=ADV, old_log_probs=old, cliprange=0.2
    )
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert "clip_fraction" in metrics
    first = log_probs.grad.clone()
    # per-token grad: -r A (unclipped) / |o_i| / B / steps
    torch.testing.assert_close(first, torch.tensor([[0.0, -2.2 / 2, 0.0], [1.5 / 3, 1.1 / 3, 0.0]]) / 4)
    grpo_microbatch_train_step(
        log_probs, mask, 2, "grpo_clip", advantages=ADV, old_log_probs=old, cliprange=0.2
    )
    torch.testing.assert_close(log_probs.grad, 2 * first)

    raw = torch.tensor([[1.0], [0.0]])
    lp = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    loss, _ = grpo_microbatch_train_step(lp, torch.ones(2, 2), 4, "no_baseline", raw_rewards=raw)
    # row 0: -1 * mean(-1, -2) = 1.5; row 1: 0; mean 0.75; / 4
    assert loss.item() == pytest.approx(0.1875)


def test_two_sided_clip_by_hand() -> None:
    # ratios 0.5, 1, 3, 6 with eps 0.2 and delta 4: A = -1 gives max(min(r, 4), clip(r, 0.8, 1.2)) = 0.8, 1, 3, 4
    # (6 without delta); A = +1 gives -min(r, clip(r)) = -0.5, -1, -1.2, -1.2 with or without delta.
    logp = torch.zeros(2, 4)
    old = -torch.tensor([0.5, 1.0, 3.0, 6.0]).log().expand(2, 4)
    A = torch.tensor([-1.0, 1.0])
    loss, _ = compute_policy_gradient_loss(logp, "grpo_clip", None, A, old, 0.2, delta=4.0)
    torch.testing.assert_close(loss, torch.tensor([[0.8, 1.0, 3.0, 4.0], [-0.5, -1.0, -1.2, -1.2]]))
    loss, _ = compute_policy_gradient_loss(logp, "grpo_clip", None, A, old, 0.2)
    torch.testing.assert_close(loss[0], torch.tensor([0.8, 1.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="delta"):
        compute_policy_gradient_loss(logp, "grpo_no_clip", None, A, old, delta=4.0)


def test_high_entropy_mask_by_hand() -> None:
    # valid entropies 0.1 0.5 0.9 0.3 | 0.7 0.2 (the 5.0s are masked out): sorted 0.1 0.2 0.3 0.5 0.7 0.9; the
    # 0.5 quantile interpolates at position 2.5 -> 0.4, so 0.5, 0.9, 0.7 are kept. quantile 0 keeps the max only,
    # 1 every valid token; a pool (other processes' tokens) moves the threshold.
    entropy = torch.tensor([[0.1, 0.5, 0.9, 0.3], [0.7, 0.2, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    torch.testing.assert_close(
        high_entropy_mask(entropy, mask, 0.5), torch.tensor([[0.0, 1, 1, 0], [1, 0, 0, 0]])
    )
    torch.testing.assert_close(
        high_entropy_mask(entropy, mask, 0.0), torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]])
    )
    torch.testing.assert_close(high_entropy_mask(entropy, mask, 1.0), mask.float())
    pooled = high_entropy_mask(entropy, mask, 0.5, pool=torch.tensor([0.6, 0.8, 1.0]))  # threshold 0.8
    torch.testing.assert_close(pooled, torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]]))
    assert not high_entropy_mask(entropy, torch.zeros_like(mask), 0.5).any()


def test_entropy_bonus_by_hand() -> None:
    # valid entropies 1, 2, 3 | 6 (the 9 is padding): mean over the 4 tokens = 3, so L_H = -0.1 * 3 = -0.3; with
    # N_tok = 8 (the optimizer step's tokens, other micro-batches included) -0.1 * 12 / 8 = -0.15. d L_H / d H_it =
    # -coef / N_tok on valid tokens, 0 on padding; an all-masked batch gives 0, not NaN.
    entropy = torch.tensor([[1.0, 2.0, 3.0], [6.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, metrics = entropy_bonus(entropy, mask, 0.1)
    torch.testing.assert_close(loss, torch.tensor(-0.3))
    torch.testing.assert_close(metrics["entropy_mean"], torch.tensor(3.0))
    torch.testing.assert_close(entropy_bonus(entropy, mask, 0.1, num_tokens=8)[0], torch.tensor(-0.15))
    loss.backward()
    torch.testing.assert_close(entropy.grad, -0.1 / 4 * mask.float())
    assert entropy_bonus(entropy, torch.zeros_like(mask), 0.1)[0].item() == 0.0


@pytest.mark.parametrize(
    "coef, entropy, want",
    [
        (0.1, 0.15, 0.105),  # at or below target 0.2: up by delta 0.005
        (0.1, 0.2, 0.105),  # the target itself counts as below
        (0.1, 0.25, 0.095),  # above: down
        (0.498, 0.1, 0.5),  # clamped to high
        (0.002, 0.3, 0.0),  # clamped to low
    ],
)
def test_adaptive_entropy_coef_by_hand(coef, entropy, want) -> None:
    got = adaptive_entropy_coef(coef, entropy, target=0.2, delta=0.005, low=0.0, high=0.5)
    assert got == pytest.approx(want)


def test_applied_entropy_coef_only_at_or_below_target() -> None:
    assert applied_entropy_coef(0.3, 0.2, 0.2) == 0.3
    assert applied_entropy_coef(0.3, 0.21, 0.2) == 0.0
    assert applied_entropy_coef(0.3, math.inf, 0.2) == 0.0  # no measurement yet
