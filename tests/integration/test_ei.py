"""Expert iteration on the tiny model: it learns a toy task (held-out greedy accuracy rises), keeps by its rule,
skips an iteration that keeps nothing, refuses a run that never keeps anything, and the recipe runs end to end.

The toy task: prompts "Q: a plus b? A:" and reward 1 when the one-token completion contains the letter e. The
randomly initialised model samples such a token about 1 time in 7 but answers ":" greedily; expert iteration
must make its greedy answer to prompts it never trained on (other numbers) contain an e.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_align.cli import parse_args
from hf_align.config import ExpertIterationConfig, ModelArguments
from hf_align.trainers.ei import ExpertIterationTrainer, keep_mask
from hf_align.trainers.safety import NoLearningError
from recipes.ei import EIScriptArguments, main
from tests.conftest import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]
TRAIN = [{"prompt": f"Q: {a} plus {b}? A:"} for a in range(4) for b in range(4)]
HELD_OUT = [{"prompt": f"Q: {a} plus {b}? A:"} for a in range(4, 8) for b in range(4, 8)]
LOG_KEYS = {
    "iteration", "questions", "samples", "train_accuracy", "train_mean_reward", "kept", "questions_with_kept",
    "mean_response_tokens", "kept_mean_response_tokens", "kept_entropy", "sft_loss", "fine_tuned",
    "eval_accuracy", "eval_mean_reward",
}  # fmt: skip


def has_letter_e(prompts, completions, **kwargs):
    """TRL's reward protocol: 1.0 when the completion contains the letter e."""
    return [float("e" in completion) for completion in completions]


def never(prompts, completions, **kwargs):
    return [0.0] * len(completions)


def toy_config(tmp_path, **overrides) -> ExpertIterationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), n_iterations=3, questions_per_iteration=16, num_generations=8,
        max_completion_length=1, stop_strings=[], learning_rate=1e-2, max_steps=8, per_device_train_batch_size=8,
        gradient_checkpointing=False, save_strategy="no", report_to="none", use_cpu=True, logging_steps=1,
        disable_tqdm=True, seed=0, grader_num_workers=0,
    )  # fmt: skip
    return ExpertIterationConfig(**{**values, **overrides})


def read_log(folder) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "ei_log.jsonl").read_text().splitlines()]


def test_held_out_accuracy_rises(tmp_path):
    tokenizer = build_tokenizer()
    trainer = ExpertIterationTrainer(
        build_model(tokenizer), has_letter_e, toy_config(tmp_path), TRAIN, HELD_OUT, tokenizer
    )
    before = trainer.evaluate()["eval_accuracy"]
    records = trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    assert before <= 0.1 and after >= 0.9, f"held-out greedy accuracy {before} -> {after}"
    assert records == read_log(tmp_path / "out") and records[-1]["eval_accuracy"] == after
    assert records[-1]["train_accuracy"] > 2 * records[0]["train_accuracy"], "sampled accuracy did not rise"
    for record in records:
        assert LOG_KEYS <= set(record) and record["samples"] == 16 * 8 and record["fine_tuned"]
        assert record["kept"] == round(record["train_accuracy"] * record["samples"])
        assert record["kept_entropy"] > 0.0 and record["sft_loss"] > 0.0
    kept = [
        json.loads(line) for line in (tmp_path / "out" / "iter_0" / "kept.jsonl").read_text().splitlines()
    ]
    assert len(kept) == records[0]["kept"] and all("e" in row["completion"] for row in kept)
    assert {row["prompt"] for row in kept} <= {row["prompt"] for row in TRAIN}


def test_keep_rule():
    rewards = [1.0, 0.5, 0.0, math.nan]
    assert keep_mask(rewards, 1.0) == [True, False, False, False]
    assert keep_mask(rewards, 0.5) == [True, True, False, False]
    assert keep_mask(rewards, -1.0) == [True, True, True, False], "an unscored completion is never kept"


