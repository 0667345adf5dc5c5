"""DPO-family losses: hand-derived values, a naive per-pair reference, gradients, errors, and parity with TRL.

Hand values use ``beta * h = log 3``, where ``sigma(log 3) = 3/4`` and ``sigma(-log 3) = 1/4``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hf_align.losses.dpo import DPO_LOSSES, dpo_loss, sequence_log_probs, split_concatenated

LOG3 = math.log(3.0)


def _pair(h: float) -> tuple[torch.Tensor, ...]:
    """One pair whose margin is h: pi_c - ref_c = h + 0.5, pi_r - ref_r = 0.5 (non-zero on both sides)."""
    ref_c, ref_r = -4.0, -6.0
    return (
        torch.tensor([ref_c + h + 0.5]),
        torch.tensor([ref_r + 0.5]),
        torch.tensor([ref_c]),
        torch.tensor([ref_r]),
    )


# ------------------------------------------------------------------------------------------------------------
# Hand-derived values
# ------------------------------------------------------------------------------------------------------------


def test_sigmoid_by_hand():
    loss, _ = dpo_loss(*_pair(0.0), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0))  # h = 0: -log sigma(0)
    loss, _ = dpo_loss(*_pair(LOG3 / 0.5), beta=0.5)
    assert loss.item() == pytest.approx(math.log(4 / 3))  # -log(3/4)


def test_cdpo_label_smoothing_by_hand():
    loss, _ = dpo_loss(*_pair(LOG3), beta=1.0, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4))
    # h = 0: both terms are log 2, whatever eps
    loss, _ = dpo_loss(*_pair(0.0), beta=1.0, label_smoothing=0.3)
    assert loss.item() == pytest.approx(math.log(2.0))


def test_robust_by_hand():
    loss, _ = dpo_loss(*_pair(LOG3), beta=1.0, loss_type="robust", label_smoothing=0.25)
    # [-(3/4) log(3/4) + (1/4) log(1/4)] / (1 - 1/2)
    assert loss.item() == pytest.approx((0.75 * math.log(4 / 3) - 0.25 * math.log(4)) / 0.5)
    # eps = 0 is plain DPO
    robust, _ = dpo_loss(*_pair(LOG3), beta=1.0, loss_type="robust")
    assert robust.item() == pytest.approx(math.log(4 / 3))


def test_hinge_by_hand():
    beta = 0.5
    assert dpo_loss(*_pair(2.0), beta=beta, loss_type="hinge")[0].item() == pytest.approx(0.0)  # beta h = 1
    assert dpo_loss(*_pair(0.5), beta=beta, loss_type="hinge")[0].item() == pytest.approx(0.75)  # 1 - 0.25
    assert dpo_loss(*_pair(6.0), beta=beta, loss_type="hinge")[0].item() == 0.0  # beta h = 3 > 1
    assert dpo_loss(*_pair(-2.0), beta=beta, loss_type="hinge")[0].item() == pytest.approx(2.0)


def test_bco_pair_by_hand():
    # _pair(h): lr_c = h + 0.5, lr_r = 0.5. h = 1.5, beta = 1: lr_c = 2 -> -log sigma(2) - log sigma(-0.5)
    loss, _ = dpo_loss(*_pair(1.5), beta=1.0, loss_type="bco_pair")
    expected = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(0.5))
    assert loss.item() == pytest.approx(expected)
    # policy == reference: two coin flips, 2 log 2 (where sigmoid DPO gives log 2)
    assert dpo_loss(*_pair(-0.5), beta=0.1, loss_type="bco_pair")[0].item() != pytest.approx(2 * math.log(2))
    zero = (torch.tensor([-3.0]),) * 4
    assert dpo_loss(*zero, beta=0.1, loss_type="bco_pair")[0].item() == pytest.approx(2 * math.log(2))


def test_sft_term_is_the_chosen_token_mean_nll():
    # chosen log-probs -6 over 2 tokens and -3 over 4 tokens: NLL per token = 9 / 6, the same for every pair
    pc, pr = torch.tensor([-6.0, -3.0], requires_grad=True), torch.tensor([-1.0, -2.0])
    loss, _ = dpo_loss(pc, pr, pr, pr, loss_type="sft", chosen_lengths_B=torch.tensor([2, 4]),
                       rejected_lengths_B=torch.tensor([1, 1]))  # fmt: skip
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.full((2,), -1 / 6))  # d(-sum / 6) / d logp_i
    with pytest.raises(ValueError, match="chosen_lengths_B"):
        dpo_loss(pc, pr, pr, pr, loss_type="sft")


def test_ipo_by_hand_uses_per_token_averages():
    beta = 0.25  # target h' = 1 / (2 beta) = 2
    # chosen: log-ratio 6 over 3 tokens -> 2 per token; rejected: log-ratio 0 -> h' = 2 -> loss 0
    pc, pr, rc, rr = torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-10.0]), torch.tensor([-9.0])
    three, five = torch.tensor([3]), torch.tensor([5])
    loss, _ = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths_B=three, rejected_lengths_B=five
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # rejected log-ratio 5 over 5 tokens -> 1 per token: h' = 2 - 1 = 1, loss (1 - 2)^2 = 1
    loss, _ = dpo_loss(
        pc, pr, rc, rr - 5.0, beta=beta, loss_type="ipo", chosen_lengths_B=three, rejected_lengths_B=five
    )
    assert loss.item() == pytest.approx(1.0)
    # the summed h would be 6 - 5 = 1 too, so check a case where averaging matters: lengths (6, 5) -> h' = 0
    loss, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr - 5.0,
        beta=beta,
        loss_type="ipo",
        chosen_lengths_B=torch.tensor([6]),
        rejected_lengths_B=five,
    )
    assert loss.item() == pytest.approx(4.0)  # (1 - 1 - 2)^2
    # an empty response counts as length 1, never 0 (no inf / NaN)
    loss, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type="ipo",
        chosen_lengths_B=torch.tensor([0]),
        rejected_lengths_B=five,
    )
    assert loss.item() == pytest.approx((6.0 - 2.0) ** 2)


def test_metrics_by_hand():
    beta = 0.5
    pc = torch.tensor([-1.0, -4.0])
    pr = torch.tensor([-3.0, -2.0])
    rc = torch.tensor([-2.0, -3.0])
    rr = torch.tensor([-2.0, -3.0])
    # chosen log-ratios (1, -1), rejected (-1, 1) -> rewards chosen (0.5, -0.5), rejected (-0.5, 0.5)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert m["rewards/chosen"].item() == pytest.approx(0.0)
    assert m["rewards/rejected"].item() == pytest.approx(0.0)
    assert m["rewards/accuracies"].item() == pytest.approx(0.5)
    assert m["rewards/margins"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert m["logps/chosen"].item() == pytest.approx(-2.5)
    assert m["logps/rejected"].item() == pytest.approx(-2.5)
    # margins 1 and -1: the mean of -log sigma(1) and -log sigma(-1)
    expected = 0.5 * (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0)))
    assert loss.item() == pytest.approx(expected)
    # a tie is not counted as correct
    _, m = dpo_loss(*_pair(0.0), beta=beta)
    assert m["rewards/accuracies"].item() == 0.0


def test_metrics_are_detached_scalars():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    _, m = dpo_loss(pc, torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]))
    assert set(m) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    for value in m.values():
        assert value.dim() == 0 and not value.requires_grad


# ------------------------------------------------------------------------------------------------------------
# Naive reference, gradients
# ------------------------------------------------------------------------------------------------------------


def _naive(loss_type: str, pc, pr, rc, rr, beta, eps, lc, lr) -> float:
    """Python-float loop over pairs, written from the papers' formulas."""

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))

    total = 0.0
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            li = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        elif loss_type == "robust":
            li = (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
        elif loss_type == "hinge":
            li = max(0.0, 1 - beta * h)
        else:
            hp = (pc[i] - rc[i]) / max(lc[i], 1) - (pr[i] - rr[i]) / max(lr[i], 1)
            li = (hp - 1 / (2 * beta)) ** 2
        total += li
    return total / len(pc)


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_against_naive_reference(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    lc = torch.randint(0, 8, (6,), generator=g)
    lr = torch.randint(1, 8, (6,), generator=g)
    beta = 0.7
    loss, _ = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_lengths_B=lc,
        rejected_lengths_B=lr,
    )
    expected = _naive(
        loss_type, pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, eps, lc.tolist(), lr.tolist()
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_sigmoid_gradient_by_hand_and_sign():
    beta = 0.5
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)
    pr = torch.tensor([-3.0, -2.0], requires_grad=True)
    rc = torch.tensor([-2.0, -3.0], requires_grad=True)
    rr = torch.tensor([-2.0, -3.0])
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta)
    loss.backward()
    # d/d pi_c [-log sigma(beta h)] / B = -beta sigma(-beta h) / B, h = (2, -2)
    h = torch.tensor([2.0, -2.0])
    expected = -beta * torch.sigmoid(-beta * h) / 2
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # raising chosen / lowering rejected lowers the loss
    assert rc.grad is None  # the reference is frozen
    # and a step along -grad does lower the loss
    with torch.no_grad():
        lower, _ = dpo_loss(pc - 0.1 * pc.grad.sign(), pr, rc, rr, beta=beta)
    assert lower.item() < loss.item()


