"""Data: prompt templates, question/answer dataset loaders, tokenization with response masks.

Choices:
- Prompt and response are tokenized separately (no special tokens added) and concatenated, so the boundary
  between what is conditioned on and what is trained is exact in token space (the seam's tokens can differ
  from tokenizing the joined string; generation sees the same prompt ids). The tensors come SHIFTED by one,
  as ``logprobs.get_response_log_probs`` takes them; TRL-format data is prepared in ``hf_align/formats.py``.
- Loaders return ``list[dict]`` rows with ``question`` and ``answer`` (str), plus ``subject``, ``level``,
  ``unique_id`` and ``solution`` when the source has them. MATH's answer is the last ``\\boxed{...}`` of the
  solution (``rewards.extract.extract_boxed``: it reproduces all 500 MATH-500 answers); GSM8K's is the text
  after ``####`` without thousands separators. Two MATH train solutions (lines 5530, 5532) box nothing.
- Bad data is never dropped silently: a malformed line, a non-object row, a missing, mistyped or empty field
  raises ``DataError`` naming ``file:line`` (or Hub id, split and row) and the field; ``on_error="skip"``
  skips such rows, counted and logged once with the first few locations.
- Templates are filled with ``str.replace`` (never ``str.format``): MATH questions are full of LaTeX braces.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from hf_align.rewards.extract import extract_boxed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
IGNORE_INDEX = -100
OnError = Literal["raise", "skip"]
# The MATH answer of a solution, under the name tests/unit/test_grader_math_golds.py imports.
last_boxed_answer = extract_boxed


class DataError(ValueError):
    """A data row that cannot be used; the message names where it is (file:line or Hub row) and the field."""


def available_prompt_templates() -> list[str]:
    """Names of the templates shipped in ``hf_align/prompts`` (file stems)."""
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.prompt"))


def load_prompt_template(name_or_path: str) -> str:
    """Template text from a bare name (``"r1_zero"`` -> ``hf_align/prompts/r1_zero.prompt``) or a file path.

    One trailing newline, which editors add to files, is removed: ``r1_zero`` must end exactly at
    ``<think>``. A template that really needs a final newline can end with two.
    """
    is_name = "/" not in name_or_path and "\\" not in name_or_path and not name_or_path.endswith(".prompt")
    path = PROMPTS_DIR / f"{name_or_path}.prompt" if is_name else Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt template {name_or_path!r} not found (looked for {path}); "
            f"available names: {', '.join(available_prompt_templates()) or 'none'}, or pass a file path"
        )
    text = path.read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def resolve_prompt_template(template_or_name: str) -> str:
    """Template text as is if it has a ``{question}`` / ``{instruction}`` placeholder, else load it by name/path."""
    if "{question}" in template_or_name or "{instruction}" in template_or_name:
        return template_or_name
    return load_prompt_template(template_or_name)


def format_prompt(template: str, question: str) -> str:
    """Fill ``{question}`` (and ``{instruction}``) with ``question``, by plain replacement.

    For a training template holding ``{response}`` (e.g. ``alpaca_sft``), only the text before ``{response}``
    is returned: that is the prompt a model is asked to continue.
    """
    prefix = template.partition("{response}")[0]
    return prefix.replace("{question}", question).replace("{instruction}", question)


def tokenize_prompt_and_output(
    prompt_strs: list[str], output_strs: list[str], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Tokenize prompt and output separately, concatenate, right-pad, and shift by one.

    Returns ``input_ids``, ``labels`` (long) and ``response_mask`` (bool), each (B, L - 1) with
    L = max_b (len(prompt_ids_b) + len(output_ids_b)): ``input_ids = full[:, :-1]``, ``labels = full[:, 1:]``,
    ``response_mask[b, t]`` true iff ``labels[b, t]`` is an output token (not prompt, not padding).
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"got {len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if not prompt_strs:
        raise ValueError("tokenize_prompt_and_output needs at least one (prompt, output) pair")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to eos) first")
    prompt_ids = tokenizer(list(prompt_strs), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    out = build_shifted_sequences(prompt_ids, output_ids, tokenizer.pad_token_id)
    return {k: out[k] for k in ("input_ids", "labels", "response_mask")}


def build_shifted_sequences(
    prompt_ids: list[list[int]], output_ids: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate token ids, right-pad with ``pad_token_id`` and shift by one.

    Returns ``input_ids``, ``labels``, ``response_mask`` (bool) and ``attention_mask`` (long), each (B, L - 1),
    with the conventions of ``tokenize_prompt_and_output``. GRPO uses it on the exact ids a rollout engine
    sampled (re-tokenizing the text could give other ids).
    """
    rows = [torch.tensor([*p, *o], dtype=torch.long) for p, o in zip(prompt_ids, output_ids)]
    full_BL = pad_sequence(rows, batch_first=True, padding_value=pad_token_id)
    position_L = torch.arange(full_BL.shape[1])
    is_real_BL = position_L < torch.tensor([len(r) for r in rows])[:, None]
    is_output_BL = is_real_BL & (position_L >= torch.tensor([len(p) for p in prompt_ids])[:, None])
    return {
        "input_ids": full_BL[:, :-1],  # (B, L-1)
        "labels": full_BL[:, 1:],  # (B, L-1): token predicted at each position
        "response_mask": is_output_BL[:, 1:],  # (B, L-1)
        "attention_mask": is_real_BL[:, :-1].long(),  # (B, L-1)
    }


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            loc = f"{path}:{lineno}"
            try:
                yield loc, json.loads(line)
            except json.JSONDecodeError as e:
                yield loc, DataError(f"{loc}: malformed JSON ({e.msg} at column {e.colno})")


