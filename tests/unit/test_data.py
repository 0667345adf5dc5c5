"""Tests for hf_align.data: tokenization masks, templates, loaders and their errors, SFT tokenization,
collators, and packing (checked on the tiny Qwen2: a packed sample's logits equal the sample run alone)."""

from __future__ import annotations

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
]
GOOD_ROW = {
    "math": MATH_ROW,
    "math500": {"problem": "p", "answer": "1"},
    "gsm8k": {"question": "q", "answer": "#### 1"},
    "qa": {"question": "q", "answer": "1"},
}
LOADERS = {
    "math": D.load_math,
    "math500": D.load_math500,
    "gsm8k": D.load_gsm8k,
    "qa": D.load_qa_jsonl,
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
