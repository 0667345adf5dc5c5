"""hf_align.formats: TRL's dataset formats -> token ids and loss masks, packing, errors; config validation."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_align.config import DPOConfig, RewardConfig, SFTConfig
from hf_align.data import DataError
from hf_align.formats import (
    SFTCollator,
    check_row,
    drop_bad_rows,
    extract_prompt,
    pack_bfd,
    prepare_preference_dataset,
    prepare_sft_dataset,
    truncate_pair,
)

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def sft_args(tmp_path, **kw) -> SFTConfig:
    return SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_pack_bfd_matches_trl_documented_example():
    # TRL's pack_dataset docstring, seq_length=4: bfd truncates, bfd_split splits the overflow.
    batch = {"input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]]}
    batch["labels"] = batch["input_ids"]
    out = pack_bfd(batch, seq_length=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]]
    assert out["seq_lengths"] == [[4], [3, 1], [2]]
    out = pack_bfd(batch, seq_length=4, split=True)
    assert out["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]]
    assert out["seq_lengths"] == [[4], [3, 1], [2, 1]]


def test_sft_formats_tokens_and_masks(tmp_path, tokenizer):
    eos = tokenizer.eos_token
    rows = [{"prompt": "What is 12 + 7?", "completion": " 19"}]
    (ex,) = prepare_sft_dataset(
        rows, tokenizer, sft_args(tmp_path), packing=False, completion_only_loss=True, name="t"
    )
    full, prompt = ids(tokenizer, "What is 12 + 7? 19" + eos), ids(tokenizer, "What is 12 + 7?")
    assert ex["input_ids"] == full and full[-1] == tokenizer.eos_token_id
    assert ex["labels"] == [-100] * len(prompt) + full[len(prompt) :]
    (ex,) = prepare_sft_dataset(
        rows, tokenizer, sft_args(tmp_path), packing=False, completion_only_loss=False, name="t"
    )
    assert ex["labels"] == full
    (ex,) = prepare_sft_dataset([{"text": "Hello world!"}], tokenizer, sft_args(tmp_path), packing=False,
                                completion_only_loss=False, name="t")  # fmt: skip
    assert ex["input_ids"] == ex["labels"] == ids(tokenizer, "Hello world!" + eos)
    # Conversational: chat template; with assistant_only_loss only the {% generation %} span is trained.
    conv = [{"messages": [U("hi"), A("Hello world!")]}]
    args = sft_args(tmp_path, assistant_only_loss=True)
    (ex,) = prepare_sft_dataset(conv, tokenizer, args, packing=False, completion_only_loss=False, name="t")
    text = tokenizer.apply_chat_template(conv[0]["messages"], tokenize=False)
    assert ex["input_ids"] == ids(tokenizer, text)
    trained = tokenizer.decode([t for t in ex["labels"] if t != -100])
    assert trained == "Hello world!<|im_end|>"


def test_sft_truncation_and_fully_masked_rows_dropped(tmp_path, tokenizer):
    rows = [{"prompt": "What is 12 + 7? " * 4, "completion": " 19"}, {"prompt": "Hi", "completion": " yes"}]
    n_prompt = len(ids(tokenizer, rows[0]["prompt"]))
    args = sft_args(tmp_path, max_length=n_prompt - 1)
    out = prepare_sft_dataset(rows, tokenizer, args, packing=False, completion_only_loss=True, name="t")
    assert len(out) == 1 and out[0]["input_ids"][:1] == ids(tokenizer, "Hi")[:1]
    args = sft_args(tmp_path, max_length=5, truncation_mode="keep_end")
    out = prepare_sft_dataset(rows, tokenizer, args, packing=False, completion_only_loss=True, name="t")
    assert all(len(r["input_ids"]) <= 5 for r in out) and out[0]["input_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_and_padding_free_never_attend_across_samples(tmp_path, tokenizer, tiny_model, attn_implementation,
                                                             batch_size):  # fmt: skip
    tiny_model.config._attn_implementation = attn_implementation
    texts = ["What is 12 + 7? The answer is 19.", "Hello world!", "<think> reasoning </think> <answer> 42",
             "User: Solve for x: 2x + 3 = 11.", "cat dog", "red blue green yes no"]  # fmt: skip
    rows = [{"text": t} for t in texts]
    args = sft_args(tmp_path, max_length=24, packing=True)
    packed = prepare_sft_dataset(rows, tokenizer, args, packing=True, completion_only_loss=False, name="t")
    assert len(packed) >= batch_size and max(len(r["seq_lengths"]) for r in packed) > 1
    features = [packed[i] for i in range(batch_size)]
    batch = SFTCollator(tokenizer.pad_token_id, padding_free=True)(features)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits[0]
    lo, n_samples = 0, 0
    for f in features:
        for n in f["seq_lengths"]:
            sample = batch["input_ids"][0, lo : lo + n]
            with torch.no_grad():
                alone = tiny_model(input_ids=sample[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[lo : lo + n], alone, atol=1e-5, rtol=0)
            assert batch["labels"][0, lo] == -100  # nothing is predicted across a sample boundary
            lo, n_samples = lo + n, n_samples + 1
    assert lo == batch["input_ids"].shape[1] and n_samples > batch_size


def test_preference_formats(tmp_path, tokenizer):
    eos = tokenizer.eos_token
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    explicit = {"prompt": "What is 12 + 7?", "chosen": " 19", "rejected": " 21"}
    implicit = {"chosen": "What is 12 + 7? 19", "rejected": "What is 12 + 7? 21"}
    assert extract_prompt(implicit["chosen"], implicit["rejected"])["prompt"] == "What is 12 + 7?"
    (a,) = prepare_preference_dataset([explicit], tokenizer, args, name="t")
    (b,) = prepare_preference_dataset([implicit], tokenizer, args, name="t")
    assert a == b
    assert a["prompt_ids"] + a["chosen_ids"] == ids(tokenizer, "What is 12 + 7? 19" + eos)
    conv = {"chosen": [U("hi"), A("yes")], "rejected": [U("hi"), A("no")]}
    conv_explicit = {"prompt": [U("hi")], "chosen": [A("yes")], "rejected": [A("no")]}
    (c,) = prepare_preference_dataset([conv], tokenizer, args, name="t")
    (d,) = prepare_preference_dataset([conv_explicit], tokenizer, args, name="t")
    assert c == d
    assert (
        c["prompt_ids"] == tokenizer.apply_chat_template([U("hi")], add_generation_prompt=True)["input_ids"]
    )
    assert tokenizer.decode(c["chosen_ids"]) == "yes<|im_end|>\n"
    # reward model: whole prompt + answer sequences
    r_args = RewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    (r,) = prepare_preference_dataset([explicit], tokenizer, r_args, name="t", full_sequences=True)
    assert r["chosen_ids"] == ids(tokenizer, "What is 12 + 7? 19" + eos)


def test_truncate_pair():
    assert truncate_pair([1, 2, 3], [4, 5, 6], 4, "keep_start") == ([1, 2, 3], [4])
    assert truncate_pair([1, 2, 3], [4, 5, 6], 4, "keep_end") == ([3], [4, 5, 6])
    assert truncate_pair([1, 2], [4, 5, 6], 2, "keep_end") == ([], [5, 6])
    assert truncate_pair([1, 2], [4], None, "keep_start") == ([1, 2], [4])


@pytest.mark.parametrize("as_type", ["list", "dataset"])
def test_bad_row_names_row_and_field(tmp_path, tokenizer, as_type):
    rows = [
        {"prompt": "a", "completion": " b"},
        {"prompt": "a", "completion": " b"},
        {"prompt": "a", "completion": None},
    ]
    data = rows if as_type == "list" else datasets.Dataset.from_list(rows)
    with pytest.raises(DataError, match=r"train dataset row 2: field 'completion' is missing"):
        prepare_sft_dataset(
            data, tokenizer, sft_args(tmp_path), packing=False, completion_only_loss=True, name="train"
        )
    pairs = [
        {"prompt": "a", "chosen": " b", "rejected": " c"},
        {"prompt": "a", "chosen": 3, "rejected": " c"},
    ]
    data = pairs if as_type == "list" else [pairs[0], {"prompt": "a", "chosen": [{"x": 1}], "rejected": " c"}]
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(DataError, match=r"train dataset row 1: field 'chosen"):
        prepare_preference_dataset(data, tokenizer, args, name="train")
    kept = drop_bad_rows(datasets.Dataset.from_list(rows), "sft")
    assert len(kept) == 2


def test_config_errors_at_construction(tmp_path):
    base = {"output_dir": str(tmp_path), "use_cpu": True}
    assert DPOConfig(**base, loss_type="sigmoid").loss_type == ["sigmoid"]
    with pytest.raises(ValueError, match=r"loss_type='nope' is not supported; choose one of \[.*'sigmoid'"):
        DPOConfig(**base, loss_type=["sigmoid", "nope"])
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2 loss_type"):
        DPOConfig(**base, loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="packing_strategy='wrapped' is not supported"):
        SFTConfig(**base, packing=True, packing_strategy="wrapped")
    with pytest.raises(ValueError, match="packing needs max_length"):
        SFTConfig(**base, packing=True, max_length=None)
    with pytest.raises(ValueError, match="truncation_mode"):
        DPOConfig(**base, truncation_mode="middle")
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        RewardConfig(**base, center_rewards_coefficient=-1.0)
    # TRL's defaults
    sft, dpo, rm = SFTConfig(**base), DPOConfig(**base), RewardConfig(**base)
    assert (sft.learning_rate, dpo.learning_rate, rm.learning_rate) == (2e-5, 1e-6, 1e-4)
    assert sft.logging_steps == 10 and sft.gradient_checkpointing and sft.max_length == 1024
    assert sft.completion_only_loss is None and not sft.assistant_only_loss and sft.packing_strategy == "bfd"
    assert rm.center_rewards_coefficient is None and dpo.beta == 0.1 and dpo.truncation_mode == "keep_start"


def test_an_empty_string_prompt_with_message_answers_is_a_mix_named_by_row():
    row = {
        "prompt": "",
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    with pytest.raises(DataError, match="row 3: mixes strings and message lists"):
        check_row(row, "preference", "train dataset row 3")
    check_row(
        {"prompt": "", "chosen": "a", "rejected": "b"}, "preference", "train dataset row 3"
    )  # all strings