def _iter_json_file(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a .json file holding one JSON array (``file[i]`` locations), else of JSON lines (``file:line``).
    A broken array cannot be split into rows, so it raises even where bad rows are skipped."""
    with path.open(encoding="utf-8") as f:
        is_array = path.suffix == ".json" and f.read(4096).lstrip().startswith("[")
    if not is_array:
        yield from _iter_jsonl(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON array ({e.msg} at column {e.colno})") from e
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def _iter_hub(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    # "openai/gsm8k:main" selects a config: ':' cannot appear in a Hub repo id.
    repo_id, _, config = dataset_id.partition(":")
    for index, row in enumerate(datasets.load_dataset(repo_id, config or None, split=split)):
        yield f"{dataset_id} (split {split}) row {index}", row


def iter_source_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` from a local jsonl file (or .json: JSON lines or one array), a folder holding
    ``<split>.jsonl``, a local copy of a Hub dataset repo (read by ``datasets``), or a Hub id. A line that is not
    valid JSON is yielded as a ``DataError`` in place of the row, so the caller decides whether to raise or skip it.
    """
    local = isinstance(source, Path) or source.startswith(("/", "./", "../", "~"))
    if not (local or source.endswith((".jsonl", ".json")) or Path(source).exists()):
        yield from _iter_hub(str(source), split)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / f"{split}.jsonl").is_file():
            # A downloaded Hub repo (parquet / arrow / csv files): `datasets` reads it exactly as from the Hub.
            yield from _iter_hub(str(path), split)
            return
        path = path / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    yield from _iter_json_file(path)


