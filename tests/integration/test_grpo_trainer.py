"""GRPOTrainer end to end on the tiny model with the HF generate engine."""

from __future__ import annotations

import json

import pytest
import torch

from hf_align.config import GRPOConfig
from hf_align.trainers.grpo import GRPOTrainer
from hf_align.trainers.grpo_rollouts import sampling_for
from tests.conftest import build_model, grad_capture

TARGET = "blue"


def target_word_reward(completions, **kwargs) -> list[float]:
    """A reward a random tiny model can learn: how often it says the target word (capped at 1)."""
    return [min(c.count(TARGET), 4) / 4 for c in completions]


def letter_e_reward(completions, **kwargs) -> list[float]:
    """Continuous (almost never tied within a group), so every group carries a learning signal."""
    return [c.count("e") / max(len(c), 1) for c in completions]


ROWS = [
    {"prompt": f"Q: {q} A:", "answer": "0"}
    for q in ["red", "green", "cat", "dog", "yes", "no", "good", "bad"]
]


def _config(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        generation_batch_size=32,
        num_generations=8,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_steps=20,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        max_completion_length=8,
        temperature=1.0,
        grader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        max_prompt_length=64,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return GRPOConfig(**base)


def _rewards(trainer):
    return [h["reward"] for h in trainer.state.log_history if "reward" in h]


@pytest.mark.slow
def test_reward_rises_and_parameters_change(tmp_path, tokenizer):
    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GRPOTrainer(
        model,
        args=_config(tmp_path),
        train_dataset=ROWS,
        processing_class=tokenizer,
        reward_funcs=[target_word_reward],
    )
    trainer.train()
    rewards = _rewards(trainer)
    assert len(rewards) == 20
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.2, rewards
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    history = trainer.state.log_history
    for key in ("loss", "grad_norm", "entropy", "completions/mean_length", "frac_reward_zero_std",
                "rewards/target_word_reward/mean", "time/generation_s", "time/grading_s", "time/training_s",
                "time/engine_start_s", "generation_tokens_per_s"):  # fmt: skip
        assert any(key in h for h in history), key
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_checkpoint_saved_and_resumed(tmp_path, tokenizer):
    """Save at step 2, resume from it: the resumed run reproduces steps 3-4 of the uninterrupted one."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, plot_curves=False)
    full = GRPOTrainer(
        build_model(tokenizer), args=_config(tmp_path / "a", **kw), train_dataset=ROWS,
        processing_class=tokenizer, reward_funcs=[target_word_reward],
    )  # fmt: skip
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "rollout_state_rank0.pt").is_file()

    resumed = GRPOTrainer(
        build_model(tokenizer, seed=123), args=_config(tmp_path / "a", **kw), train_dataset=ROWS,
        processing_class=tokenizer, reward_funcs=[target_word_reward],
    )  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4

    def losses(t):
        return {h["step"]: h["loss"] for h in t.state.log_history if "loss" in h}

    got = {step: loss for step, loss in losses(resumed).items() if step > 2}  # 1-2 come from the checkpoint
    want = losses(full)
    assert set(got) == {3, 4}
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (got, want)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_dynamic_sampling_fills_batch_and_counts(tmp_path, tokenizer):
    cfg = _config(tmp_path, max_steps=1, dynamic_sampling=True, max_dynamic_sampling_rounds=2,
                  plot_curves=False)  # fmt: skip
    trainer = GRPOTrainer(
        build_model(tokenizer), args=cfg, train_dataset=ROWS, processing_class=tokenizer,
        reward_funcs=[target_word_reward],
    )  # fmt: skip
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "dynamic_sampling_rounds" in h)
    assert 1 <= logged["dynamic_sampling_rounds"] <= 2


def test_off_policy_epochs_use_old_logprobs(tmp_path, tokenizer):
    cfg = _config(tmp_path, max_steps=4, num_iterations=2, per_device_train_batch_size=8, plot_curves=False)
    trainer = GRPOTrainer(
        build_model(tokenizer), args=cfg, train_dataset=ROWS, processing_class=tokenizer,
        reward_funcs=[letter_e_reward],
    )  # fmt: skip
    trainer.train()
    ratios = [h["ratio_max"] for h in trainer.state.log_history if "ratio_max" in h]
    assert ratios and all(r == r for r in ratios)
    # two optimizer steps per pass x two passes over one rollout batch: one generation for 4 steps
    gens = [h for h in trainer.state.log_history if "time/generation_s" in h]
    assert len(gens) == 1, json.dumps(trainer.state.log_history)[:2000]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(generation_batch_size=30), "must be a multiple of per_device_train_batch_size"),
        (dict(generation_batch_size=48), "whole number of optimizer steps"),
        (dict(generation_batch_size=32, steps_per_generation=2), "not both"),
        (
            dict(
                per_device_train_batch_size=4,
                generation_batch_size=12,
                num_generations=8,
                gradient_accumulation_steps=1,
            ),
            "whole groups",
        ),
        (dict(num_iterations=2, policy_loss="reinforce_with_baseline"), "off-policy"),
        (dict(importance_sampling_level="sequence", policy_loss="no_baseline"), "GSPO"),
        (dict(epsilon_high=1.5), "epsilon_high"),
        (dict(loss_type="cispo"), r"loss_type='cispo'.*choose one of \['bnpo', 'dapo', 'dr_grpo', 'grpo'\]"),
        (dict(loss_type="token_mean"), "choose one of"),
        (dict(scale_rewards="std"), "scale_rewards must be"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(num_generations=1, generation_batch_size=32), "num_generations must be >= 2"),
        (dict(beta=-0.1), "beta must be >= 0"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (
            dict(generation_kwargs={"typical_p": 0.9}),
            "typical_p",
        ),  # model.generate: after the log-prob recorder
        (dict(generation_kwargs={"max_new_tokens": 9}), "set from the sampling fields"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(max_completion_length=0), "max_completion_length must be >= 1"),
        (dict(min_completion_length=9, max_completion_length=8), "must be <= max_completion_length"),
        (dict(num_iterations=0), "num_iterations must be >= 1"),
        (dict(generation_kwargs={"temperature": 0.0}), "temperature must be > 0"),
    ],
)
def test_config_validation(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **bad)


def test_trl_defaults_and_aliases(tmp_path):
    cfg = GRPOConfig(output_dir=str(tmp_path))
    assert (cfg.learning_rate, cfg.beta, cfg.epsilon, cfg.num_generations, cfg.max_completion_length) == (
        1e-6, 0.0, 0.2, 8, 512,
    )  # fmt: skip
    assert (cfg.loss_type, cfg.scale_rewards, cfg.logging_steps, cfg.remove_unused_columns) == (
        "dapo",
        "group",
        10,
        False,
    )
    assert cfg.steps_per_generation == cfg.gradient_accumulation_steps == 1 and cfg.generation_batch_size == 8
    assert GRPOConfig(output_dir=str(tmp_path), scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(output_dir=str(tmp_path), scale_rewards=True).scale_rewards == "group"
    # TRL: sampling fields in generation_kwargs override the config's (here they move into those fields)
    cfg = GRPOConfig(output_dir=str(tmp_path), generation_kwargs='{"top_p": 0.9, "suppress_tokens": [3]}')
    assert cfg.top_p == 0.9 and cfg.generation_kwargs == {"suppress_tokens": [3]} and cfg.min_p is None
    sampling = sampling_for(
        GRPOConfig(output_dir=str(tmp_path), min_p=0.1, generation_kwargs=cfg.generation_kwargs)
    )
    assert (sampling.min_p, sampling.top_p, sampling.extra) == (0.1, 1.0, {"suppress_tokens": [3]})
    server = GRPOConfig(output_dir=str(tmp_path), use_vllm=True, vllm_mode="server", vllm_server_port=8011)
    assert server.rollout_engine == "vllm_server" and server.vllm_server_url == "http://0.0.0.0:8011"


@pytest.mark.parametrize(
    "loss_type, entropy_coef", [("grpo", 0.0), ("dapo", 0.0), ("dr_grpo", 0.0), ("grpo", 0.2)]
)
def test_accumulation_splits_give_identical_gradients(tmp_path, tokenizer, loss_type, entropy_coef):
    """One optimizer step over the same 8 rollouts, split 8x1, 4x2, 1x8: identical gradients (1e-6); the entropy
    bonus is a token mean over the whole step, so it is exact too."""
    grads = {}
    for micro, accum in [(8, 1), (4, 2), (1, 8)]:
        cap = grad_capture()
        cfg = _config(
            tmp_path / f"{micro}x{accum}", max_steps=1, generation_batch_size=8,
            per_device_train_batch_size=micro, gradient_accumulation_steps=accum, loss_type=loss_type,
            max_grad_norm=0.0, plot_curves=False, max_completion_length=6, entropy_coef=entropy_coef,
        )  # fmt: skip
        trainer = GRPOTrainer(
            build_model(tokenizer), args=cfg, train_dataset=ROWS, processing_class=tokenizer,
            reward_funcs=[letter_e_reward], callbacks=[cap],
        )  # fmt: skip
        trainer.train()
        grads[(micro, accum)] = cap.grads
    ref = grads[(8, 1)]
    assert ref and any(g.abs().sum() > 0 for g in ref.values())
    for split, g in grads.items():
        for name in ref:
            diff = (g[name] - ref[name]).abs().max().item()
            assert diff <= 1e-6 + 1e-5 * ref[name].abs().max().item(), (
                split,
                name,
                diff,
                ref[name].abs().max().item(),
            )


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": True}])
def test_shared_prompt_forward_gives_the_same_step(tmp_path, tokenizer, checkpointing):
    """share_prompt_prefix (the default) runs each group's prompt through the decoder once per micro-batch:
    the same gradients as one full pass per row (1e-5), with fewer decoder rows; under activation
    checkpointing (reentrant, the harder case) too."""
    grads, shapes = {}, {}
    for share in (False, True):
        cap = grad_capture()
        cfg = _config(
            tmp_path / str(share), max_steps=1, generation_batch_size=16, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=0.0, plot_curves=False, max_completion_length=6,
            share_prompt_prefix=share, activation_checkpointing=checkpointing is not None,
            activation_checkpointing_kwargs=checkpointing,
        )  # fmt: skip
        model = build_model(tokenizer)
        seen = shapes[share] = []
        model.get_decoder().register_forward_pre_hook(
            lambda module, _a, kw, seen=seen: (
                seen.append(tuple(kw["input_ids"].shape)) if module.training else None
            ),
            with_kwargs=True,
        )
        trainer = GRPOTrainer(
            model, args=cfg, train_dataset=ROWS, processing_class=tokenizer,
            reward_funcs=[letter_e_reward], callbacks=[cap],
        )  # fmt: skip
        trainer.train()
        assert model.is_activation_checkpointing == (checkpointing is not None)
        grads[share] = cap.grads
    assert [rows for rows, _ in shapes[False]] == [8, 8]
    assert [rows for rows, _ in shapes[True]] == [1, 8, 1, 8]  # one prompt, then its 8 completions
    for name, ref in grads[False].items():
        diff = (grads[True][name] - ref).abs().max().item()
        assert diff <= 1e-6 + 1e-5 * ref.abs().max().item(), (name, diff)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tokenizer):
    """accelerate multi_cpu (2 processes x 4 x accumulation 2) == 1 process (8 x 2) at global batch 16, for two
    steps: same rollouts (seeded per prompt position), same loss and gradient norm."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    model_dir = tmp_path / "model"
    build_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"  # question / answer rows: the recipe builds the prompt through the template
    data.write_text("".join(json.dumps({"question": r["prompt"][3:-3], "answer": "0"}) + "\n" for r in ROWS))
    template = tmp_path / "colour.prompt"
    template.write_text("Q: {question} A:")

    def run(launcher: list[str], out: Path, micro: int) -> dict[int, dict]:
        cmd = launcher + [
            str(repo / "recipes" / "grpo.py"),
            "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--dataset_kind", "qa",
            "--output_dir", str(out), "--prompt_template", str(template),
            "--reward_funcs", "tests.integration.test_grpo_trainer:letter_e_reward", "--grader_num_workers", "0",
            "--generation_batch_size", "16", "--num_generations", "8",
            "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", "2",
            "--max_steps", "2", "--learning_rate", "1e-2", "--max_completion_length", "6",
            "--max_prompt_length", "64", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--plot_curves", "false", "--seed", "0",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
        assert proc.returncode == 0, proc.stderr[-4000:]
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h for h in history if "loss" in h}

    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    one = run(accelerate + ["--num_processes", "1", "--cpu"], tmp_path / "one", 8)
    two = run(
        accelerate + ["--config_file", str(repo / "accelerate_configs" / "multi_cpu.yaml")],
        tmp_path / "two",
        4,
    )
    assert set(one) == set(two) == {1, 2}
    for step in (1, 2):
        assert two[step]["reward"] == pytest.approx(one[step]["reward"], rel=1e-6)
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-7)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5)
        assert one[step]["grad_norm"] > 0


