"""Bad input is named (file:line, row, field) or skipped counted and logged; never a silent NaN or a lost column."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch

from hf_align.cli import load_rows, parse_args
from hf_align.config import DPOConfig, GRPOConfig, RewardConfig, ScriptArguments, SFTConfig
from hf_align.data import DataError, load_dataset_rows
from hf_align.formats import (
    SFTCollator,
    as_dataset,
    drop_bad_rows,
    prepare_preference_dataset,
    prepare_sft_dataset,
)
from hf_align.trainers.dpo import PreferenceCollator

PAIR = {"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 42"}


def _args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def _write_jsonl(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_skip_counts_and_logs_every_run_even_from_the_cache(tmp_path, caplog):
    rows = [{"text": t, "prompt": p} for t, p in [("a", None), (None, None), ("b", None), (None, "x")]]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "ds")
    for _ in range(2):  # the second run's map is answered by the cache files
        ds = datasets.load_from_disk(tmp_path / "ds")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_align.formats"):
            kept = drop_bad_rows(ds, "sft")
        assert kept["text"] == ["a", "b"]
        assert "skipped 2 bad row(s)" in caplog.text and "train dataset row 1" in caplog.text


def test_load_rows_names_a_malformed_line_or_skips_it(tmp_path, caplog):
    good = json.dumps(PAIR)
    path = _write_jsonl(tmp_path / "p.jsonl", [good, '{"prompt": "x", "chosen": "y", ', good])
    with pytest.raises(DataError, match=r"p\.jsonl:2: malformed JSON"):
        load_rows(ScriptArguments(dataset_name=path), "preference")
    with caplog.at_level(logging.WARNING, logger="hf_align.cli"):
        ds = load_rows(ScriptArguments(dataset_name=path, on_bad_rows="skip"), "preference")
    assert len(ds) == 2 and "skipped 1 bad row(s)" in caplog.text and "p.jsonl:2" in caplog.text
    bad_field = _write_jsonl(tmp_path / "q.jsonl", [good, json.dumps({"prompt": "x", "chosen": " y"})])
    with pytest.raises(DataError, match=r"q\.jsonl:2: field 'rejected' is missing"):
        load_rows(ScriptArguments(dataset_name=bad_field), "preference")


def test_load_rows_keeps_strings_and_reads_a_json_array(tmp_path):
    # one row's chosen is a number: datasets' JSON inference would make the other row's " 19" the int 19
    path = _write_jsonl(tmp_path / "p.jsonl", [json.dumps(PAIR), json.dumps({**PAIR, "chosen": 19})])
    ds = load_rows(ScriptArguments(dataset_name=path, on_bad_rows="skip"), "preference")
    assert ds["chosen"] == [" 19"]
    array = tmp_path / "a.json"
    array.write_text(
        json.dumps([{"prompt": "Q", "response": " A"}, {"prompt": "R", "response": " B"}], indent=1)
    )
    ds = load_rows(ScriptArguments(dataset_name=str(array)), "sft")
    assert ds.to_list() == [{"prompt": "Q", "completion": " A"}, {"prompt": "R", "completion": " B"}]
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "1+1?", "answer": "2"}], indent=2))
    assert load_dataset_rows(qa, kind="qa") == [{"question": "1+1?", "answer": "2"}]


def test_nan_or_infinite_answer_is_rejected_naming_the_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "0/0?", "answer": NaN}\n{"question": "2?", "answer": 2}\n')
    with pytest.raises(DataError, match=r"qa\.jsonl:1: field 'answer' is nan"):
        load_dataset_rows(path, kind="qa")
    assert load_dataset_rows(path, kind="qa", on_error="skip") == [{"question": "2?", "answer": "2"}]


def test_list_rows_keep_keys_that_only_later_rows_have(tmp_path, tokenizer):
    rows = [{"prompt": "Q: hi A:", "chosen": " yes", "rejected": " no"}, {**PAIR, "margin": 3.0}]
    assert as_dataset(rows, "preference", "train")[1]["margin"] == 3.0
    implicit = [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, PAIR]
    out = prepare_preference_dataset(implicit, tokenizer, _args(DPOConfig, tmp_path), name="train")
    assert tokenizer.decode(out[1]["prompt_ids"]) == PAIR["prompt"]
    with pytest.raises(DataError, match=r"train dataset row 1: field 'chosen' is a list but a str in train"):
        answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
        as_dataset([PAIR, {"chosen": answer("a"), "rejected": answer("b")}], "preference", "train")


@pytest.mark.parametrize(
    ("margins", "message"),
    [
        ([0.5, None], r"row 1: field 'margin' must be a finite number, got missing"),
        ([0.5, float("nan")], r"row 1: field 'margin' must be a finite number, got nan"),
        (["0.5", "1"], r"row 0: field 'margin' must be a finite number, got '0.5'"),
        (["0.5", 1.0], r"row 1: field 'margin' is a number but a str in train dataset row 0"),
    ],
)
def test_reward_margin_checked_per_row(tmp_path, tokenizer, margins, message):
    rows = [{**PAIR, "margin": m} for m in margins]
    args = _args(RewardConfig, tmp_path)
    for data in (rows, datasets.Dataset.from_list(rows) if isinstance(margins[0], float) else rows):
        with pytest.raises(DataError, match=message):
            prepare_preference_dataset(data, tokenizer, args, name="train", full_sequences=True)
    ok = prepare_preference_dataset(
        [{**PAIR, "margin": 1}], tokenizer, args, name="train", full_sequences=True
    )
    assert ok[0]["margin"] == 1.0


def test_pretokenized_reward_rows_get_the_length_filter_and_margin_check(tmp_path, tokenizer):
    rows = [
        {"chosen_ids": [5] * 20, "rejected_ids": [6] * 3},
        {"chosen_ids": [5] * 4, "rejected_ids": [6] * 3},
    ]
    args = _args(RewardConfig, tmp_path, max_length=16)
    out = prepare_preference_dataset(rows, tokenizer, args, name="train", full_sequences=True)
    assert out["chosen_ids"] == [[5] * 4]
    nan = [{**rows[1], "margin": float("nan")}]
    with pytest.raises(DataError, match="row 0: field 'margin' must be a finite number"):
        prepare_preference_dataset(nan, tokenizer, args, name="train", full_sequences=True)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user"}, "missing"),
        ({"role": "user", "content": None}, "missing"),
        ({"role": "user", "content": 5}, "a int"),
    ],
)
def test_message_content_checked_naming_row_and_field(tmp_path, tokenizer, message, field):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [ok, {"messages": [message, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError, match=rf"train dataset row 1: field 'messages\[0\]\.content' is {field}"):
        prepare_sft_dataset(
            rows,
            tokenizer,
            _args(SFTConfig, tmp_path),
            packing=False,
            completion_only_loss=False,
            name="train",
        )
    tool_turn = {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}
    as_dataset([{"messages": [ok["messages"][0], tool_turn]}], "sft", "train")  # a tool call needs no content


def test_iterable_dataset_length_drops_are_logged(tmp_path, tokenizer, caplog):
    rows = [PAIR, {**PAIR, "prompt": "The quick brown fox jumps over the lazy dog. " * 4}]
    data = datasets.Dataset.from_list(rows).to_iterable_dataset()
    with caplog.at_level(logging.WARNING, logger="hf_align.formats"):
        out = prepare_preference_dataset(
            data, tokenizer, _args(DPOConfig, tmp_path, max_length=16), name="train"
        )
        assert len(list(out)) == 1
    assert "IterableDataset" in caplog.text and "prompt alone fills max_length=16" in caplog.text


def test_sft_collator_defaults_labels_to_input_ids():
    batch = SFTCollator(pad_token_id=0)(
        [{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9], "completion_mask": [0, 1]}]
    )
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, 9, -100]]


def test_packed_rows_are_flattened_even_without_padding_free():
    packed = {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lengths": [3, 2]}
    batch = SFTCollator(pad_token_id=0, padding_free=False)([packed])
    assert batch["position_ids"].tolist() == [
        [0, 1, 2, 0, 1]
    ]  # positions restart: no attention across samples
    assert "attention_mask" not in batch


def test_dpo_collator_pads_to_a_multiple():
    pair = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}
    batch = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=8)([pair])
    assert {tuple(v.shape) for v in batch.values()} == {(2, 8)}
    assert batch["attention_mask"].sum(-1).tolist() == [4, 4] and batch["response_mask"].sum().item() == 3
    assert batch["input_ids"][:, 4:].eq(0).all() and batch["response_mask"].dtype == torch.bool


def test_yaml_numbers_become_the_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"output_dir: {tmp_path}\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 5e-2]\nbeta: 1e-1\n"
    )
    (cfg,) = parse_args((DPOConfig,), ["--config", str(path), "--use_cpu", "true", "--report_to", "none"])
    assert cfg.loss_weights == [1.0, 0.05] and cfg.beta == 0.1
    path.write_text(f"output_dir: {tmp_path}\nreward_weights: [1, 2e-1]\nmax_steps: 1e3\n")
    (cfg,) = parse_args((GRPOConfig,), ["--config", str(path), "--use_cpu", "true", "--report_to", "none"])
    assert cfg.reward_weights == [1.0, 0.2] and cfg.max_steps == 1000
    path.write_text(f"output_dir: {tmp_path}\nloss_weights: [1.0, heavy]\n")
    with pytest.raises(ValueError, match=r"c\.yaml: key 'loss_weights': 'heavy' is not a float"):
        parse_args((DPOConfig,), ["--config", str(path)])


def test_config_values_refused_or_read_when_the_config_is_built(tmp_path, caplog):
    with pytest.raises(ValueError, match="pad_to_multiple_of must be > 0"):
        SFTConfig(output_dir=str(tmp_path), pad_to_multiple_of=-8)
    # TRL parses dataset_kwargs given as JSON text (a YAML or the command line)
    cfg = SFTConfig(output_dir=str(tmp_path), dataset_kwargs='{"skip_prepare_dataset": true}')
    assert cfg.dataset_kwargs == {"skip_prepare_dataset": True}
    with caplog.at_level("WARNING", logger="hf_align.config"):
        GRPOConfig(output_dir=str(tmp_path), num_generations_eval=4)  # eval_temperature 0: greedy, one each
    assert any("num_generations_eval=4 with eval_temperature=0" in r.getMessage() for r in caplog.records)
