"""GRPOTrainer with TRL's reward-function protocol: any callable, reward models, built-in graders, failures.

Every run is one or two optimizer steps on the tiny model (conftest.py); what is checked is what reached the reward
functions and what the trainer logged or raised.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from hf_align.config import GRPOConfig
from hf_align.trainers.grpo import GRPOTrainer
from hf_align.trainers.grpo_rewards import RewardFunctionError
from hf_align.trainers.safety import NoLearningError
from tests.conftest import build_model

ROWS = [{"prompt": f"Q: {q} A:", "answer": "0", "colour": q} for q in ["red", "green", "cat", "dog"]]


def _args(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=8, num_generations=4,
        max_completion_length=6, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
        plot_curves=False, disable_tqdm=True, grader_num_workers=0, seed=0,
    )  # fmt: skip
    base.update(kw)
    return GRPOConfig(**base)


def _logged(trainer) -> dict:
    return next(h for h in trainer.state.log_history if "reward" in h)


def test_local_function_lambda_and_async_reward_all_work(tmp_path, tokenizer):
    calls = {}

    def local_reward(
        prompts, completions, completion_ids, trainer_state, **kwargs
    ):  # not importable: a closure
        calls["local"] = (len(prompts), len(completion_ids), trainer_state.global_step)
        return [float(len(ids)) for ids in completion_ids]

    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0)
        calls["async"] = len(completions)
        return [c.count("e") / max(len(c), 1) for c in completions]

    trainer = GRPOTrainer(
        build_model(tokenizer),
        [local_reward, lambda completions, **kw: [1.0] * len(completions), async_reward],
        _args(tmp_path),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    trainer.train()
    assert calls["local"] == (8, 8, 0) and calls["async"] == 8
    h = _logged(trainer)
    for name in ("local_reward", "<lambda>", "async_reward"):
        assert h[f"rewards/{name}/mean"] == h[f"rewards/{name}/mean"] and h[f"rewards/{name}/invalid"] == 0
    assert h["rewards/<lambda>/mean"] == 1.0 and h["rewards/<lambda>/std"] == 0.0
    assert h["reward"] == pytest.approx(
        h["rewards/local_reward/mean"] + 1.0 + h["rewards/async_reward/mean"], rel=1e-6
    )


def test_columns_reach_rewards_and_weights_apply(tmp_path, tokenizer):
    seen = {}

    def colour_reward(completions, colour, answer, **kwargs):
        seen["colour"], seen["answer"] = list(colour), list(answer)
        return [float(len(c)) for c in completions]

    def one(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = GRPOTrainer(
        build_model(tokenizer), [colour_reward, one], _args(tmp_path, reward_weights=[0.5, 2.0]),
        train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    # one prompt x 4 completions per process step, here two prompts: each column entry repeated per completion
    assert len(seen["colour"]) == 8 and seen["colour"][:4] == [seen["colour"][0]] * 4
    assert seen["colour"][0] in {r["colour"] for r in ROWS} and seen["answer"] == ["0"] * 8
    h = _logged(trainer)
    assert h["reward"] == pytest.approx(0.5 * h["rewards/colour_reward/mean"] + 2.0, rel=1e-6)


def test_conversational_prompts_give_message_completions(tmp_path, tokenizer):
    seen = {}

    def chat_reward(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [float(len(c[0]["content"])) for c in completions]

    rows = [{"prompt": [{"role": "user", "content": f"Say {q}"}]} for q in ("red", "blue")]
    trainer = GRPOTrainer(
        build_model(tokenizer), chat_reward, _args(tmp_path), train_dataset=rows, processing_class=tokenizer
    )
    trainer.train()
    assert seen["prompt"][0]["role"] == "user"
    assert isinstance(seen["completion"], list) and seen["completion"][0]["role"] == "assistant"
    assert isinstance(seen["completion"][0]["content"], str)


def test_a_reward_that_always_raises_stops_training_naming_it(tmp_path, tokenizer):
    def broken_reward(completions, **kwargs):
        raise RuntimeError("reward service unavailable")

    trainer = GRPOTrainer(
        build_model(tokenizer), [broken_reward], _args(tmp_path, max_steps=2), train_dataset=ROWS,
        processing_class=tokenizer,
    )  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(
        RewardFunctionError, match=r"'broken_reward': RuntimeError: reward service unavailable"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))


def test_a_partly_failing_reward_is_counted_and_training_goes_on(tmp_path, tokenizer):
    calls = []

    def sometimes_raises(completions, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("first call fails")
        return [1.0 for _ in completions]

    trainer = GRPOTrainer(
        build_model(tokenizer), [sometimes_raises, lambda completions, **kw: [float(len(c)) for c in completions]],
        _args(tmp_path, max_steps=2), train_dataset=ROWS, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    invalid = [h["rewards/sometimes_raises/invalid"] for h in trainer.state.log_history if "reward" in h]
    assert invalid == [8.0, 0.0]


def test_a_hanging_reward_stops_training_with_a_clear_error(tmp_path, tokenizer):
    def hanging_reward(completions, **kwargs):
        time.sleep(60)
        return [0.0] * len(completions)

    trainer = GRPOTrainer(
        build_model(tokenizer), hanging_reward, _args(tmp_path, reward_timeout_s=1.0), train_dataset=ROWS,
        processing_class=tokenizer,
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(RewardFunctionError, match=r"'hanging_reward' ran for more than reward_timeout_s=1 s"):
        trainer.train()
    assert time.monotonic() - start < 30


def _reward_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return Qwen2ForSequenceClassification(config).eval()


def test_sequence_classification_reward_model_object_and_path(tmp_path, tokenizer):
    reward_model = _reward_model(tokenizer)
    path = tmp_path / "my-rm"
    reward_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    for funcs, procs in ((reward_model, tokenizer), (str(path), None)):
        trainer = GRPOTrainer(
            build_model(tokenizer), funcs, _args(tmp_path), train_dataset=ROWS, processing_class=tokenizer,
            reward_processing_classes=procs,
        )  # fmt: skip
        trainer.train()
        name = trainer.reward_func_names[0]
        assert name == "my-rm" if isinstance(funcs, str) else True
        h = _logged(trainer)
        assert h[f"rewards/{name}/invalid"] == 0 and h[f"rewards/{name}/std"] > 0


def test_builtin_grader_by_name_in_worker_processes(tmp_path, tokenizer):
    rows = [{"prompt": f"Q: {q} A:", "answer": "7"} for q in ("red", "cat")]
    trainer = GRPOTrainer(
        build_model(tokenizer), ["gsm8k", "question_only"], _args(tmp_path, grader_num_workers=1),
        train_dataset=rows, processing_class=tokenizer,
    )  # fmt: skip
    # the random tiny model earns no reward, so the run learns nothing and says so; its logs show the graders ran
    with pytest.raises(NoLearningError, match="every group's rewards were equal"):
        trainer.train()
    h = _logged(trainer)
    for key in (
        "rewards/gsm8k/mean",
        "rewards/question_only/mean",
        "accuracy",
        "format_rate",
        "grader_timeouts",
    ):
        assert key in h, key


def test_model_as_a_path_without_args(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = GRPOTrainer(
        str(tiny_model_dir), lambda completions, **kw: [0.0] * len(completions), train_dataset=ROWS
    )
    assert trainer.args.output_dir.endswith("-GRPO") and trainer.args.num_generations == 8
    assert trainer.processing_class.pad_token == tokenizer.pad_token
    assert trainer.model.config.model_type == "qwen2"


def test_batch_scaled_advantages_and_truncated_completions_masked(tmp_path, tokenizer):
    from hf_align.trainers import grpo_rollouts as R

    scored = R.ScoredGroups(rewards=[0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, float("nan")])
    _, advantages = R.advantages_for(
        scored, 4, 1e-4, "batch", batch_std=R.rewards_std(torch.tensor(scored.rewards))
    )
    std = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]).std()  # TRL: nanstd of the whole generation batch
    want = torch.tensor([-0.75, 0.25, 0.25, 0.25, 0.0, 0.0, 0.0, 0.0]) / (std + 1e-4)
    torch.testing.assert_close(advantages, want)

    # every completion of the tiny model runs into max_completion_length: masked, nothing to learn, no NaN; a
    # run that never had anything to learn stops with an error naming the setting
    trainer = GRPOTrainer(
        build_model(tokenizer), lambda completions, **kw: [float(len(c)) for c in completions],
        _args(tmp_path, mask_truncated_completions=True), train_dataset=ROWS, processing_class=tokenizer,
    )  # fmt: skip
    with pytest.raises(NoLearningError, match="mask_truncated_completions"):
        trainer.train()
    h = _logged(trainer)
    assert h["completions/clipped_ratio"] == 1.0 and h["loss"] == 0.0 and h["grad_norm"] == 0.0


def test_constructor_takes_trls_arguments_in_trls_order():
    import inspect

    trl = pytest.importorskip("trl")
    ours = list(inspect.signature(GRPOTrainer.__init__).parameters)
    theirs = list(inspect.signature(trl.GRPOTrainer.__init__).parameters)
    assert ours[: theirs.index("peft_config") + 1] == theirs[: theirs.index("peft_config") + 1]


def test_trls_log_metric_and_log_extra_reach_the_logs(tmp_path, tokenizer, caplog):
    """TRL 1.16 hands reward functions ``log_metric(name, value)`` and ``log_extra(column, values)``."""

    def scored(completions, log_metric, log_extra, **kwargs):
        log_metric("scored/length", sum(map(len, completions)) / len(completions))
        log_extra("length", [len(c) for c in completions])
        return [float(len(set(c))) for c in completions]

    trainer = GRPOTrainer(
        build_model(tokenizer), scored, _args(tmp_path, log_completions=True), train_dataset=ROWS,
        processing_class=tokenizer,
    )  # fmt: skip
    with caplog.at_level("INFO", logger="hf_align.trainers.grpo"):
        trainer.train()
    assert _logged(trainer)["scored/length"] > 0
    assert any("\nlength: " in r.getMessage() for r in caplog.records)


def test_a_reward_failing_every_call_stops_training_next_to_a_working_one(tmp_path, tokenizer):
    def wrong_column(completions, solution, **kwargs):  # the rows name it 'answer'
        return [float(c == s) for c, s in zip(completions, solution)]

    def spread(completions, **kwargs):
        return [float(len(set(c))) for c in completions]

    trainer = GRPOTrainer(
        build_model(tokenizer), [spread, wrong_column], _args(tmp_path, max_steps=5), train_dataset=ROWS,
        processing_class=tokenizer,
    )  # fmt: skip
    with pytest.raises(RewardFunctionError, match=r"'wrong_column' raised in 3 calls in a row.*solution"):
        trainer.train()
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("returned", [None, 1.0, ["abc"] * 8, [[1.0]] * 8, {"r": [1.0] * 8}])
def test_a_reward_of_the_wrong_type_is_an_error_naming_it(tmp_path, tokenizer, returned):
    def odd_reward(completions, **kwargs):
        return returned

    trainer = GRPOTrainer(
        build_model(tokenizer), odd_reward, _args(tmp_path), train_dataset=ROWS, processing_class=tokenizer
    )
    with pytest.raises(ValueError, match=r"reward function 'odd_reward' must return a list of 8 floats"):
        trainer.train()


def test_a_round_without_a_functions_reward_logs_no_nan_and_eval_skips_none(tmp_path, tokenizer):
    """A reward that gives None for a whole round (TRL's protocol) is left out of that round's averages: the log
    window is the mean of the rounds that had one, never NaN; eval means count only the completions scored, and a
    group with a None and otherwise equal rewards has zero spread."""
    calls = []

    def odd_rounds(completions, **kwargs):
        calls.append(1)
        return [1.0 if len(calls) % 2 == 0 else None] * len(completions)

    def half(completions, **kwargs):
        return [1.0 if i % 2 else None for i in range(len(completions))]

    def spread(completions, **kwargs):
        return [float(len(set(c))) for c in completions]

    args = _args(tmp_path, max_steps=2, logging_steps=2, per_device_train_batch_size=4, eval_strategy="no")
    trainer = GRPOTrainer(
        build_model(tokenizer), [spread, odd_rounds, half], args, train_dataset=ROWS,
        eval_dataset={"a": ROWS[:2], "b": ROWS[2:]}, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "reward" in h]
    assert all(v == v for v in logged.values()), logged
    assert logged["rewards/odd_rounds/mean"] == 1.0 and logged["rewards/odd_rounds/invalid"] == 2.0
    metrics = trainer.evaluate()
    assert metrics["eval_a_rewards/half/mean"] == metrics["eval_b_rewards/half/mean"] == 1.0  # None: not a 0
    assert {"eval_a_reward", "eval_b_reward"} <= set(metrics)

    from hf_align.trainers import grpo_rollouts as R

    nan = float("nan")
    scored = R.ScoredGroups(
        completion_ids=[[1] * k for k in range(1, 9)], finish_reasons=["eos", "length"] * 4,
        rewards=[1.0, nan, 1.0, 1.0, 0.0, 1.0, nan, 1.0],
    )  # fmt: skip
    metrics = R.rollout_metrics(torch.zeros(8, 1), ["f"], scored, 4)
    assert metrics["frac_reward_zero_std"] == 0.5
    # TRL's lengths of the completions that ended (EOS / stop) rather than at max_completion_length: 1, 3, 5, 7
    ended = [metrics[f"completions/{k}_terminated_length"] for k in ("mean", "min", "max")]
    assert ended == [4.0, 1.0, 7.0] and metrics["completions/clipped_ratio"] == 0.5


def test_a_run_with_nothing_to_learn_stops_with_an_error(tmp_path, tokenizer):
    trainer = GRPOTrainer(
        build_model(tokenizer), lambda completions, **kw: [1.0] * len(completions), _args(tmp_path, max_steps=2),
        train_dataset=ROWS, processing_class=tokenizer,
    )  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(
        NoLearningError, match="none of the 2 optimizer steps of this run had anything to learn"
    ):
        trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))


def test_a_row_without_ground_truth_gets_no_reward_and_no_accuracy(tokenizer):
    """TRL's accuracy reward gives None where the gold cannot be read; a built-in grader does the same for a row
    without a ground truth (None, NaN, blank, empty list), and the accuracy metric counts only graded rows."""
    from hf_align.trainers.grpo_rewards import RewardRunner

    runner = RewardRunner(["r1_zero"], None, None, _args(Path("/tmp")), "cpu")
    right = "<think>sum</think> <answer>7</answer>"
    try:
        rewards_NF, _ = runner(
            ["p"] * 5, [right] * 5, [[1]] * 5, {"answer": ["7", None, float("nan"), "  ", []]}, None
        )
        metrics = runner.grader_metrics()
    finally:
        runner.close()
    assert rewards_NF[0, 0] == 1.0 and torch.isnan(rewards_NF[1:, 0]).all()
    assert metrics["accuracy"] == 1.0 and metrics["format_rate"] == 1.0