def test_evaluation_runs_once_per_eval_step(tmp_path, tokenizer):
    cfg = _config(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, eval_on_start=True,
                  max_completion_length=4, plot_curves=False)  # fmt: skip
    trainer = GRPOTrainer(
        build_model(tokenizer), args=cfg, train_dataset=ROWS, eval_dataset=ROWS[:2], processing_class=tokenizer,
        reward_funcs=[target_word_reward],
    )  # fmt: skip
    trainer.train()
    evals = [h["step"] for h in trainer.state.log_history if "eval_reward" in h]
    assert evals == [0, 2]


def test_beta_without_a_usable_reference_fails_at_start(tmp_path, tokenizer):
    cfg = _config(tmp_path, beta=0.1, ref_mode="adapter_disabled")
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        GRPOTrainer(build_model(tokenizer), args=cfg, train_dataset=ROWS, processing_class=tokenizer,
                    reward_funcs=[target_word_reward])  # fmt: skip


def test_kl_to_a_frozen_copy_starts_at_zero_and_grows(tmp_path, tokenizer):
    cfg = _config(tmp_path, max_steps=3, beta=0.1, plot_curves=False)
    trainer = GRPOTrainer(build_model(tokenizer), args=cfg, train_dataset=ROWS, processing_class=tokenizer,
                          reward_funcs=[letter_e_reward])  # fmt: skip
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.train()
    kl = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kl) == 3 and abs(kl[0]) < 1e-6 and kl[-1] > 1e-6, kl


