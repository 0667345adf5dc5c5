"""Tests for hf_align.data: tokenization masks, templates, loaders and their errors, SFT tokenization,
collators, and packing (checked on the tiny Qwen2: a packed sample's logits equal the sample run alone)."""

from __future__ import annotations

import copy
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch

from hf_align import data as D

REPO = Path(__file__).resolve().parents[2]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"
SAMPLES = REPO / "data" / "samples"


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows that are str are written verbatim (to make malformed lines), anything else as JSON."""
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# tokenize_prompt_and_output
# ---------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """a -> 1, b -> 2, ...; pad 0. Lets expected tensors be written by hand."""

    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) - ord("a") + 1 for c in t] for t in texts]}


def test_tokenize_prompt_and_output_hand_case():
    out = D.tokenize_prompt_and_output(["ab", "c"], ["c", "ded"], CharTokenizer())
    # full rows: [1, 2, 3, pad] and [3, 4, 5, 4]; L = 4 -> tensors of width 3
    assert set(out) == {"input_ids", "labels", "response_mask"}
    assert out["input_ids"].tolist() == [[1, 2, 3], [3, 4, 5]]
    assert out["labels"].tolist() == [[2, 3, 0], [4, 5, 4]]
    assert out["response_mask"].tolist() == [[False, True, False], [True, True, True]]
    assert out["response_mask"].dtype == torch.bool and out["input_ids"].dtype == torch.long


def test_tokenize_prompt_and_output_matches_naive_reference(tokenizer):
    prompts = ["What is 12 + 7?", "Hello", "A conversation between User and Assistant.", ""]
    outputs = [" The answer is 19.", " world! The quick brown fox", " ok", "<think> x </think>"]
    out = D.tokenize_prompt_and_output(prompts, outputs, tokenizer)
    fulls = [ids(tokenizer, p) + ids(tokenizer, o) for p, o in zip(prompts, outputs)]
    L = max(len(f) for f in fulls)
    assert out["input_ids"].shape == (4, L - 1)
    for b, (p, o) in enumerate(zip(prompts, outputs)):
        n_p, n_o = len(ids(tokenizer, p)), len(ids(tokenizer, o))
        full = fulls[b] + [tokenizer.pad_token_id] * (L - len(fulls[b]))
        is_out = [n_p <= i < n_p + n_o for i in range(L)]
        assert out["input_ids"][b].tolist() == full[:-1]
        assert out["labels"][b].tolist() == full[1:]
        assert out["response_mask"][b].tolist() == is_out[1:]
        assert int(out["response_mask"][b].sum()) == n_o - (1 if n_p == 0 else 0)


def test_tokenize_prompt_and_output_errors(tokenizer):
    with pytest.raises(ValueError, match="2 prompts but 1 outputs"):
        D.tokenize_prompt_and_output(["a", "b"], ["c"], tokenizer)
    no_pad = CharTokenizer()
    no_pad.pad_token_id = None
    with pytest.raises(ValueError, match="no pad token"):
        D.tokenize_prompt_and_output(["a"], ["b"], no_pad)


# ---------------------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------------------

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
    "Assistant first thinks about the reasoning process in the mind and then provides the User with the answer. "
    "The reasoning process is enclosed within <think> </think> and answer is enclosed within <answer> </answer> "
    "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\nAssistant: <think>"
)


def test_shipped_templates():
    assert D.PROMPTS_DIR == REPO / "hf_align" / "prompts"
    assert {"r1_zero", "question_only", "alpaca_sft"} <= set(D.available_prompt_templates())
    assert D.load_prompt_template("r1_zero") == R1_ZERO
    question_only = D.load_prompt_template("question_only")
    assert question_only.startswith("{question}") and "\\boxed{}" in question_only
    alpaca = D.load_prompt_template("alpaca_sft")
    assert alpaca.endswith("### Instruction:\n{instruction}\n\n### Response:\n{response}")


def test_format_prompt_keeps_latex_braces():
    question = "Find $\\frac{1}{2} + x$ where $\\{x\\} = {0}$ and {question} is literal."
    prompt = D.format_prompt(D.load_prompt_template("r1_zero"), question)
    assert prompt.endswith(f"User: {question}\nAssistant: <think>")
    assert prompt.count("{question}") == 1  # only the one inside the question itself
    alpaca = D.format_prompt(D.load_prompt_template("alpaca_sft"), "Add 2 and 3.")
    assert alpaca.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")


def test_load_prompt_template_from_path_and_missing(tmp_path):
    path = tmp_path / "mine.prompt"
    path.write_text("Q: {question}\nA:\n", encoding="utf-8")
    assert D.load_prompt_template(str(path)) == "Q: {question}\nA:"  # one trailing newline removed
    assert D.resolve_prompt_template("r1_zero") == R1_ZERO
    assert D.resolve_prompt_template("Q: {question}") == "Q: {question}"
    with pytest.raises(FileNotFoundError, match="r1_zero"):
        D.load_prompt_template("no_such_template")


# ---------------------------------------------------------------------------------------------------------
# Answer extraction and loaders
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("so $x = \\boxed{4}$.", "4"),
        ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("nested \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("escaped \\boxed{\\{1, 2\\}} and \\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("fbox \\boxed{1} then \\fbox{7}", "7"),
        ("space form $\\boxed 2$.", "2"),
        ("no box here", None),
        ("unclosed \\boxed{3", None),
    ],
)
def test_last_boxed_answer(solution, expected):
    assert D.last_boxed_answer(solution) == expected


def test_gsm8k_final_answer():
    assert D.gsm8k_final_answer("a\nb #### 1,234") == "1234"
    assert D.gsm8k_final_answer("x #### 3 #### 5 ") == "5"
    assert D.gsm8k_final_answer("no marker") is None
    assert D.gsm8k_final_answer("#### ") is None


MATH_ROW = {
    "problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?",
    "level": "Level 1",
    "type": "Prealgebra",
    "solution": "It is $\\boxed{1}$.",
    "unique_id": "train/prealgebra/1.json",
}


def test_load_math(tmp_path):
    with_answer = {**MATH_ROW, "answer": "1.0"}
    path = write_jsonl(tmp_path / "math.jsonl", [MATH_ROW, with_answer, ""])  # blank line ignored
    rows = D.load_math(path)
    assert rows[0] == {
        "question": MATH_ROW["problem"],
        "answer": "1",
        "solution": MATH_ROW["solution"],
        "subject": "Prealgebra",
        "level": "Level 1",
        "unique_id": "train/prealgebra/1.json",
    }
    assert rows[1]["answer"] == "1.0"  # a usable answer field wins over the boxed one
    assert D.load_math(path, max_rows=1) == rows[:1]


def test_load_math500_gsm8k_qa(tmp_path):
    m500 = {
        "problem": "p",
        "solution": "s",
        "answer": " 3 ",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "u",
    }
    rows = D.load_math500(write_jsonl(tmp_path / "m500.jsonl", [m500, {"problem": "q", "answer": 142.0}]))
    assert rows[0] == {
        "question": "p",
        "answer": "3",
        "solution": "s",
        "subject": "Algebra",
        "level": 2,
        "unique_id": "u",
    }
    assert rows[1] == {"question": "q", "answer": "142"}  # AMC stores answers as floats
    olympiad = D.load_math500(write_jsonl(tmp_path / "ob.jsonl", [{"problem": "q", "answer": ["9.6\n"]}]))
    assert olympiad[0]["answer"] == "9.6"

    gsm = {"question": "How many?", "answer": "1000 + 234 = <<1000+234=1234>>1234\n#### 1,234"}
    assert D.load_gsm8k(write_jsonl(tmp_path / "gsm.jsonl", [gsm])) == [
        {"question": "How many?", "answer": "1234", "solution": gsm["answer"]}
    ]
    qa = D.load_qa_jsonl(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "\\frac{1}{2}"}]))
    assert qa == [{"question": "q", "answer": "\\frac{1}{2}"}]


def test_load_dataset_rows_auto_detects_and_reads_folders(tmp_path):
    files = {
        "math": write_jsonl(tmp_path / "a.jsonl", [MATH_ROW]),
        "math500": write_jsonl(tmp_path / "b.jsonl", [{"problem": "p", "answer": "2"}]),
        "gsm8k": write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": "x\n#### 5"}]),
        "qa": write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "5"}]),
    }
    for kind, path in files.items():
        assert D.detect_kind(path) == kind
        assert D.load_dataset_rows(path) == D.load_dataset_rows(str(path), kind=kind)
    folder = tmp_path / "split_folder"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", [{"problem": "p", "answer": "7"}])
    assert D.load_dataset_rows(folder, split="test") == [{"question": "p", "answer": "7"}]
    with pytest.raises(ValueError, match="unknown dataset kind"):
        D.load_dataset_rows(files["qa"], kind="nope")
    with pytest.raises(D.DataError, match="cannot tell the dataset kind"):
        D.detect_kind(write_jsonl(tmp_path / "e.jsonl", [{"text": "x"}]))
    with pytest.raises(FileNotFoundError):
        D.load_math(tmp_path / "missing.jsonl")


def test_sample_files_load():
    assert [r["answer"] for r in D.load_math(SAMPLES / "math_sample.jsonl")] == [
        "17",
        "4",
        "\\frac{3}{4}",
        "\\{-3, 3\\}",
        "10",
        "2",
        "10",
        "1",
    ]
    assert [r["answer"] for r in D.load_gsm8k(SAMPLES / "gsm8k_sample.jsonl")] == ["26", "6", "5000", "6"]
    assert len(D.load_sft_rows(SAMPLES / "sft_sample.jsonl")) == 4
    assert len(D.load_sft_rows(SAMPLES / "chat_sample.jsonl")) == 3


@pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(), reason=f"shared datasets folder {SHARED_DATASETS} is absent"
)
def test_real_shared_datasets_load(caplog):
    math500 = D.load_dataset_rows(SHARED_DATASETS / "math500" / "test.jsonl")
    assert len(math500) == 500 and math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    # The last \boxed{} of each MATH test solution reproduces PRM800K's answer for all 500 shared problems.
    math_test = {r["unique_id"]: r for r in D.load_math(SHARED_DATASETS / "math", split="test")}
    assert len(math_test) == 5000
    assert all(math_test[r["unique_id"]]["answer"] == r["answer"] for r in math500)
    gsm = D.load_gsm8k(SHARED_DATASETS / "gsm8k" / "test.jsonl")
    assert len(gsm) == 1319 and gsm[0]["answer"] == "18"
    # Two MATH train solutions have an empty \boxed{}: raised by default, counted and located in skip mode.
    with pytest.raises(D.DataError, match=r"train.jsonl:5530: field 'solution'"):
        D.load_math(SHARED_DATASETS / "math" / "train.jsonl")
    with caplog.at_level(logging.WARNING, logger="hf_align.data"):
        train = D.load_math(SHARED_DATASETS / "math" / "train.jsonl", on_error="skip")
    assert len(train) == 7498
    assert "skipped 2 bad row(s)" in caplog.text and "train.jsonl:5532" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Error paths: every one names file:line and the field
# ---------------------------------------------------------------------------------------------------------

BAD_ROWS = [
    ("math", '{"problem": "p", "solution": ', "malformed JSON"),
    ("math", "[1, 2]", "expected a JSON object, got list"),
    ("math", {"problem": "p"}, "field 'solution' is missing"),
    ("math", {"problem": 3, "solution": "\\boxed{1}"}, "field 'problem' must be a string, got int"),
    ("math", {"problem": "p", "solution": "no box"}, "field 'solution' has no non-empty \\boxed"),
    ("math", {"problem": "p", "solution": "\\boxed{ }"}, "field 'solution' has no non-empty \\boxed"),
    ("math", {**MATH_ROW, "level": [1]}, "field 'level' must be str or int, got list"),
    (
        "math500",
        {"problem": "p"},
        "field 'answer' must be a string, a number or a list of strings, got missing",
    ),
    ("math500", {"problem": "p", "answer": True}, "field 'answer' must be a string"),
    ("math500", {"problem": "p", "answer": "  "}, "field 'answer' is empty"),
    ("math500", {"problem": "", "answer": "1"}, "field 'problem' is empty"),
    ("gsm8k", {"question": "q", "answer": "no final"}, "field 'answer' has no '#### <final answer>' line"),
    ("gsm8k", {"answer": "#### 1"}, "field 'question' is missing"),
    ("qa", {"question": "q", "answer": None}, "field 'answer' must be a string"),
    ("sft", {"prompt": "p"}, "field 'response' is missing"),
    ("sft", {"prompt": "p", "response": ""}, "field 'response' is empty"),
    ("sft", {"text": "x"}, "field 'messages' is missing"),
    ("sft", {"messages": "hi"}, "field 'messages' must be a non-empty list"),
    ("sft", {"messages": [{"role": "user"}]}, "messages[0]: field 'content' is missing"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "no non-empty assistant message"),
]
GOOD_ROW = {
    "math": MATH_ROW,
    "math500": {"problem": "p", "answer": "1"},
    "gsm8k": {"question": "q", "answer": "#### 1"},
    "qa": {"question": "q", "answer": "1"},
    "sft": {"prompt": "p", "response": "r"},
}
LOADERS = {
    "math": D.load_math,
    "math500": D.load_math500,
    "gsm8k": D.load_gsm8k,
    "qa": D.load_qa_jsonl,
    "sft": D.load_sft_rows,
}


@pytest.mark.parametrize("kind, bad, message", BAD_ROWS)
def test_bad_rows_raise_with_file_line_and_field(tmp_path, kind, bad, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW[kind], bad, GOOD_ROW[kind]])
    with pytest.raises(D.DataError) as excinfo:
        LOADERS[kind](path)
    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value).startswith(f"{path}:2: ")
    assert message in str(excinfo.value)


def test_skip_mode_counts_and_logs_once(tmp_path, caplog):
    rows = [GOOD_ROW["math"], "not json", {"problem": "p"}, GOOD_ROW["math"], [1], GOOD_ROW["math"]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="hf_align.data"):
        kept = D.load_math(path, on_error="skip")
    assert len(kept) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 3 bad row(s)" in text
    assert all(f"rows.jsonl:{n}" in text for n in (2, 3, 5))
    assert D.load_math(path, on_error="skip", max_rows=2) == kept[:2]
    with pytest.raises(ValueError, match="on_error"):
        D.load_math(path, on_error="ignore")


def test_hub_layout_folder_goes_through_datasets(tmp_path):
    """A local copy of a Hub dataset repo (parquet under data/) is read by the real `datasets.load_dataset`,
    the same code path as a Hub id; errors name the source, split and row."""
    datasets = pytest.importorskip("datasets")
    repo = tmp_path / "gsm8k_repo"
    (repo / "data").mkdir(parents=True)
    rows = [{"question": "q0", "answer": "work #### 1,000"}, {"question": "q1", "answer": "no marker"}]
    datasets.Dataset.from_list(rows).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(D.DataError, match=r"gsm8k_repo \(split test\) row 1: field 'answer'"):
        D.load_gsm8k(str(repo), split="test")
    assert D.load_gsm8k(str(repo), split="test", on_error="skip") == [
        {"question": "q0", "answer": "1000", "solution": "work #### 1,000"}
    ]


def test_write_and_convert_round_trip(tmp_path, monkeypatch, capsys):
    source = write_jsonl(tmp_path / "math.jsonl", [MATH_ROW, {**MATH_ROW, "solution": "\\boxed{x^{2}}"}])
    out = tmp_path / "out" / "qa.jsonl"
    assert D.convert_dataset(source, out, kind="math") == 2
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"question": MATH_ROW["problem"], "answer": "1"},
        {"question": MATH_ROW["problem"], "answer": "x^{2}"},
    ]
    assert D.load_dataset_rows(out) == lines  # auto-detected as qa
    # The thin script and `python -m hf_align.data convert` take the same arguments.
    out2 = tmp_path / "qa2.jsonl"
    argv = [
        "convert_dataset.py",
        "--input",
        str(source),
        "--kind",
        "math",
        "--output",
        str(out2),
        "--max-rows",
        "1",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as excinfo:
        runpy.run_path(str(REPO / "scripts" / "convert_dataset.py"), run_name="__main__")
    assert excinfo.value.code == 0
    assert out2.read_text(encoding="utf-8").count("\n") == 1
    assert D.main(["convert", "--input", str(source), "--output", str(out2)]) == 0
    assert D.main([]) == 2
    assert "wrote 2 rows" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# SFT rows and tokenization
# ---------------------------------------------------------------------------------------------------------


def test_load_sft_rows_formats_and_field_names(tmp_path):
    rows = [
        {"q": "What?", "a": "That."},
        {"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "x": 1}]},
    ]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    loaded = D.load_sft_rows(path, prompt_field="q", response_field="a", messages_field="conv")
    assert loaded == [
        {"prompt": "What?", "response": "That."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]


def test_tokenize_sft_example_plain(tokenizer):
    row = {"prompt": "What is 12 + 7?", "response": " The answer is 19."}
    ex = D.tokenize_sft_example(row, tokenizer, max_length=512)
    p, r = ids(tokenizer, row["prompt"]), ids(tokenizer, row["response"])
    assert ex["input_ids"] == p + r + [tokenizer.eos_token_id]
    assert ex["labels"] == [-100] * len(p) + r + [tokenizer.eos_token_id]
    assert ex["num_truncated"] == 0

    # Through a template, given by name or as text: the prompt is the formatted template.
    ex = D.tokenize_sft_example(row, tokenizer, max_length=512, prompt_template="r1_zero")
    p = ids(tokenizer, D.format_prompt(R1_ZERO, row["prompt"]))
    assert ex["input_ids"][: len(p)] == p and ex["labels"][: len(p)] == [-100] * len(p)
    assert ex == D.tokenize_sft_example(row, tokenizer, max_length=512, prompt_template=R1_ZERO)
    alpaca = D.tokenize_sft_example(row, tokenizer, max_length=512, prompt_template="alpaca_sft")
    prompt_text = tokenizer.decode(
        [t for t, lab in zip(alpaca["input_ids"], alpaca["labels"]) if lab == -100]
    )
    assert prompt_text.endswith("### Instruction:\nWhat is 12 + 7?\n\n### Response:\n")
    trained = tokenizer.decode([lab for lab in alpaca["labels"] if lab != -100])
    assert trained == " The answer is 19.<|im_end|>"

    with pytest.raises(ValueError, match="use_chat_template=True"):
        D.tokenize_sft_example({"messages": []}, tokenizer, max_length=512)


def test_tokenize_sft_example_chat_trains_only_assistant_tokens(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    ex = D.tokenize_sft_example({"messages": messages}, tokenizer, max_length=512, use_chat_template=True)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"] == list(full) and len(ex["labels"]) == len(full)
    trained = [lab for lab in ex["labels"] if lab != -100]
    # Hand count: each assistant turn trains its content tokens plus its <|im_end|>; nothing else.
    assert len(trained) == len(ids(tokenizer, "Blue.")) + 1 + len(ids(tokenizer, "Green.")) + 1
    assert tokenizer.decode(trained) == "Blue.<|im_end|>Green.<|im_end|>"
    kept = [i for i, lab in enumerate(ex["labels"]) if lab != -100]
    assert all(ex["labels"][i] == ex["input_ids"][i] for i in kept)  # unshifted

    # A prompt/response row is wrapped as one user turn and one assistant turn.
    ex = D.tokenize_sft_example({"prompt": "hi", "response": "yes"}, tokenizer, 512, use_chat_template=True)
    assert tokenizer.decode([lab for lab in ex["labels"] if lab != -100]) == "yes<|im_end|>"


def test_chat_template_without_generation_markers_is_refused(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(ValueError, match="generation"):
        D.tokenize_sft_example(row, plain, max_length=64, use_chat_template=True)
    with pytest.raises(ValueError, match="generation"):
        D.tokenize_sft_dataset([row], plain, max_length=64, use_chat_template=True)


def test_truncation_and_drop_counts(tokenizer, caplog):
    row = {"prompt": "What is 12 + 7?", "response": " The answer is 19."}
    n_prompt = len(ids(tokenizer, row["prompt"]))
    n_full = n_prompt + len(ids(tokenizer, row["response"])) + 1
    cut = D.tokenize_sft_example(row, tokenizer, max_length=n_prompt + 2)
    assert cut["num_truncated"] == 1 and len(cut["input_ids"]) == len(cut["labels"]) == n_prompt + 2
    assert cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:]
    assert D.tokenize_sft_example(row, tokenizer, max_length=n_full)["num_truncated"] == 0
    assert D.tokenize_sft_example(row, tokenizer, max_length=n_prompt) is None  # no response token fits

    long_prompt = {"prompt": "Hello world! " * 20, "response": " ok"}
    rows = [row, long_prompt, row]
    with caplog.at_level(logging.INFO, logger="hf_align.data"):
        examples, stats = D.tokenize_sft_dataset(rows, tokenizer, max_length=n_prompt + 2)
    assert stats == {"truncated": 2, "dropped": 1} and len(examples) == 2
    assert "2 truncated" in caplog.text and "1 dropped" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# Collators and packing
# ---------------------------------------------------------------------------------------------------------


def test_sft_collator():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "num_truncated": 0},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = D.SFTCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert D.SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(features)["input_ids"].shape == (2, 4)


def test_pack_examples_layout():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},  # first label trainable in isolation: masked when packed
        {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, 8, 9]},
        {"input_ids": [10], "labels": [10]},
    ]
    rows = D.pack_examples(examples, max_length=6)
    assert rows == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8, 9, 10], "labels": [-100, -100, 8, 9, -100], "position_ids": [0, 1, 2, 3, 0]},
    ]
    with pytest.raises(ValueError, match="max_length"):
        D.pack_examples(examples, max_length=3)

    batch = D.PackedCollator(pad_token_id=0, pad_to_multiple_of=4)(
        rows[:1] + [rows[1] | {"input_ids": [6, 7]}]
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # padding continues the last sample
    flat = D.PackedCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert flat["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, -100, 8, 9, -100]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(tokenizer, tiny_model, attn_implementation):
    tiny_model.config._attn_implementation = attn_implementation
    rows = [
        {"prompt": "What is 12 + 7?", "response": " The answer is 19."},
        {"prompt": "Hello", "response": " world!"},
        {"prompt": "<think> reasoning </think>", "response": " <answer> 42 </answer>"},
        {"prompt": "User: Solve for x: 2x + 3 = 11.", "response": " x = 4."},
    ]
    examples, _ = D.tokenize_sft_dataset(rows, tokenizer, max_length=64)
    lengths = [len(e["input_ids"]) for e in examples]
    packed = D.pack_examples(examples, max_length=sum(lengths[:3]))
    assert len(packed) == 2  # three samples in the first row, one (plus padding) in the second
    batch = D.PackedCollator(pad_token_id=tokenizer.pad_token_id)(packed)
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers skips the packed-sequence detection (module docstring).
        logits = tiny_model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        alone = [
            tiny_model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in examples
        ]
    spans = [(0, 0, lengths[0]), (0, lengths[0], lengths[0] + lengths[1])]
    spans += [(0, lengths[0] + lengths[1], sum(lengths[:3])), (1, 0, lengths[3])]
    for (row, start, end), expected in zip(spans, alone):
        torch.testing.assert_close(logits[row, start:end], expected, atol=1e-5, rtol=0)

    # flatten=True: the whole batch as one row, the layout flash attention needs; same logits again.
    flat = D.PackedCollator(pad_token_id=tokenizer.pad_token_id, flatten=True)(packed)
    assert flat["input_ids"].shape == (1, sum(lengths))
    with torch.no_grad():
        flat_logits = tiny_model(
            input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False
        ).logits
    torch.testing.assert_close(flat_logits[0, sum(lengths[:3]) :], alone[3], atol=1e-5, rtol=0)
    torch.testing.assert_close(flat_logits[0, : lengths[0]], alone[0], atol=1e-5, rtol=0)

    # The shifted targets of the packed batch are exactly the union of each example's shifted targets.
    targets = batch["labels"][:, 1:]  # (B, T-1)
    assert int((targets != -100).sum()) == sum(sum(lab != -100 for lab in e["labels"][1:]) for e in examples)
