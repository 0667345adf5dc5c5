"""Importance-sampling correction between sampler and trainer (losses/grpo.py importance_sampling_weight):
hand-derived TIS / MIS values at token and sequence level, ratio 1 when the sampler is the trainer's forward,
and HF generate's top-p log-probs (the truncated, renormalised distribution) feeding the weight."""

from __future__ import annotations

import math

import pytest
import torch

from hf_align.config import GRPOConfig
from hf_align.logprobs import get_response_log_probs
from hf_align.losses.grpo import importance_sampling_weight, policy_loss
from hf_align.rollout import HFEngine, SamplingConfig
from hf_align.trainers import grpo_rollouts as R

LN2, LN4, LN5 = math.log(2), math.log(4), math.log(5)
# d = old - sampling. Row 0: tokens d = (ln 2, -ln 2, ln 4), one padded position; row 1: (ln 5, 0), two
# padded;
# row 2: fully masked (e.g. a truncated completion left out of the loss).
D_BT = torch.tensor([[LN2, -LN2, LN4, 7.0], [LN5, 0.0, -9.0, 3.0], [1.0, 2.0, 3.0, 4.0]])
MASK_BT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
OLD_BT = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.7, -1.1, -2.0, -0.1], [-1.0, -1.0, -1.0, -1.0]])
SAMPLING_BT = OLD_BT - D_BT


def _weight(level, mode, clip_max, clip_min=None):
    return importance_sampling_weight(OLD_BT, SAMPLING_BT, MASK_BT, level, mode, clip_max, clip_min)