def _load_rows(
    convert: Callable[[dict, str], dict],
    source: str | Path,
    split: str = "train",
    on_error: OnError = "raise",
    max_rows: int | None = None,
) -> list[dict]:
    """Run ``convert`` on each row; raise or skip-and-count the rows it rejects."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    rows: list[dict] = []
    bad: list[str] = []
    for loc, raw in iter_source_rows(source, split):
        if max_rows is not None and len(rows) >= max_rows:
            break
        try:
            if isinstance(raw, DataError):
                raise raw
            if not isinstance(raw, dict):
                raise DataError(f"{loc}: expected a JSON object, got {type(raw).__name__}")
            rows.append(convert(raw, loc))
        except DataError as e:
            if on_error == "raise":
                raise
            bad.append(str(e))
    if bad:
        first = " | ".join(bad[:5])
        logger.warning("%s: skipped %d bad row(s) (on_error='skip'); first: %s", source, len(bad), first)
    return rows


def _require_str(row: dict, field: str, loc: str) -> str:
    if row.get(field) is None:
        raise DataError(f"{loc}: field {field!r} is missing")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{loc}: field {field!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{loc}: field {field!r} is empty")
    return value


def _answer_str(value: Any, field: str, loc: str) -> str:
    """An answer as a stripped string. Numbers (AMC's 142.0) and lists of strings (OlympiadBench) are accepted."""
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN / Infinity: no gold "nan"
        raise DataError(f"{loc}: field {field!r} is {value}, not an answer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ", ".join(v.strip() for v in value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{loc}: field {field!r} must be a string, a number or a list of strings, got {what}")
    if not str(value).strip():
        raise DataError(f"{loc}: field {field!r} is empty")
    return str(value).strip()


# Optional fields of MATH-like rows: (source field, our field, accepted types). MATH calls the subject "type";
# its level reads "Level 3", MATH-500's is 3.
_METADATA = [
    ("solution", "solution", (str,)),
    ("subject", "subject", (str,)),
    ("type", "subject", (str,)),
    ("level", "level", (str, int)),
    ("unique_id", "unique_id", (str,)),
]


def _with_metadata(row: dict, out: dict, loc: str) -> dict:
    """``out`` plus the ``_METADATA`` fields ``row`` has, type-checked."""
    for src, dst, types in _METADATA:
        if row.get(src) is None or dst in out:
            continue
        if not isinstance(row[src], types) or isinstance(row[src], bool):
            names = " or ".join(t.__name__ for t in types)
            raise DataError(f"{loc}: field {src!r} must be {names}, got {type(row[src]).__name__}")
        out[dst] = row[src]
    return out


def _convert_answered(question_field: str, row: dict, loc: str) -> dict:
    """A row that states its answer: MATH-500 (and AIME / AMC / OlympiadBench files), or our qa jsonl."""
    question = _require_str(row, question_field, loc)
    return _with_metadata(
        row, {"question": question, "answer": _answer_str(row.get("answer"), "answer", loc)}, loc
    )


def _convert_math(row: dict, loc: str) -> dict:
    if row.get("answer") not in (None, ""):
        return _convert_answered("problem", row, loc)
    question = _require_str(row, "problem", loc)
    answer = last_boxed_answer(_require_str(row, "solution", loc))
    if not answer:
        raise DataError(f"{loc}: field 'solution' has no non-empty \\boxed{{...}} answer")
    return _with_metadata(row, {"question": question, "answer": answer}, loc)


def gsm8k_final_answer(solution: str) -> str | None:
    """The text after the last ``####`` of a GSM8K solution, thousands separators removed; None if absent."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "") or None


def _convert_gsm8k(row: dict, loc: str) -> dict:
    question = _require_str(row, "question", loc)
    solution = _require_str(row, "answer", loc)
    answer = gsm8k_final_answer(solution)
    if answer is None:
        raise DataError(f"{loc}: field 'answer' has no '#### <final answer>' line")
    return {"question": question, "answer": answer, "solution": solution}


# Each loader: (source, split, on_error, max_rows) -> rows; `source` as in iter_source_rows.
load_math = partial(_load_rows, _convert_math)  # MATH: answer = last \boxed{} of the solution
load_gsm8k = partial(_load_rows, _convert_gsm8k)  # answer = text after ####, solution = the worked answer
load_qa_jsonl = partial(_load_rows, partial(_convert_answered, "question"))  # {"question", "answer"} rows


def load_math500(
    source: str | Path, split: str = "test", on_error: OnError = "raise", max_rows: int | None = None
) -> list[dict]:
    """Rows with ``problem`` and ``answer`` (MATH-500; also the answer-only AIME / AMC / OlympiadBench files)."""
    return _load_rows(partial(_convert_answered, "problem"), source, split, on_error, max_rows)


DatasetKind = Literal["auto", "math", "math500", "gsm8k", "qa"]
_LOADERS: dict[str, Callable[..., list[dict]]] = {
    "math": load_math,
    "math500": load_math500,
    "gsm8k": load_gsm8k,
    "qa": load_qa_jsonl,
}
# Checked in order on the first JSON object of a source; the first predicate that holds names its kind.
_KIND_DETECTORS: list[tuple[Callable[[dict], bool], str]] = [
    (lambda r: "problem" in r and r.get("answer") not in (None, ""), "math500"),
    (lambda r: "problem" in r and "solution" in r, "math"),
    (lambda r: "question" in r and isinstance(r.get("answer"), str) and "####" in r["answer"], "gsm8k"),
    (lambda r: "question" in r and "answer" in r, "qa"),
]


def detect_kind(source: str | Path, split: str = "train") -> str:
    """Dataset kind of ``source`` from the fields of its first JSON object row."""
    for loc, raw in iter_source_rows(source, split):
        if isinstance(raw, dict):
            for matches, kind in _KIND_DETECTORS:
                if matches(raw):
                    return kind
            raise DataError(
                f"{loc}: cannot tell the dataset kind from fields {sorted(raw)}; pass kind= one of {sorted(_LOADERS)}"
            )
    raise DataError(f"{source}: no JSON object row found to detect the dataset kind from")


def load_dataset_rows(
    source: str | Path,
    kind: DatasetKind = "auto",
    split: str = "train",
    on_error: OnError = "raise",
    max_rows: int | None = None,
) -> list[dict]:
    """Load question/answer rows of any supported ``kind``; ``"auto"`` detects it from the first row's fields."""
    if kind == "auto":
        kind = detect_kind(source, split)
        logger.info("%s: detected dataset kind %r", source, kind)
    if kind not in _LOADERS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose auto or one of {sorted(_LOADERS)}")
    return _LOADERS[kind](source, split=split, on_error=on_error, max_rows=max_rows)


def convert_dataset(
    input_source: str | Path, output_path: str | Path, kind: DatasetKind = "auto", **options
) -> int:
    """``load_dataset_rows(input_source, kind, **options)`` written as question/answer jsonl; returns the count."""
    rows = load_dataset_rows(input_source, kind=kind, **options)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ("question", "answer")}, ensure_ascii=False) + "\n")
    logger.info("wrote %d rows to %s", len(rows), output_path)
    return len(rows)


def convert_main(argv: list[str] | None = None) -> int:
    """Convert a MATH / MATH-500 / GSM8K / QA source (jsonl or Hub id) to question/answer jsonl."""
    parser = argparse.ArgumentParser(description=convert_main.__doc__)
    parser.add_argument("--input", required=True, help="jsonl file, folder with <split>.jsonl, or Hub id")
    parser.add_argument("--output", required=True, help="where to write the question/answer jsonl")
    parser.add_argument("--kind", default="auto", choices=["auto", *_LOADERS], help="input format")
    parser.add_argument("--split", default="train", help="split (Hub ids and folders)")
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="for bad rows")
    parser.add_argument("--max-rows", type=int, default=None, help="keep at most this many rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = {"split": args.split, "on_error": args.on_error, "max_rows": args.max_rows}
    count = convert_dataset(args.input, args.output, args.kind, **options)
    print(f"wrote {count} rows to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_align.data convert --input X --kind math --output Y.jsonl``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["convert"]:
        print("usage: python -m hf_align.data convert [options]  (try: convert --help)")
        return 2
    return convert_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
