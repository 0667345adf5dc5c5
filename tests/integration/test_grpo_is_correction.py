"""GRPOTrainer with the importance-sampling correction, on the tiny model and the HF generate engine: the
on-policy shortcut (old log-probs = the current ones, detached) gives the gradient of a separate no-grad pass,
the weight multiplies the trainer's loss where sampling is truncated, and an engine without log-probs is
refused."""

from __future__ import annotations

import pytest
import torch

from hf_align.config import GRPOConfig
from hf_align.rollout import HFEngine
from hf_align.trainers.grpo import GRPOTrainer
from tests.conftest import build_model

ROWS = [{"prompt": f"Q: {q} A:"} for q in ["red", "green", "cat", "dog"]]


def letter_e_reward(completions, **kwargs) -> list[float]:
    """Continuous: groups almost never tie, so advantages are non-zero."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def _trainer(tmp_path, tokenizer, engine=None, **kw) -> GRPOTrainer:
    base = dict(
        output_dir=str(tmp_path / "out"), generation_batch_size=8, num_generations=4,
        per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=2, max_completion_length=6,
        temperature=0.9, top_p=0.7, grader_num_workers=0, report_to="none", save_strategy="no", seed=0,
        plot_curves=False, loss_type="dapo", disable_tqdm=True,
    )  # fmt: skip
    model = build_model(
        tokenizer
    )  # no dropout: the same weights give the same log-probs in train and eval mode
    if engine is not None:
        engine = engine(model, tokenizer)
    return GRPOTrainer(model, reward_funcs=[letter_e_reward], args=GRPOConfig(**{**base, **kw}),
                       train_dataset=ROWS, processing_class=tokenizer, rollout_engine=engine)  # fmt: skip


def _first_step(trainer: GRPOTrainer, shift_old: float = 0.0):
    """The first micro-batch (as Trainer gets it) and the gradient of compute_loss on it."""
    inputs = trainer._prepare_inputs(None)
    if shift_old:
        inputs = {**inputs, "old_log_probs": inputs["old_log_probs"] + shift_old}
    model = trainer.model.train()
    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    return inputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_shortcut_gives_the_gradient_of_a_separate_old_pass(tmp_path, tokenizer, level):
    # One optimizer step per rollout batch: old = current detached. num_iterations=2 makes the batch last two
    # steps, so _add_reference_log_probs computes old log-probs in a no-grad eval pass of the same weights.
    kw = dict(importance_sampling_level=level, vllm_importance_sampling_mode="token_truncate")
    on_inputs, on_grads = _first_step(_trainer(tmp_path / "a", tokenizer, **kw))
    off_trainer = _trainer(tmp_path / "b", tokenizer, num_iterations=2, **kw)
    off_inputs, off_grads = _first_step(off_trainer)
    assert "old_log_probs" not in on_inputs and "old_log_probs" in off_inputs
    assert "sampling_log_probs" in on_inputs  # top_p < 1: the correction is on in both
    assert torch.equal(on_inputs["labels"], off_inputs["labels"])  # the same rollouts
    assert (on_inputs["advantages"] != 0).any()
    assert on_grads.keys() == off_grads.keys() and on_grads
    for name, g in on_grads.items():
        torch.testing.assert_close(off_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # the comparison can fail: other old log-probs give another gradient
    _, shifted = _first_step(_trainer(tmp_path / "c", tokenizer, num_iterations=2, **kw), shift_old=0.3)
    assert (
        max((shifted[n] - g).abs().max() / g.abs().max().clamp(min=1e-12) for n, g in on_grads.items()) > 1e-2
    )


def test_weight_multiplies_the_loss_under_truncated_sampling(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, vllm_importance_sampling_mode="token_truncate")
    inputs = trainer._prepare_inputs(None)
    mask, A_B1 = inputs["response_mask"], inputs["advantages"][:, None]
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    with torch.no_grad():
        w_BT = (trainer._log_probs(trainer.model, inputs) - inputs["sampling_log_probs"]).exp()
    # on-policy grpo_clip (ratio 1), dapo: -(1/N_tok) sum A_i w_it over the response tokens; C_max 3 never
    # bites (w = p_full / p_top_p <= 1)
    expected = -(A_B1 * w_BT * mask).sum() / inputs["num_tokens"]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-7)
    assert w_BT[mask].min() < 0.99
    logged = trainer._metrics["train"]
    for key in ("min", "mean", "max", "clipped_fraction"):
        assert f"sampling/importance_sampling_ratio/{key}" in logged
    assert "sampling/sampling_logp_difference/mean" in logged


def test_no_correction_when_generate_samples_the_full_softmax(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, top_p=1.0)
    inputs = trainer._prepare_inputs(None)
    assert "sampling_log_probs" not in inputs
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    expected = -(inputs["advantages"][:, None] * inputs["response_mask"]).sum() / inputs["num_tokens"]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-7)
    assert not any(k.startswith("sampling/") for k in trainer._metrics["train"])


class NoLogprobsEngine(HFEngine):
    """An engine that does not report its sampling log-probs (as a third-party engine may not)."""

    def generate(self, prompts, sampling):
        groups = super().generate(prompts, sampling)
        for r in (r for g in groups for r in g):
            r.logprobs = None
        return groups


def test_engine_without_logprobs_is_refused_only_when_the_correction_needs_them(tmp_path, tokenizer):
    with pytest.raises(
        ValueError, match="returned no sampling log-probs.*vllm_importance_sampling_correction"
    ):
        _trainer(tmp_path / "a", tokenizer, engine=NoLogprobsEngine)._prepare_inputs(None)
    for kw in (dict(top_p=1.0), dict(vllm_importance_sampling_correction=False)):
        assert "sampling_log_probs" not in _trainer(
            tmp_path / "b", tokenizer, engine=NoLogprobsEngine, **kw
        )._prepare_inputs(None)


def test_top_entropy_quantile_keeps_the_policy_gradient_of_high_entropy_tokens(tmp_path, tokenizer):
    # "Beyond the 80/20 rule" (TRL's top_entropy_quantile): on-policy dapo at top_p=1 (no IS weight), the loss is
    # -(1/N_tok) sum A_i over the response tokens whose entropy reaches the 0.8 quantile of all of them.
    trainer = _trainer(tmp_path, tokenizer, top_p=1.0, top_entropy_quantile=0.2)
    inputs = trainer._prepare_inputs(None)
    mask = inputs["response_mask"].bool()
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    with torch.no_grad():
        entropy_BT = trainer._log_probs(trainer.model, inputs, with_entropy=True)["token_entropy"]
    threshold = torch.quantile(entropy_BT[mask], 0.8)
    kept = (entropy_BT >= threshold) & mask
    assert 0 < kept.sum() < mask.sum()
    expected = -(inputs["advantages"][:, None] * kept).sum() / inputs["num_tokens"]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-5, atol=1e-7)
    everything = _trainer(tmp_path / "all", tokenizer, top_p=1.0)  # quantile 1: every token
    all_loss = everything.compute_loss(everything.model.train(), everything._prepare_inputs(None))
    assert not torch.allclose(loss, all_loss)


def test_two_sided_clipping_caps_the_ratio_of_negative_advantages(tmp_path, tokenizer):
    # INTELLECT-2's delta (TRL's field): -min(min(r, delta) A, clip(r) A). Old log-probs shifted down by 2 make
    # r = e^2 ~ 7.4 everywhere: tokens with A < 0 weigh min(r, delta) = 3 instead of 7.4; A > 0 ones are clipped.
    trainer = _trainer(tmp_path, tokenizer, top_p=1.0, num_iterations=2, delta=3.0)
    inputs = trainer._prepare_inputs(None)
    inputs = {**inputs, "old_log_probs": inputs["old_log_probs"] - 2.0}
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    A_B1, mask = inputs["advantages"][:, None], inputs["response_mask"]
    weight_B1 = torch.where(A_B1 < 0, torch.tensor(3.0), torch.tensor(1.2))  # delta / 1 + epsilon
    expected = -(weight_B1 * A_B1 * mask).sum() / inputs["num_tokens"]
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-4, atol=1e-6)
    assert (A_B1 < 0).any() and (A_B1 > 0).any()
    with pytest.raises(ValueError, match="delta.*grpo_clip"):
        _trainer(tmp_path / "b", tokenizer, policy_loss="reinforce_with_baseline", delta=3.0)
