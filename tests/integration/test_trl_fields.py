"""TRL 1.16 fields on the tiny model: TR-DPO's reference update (sync_ref_model) in DPO and GRPO, GRPO's entropy
bonus (static and adaptive, resumed exactly) and num_generations_eval, and trust_remote_code through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from hf_align.cli import parse_args
from hf_align.config import DPOConfig, GRPOConfig, ModelArguments, RewardConfig, ScriptArguments, SFTConfig
from hf_align.logprobs import masked_mean_or_zero
from hf_align.trainers.dpo import DPOTrainer
from hf_align.trainers.grpo import GRPOTrainer
from tests.conftest import build_model
from tests.integration.test_dpo_trainer import TOY
from tests.integration.test_dpo_trainer import _config as dpo_config
from tests.integration.test_grpo_is_correction import ROWS, letter_e_reward


def _grpo(tmp_path, tokenizer, **kw) -> GRPOTrainer:
    base = dict(
        output_dir=str(tmp_path / "out"), generation_batch_size=8, num_generations=4,
        per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, max_completion_length=6,
        learning_rate=1e-2, grader_num_workers=0, report_to="none", save_strategy="no", seed=0,
        plot_curves=False, loss_type="dapo", disable_tqdm=True, logging_steps=1,
    )  # fmt: skip
    callbacks = kw.pop("callbacks", None)
    return GRPOTrainer(build_model(tokenizer), reward_funcs=[letter_e_reward], args=GRPOConfig(**{**base, **kw}),
                       train_dataset=ROWS, processing_class=tokenizer, callbacks=callbacks)  # fmt: skip


class Snapshots(TrainerCallback):
    """Policy and reference after each optimizer step, before the reference update (it is added later)."""

    def __init__(self):
        self.trainer, self.steps = None, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        copy = lambda m: {n: p.detach().clone() for n, p in m.named_parameters()}  # noqa: E731
        self.steps[state.global_step] = (copy(model), copy(self.trainer.ref_model))


def _check_reference_mixes(trainer, snaps: Snapshots, alpha: float, every: int, steps: int) -> None:
    """ref after step k = alpha * policy_k + (1 - alpha) * ref before it, when every | k; unchanged otherwise."""
    final = {n: p.detach() for n, p in trainer.ref_model.named_parameters()}
    for k in range(1, steps + 1):
        policy, ref_before = snaps.steps[k]
        ref_after = snaps.steps[k + 1][1] if k < steps else final
        for name, r in ref_before.items():
            want = alpha * policy[name] + (1 - alpha) * r if k % every == 0 else r
            torch.testing.assert_close(ref_after[name], want, rtol=1e-6, atol=1e-7, msg=f"step {k} {name}")
    policy0 = snaps.steps[1][1]  # the reference before any update is the initial policy
    assert any(not torch.equal(final[n], policy0[n]) for n in final)


def test_grpo_reference_is_mixed_every_sync_steps(tmp_path, tokenizer):
    snaps = Snapshots()
    trainer = _grpo(tmp_path, tokenizer, max_steps=4, beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.3,
                    ref_model_sync_steps=2, callbacks=[snaps])  # fmt: skip
    snaps.trainer = trainer
    trainer.train()
    _check_reference_mixes(trainer, snaps, 0.3, 2, 4)


def test_dpo_reference_is_mixed_every_sync_steps(tmp_path, tokenizer):
    snaps = Snapshots()
    cfg = dpo_config(tmp_path, per_device_train_batch_size=2, max_steps=3, sync_ref_model=True,
                     ref_model_mixup_alpha=0.5, ref_model_sync_steps=1)  # fmt: skip
    trainer = DPOTrainer(build_model(tokenizer), args=cfg, train_dataset=TOY, processing_class=tokenizer,
                         callbacks=[snaps])  # fmt: skip
    snaps.trainer = trainer
    trainer.train()
    _check_reference_mixes(trainer, snaps, 0.5, 1, 3)


@pytest.mark.parametrize(
    "config, kw, message",
    [
        (GRPOConfig, dict(beta=0.0), "beta=0"),
        (GRPOConfig, dict(beta=0.1, ref_mode="adapter_disabled"), "adapter_disabled"),
        (DPOConfig, dict(precompute_ref_log_probs=True), "precompute_ref_log_probs: false"),
        (GRPOConfig, dict(beta=0.1, ref_model_mixup_alpha=1.5), r"ref_model_mixup_alpha in \[0, 1\]"),
    ],
)
def test_sync_ref_model_without_a_reference_is_refused_at_config_time(tmp_path, config, kw, message):
    with pytest.raises(ValueError, match=message):
        config(output_dir=str(tmp_path), sync_ref_model=True, **kw)


def test_sync_ref_model_with_lora_is_refused(tmp_path, tokenizer):
    from peft import LoraConfig

    cfg = dpo_config(tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model needs a full-weight policy"):
        DPOTrainer(build_model(tokenizer), args=cfg, train_dataset=TOY, processing_class=tokenizer,
                   peft_config=LoraConfig(r=4, target_modules=["q_proj"]))  # fmt: skip


def test_synced_reference_and_entropy_coefficient_are_resumed(tmp_path, tokenizer):
    """Save at step 2, resume: the reference (mixed at steps 1-2) and the adaptive coefficient come back, and the
    resumed run ends where the uninterrupted one does."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, beta=0.1, sync_ref_model=True,
              ref_model_sync_steps=1, use_adaptive_entropy=True, entropy_coef=0.05, entropy_target=100.0)  # fmt: skip
    full = _grpo(tmp_path, tokenizer, **kw)
    full.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "reference_model.pt").is_file()
    resumed = _grpo(tmp_path, tokenizer, **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    coefs = {h["step"]: h["entropy_coef"] for h in full.state.log_history if "entropy_coef" in h}
    assert coefs == pytest.approx({1: 0.055, 2: 0.06, 3: 0.065, 4: 0.07})  # entropy <= target: up by delta
    assert resumed._entropy_coef == pytest.approx(0.07) and math.isfinite(resumed._last_entropy)
    for (n, p), q in zip(full.ref_model.named_parameters(), resumed.ref_model.parameters()):
        torch.testing.assert_close(p, q, msg=n)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_entropy_bonus_is_subtracted_from_the_policy_loss(tmp_path, tokenizer):
    # on-policy dapo at top_p=1, one process, no accumulation: loss = -(1/N_tok) sum A_i - coef * mean H (TRL's)
    trainer = _grpo(tmp_path, tokenizer, gradient_accumulation_steps=1, per_device_train_batch_size=8,
                    entropy_coef=0.3)  # fmt: skip
    inputs = trainer._prepare_inputs(None)
    mask = inputs["response_mask"]
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    with torch.no_grad():
        entropy_BT = trainer._log_probs(trainer.model, inputs, with_entropy=True)["token_entropy"]
    pg = -(inputs["advantages"][:, None] * mask).sum() / inputs["num_tokens"]
    torch.testing.assert_close(loss, pg - 0.3 * masked_mean_or_zero(entropy_BT, mask), rtol=1e-5, atol=1e-6)
    loss.backward()  # the bonus has a gradient: it pushes the entropy up
    assert trainer._metrics["train"]["entropy_coef"] == [0.3]


def test_adaptive_entropy_applies_no_bonus_above_target(tmp_path, tokenizer):
    # the first step has no measurement (applied coef 0); entropy of a random tiny model >> 0.2 nats: decreases
    trainer = _grpo(tmp_path, tokenizer, max_steps=3, use_adaptive_entropy=True, entropy_coef=0.1)
    trainer.train()
    coefs = [h["entropy_coef"] for h in trainer.state.log_history if "entropy_coef" in h]
    assert coefs == pytest.approx([0.095, 0.09, 0.085])
    assert trainer._last_entropy > 0.2


def test_num_generations_eval(tmp_path, tokenizer):
    seen = []

    def counting_reward(completions, **kwargs):
        seen.append(len(completions))
        return [0.0] * len(completions)

    for kw, want in [(dict(num_generations_eval=3), 6), ({}, 8), (dict(eval_temperature=0.0), 2)]:
        cfg = GRPOConfig(output_dir=str(tmp_path), num_generations=4, generation_batch_size=8,
                         per_device_train_batch_size=8, max_completion_length=4, grader_num_workers=0,
                         report_to="none", **{"eval_temperature": 1.0, **kw})  # fmt: skip
        trainer = GRPOTrainer(build_model(tokenizer), reward_funcs=[counting_reward], args=cfg,
                              train_dataset=ROWS, eval_dataset=ROWS[:2], processing_class=tokenizer)  # fmt: skip
        seen.clear()
        assert "eval_reward" in trainer.evaluate()
        assert seen == [want], kw


@pytest.mark.parametrize("config", [SFTConfig, DPOConfig, RewardConfig, GRPOConfig])
def test_trust_remote_code_is_a_trainer_config_field_without_a_clash(tmp_path, config):
    # TRL 1.16 moved trust_remote_code from ModelConfig into every trainer config; the recipes parse both
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"# launch\nmodel_name_or_path: m\noutput_dir: {tmp_path}\ntrust_remote_code: true\n")
    _, _, cfg = parse_args((ModelArguments, ScriptArguments, config), ["--config", str(yaml)])
    assert cfg.trust_remote_code is True
    _, _, cfg = parse_args((ModelArguments, ScriptArguments, config), ["--output_dir", "x"])
    assert cfg.trust_remote_code is False
    _, _, cfg = parse_args(
        (ModelArguments, ScriptArguments, config), ["--config", str(yaml), "--trust_remote_code", "false"]
    )
    assert cfg.trust_remote_code is False


def test_recipe_passes_trust_remote_code_to_the_loader(tmp_path, monkeypatch):
    import recipes.sft as recipe

    class Stop(Exception):
        pass

    def fake_load(model_args, device=None, trust_remote_code=False):
        raise Stop(trust_remote_code)

    monkeypatch.setattr(recipe, "load_from_args", fake_load)
    with pytest.raises(Stop) as stopped:
        recipe.main(
            ["--dataset_name", "x.jsonl", "--output_dir", str(tmp_path), "--trust_remote_code", "true"]
        )
    assert stopped.value.args == (True,)
