"""DPOTrainer end to end on the tiny model: it learns preferences, its gradients do not depend on how a step is
split, LoRA's adapter-disabled reference needs no second model, and a precomputed reference equals a live one."""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch

from hf_align.config import DPOConfig
from hf_align.trainers.dpo import DPOTrainer, PreferenceCollator
from tests.conftest import build_model, grad_capture
from tests.integration.test_reward_model_trainer import HELD_OUT, SUBJECTS, _pairs

# Chosen answers say "yes"/"good"/"true", rejected ones "no"/"bad"/"false"; lengths vary so padding differs
# between micro-batch layouts.
TOY = [
    {"prompt": "Is the sky blue?", "chosen": " yes", "rejected": " no"},
    {"prompt": "Is a cat a dog?", "chosen": " no, a cat is a cat", "rejected": " yes"},
    {"prompt": "What is 12 + 7?", "chosen": " The answer is 19.", "rejected": " The answer is 20."},
    {"prompt": "Good or bad?", "chosen": " good", "rejected": " bad bad bad"},
    {"prompt": "True or false: 2 + 2 = 4.", "chosen": " true", "rejected": " false"},
    {"prompt": "Name a colour.", "chosen": " green", "rejected": " the quick brown fox"},
    {"prompt": "Solve 2x + 3 = 11.", "chosen": " x = 4.", "rejected": " x = 5, I think."},
    {"prompt": "Say hello.", "chosen": " Hello world!", "rejected": " no"},
]


def _config(tmp_path, **kw) -> DPOConfig:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        max_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        max_length=64,
        gradient_checkpointing=False,
        beta=0.5,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    defaults.update(kw)
    return DPOConfig(**defaults)


def _logged(trainer, key="loss") -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def _live_qwen2_models() -> int:
    gc.collect()
    return sum(type(o).__name__ == "Qwen2ForCausalLM" for o in gc.get_objects())


def test_collator_truncates_prompt_plus_answer_like_trl(tokenizer):
    """keep_start cuts ``prompt + answer`` at max_length (the answer's end goes); keep_end keeps the end."""
    ex = {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8]}
    batch = PreferenceCollator(pad_token_id=0, max_length=5)([ex])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]  # shifted: full[:, :-1]
    assert batch["labels"].tolist() == [[2, 3, 4, 5], [2, 3, 4, 8]]
    assert batch["response_mask"].tolist() == [[False, False, False, True], [False, False, False, True]]
    batch = PreferenceCollator(pad_token_id=0, max_length=5, truncation_mode="keep_end")([ex])
    assert batch["labels"].tolist() == [[4, 5, 6, 7], [2, 3, 4, 8]]  # rejected fits whole


def test_loss_type_list_with_weights(tmp_path, tokenizer):
    """sum_k w_k * loss_k: at step 0 (reference = policy) sigmoid is log 2 and IPO (0 - 1 / (2 beta))^2."""
    cfg = _config(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[0.5, 0.1], learning_rate=0.0)
    trainer = DPOTrainer(build_model(tokenizer), args=cfg, train_dataset=TOY, processing_class=tokenizer)
    trainer.train()
    assert _logged(trainer)[0] == pytest.approx(0.5 * math.log(2) + 0.1 * (1 / (2 * 0.5)) ** 2, rel=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("ipo", marks=pytest.mark.slow)])
def test_gradient_accumulation_splits_give_identical_gradients(tmp_path, tokenizer, loss_type):
    """8x1, 4x2 and 1x8 splits, with each pair's prompt run once (share_prompt_prefix, the default), give the
    gradients of 8x1 with every row run whole."""
    examples = TOY
    grads = {}
    for micro, accum, share in [(8, 1, False), (8, 1, True), (4, 2, True), (1, 8, True)]:
        cap = grad_capture()
        cfg = _config(
            tmp_path,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum,
            loss_type=loss_type,
            max_grad_norm=0.0,
            share_prompt_prefix=share,
        )
        # A reference other than the policy, so that the loss is not at its trivial point.
        trainer = DPOTrainer(
            build_model(tokenizer),
            args=cfg,
            ref_model=build_model(tokenizer, seed=1),
            train_dataset=examples,
            processing_class=tokenizer,
            callbacks=[cap],
        )
        trainer.train()
        grads[(micro, accum, share)] = cap.grads
    ref = grads[(8, 1, False)]
    assert ref and all(g.abs().sum() > 0 for g in ref.values())
    for split, g in grads.items():
        for name in ref:
            torch.testing.assert_close(g[name], ref[name], atol=1e-6, rtol=1e-5, msg=f"{split} {name}")


