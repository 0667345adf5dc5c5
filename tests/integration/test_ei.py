"""Expert iteration end to end on the tiny model: 2 iterations sample, keep, fine-tune, evaluate and log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_align.cli import parse_args
from hf_align.config import ModelArguments, ScriptArguments, SFTConfig
from recipes.ei import EIArguments, keep_mask, main
from tests.conftest import build_model, build_tokenizer

REPO = Path(__file__).resolve().parents[2]

LOG_KEYS = {
    "iteration",
    "train_accuracy",
    "kept",
    "mean_response_tokens",
    "kept_entropy",
    "sft_loss",
    "fine_tuned",
    "eval_accuracy",
    "eval_format_rate",
    "eval_mean_reward",
}


def has_letter_e(response, ground_truth):
    """A reward the untrained tiny model earns often: the response contains the letter e."""
    ok = "e" in response
    return {"reward": float(ok), "answer_reward": float(ok), "format_reward": float(ok)}


def never(response, ground_truth):
    return {"reward": 0.0, "answer_reward": 0.0, "format_reward": 0.0}


@pytest.mark.parametrize("path", sorted((REPO / "recipes/configs/ei").glob("*.yaml")), ids=lambda p: p.name)
def test_ei_yaml_parses(path, tmp_path):
    assert path.read_text().startswith("# "), "the first line must hold the launch command"
    cpu = ["--use_cpu", "true", "--bf16", "false", "--output_dir", str(tmp_path)]
    classes = (ModelArguments, ScriptArguments, SFTConfig, EIArguments)
    _, script_args, cfg, ei = parse_args(classes, ["--config", str(path), *cpu])
    assert script_args.dataset_name and ei.n_iterations >= 1 and ei.prompt_template == "r1_zero"


def test_keep_mask_rules():
    rewards = [
        {"reward": 1.0, "answer_reward": 1.0},
        {"reward": 0.5, "answer_reward": 0.0},
        {"reward": 0.0, "answer_reward": 0.0},
    ]
    assert keep_mask(rewards, None) == [True, False, False]
    assert keep_mask(rewards, 0.5) == [True, True, False]


def _setup(tmp_path):
    tokenizer = build_tokenizer()
    model_dir = tmp_path / "model"
    initial = build_model(tokenizer)
    initial.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "qa.jsonl"
    questions = ["What is 12 + 7?", "Say hello.", "Name a fox.", "Count to three."]
    data.write_text("".join(json.dumps({"question": q, "answer": "1"}) + "\n" for q in questions))
    template = tmp_path / "qa.prompt"
    template.write_text("Q: {question} A:")
    args = [
        "--model_name_or_path", str(model_dir), "--dtype", "float32",
        "--dataset_name", str(data), "--dataset_kind", "qa",
        "--output_dir", str(tmp_path / "out"), "--prompt_template", str(template),
        "--questions_per_iteration", "2", "--samples_per_question", "4",
        "--max_completion_length", "12", "--stop_strings", "</answer>", "--grader_num_workers", "0",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
        "--max_length", "64", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--logging_steps", "1", "--disable_tqdm", "true", "--seed", "0",
    ]  # fmt: skip
    return initial, data, args


def _changed(initial, folder) -> bool:
    final = AutoModelForCausalLM.from_pretrained(folder)
    return any(
        not torch.equal(a, b) for a, b in zip(initial.state_dict().values(), final.state_dict().values())
    )


def test_expert_iteration_two_iterations(tmp_path):
    initial, data, args = _setup(tmp_path)
    out = tmp_path / "out"
    main(
        args
        + ["--n_iterations", "2", "--reward_fn", "tests.integration.test_ei:has_letter_e"]
        + ["--eval_dataset_name", str(data), "--eval_dataset_kind", "qa", "--eval_dataset_split", "train"]
        + ["--max_eval_samples", "2"]
    )

    lines = [json.loads(line) for line in (out / "ei_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [0, 1]
    for record in lines:
        assert LOG_KEYS <= set(record)
        assert record["samples"] == 8
        assert 0.0 <= record["eval_accuracy"] <= 1.0
        assert record["fine_tuned"] == (record["kept"] > 0)
    first = lines[0]
    assert first["kept"] > 0
    assert first["kept_entropy"] > 0.0 and first["sft_loss"] > 0.0
    assert first["kept"] == round(first["train_accuracy"] * first["samples"])

    kept_rows = (out / "iter_0" / "kept.jsonl").read_text().splitlines()
    assert len(kept_rows) == first["kept"]
    assert all("e" in json.loads(row)["completion"] for row in kept_rows)
    assert _changed(initial, out), "fine-tuning on kept rows left every parameter unchanged"


def test_iteration_with_nothing_kept_skips_fine_tuning(tmp_path):
    initial, _, args = _setup(tmp_path)
    main(args + ["--n_iterations", "1", "--reward_fn", "tests.integration.test_ei:never"])
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "ei_log.jsonl").read_text().splitlines()]
    assert record["kept"] == 0 and record["fine_tuned"] is False and record["sft_loss"] is None
    assert not _changed(initial, tmp_path / "out")