def test_token_level_truncate_and_mask_by_hand():
    # Token ratios exp(d) over the 5 valid tokens: (2, 0.5, 4), (5, 1): mean 12.5 / 5 = 2.5, min 0.5, max 5.
    w, m = _weight("token", "truncate", 3.0)
    # TIS, cap 3: 4 -> 3 and 5 -> 3 (2 of 5 valid tokens clipped); padded / masked positions weigh 1.
    expected = torch.tensor([[2.0, 0.5, 3.0, 1.0], [3.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(w, expected)
    assert not w.requires_grad
    assert (m["is_ratio_min"].item(), m["is_ratio_max"].item()) == pytest.approx((0.5, 5.0))
    assert m["is_ratio_mean"].item() == pytest.approx(2.5)
    assert m["is_clipped_fraction"].item() == pytest.approx(0.4)
    # |d| over valid tokens: (ln 2, ln 2, ln 4, ln 5, 0): mean (4 ln 2 + ln 5) / 5, max ln 5
    assert m["logp_diff_mean"].item() == pytest.approx((4 * LN2 + LN5) / 5)
    assert m["logp_diff_max"].item() == pytest.approx(LN5)
    # MIS, cap 3: the same two tokens get 0 instead
    w, m = _weight("token", "mask", 3.0)
    torch.testing.assert_close(w[MASK_BT], torch.tensor([2.0, 0.5, 0.0, 0.0, 1.0]))
    assert m["is_clipped_fraction"].item() == pytest.approx(0.4)
    # with clip_min 0.6 the 0.5 token is masked too (3 of 5); truncation lifts it to 0.6 instead
    w, m = _weight("token", "mask", 3.0, 0.6)
    torch.testing.assert_close(w[MASK_BT], torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0]))
    assert m["is_clipped_fraction"].item() == pytest.approx(0.6)
    w, _ = _weight("token", "truncate", 3.0, 0.6)
    torch.testing.assert_close(w[MASK_BT], torch.tensor([2.0, 0.6, 3.0, 3.0, 1.0]))


def test_sequence_level_truncate_and_mask_by_hand():
    # Sequence ratio exp(sum of d over the valid tokens): row 0 exp(ln 2 - ln 2 + ln 4) = 4 (the padded 7.0 is
    # ignored), row 1 exp(ln 5 + 0) = 5, row 2 (no valid token) exp(0) = 1 and not counted in the metrics.
    w, m = _weight("sequence", "truncate", 4.5)
    assert w.shape == (3, 1)
    torch.testing.assert_close(w, torch.tensor([[4.0], [4.5], [1.0]]))
    assert (m["is_ratio_min"].item(), m["is_ratio_mean"].item(), m["is_ratio_max"].item()) == pytest.approx(
        (4.0, 4.5, 5.0)
    )
    assert m["is_clipped_fraction"].item() == pytest.approx(0.5)  # 1 of 2 valid sequences
    w, m = _weight("sequence", "mask", 4.5)
    torch.testing.assert_close(w, torch.tensor([[4.0], [0.0], [1.0]]))
    assert m["is_clipped_fraction"].item() == pytest.approx(0.5)
    # TRL's default (sequence_mask, C_max 3): both valid sequences are masked
    w, m = _weight("sequence", "mask", 3.0)
    torch.testing.assert_close(w[:2], torch.zeros(2, 1))
    assert m["is_clipped_fraction"].item() == pytest.approx(1.0)
    # clip_min alone (clip_max None): mask below 4.5 only
    w, _ = _weight("sequence", "mask", None, 4.5)
    torch.testing.assert_close(w[:2], torch.tensor([[0.0], [5.0]]))


def test_nothing_valid_and_nan_sampler_logprobs():
    w, m = importance_sampling_weight(OLD_BT, SAMPLING_BT, torch.zeros_like(MASK_BT), "token", "mask", 3.0)
    assert (w == 1).all() and all(v.item() == 0 for v in m.values())
    sampling = SAMPLING_BT.clone()
    sampling[0, 0] = float("nan")  # a token the sampler could not score: ratio 1 (TRL's rule)
    w, _ = importance_sampling_weight(OLD_BT, sampling, MASK_BT, "token", "truncate", 3.0)
    assert w[0, 0].item() == 1.0 and torch.isfinite(w).all()


def test_weight_multiplies_the_policy_gradient_loss_not_the_kl():
    log_probs_BT = OLD_BT.clone().requires_grad_(True)
    A_B = torch.tensor([1.0, -2.0, 0.5])
    w_BT, _ = _weight("token", "truncate", 3.0)
    ref_BT = OLD_BT - 0.3
    kw = dict(loss_type="grpo_clip", reduction="token_mean", advantages_B=A_B, old_log_probs_BT=OLD_BT,
              ref_log_probs_BT=ref_BT, cliprange=0.2, beta=0.1)  # fmt: skip
    loss, metrics = policy_loss(log_probs_BT, MASK_BT, is_weight_BT=w_BT, **kw)
    # on-policy ratio 1: l = -A w + beta * k3 with k3 = exp(-0.3) + 0.3 - 1 at every token; token mean over 5
    k3 = math.exp(-0.3) + 0.3 - 1
    pg = -(A_B[:, None] * w_BT)[MASK_BT].sum() / 5
    assert loss.item() == pytest.approx(pg.item() + 0.1 * k3)
    assert metrics["policy_loss"].item() == pytest.approx(pg.item())


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_ratio_is_exactly_one_when_the_sampler_is_the_trainer_forward(tiny_model, mode):
    torch.manual_seed(0)
    input_ids = torch.randint(3, tiny_model.config.vocab_size, (3, 9))
    labels = torch.randint(3, tiny_model.config.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        log_probs = get_response_log_probs(tiny_model, input_ids, labels, temperature=0.7)["log_probs"]
        again = get_response_log_probs(tiny_model, input_ids, labels, temperature=0.7)["log_probs"]
    w, m = importance_sampling_weight(log_probs, again, mask, *mode.split("_"), clip_max=1.0 + 1e-6)
    assert (w == 1).all()
    assert m["is_clipped_fraction"].item() == 0
    assert m["is_ratio_min"].item() == m["is_ratio_mean"].item() == m["is_ratio_max"].item() == 1.0


def _nucleus_log_probs(model, rollout, temperature: float, top_p: float) -> torch.Tensor:
    """Written here from the definition: softmax(logits / T), keep the most likely tokens until their mass
    reaches top_p (a token is kept if the tokens more likely than it hold < top_p), renormalise."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / temperature
    start = len(rollout.prompt_ids) - 1
    out = []
    for k, token in enumerate(rollout.completion_ids):
        probs = logits[start + k].softmax(-1)
        sorted_p, order = probs.sort(descending=True)
        kept = order[(sorted_p.cumsum(0) - sorted_p) < top_p]
        assert token in kept.tolist(), "a token outside the nucleus was sampled"
        out.append(math.log(probs[token] / probs[kept].sum()))
    return torch.tensor(out)


def test_top_p_logprobs_are_the_truncated_distribution_and_feed_the_weight(tiny_model, tokenizer):
    temperature, top_p = 0.8, 0.5
    engine = HFEngine(tiny_model, tokenizer)
    sampling = SamplingConfig(n=4, max_new_tokens=6, temperature=temperature, top_p=top_p, seed=0)
    groups = engine.generate(["cat dog red", "What is 12 + 7?"], sampling)
    flat = [r for g in groups for r in g]
    for r in flat:
        torch.testing.assert_close(
            torch.tensor(r.logprobs),
            _nucleus_log_probs(tiny_model, r, temperature, top_p).float(),
            atol=1e-4,
            rtol=0,
        )
    # the micro-batch carries them aligned with labels; the trainer's log-probs are the full softmax's
    scored = R.scored_groups(groups, [0.0] * len(flat))
    zeros = torch.zeros(len(flat))
    (b,) = R.build_micro_batches(scored, zeros, zeros, tokenizer.pad_token_id, len(flat), 1)
    mask = b["response_mask"]
    with torch.no_grad():
        trainer_BT = get_response_log_probs(tiny_model, b["input_ids"], b["labels"], temperature=temperature,
                                            attention_mask=b["attention_mask"])["log_probs"]  # fmt: skip
    sampler_BT = b["sampling_log_probs"]
    assert (sampler_BT[~mask] == 0).all()
    torch.testing.assert_close(sampler_BT[mask], torch.cat([torch.tensor(r.logprobs) for r in flat]))
    gap = (sampler_BT - trainer_BT)[mask]
    assert (gap >= -1e-4).all() and (gap > 1e-2).any()  # renormalised over fewer tokens: never less likely
    # token-level weight = exp(trainer - sampler) = p_full / p_truncated (<= 1, < 1 where truncation bit)
    w, m = importance_sampling_weight(trainer_BT, sampler_BT, mask, "token", "mask", 3.0)
    torch.testing.assert_close(w[mask], (trainer_BT - sampler_BT)[mask].exp())
    assert m["is_ratio_max"].item() <= 1 + 1e-4 and m["is_ratio_min"].item() < 0.99
    # sequence level: the product over tokens, exp(sum), one per completion
    w, _ = importance_sampling_weight(trainer_BT, sampler_BT, mask, "sequence", "truncate", 3.0)
    torch.testing.assert_close(w[:, 0], ((trainer_BT - sampler_BT) * mask).sum(-1).exp())


def test_config_fields_follow_trl_and_the_rule_of_when_it_applies(tmp_path):
    trl = pytest.importorskip("trl")
    fields = trl.GRPOConfig.__dataclass_fields__
    ours = GRPOConfig(output_dir=str(tmp_path))
    for name in ("correction", "mode", "clip_max", "clip_min"):
        key = f"vllm_importance_sampling_{name}"
        assert getattr(ours, key) == fields[key].default, key
    assert not ours.corrects_sampling  # HF generate, untruncated: the sampler is the trainer's forward
    samplers = [dict(use_vllm=True), dict(top_p=0.9), dict(top_k=20), dict(repetition_penalty=1.1),
                dict(min_p=0.1), dict(min_completion_length=2),
                dict(generation_kwargs={"no_repeat_ngram_size": 3})]  # fmt: skip
    for sampler in samplers:
        assert GRPOConfig(output_dir=str(tmp_path), **sampler).corrects_sampling, sampler
        off = GRPOConfig(output_dir=str(tmp_path), vllm_importance_sampling_correction=False, **sampler)
        assert not off.corrects_sampling


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(vllm_importance_sampling_mode="token"), "choose one of"),
        (dict(vllm_importance_sampling_clip_max=0.0), "clip_max must be > 0"),
        (dict(vllm_importance_sampling_clip_min=-1.0), "clip_min must be >= 0"),
        (dict(vllm_importance_sampling_clip_min=3.0), r"clip_min \(3.0\) must be < clip_max \(3.0\)"),
        (
            dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
            "needs",
        ),
    ],
)
def test_config_validation(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), **bad)