def test_preference_accuracy_rises_on_held_out_pairs(tmp_path, tokenizer):
    """A separable toy set (chosen answers call things good / true, rejected ones bad / false): after a dozen
    steps the implicit reward ranks pairs about unseen subjects correctly."""
    train, held_out = _pairs(SUBJECTS), _pairs(HELD_OUT)
    cfg = _config(tmp_path, max_steps=12, learning_rate=3e-3, lr_scheduler_type="constant", beta=0.1)
    trainer = DPOTrainer(
        build_model(tokenizer),
        args=cfg,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = _logged(trainer)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # copy reference: policy == reference at step 0
    assert _logged(trainer, "rewards/accuracies")[0] == 0.0  # no margin yet
    assert losses[-1] < 0.5 * losses[0], losses
    metrics = trainer.evaluate()
    assert metrics["eval_rewards/accuracies"] >= 0.9, metrics
    assert metrics["eval_rewards/margins"] > 0 and metrics["eval_loss"] < 0.5 * math.log(2)


def test_lora_adapter_disabled_reference_has_no_second_model(tmp_path, tokenizer):
    from peft import LoraConfig

    alive_before = _live_qwen2_models()
    model = build_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    cfg = _config(tmp_path, max_steps=3, ref_mode="adapter_disabled")
    trainer = DPOTrainer(
        model, args=cfg, train_dataset=TOY, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    assert trainer.ref_model is None
    assert _live_qwen2_models() - alive_before == 1  # the policy only: no reference copy anywhere
    base = [p for n, p in trainer.model.named_parameters() if "lora_" not in n]
    assert sum(p.numel() for p in base) == n_params
    losses = _logged(trainer)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the adapters start as the identity
    assert losses[-1] < losses[0]  # adapters moved, the reference (adapters off) did not


def test_adapter_disabled_without_lora_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs a LoRA model"):
        DPOTrainer(
            build_model(tokenizer),
            args=_config(tmp_path, ref_mode="adapter_disabled"),
            processing_class=tokenizer,
        )


def test_precomputed_reference_equals_copy(tmp_path, tokenizer):
    examples = TOY
    runs = {}
    for mode in ("copy", "precomputed"):
        cfg = _config(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                      precompute_ref_log_probs=mode == "precomputed")  # fmt: skip
        trainer = DPOTrainer(
            build_model(tokenizer),
            args=cfg,
            ref_model=build_model(tokenizer, seed=1),
            train_dataset=examples,
            processing_class=tokenizer,
        )
        trainer.train()
        runs[mode] = _logged(trainer)
        if mode == "precomputed":
            assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset[0]
    assert abs(runs["copy"][0] - math.log(2)) > 1e-3
    assert runs["precomputed"] == pytest.approx(runs["copy"], rel=1e-5)
    # Without ref_model, precomputation uses the untrained policy: first loss log 2.
    cfg = _config(tmp_path, precompute_ref_log_probs=True, learning_rate=0.0)
    trainer = DPOTrainer(build_model(tokenizer), args=cfg, train_dataset=examples, processing_class=tokenizer)
    trainer.train()
    assert _logged(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)


def test_evaluate_reports_preference_metrics(tmp_path, tokenizer):
    examples = TOY
    cfg = _config(tmp_path, per_device_eval_batch_size=4)
    trainer = DPOTrainer(
        build_model(tokenizer),
        args=cfg,
        ref_model=build_model(tokenizer, seed=1),
        train_dataset=examples,
        eval_dataset=examples,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen"} <= set(
        metrics
    )


def _load_recipe(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_trains_lora_on_conversations(tmp_path, tiny_model_dir):
    """recipes/dpo.py from the command line: chat rows (trl-lib/ultrafeedback_binarized layout), LoRA, adapter-off
    reference, eval; the first loss is log 2 and the run saves an adapter."""
    data = tmp_path / "pairs.jsonl"
    rows = [
        {
            "chosen": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["chosen"]},
            ],
            "rejected": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["rejected"]},
            ],
        }
        for r in TOY
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(data), "--eval_dataset_name", str(data),
            "--output_dir", str(tmp_path / "out"), "--use_peft", "true", "--lora_r", "4", "--ref_mode", "adapter_disabled",
            "--max_length", "64", "--max_steps", "2", "--gradient_checkpointing", "false",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true"]  # fmt: skip
    trainer = _load_recipe("dpo").main(argv)
    assert _logged(trainer)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert "eval_rewards/accuracies" in trainer.evaluate()
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_pad_to_multiple_of_reaches_the_collator_and_keeps_the_loss(tmp_path, tokenizer):
    losses = []
    for multiple in (8, None):
        cfg = _config(tmp_path, learning_rate=0.0, pad_to_multiple_of=multiple)
        trainer = DPOTrainer(build_model(tokenizer), args=cfg, train_dataset=TOY, processing_class=tokenizer)
        widths = {trainer.data_collator([row])["input_ids"].shape[1] for row in trainer.train_dataset}
        assert all(w % 8 == 0 for w in widths) if multiple else len(widths) > 1
        trainer.train()
        losses.append(_logged(trainer)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