def test_batch_mean_of_per_pair_losses():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-5 * torch.rand(4, generator=g) for _ in range(4))
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust", label_smoothing=0.1)
    single = [
        dpo_loss(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], 0.3, "robust", 0.1)[0]
        for i in range(4)
    ]
    torch.testing.assert_close(loss, torch.stack(single).mean())


# ------------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------------


def test_sequence_log_probs_and_padding():
    log_probs_BT = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]])
    mask_BT = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])
    torch.testing.assert_close(sequence_log_probs(log_probs_BT, mask_BT), torch.tensor([-3.0, -11.0, 0.0]))
    torch.testing.assert_close(
        sequence_log_probs(log_probs_BT, mask_BT.bool()), torch.tensor([-3.0, -11.0, 0.0])
    )
    padded_BT = torch.cat([log_probs_BT, torch.full((3, 2), -99.0)], dim=1)
    pmask_BT = torch.cat([mask_BT, torch.zeros(3, 2, dtype=mask_BT.dtype)], dim=1)
    torch.testing.assert_close(
        sequence_log_probs(padded_BT, pmask_BT), sequence_log_probs(log_probs_BT, mask_BT)
    )


def test_split_concatenated():
    x_2B = torch.arange(6.0)
    chosen_B, rejected_B = split_concatenated(x_2B)
    torch.testing.assert_close(chosen_B, torch.tensor([0.0, 1.0, 2.0]))
    torch.testing.assert_close(rejected_B, torch.tensor([3.0, 4.0, 5.0]))
    chosen, rejected = split_concatenated(torch.arange(8.0).reshape(4, 2))  # (2B, T) works too
    assert chosen.tolist() == [[0.0, 1.0], [2.0, 3.0]] and rejected.tolist() == [[4.0, 5.0], [6.0, 7.0]]
    with pytest.raises(ValueError, match="even"):
        split_concatenated(torch.arange(5.0))


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_errors():
    args = _pair(1.0)
    with pytest.raises(ValueError, match="hinge.*ipo.*robust.*sigmoid"):
        dpo_loss(*args, loss_type="kto")
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(*args, beta=beta)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(*args, loss_type="robust", label_smoothing=eps)
    for loss_type in ("hinge", "ipo"):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(
                *args,
                loss_type=loss_type,
                label_smoothing=0.1,
                chosen_lengths_B=torch.ones(1),
                rejected_lengths_B=torch.ones(1),
            )
    with pytest.raises(ValueError, match="chosen_lengths_B and rejected_lengths_B"):
        dpo_loss(*args, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths_B and rejected_lengths_B"):
        dpo_loss(*args, loss_type="ipo", chosen_lengths_B=torch.ones(1))
    with pytest.raises(ValueError, match="rejected_lengths_B has shape"):
        dpo_loss(*args, loss_type="ipo", chosen_lengths_B=torch.ones(1), rejected_lengths_B=torch.ones(2))
    with pytest.raises(ValueError, match="ref_rejected_log_probs_B has shape"):
        dpo_loss(args[0], args[1], args[2], torch.zeros(2))
    assert set(DPO_LOSSES) == {"sigmoid", "robust", "hinge", "ipo", "bco_pair"}


# ------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16
# ------------------------------------------------------------------------------------------------------------
#
# TRL 1.16 computes every DPO variant inline in `DPOTrainer._compute_loss(model, inputs, return_outputs)`,
# which runs a model forward; there is no free loss function. We call that method on an instance made with
# `DPOTrainer.__new__(DPOTrainer)` (no __init__), whose attributes we set by hand to exactly what the method
# reads on our path:
#   model                (.training = False -> "eval" metrics, which skips the train token counter)
#   accelerator          (.device; .gather / .gather_for_metrics as identities: a single process)
#   beta, label_smoothing, loss_types = [loss_type], loss_weights = [1.0]
#   precompute_ref_logps = True   (reference log-probs come from inputs["ref_chosen_logps" / "ref_rejected_logps"])
#   ld_alpha = None               (no LD-DPO length desensitization: plain sums)
#   f_divergence_type = "reverse_kl" (standard DPO scores = log-ratios)
#   use_weighting = False, aux_loss_enabled = False
#   _metrics = {"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens = 0
# The model is a stand-in for TRL's fused-LM-head forward, `model(..., labels=labels, fused_lm_head=True)`:
# it returns per-token log-probs for next-token labels `labels[:, 1:]`, zero where the label is -100, plus the
# entropy / mean_logits / is_top1 fields the method logs. TRL then sums them over the sequence and splits the
# 2B rows into [chosen; rejected]; we do the same with `sequence_log_probs` + `split_concatenated` on the same
# per-token tensor, so the parity covers those helpers too, and gradients w.r.t. the per-token log-probs are
# compared as well as values and the logged metrics.


class _FusedLMStandIn:
    """Returns fixed per-token log-probs (2B, T-1) the way TRL's fused LM head would for those labels."""

    training = False

    def __init__(self, per_token_log_probs_2BT1: torch.Tensor):
        self.per_token_log_probs_2BT1 = per_token_log_probs_2BT1

    def __call__(self, *, labels: torch.Tensor, **kwargs) -> SimpleNamespace:
        mask = labels[:, 1:] != -100
        log_probs = self.per_token_log_probs_2BT1.masked_fill(~mask, 0.0)
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(
            log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=torch.zeros_like(mask)
        )


def _trl_dpo(
    loss_type,
    beta,
    label_smoothing,
    per_token_log_probs_2BT1,
    completion_mask_2BT,
    ref_chosen_B,
    ref_rejected_B,
):
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer

    model = _FusedLMStandIn(per_token_log_probs_2BT1)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.model = model
    trainer.accelerator = SimpleNamespace(
        device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t
    )
    trainer.beta = beta
    trainer.label_smoothing = label_smoothing
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.precompute_ref_logps = True
    trainer.ld_alpha = None
    trainer.f_divergence_type = "reverse_kl"
    trainer.use_weighting = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    inputs = {
        "input_ids": torch.ones_like(completion_mask_2BT),
        "attention_mask": torch.ones_like(completion_mask_2BT),
        "completion_mask": completion_mask_2BT,
        "ref_chosen_logps": ref_chosen_B,
        "ref_rejected_logps": ref_rejected_B,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[0] for k, v in trainer._metrics["eval"].items()}


def _parity_inputs(B: int = 4, T: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    per_token_2BT1 = -3 * torch.rand(2 * B, T - 1, generator=g, dtype=torch.float64)
    # column 0 is the prompt (the first label is never scored); ragged completion lengths, one of them 1 token
    completion_mask_2BT = torch.zeros(2 * B, T, dtype=torch.long)
    for row, length in enumerate([6, 4, 1, 5, 3, 6, 2, 4][: 2 * B]):
        completion_mask_2BT[row, T - length :] = 1
    ref_chosen_B = -3 * torch.rand(B, generator=g, dtype=torch.float64) * 4
    ref_rejected_B = -3 * torch.rand(B, generator=g, dtype=torch.float64) * 4
    return per_token_2BT1, completion_mask_2BT, ref_chosen_B, ref_rejected_B


def _ours(loss_type, beta, eps, per_token_2BT1, completion_mask_2BT, ref_chosen_B, ref_rejected_B):
    mask_2BT1 = completion_mask_2BT[:, 1:]  # the mask of the scored labels (TRL's shift_completion_mask)
    chosen_B, rejected_B = split_concatenated(sequence_log_probs(per_token_2BT1, mask_2BT1))
    # TRL's ipo divides by the UNshifted completion_mask.sum(1); column 0 is prompt, so the counts coincide
    lengths_c, lengths_r = split_concatenated(mask_2BT1.sum(-1))
    return dpo_loss(
        chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta, loss_type, eps, lengths_c, lengths_r
    )


# (our loss_type, TRL loss_type, beta, label_smoothing). TRL 1.16's "sigmoid" ignores label_smoothing (cDPO was
# dropped from it), so cDPO is compared below through "aot" instead. "ipo" in TRL 1.16 takes SUMMED log-probs
# and divides the log-ratios by the completion token counts itself: the same convention as ours, so both get
# the same summed inputs.
TRL_PARITY_CASES = [
    ("sigmoid", "sigmoid", 0.1, 0.0),
    ("sigmoid", "sigmoid", 0.7, 0.0),
    ("robust", "robust", 0.5, 0.2),
    ("robust", "robust", 0.5, 0.0),
    ("hinge", "hinge", 0.3, 0.0),
    ("ipo", "ipo", 0.1, 0.0),
    ("ipo", "ipo", 2.0, 0.0),
]


@pytest.mark.parametrize("ours_type,trl_type,beta,eps", TRL_PARITY_CASES)
def test_parity_with_trl(ours_type, trl_type, beta, eps):
    pytest.importorskip("trl")
    per_token, mask, ref_c, ref_r = _parity_inputs()
    leaf_trl = per_token.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_dpo(trl_type, beta, eps, leaf_trl, mask, ref_c, ref_r)
    leaf_ours = per_token.clone().requires_grad_(True)
    loss, metrics = _ours(ours_type, beta, eps, leaf_ours, mask, ref_c, ref_r)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(leaf_ours.grad, leaf_trl.grad, rtol=1e-12, atol=1e-12)
    for key, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[key], rel=1e-6, abs=1e-9), key
    # the comparison is sensitive: a perturbed input (or a wrong convention) gives a different value
    perturbed = per_token.clone()
    perturbed[0, -1] += 0.5  # chosen answer of pair 0
    assert abs(_ours(ours_type, beta, eps, perturbed, mask, ref_c, ref_r)[0].item() - trl_loss.item()) > 1e-4
    if ours_type == "ipo":  # dividing by different lengths (here: none) would not match TRL
        mask_2BT1 = mask[:, 1:]
        chosen_B, rejected_B = split_concatenated(sequence_log_probs(per_token, mask_2BT1))
        ones = torch.ones(chosen_B.shape[0])
        unnormalized, _ = dpo_loss(chosen_B, rejected_B, ref_c, ref_r, beta, "ipo", 0.0, ones, ones)
        assert abs(unnormalized.item() - trl_loss.item()) > 1e-3


def test_hinge_parity_inputs_cover_both_sides():
    """Guard for the hinge parity above: some pairs are inside the margin (relu active), some outside."""
    per_token, mask, ref_c, ref_r = _parity_inputs()
    chosen_B, rejected_B = split_concatenated(sequence_log_probs(per_token, mask[:, 1:]))
    beta_h_B = 0.3 * ((chosen_B - ref_c) - (rejected_B - ref_r))
    assert (beta_h_B < 1).any() and (beta_h_B > 1).any()


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_cdpo_parity_with_trl_aot(eps):
    """cDPO (sigmoid + label smoothing) against TRL's "aot", the only TRL 1.16 loss that still applies
    ``-(1-eps) log sigma(beta d) - eps log sigma(-beta d)``. aot sorts the policy log-ratio differences
    ``pi_c - pi_r`` and the reference ones ``ref_c - ref_r`` separately, then uses ``d = sorted - sorted``; when
    both sort the pairs in the same order, d is a permutation of DPO's h and the batch mean is cDPO's. We
    build the reference log-probs so that holds and assert it.
    """
    pytest.importorskip("trl")
    beta = 0.5
    per_token, mask, _, _ = _parity_inputs(seed=3)
    chosen_B, rejected_B = split_concatenated(sequence_log_probs(per_token, mask[:, 1:]))
    ref_c = 0.6 * chosen_B - 0.3  # ref_c - ref_r = 0.6 (pi_c - pi_r) - 0.5: same order as pi_c - pi_r
    ref_r = 0.6 * rejected_B + 0.2
    assert torch.equal(torch.argsort(chosen_B - rejected_B), torch.argsort(ref_c - ref_r))
    trl_loss, trl_metrics = _trl_dpo("aot", beta, eps, per_token, mask, ref_c, ref_r)
    loss, metrics = _ours("sigmoid", beta, eps, per_token, mask, ref_c, ref_r)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-12)
    assert metrics["rewards/margins"].item() == pytest.approx(trl_metrics["rewards/margins"])
    # label smoothing matters here: eps = 0 would not match
    assert abs(_ours("sigmoid", beta, 0.0, per_token, mask, ref_c, ref_r)[0].item() - trl_loss.item()) > 1e-3