def sometimes_none_reward(completions, **kwargs) -> list[float | None]:
    """No reward (None) for completions of even length, NaN for a length of 1 mod 4, else a real one."""
    return [
        None if len(c) % 2 == 0 else float("nan") if len(c) % 4 == 1 else c.count("e") / len(c)
        for c in completions
    ]


def test_unscorable_completions_get_zero_advantage_and_are_counted(tmp_path, tokenizer):
    """Documented policy (hf_align/trainers/grpo_rewards.py): None / NaN is "no reward"; a completion with no reward
    from any function has advantage 0 and is left out of its group's statistics; counted per function."""
    from hf_align.rollout import HFEngine, SamplingConfig
    from hf_align.trainers import grpo_rollouts as R

    model = build_model(tokenizer)
    groups = HFEngine(model, tokenizer).generate(
        ["Q: red A:", "Q: cat A:"], SamplingConfig(n=8, max_new_tokens=8, temperature=1.0, seed=3)
    )
    texts = [r.text for g in groups for r in g]
    values = sometimes_none_reward(texts)
    rewards_NF = torch.tensor([[v if v is not None else float("nan")] for v in values], dtype=torch.float64)
    totals = R.total_rewards(rewards_NF, [1.0])
    scored = R.scored_groups(groups, totals)
    rewards, advantages = R.advantages_for(scored, 8, 1e-4, "group")
    kinds = [v is not None and v == v for v in values]
    assert 0 < sum(kinds) < len(kinds), texts
    for g in range(2):  # TRL: (r - nanmean) / (nanstd + eps) over the scorable ones of the group
        idx = [i for i in range(8 * g, 8 * g + 8) if kinds[i]]
        if len(idx) > 1:
            r = torch.tensor([values[i] for i in idx])
            want = (r - r.mean()) / (r.std() + 1e-4) if r.max() > r.min() else torch.zeros_like(r)
            torch.testing.assert_close(advantages[idx], want.float(), rtol=1e-5, atol=1e-6)
    for ok, a, r in zip(kinds, advantages.tolist(), rewards.tolist()):
        if not ok:
            assert a == 0.0 and r == 0.0

    cfg = _config(tmp_path, max_steps=2, plot_curves=False)
    trainer = GRPOTrainer(
        model, [sometimes_none_reward, letter_e_reward], cfg, train_dataset=ROWS, processing_class=tokenizer
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/sometimes_none_reward/invalid" in h]
    assert logged and sum(h["rewards/sometimes_none_reward/invalid"] for h in logged) > 0
    for h in logged:
        assert h["rewards/letter_e_reward/invalid"] == 0
        assert all(h[k] == h[k] for k in ("loss", "grad_norm", "reward")), h
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
