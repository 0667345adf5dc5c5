"""GRPOTrainer end to end on the tiny model with the HF generate engine."""

from __future__ import annotations

import json

import pytest
import torch

from hf_align.config import GRPOConfig
from hf_align.trainers.grpo import GRPOTrainer
from tests.conftest import build_model, grad_capture

TARGET = "blue"


def target_word_reward(response: str, ground_truth) -> dict[str, float]:
    """A reward a random tiny model can learn: how often it says the target word (capped at 1)."""
    hits = min(response.count(TARGET), 4) / 4
    return {"format_reward": float(hits > 0), "answer_reward": 0.0, "reward": hits}


def letter_e_reward(response: str, ground_truth) -> dict[str, float]:
    """Continuous (almost never tied within a group), so every group carries a learning signal."""
    return {"reward": response.count("e") / max(len(response), 1)}


ROWS = [{"question": q, "answer": "0"} for q in ["red", "green", "cat", "dog", "yes", "no", "good", "bad"]]


def _config(tmp_path, template, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        prompt_template=str(template),
        rollout_batch_size=32,
        group_size=8,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        max_steps=20,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        max_completion_length=8,
        stop_strings=[],
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


@pytest.fixture()
def template(tmp_path):
    path = tmp_path / "colour.prompt"
    path.write_text("Q: {question} A:")
    return path


def _rewards(trainer):
    return [h["reward_mean"] for h in trainer.state.log_history if "reward_mean" in h]


@pytest.mark.slow
def test_reward_rises_and_parameters_change(tmp_path, tokenizer, template):
    model = build_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = GRPOTrainer(
        model,
        _config(tmp_path, template),
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
    for key in ("loss", "grad_norm", "entropy", "completion_length_mean", "zero_std_group_fraction",
                "time/generation_s", "time/grading_s", "time/training_s", "generation_tokens_per_s"):  # fmt: skip
        assert any(key in h for h in history), key
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000


def test_checkpoint_saved_and_resumed(tmp_path, tokenizer, template):
    """Save at step 2, resume from it: the resumed run reproduces steps 3-4 of the uninterrupted one."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, plot_curves=False)
    full = GRPOTrainer(
        build_model(tokenizer), _config(tmp_path / "a", template, **kw), train_dataset=ROWS,
        processing_class=tokenizer, reward_funcs=[target_word_reward],
    )  # fmt: skip
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "rollout_state_rank0.pt").is_file()

    resumed = GRPOTrainer(
        build_model(tokenizer, seed=123), _config(tmp_path / "a", template, **kw), train_dataset=ROWS,
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


def test_dynamic_sampling_fills_batch_and_counts(tmp_path, tokenizer, template):
    cfg = _config(tmp_path, template, max_steps=1, dynamic_sampling=True, max_dynamic_sampling_rounds=2,
                  plot_curves=False)  # fmt: skip
    trainer = GRPOTrainer(
        build_model(tokenizer), cfg, train_dataset=ROWS, processing_class=tokenizer,
        reward_funcs=[target_word_reward],
    )  # fmt: skip
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "dynamic_sampling_rounds" in h)
    assert 1 <= logged["dynamic_sampling_rounds"] <= 2


def test_off_policy_epochs_use_old_logprobs(tmp_path, tokenizer, template):
    cfg = _config(tmp_path, template, max_steps=4, epochs_per_rollout_batch=2, loss_type="grpo_clip",
                  per_device_train_batch_size=8, plot_curves=False)  # fmt: skip
    trainer = GRPOTrainer(
        build_model(tokenizer), cfg, train_dataset=ROWS, processing_class=tokenizer,
        reward_funcs=[target_word_reward],
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
        (dict(rollout_batch_size=30), "multiple of group_size"),
        (dict(per_device_train_batch_size=4, optimizer_batch_size=16), "optimizer_batch_size"),
        (dict(epochs_per_rollout_batch=2), "off-policy"),
        (dict(ratio_level="sequence"), "GSPO"),
        (dict(cliprange_high=1.5), "cliprange_high"),
        (dict(reward_funcs=["r1_zero"], reward_weights=[1.0, 2.0]), "reward_weights"),
        (dict(loss_type="grpo_clip", cliprange=None), "grpo_clip' needs a clip range"),
        (dict(loss_type="grpo_clip", cliprange=None, cliprange_low=0.2), "grpo_clip' needs a clip range"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(group_size=1, rollout_batch_size=8), "group_size must be >= 2"),
        (dict(beta=-0.1), "beta must be >= 0"),
    ],
)
def test_config_validation(tmp_path, template, bad, message):
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, template, **bad)


@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean", "constant"])
def test_accumulation_splits_give_identical_gradients(tmp_path, tokenizer, template, reduction):
    """One optimizer step over the same 8 rollouts, split 8x1, 4x2, 1x8: identical gradients (1e-6)."""
    grads = {}
    for micro, accum in [(8, 1), (4, 2), (1, 8)]:
        cap = grad_capture()
        cfg = _config(
            tmp_path / f"{micro}x{accum}", template, max_steps=1, rollout_batch_size=8,
            per_device_train_batch_size=micro, gradient_accumulation_steps=accum, loss_reduction=reduction,
            max_grad_norm=0.0, plot_curves=False, max_completion_length=6,
        )  # fmt: skip
        trainer = GRPOTrainer(
            build_model(tokenizer), cfg, train_dataset=ROWS, processing_class=tokenizer,
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


def test_shared_prompt_forward_gives_the_same_step(tmp_path, tokenizer, template):
    """share_prompt_prefix (the default) runs each group's prompt through the decoder once per micro-batch:
    the same gradients as one full pass per row (1e-5), with fewer decoder rows."""
    grads, shapes = {}, {}
    for share in (False, True):
        cap = grad_capture()
        cfg = _config(
            tmp_path / str(share), template, max_steps=1, rollout_batch_size=16, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, max_grad_norm=0.0, plot_curves=False, max_completion_length=6,
            share_prompt_prefix=share,
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
            model, cfg, train_dataset=ROWS, processing_class=tokenizer,
            reward_funcs=[letter_e_reward], callbacks=[cap],
        )  # fmt: skip
        trainer.train()
        grads[share] = cap.grads
    assert [rows for rows, _ in shapes[False]] == [8, 8]
    assert [rows for rows, _ in shapes[True]] == [1, 8, 1, 8]  # one prompt, then its 8 completions
    for name, ref in grads[False].items():
        diff = (grads[True][name] - ref).abs().max().item()
        assert diff <= 1e-6 + 1e-5 * ref.abs().max().item(), (name, diff)


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tokenizer, template):
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
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def run(launcher: list[str], out: Path, micro: int) -> dict[int, dict]:
        cmd = launcher + [
            str(repo / "recipes" / "grpo.py"),
            "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--dataset_kind", "qa",
            "--output_dir", str(out), "--prompt_template", str(template),
            "--reward_funcs", "tests.integration.test_grpo_trainer:letter_e_reward", "--grader_num_workers", "0",
            "--rollout_batch_size", "16", "--group_size", "8",
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
        assert two[step]["reward_mean"] == pytest.approx(one[step]["reward_mean"], rel=1e-6)
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-7)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5)
        assert one[step]["grad_norm"] > 0


def test_evaluation_runs_once_per_eval_step(tmp_path, tokenizer, template):
    cfg = _config(tmp_path, template, max_steps=2, eval_strategy="steps", eval_steps=2, eval_on_start=True,
                  max_completion_length=4, plot_curves=False)  # fmt: skip
    trainer = GRPOTrainer(
        build_model(tokenizer), cfg, train_dataset=ROWS, eval_dataset=ROWS[:2], processing_class=tokenizer,
        reward_funcs=[target_word_reward],
    )  # fmt: skip
    trainer.train()
    evals = [h["step"] for h in trainer.state.log_history if "eval_mean_reward" in h]
    assert evals == [0, 2]


def test_beta_without_a_usable_reference_fails_at_start(tmp_path, tokenizer, template):
    cfg = _config(tmp_path, template, beta=0.1, ref_mode="adapter_disabled")
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        GRPOTrainer(build_model(tokenizer), cfg, train_dataset=ROWS, processing_class=tokenizer,
                    reward_funcs=[target_word_reward])  # fmt: skip


def test_kl_to_a_frozen_copy_starts_at_zero_and_grows(tmp_path, tokenizer, template):
    cfg = _config(tmp_path, template, max_steps=3, beta=0.1, plot_curves=False)
    trainer = GRPOTrainer(build_model(tokenizer), cfg, train_dataset=ROWS, processing_class=tokenizer,
                          reward_funcs=[letter_e_reward])  # fmt: skip
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    trainer.train()
    kl = [h["kl_mean"] for h in trainer.state.log_history if "kl_mean" in h]
    assert len(kl) == 3 and abs(kl[0]) < 1e-6 and kl[-1] > 1e-6, kl


def flaky_reward(response: str, ground_truth) -> dict[str, float] | None:
    """Raises, returns None, returns NaN, or a real reward, depending on the completion."""
    kind = len(response) % 4
    if kind == 0:
        raise RuntimeError("reward service unavailable")
    if kind == 1:
        return None
    if kind == 2:
        return {"reward": float("nan")}
    return {"reward": response.count("e") / max(len(response), 1)}


@pytest.mark.parametrize("workers", [0, 1])
def test_failing_rewards_are_counted_and_get_zero_advantage(tmp_path, tokenizer, template, workers):
    """Documented policy (hf_align/trainers/grpo_rollouts.py): a reward that raises or comes back None / NaN
    counts in reward_invalid and its completion's advantage is 0; the loss never sees a NaN."""
    from hf_align.rewards import Grader
    from hf_align.rollout import HFEngine, SamplingConfig
    from hf_align.trainers import grpo_rollouts as R

    model = build_model(tokenizer)
    groups = HFEngine(model, tokenizer).generate(
        ["Q: red A:", "Q: cat A:"], SamplingConfig(n=8, max_new_tokens=8, temperature=1.0, seed=3)
    )
    with Grader(flaky_reward, timeout_s=5.0, num_workers=workers) as grader:
        scored, invalid = R.score_groups(groups, ["0", "0"], [grader], [1.0])
        assert grader.stats["errors"] == sum(len(t) % 4 in (0, 1) for t in scored.texts)
    kinds = [len(t) % 4 for t in scored.texts]
    assert invalid == sum(k != 3 for k in kinds) and 0 < invalid < len(kinds), kinds
    _, advantages = R.advantages_for(scored, 8, 1e-6, True)
    for k, a, r in zip(kinds, advantages.tolist(), scored.rewards):
        assert r == r and a == a  # finite
        if k != 3:
            assert a == 0.0 and r == 0.0

    cfg = _config(tmp_path, template, max_steps=2, plot_curves=False, grader_num_workers=workers)
    trainer = GRPOTrainer(
        model, cfg, train_dataset=ROWS, processing_class=tokenizer, reward_funcs=[flaky_reward]
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward_invalid" in h]
    assert logged and sum(h["reward_invalid"] for h in logged) > 0
    for h in logged:
        assert all(h[k] == h[k] for k in ("loss", "grad_norm", "reward_mean")), h
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