def test_iteration_that_keeps_nothing_is_skipped(tmp_path):
    calls = []

    def nothing_at_first(prompts, completions, **kwargs):
        calls.append(1)
        return never(prompts, completions) if len(calls) == 1 else has_letter_e(prompts, completions)

    tokenizer = build_tokenizer()
    args = toy_config(tmp_path, n_iterations=2, questions_per_iteration=8, max_steps=1)
    records = ExpertIterationTrainer(
        build_model(tokenizer), nothing_at_first, args, TRAIN, None, tokenizer
    ).train()
    assert records[0]["kept"] == 0 and not records[0]["fine_tuned"] and records[0]["sft_loss"] is None
    assert records[1]["kept"] > 0 and records[1]["fine_tuned"] and records[1]["sft_loss"] > 0.0


def test_run_that_never_keeps_anything_raises(tmp_path):
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = toy_config(tmp_path, n_iterations=2, questions_per_iteration=4)
    with pytest.raises(NoLearningError, match="no iteration of 2 kept a completion"):
        ExpertIterationTrainer(model, never, args, TRAIN, None, tokenizer).train()
    assert [r["kept"] for r in read_log(tmp_path / "out")] == [0, 0]
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "field, value",
    [("n_iterations", 0), ("questions_per_iteration", 0), ("num_generations", 0), ("max_completion_length", 0),
     ("temperature", -1.0), ("eval_temperature", -0.5), ("top_p", 0.0)],
)  # fmt: skip
def test_config_validation(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        toy_config(tmp_path, **{field: value})


@pytest.mark.parametrize("path", sorted((REPO / "recipes/configs/ei").glob("*.yaml")), ids=lambda p: p.name)
def test_ei_yaml_parses(path, tmp_path):
    assert path.read_text().startswith("# "), "the first line must hold the launch command"
    cpu = ["--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path)]
    classes = (ModelArguments, EIScriptArguments, ExpertIterationConfig)
    _, script_args, cfg = parse_args(classes, ["--config", str(path), *cpu])
    assert script_args.dataset_name and cfg.n_iterations >= 1 and script_args.prompt_template == "r1_zero"


def _recipe_args(tmp_path) -> list[str]:
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = tmp_path / "qa.jsonl"
    questions = ["What is 12 + 7?", "Say hello.", "Name a fox.", "Count to three."]
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    template = tmp_path / "qa.prompt"
    template.write_text("Q: {question} A:")
    return [
        "--model_name_or_path", str(tmp_path / "model"), "--dtype", "float32",
        "--dataset_name", str(data), "--dataset_kind", "qa", "--prompt_template", str(template),
        "--eval_dataset_name", str(data), "--eval_dataset_kind", "qa", "--max_eval_samples", "2",
        "--output_dir", str(tmp_path / "out"), "--n_iterations", "1", "--questions_per_iteration", "2",
        "--num_generations", "4", "--max_completion_length", "8", "--grader_num_workers", "0",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--max_length", "64", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0",
    ]  # fmt: skip


def test_recipe_end_to_end(tmp_path):
    main(_recipe_args(tmp_path) + ["--reward_funcs", "tests.integration.test_ei:has_letter_e"])
    (record,) = read_log(tmp_path / "out")
    assert LOG_KEYS <= set(record) and record["samples"] == 8 and record["fine_tuned"]
    initial = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial), "the saved model is the initial one"


def test_recipe_r1_zero_default_refuses_a_run_that_learns_nothing(tmp_path):
    """The built-in grader path: the random model never writes the R1-Zero format, so nothing is kept."""
    with pytest.raises(NoLearningError):
        main(_recipe_args(tmp_path))
    (record,) = read_log(tmp_path / "out")
    assert record["kept"] == 0 and record["train_format_rate"] == 0.0
    assert record["eval_accuracy"] == 0.0 and record["eval_format_rate"] == 0.0
