"""Bradley-Terry reward-model loss: hand-derived values, margin, centering, metrics, gradients, TRL parity."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from hf_align.losses.reward_model import bradley_terry_loss

LOG3 = math.log(3.0)


def test_equal_rewards_give_log2():
    loss, m = bradley_terry_loss(torch.tensor([0.5, -2.0]), torch.tensor([0.5, -2.0]))
    assert loss.item() == pytest.approx(math.log(2.0))
    assert m["accuracy"].item() == 0.0  # ties are not correct
    assert m["margin"].item() == 0.0


def test_by_hand():
    # differences log 3 and -log 3: -log(3/4) and -log(1/4)
    chosen = torch.tensor([LOG3 + 1.0, 0.0])
    rejected = torch.tensor([1.0, LOG3])
    loss, m = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(0.5 * (math.log(4 / 3) + math.log(4)))
    assert m["accuracy"].item() == pytest.approx(0.5)
    assert m["margin"].item() == pytest.approx(0.0)
    assert m["rewards/chosen"].item() == pytest.approx((LOG3 + 1.0) / 2)
    assert m["rewards/rejected"].item() == pytest.approx((1.0 + LOG3) / 2)


def test_margin_by_hand():
    # r_c - r_r = 1 + log 3 with margin 1 -> -log sigma(log 3) = log(4/3); margin 0 on the second pair
    chosen = torch.tensor([2.0 + LOG3, 1.0])
    rejected = torch.tensor([1.0, 1.0])
    loss, m = bradley_terry_loss(chosen, rejected, margin_B=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.5 * (math.log(4 / 3) + math.log(2.0)))
    assert m["margin"].item() == pytest.approx(
        (1.0 + LOG3) / 2
    )  # the metric is r_c - r_r, without the margin
    assert m["accuracy"].item() == pytest.approx(0.5)


def test_centering_by_hand():
    chosen = torch.tensor([1.0, 2.0])
    rejected = torch.tensor([1.0, 2.0])
    # BT part log 2; centering mean((2)^2, (4)^2) = 10
    loss, _ = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.01)
    assert loss.item() == pytest.approx(math.log(2.0) + 0.01 * 10.0)
    # gradient of the centering term: coef * 2 (r_c + r_r) / B on both sides
    leaf_c = chosen.clone().requires_grad_(True)
    leaf_r = rejected.clone().requires_grad_(True)
    bradley_terry_loss(leaf_c, leaf_r, center_rewards_coefficient=0.01)[0].backward()
    bt_grad = -0.5 / 2  # -sigma(0) / B
    torch.testing.assert_close(leaf_c.grad, bt_grad + 0.01 * 2 * torch.tensor([2.0, 4.0]) / 2)
    torch.testing.assert_close(leaf_r.grad, -bt_grad + 0.01 * 2 * torch.tensor([2.0, 4.0]) / 2)


def test_gradient_by_hand_and_sign():
    chosen = torch.tensor([LOG3, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, LOG3], requires_grad=True)
    loss, m = bradley_terry_loss(chosen, rejected)
    loss.backward()
    # d/d r_c [-log sigma(d)] / B = -sigma(-d) / B with d = (log 3, -log 3): sigma(-d) = (1/4, 3/4)
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25, -0.75]) / 2)
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25, 0.75]) / 2)
    for value in m.values():
        assert value.dim() == 0 and not value.requires_grad
    assert set(m) == {
        "accuracy",
        "margin",
        "rewards/chosen",
        "rewards/rejected",
        "min_reward",
        "mean_reward",
        "max_reward",
    }


def test_against_naive_reference():
    g = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    loss, _ = bradley_terry_loss(chosen, rejected, margin_B=margin, center_rewards_coefficient=0.05)
    naive = 0.0
    for c, r, mg in zip(chosen.tolist(), rejected.tolist(), margin.tolist()):
        naive += math.log1p(math.exp(-(c - r - mg))) / 7 + 0.05 * (c + r) ** 2 / 7
    assert loss.item() == pytest.approx(naive, rel=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="squeeze"):
        bradley_terry_loss(torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="margin_B"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), margin_B=torch.zeros(2))
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(3), center_rewards_coefficient=-0.1)


# ------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16's RewardTrainer.compute_loss
# ------------------------------------------------------------------------------------------------------------
#
# TRL 1.16 computes the loss inline in `RewardTrainer.compute_loss(model, inputs)`: the model's (2B, 1) logits
# on [chosen; rejected] are split in two, the loss is `-logsigmoid(r_c - r_r [- inputs["margin"]]).mean()`
# plus `args.center_rewards_coefficient * mean((r_c + r_r)^2)` when that is not None. We call it on an
# instance made with `RewardTrainer.__new__(RewardTrainer)`, setting by hand what it reads:
#   model (.training = False -> "eval" metrics, no train token counter), args.center_rewards_coefficient,
#   accelerator.gather / .gather_for_metrics (identities: one process),
#   _metrics = {"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens = 0.
# The model is a stand-in returning fixed rewards as `.logits`.


class _RewardModelStandIn:
    training = False

    def __init__(self, rewards_2B1: torch.Tensor):
        self.rewards_2B1 = rewards_2B1

    def __call__(self, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.rewards_2B1)


def _trl_reward(rewards_2B1: torch.Tensor, margin_B: torch.Tensor | None, coef: float | None):
    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    model = _RewardModelStandIn(rewards_2B1)
    trainer = RewardTrainer.__new__(RewardTrainer)
    trainer.model = model
    trainer.args = SimpleNamespace(center_rewards_coefficient=coef)
    trainer.accelerator = SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    inputs = {} if margin_B is None else {"margin": margin_B}
    loss = trainer.compute_loss(model, inputs)
    return loss, {k: v[0] for k, v in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("coef", [None, 0.0, 0.05])
def test_parity_with_trl(with_margin, coef):
    pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)
    B = 5
    rewards_2B1 = 2 * torch.randn(2 * B, 1, generator=g, dtype=torch.float64)
    margin_B = torch.rand(B, generator=g, dtype=torch.float64) if with_margin else None

    leaf_trl = rewards_2B1.clone().requires_grad_(True)
    trl_loss, trl_metrics = _trl_reward(leaf_trl, margin_B, coef)

    leaf_ours = rewards_2B1.clone().requires_grad_(True)
    chosen_B, rejected_B = leaf_ours.squeeze(-1).chunk(2)  # (2B, 1) -> (B,), (B,)
    loss, metrics = bradley_terry_loss(chosen_B, rejected_B, margin_B, center_rewards_coefficient=coef or 0.0)

    torch.testing.assert_close(loss, trl_loss, rtol=1e-12, atol=1e-12)
    loss.backward()
    trl_loss.backward()
    torch.testing.assert_close(leaf_ours.grad, leaf_trl.grad, rtol=1e-12, atol=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["accuracy"])
    assert metrics["margin"].item() == pytest.approx(trl_metrics["margin"])
    for key in ("min_reward", "mean_reward", "max_reward"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key]), key
    # sensitive: swapping chosen and rejected changes the value
    swapped, _ = bradley_terry_loss(rejected_B.detach(), chosen_B.detach(), margin_B, coef or 0.0)
    assert abs(swapped.item() - trl_loss.item()) > 1e-3
