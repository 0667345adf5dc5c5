"""Data: prompt templates, dataset loaders, tokenization with response masks, collators and packing.

Choices:
- Prompt and response are tokenized separately (no special tokens added) and concatenated, so the
  boundary between what is conditioned on and what is trained is exact in token space. The price is that
  the tokens at the seam can differ from tokenizing the joined string; generation sees the same prompt ids.
- Two label conventions, each named where it is produced:
  * ``tokenize_prompt_and_output`` returns SHIFTED tensors: ``input_ids = full[:, :-1]``,
    ``labels = full[:, 1:]``, so ``labels[:, t]`` is the token predicted at position t, and a bool
    ``response_mask`` marks labels that are output tokens. This is what ``logprobs.get_response_log_probs``
    takes for RL / DPO style losses.
  * The SFT path (``tokenize_sft_example``, ``SFTCollator``, ``pack_examples``, ``PackedCollator``) returns
    UNSHIFTED ``labels`` aligned with ``input_ids`` (Hugging Face convention), ``-100`` on every token that is
    not trained (prompt, padding, non-assistant turns). The trainer shifts: it predicts ``labels[t + 1]``
    from ``input_ids[: t + 1]``; ``labels[0]`` is never a target.
- Packing is next-fit in data order. Every packed sample restarts ``position_ids`` at 0 and its first label
  is set to -100 (in a lone example that label is never a target either, so packing changes no loss term).
  No attention mask is returned: transformers (5.x, ``masking_utils.find_packed_sequence_indices``) turns the
  position-id restarts into a block-diagonal causal mask for the sdpa, eager and flex kernels. Flash
  attention derives ``cu_seqlens`` from them only for a batch of ONE row (``_is_packed_sequence``), so
  ``PackedCollator(flatten=True)`` concatenates a batch into one row. Detection only runs without a KV cache:
  call the model with ``use_cache=False`` (as ``logprobs.get_response_log_probs`` does). With the config's
  default ``use_cache=True`` the model builds an empty cache, skips the detection and attends across
  samples, in train mode too. ``tests/unit/test_data.py`` checks per-sample logits equal the unpacked ones.
- Dataset loaders return plain ``list[dict]`` rows with ``question`` and ``answer`` (str), plus ``subject``,
  ``level``, ``unique_id`` and ``solution`` when the source has them. MATH's answer is the content of the
  last ``\\boxed{...}`` / ``\\fbox{...}`` of the solution (balanced braces, escaped braces skipped; this
  reproduces all 500 MATH-500 answers from their MATH solutions); GSM8K's is the text after ``####``
  with thousands separators removed. Two MATH train solutions (lines 5530 and 5532) box an empty answer:
  they raise by default and are the two rows ``on_error="skip"`` drops from MATH train.
- Bad data is never dropped silently: a malformed line, a non-object row, a missing, mistyped or empty
  field raises ``DataError`` naming ``file:line`` (or Hub id, split and row index) and the field. With
  ``on_error="skip"`` such rows are skipped, counted and logged once with the first few locations.
- Templates are filled with ``str.replace`` (never ``str.format``): MATH questions are full of LaTeX braces.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
IGNORE_INDEX = -100
OnError = Literal["raise", "skip"]
_MAX_LOGGED_LOCATIONS = 5
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


class DataError(ValueError):
    """A data row that cannot be used; the message names where it is (file:line or Hub row) and the field."""


# ---------------------------------------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------------------------------------


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


def _split_template(template: str) -> tuple[str, str]:
    """(text before ``{response}``, text after it); the whole template and "" when there is no ``{response}``."""
    prefix, _, suffix = template.partition("{response}")
    return prefix, suffix


def format_prompt(template: str, question: str) -> str:
    """Fill ``{question}`` (and ``{instruction}``) with ``question``, by plain replacement.

    For a training template holding ``{response}`` (e.g. ``alpaca_sft``), only the text before ``{response}``
    is returned: that is the prompt a model is asked to continue.
    """
    prefix, _ = _split_template(template)
    return prefix.replace("{question}", question).replace("{instruction}", question)


# ---------------------------------------------------------------------------------------------------------
# Tokenization for RL / DPO: shifted tensors with a response mask
# ---------------------------------------------------------------------------------------------------------


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
        raise ValueError(
            "the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token) first"
        )
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
    L = max(len(p) + len(o) for p, o in zip(prompt_ids, output_ids))
    full_BL = torch.full((len(prompt_ids), L), pad_token_id, dtype=torch.long)
    is_output_BL = torch.zeros((len(prompt_ids), L), dtype=torch.bool)
    is_real_BL = torch.zeros((len(prompt_ids), L), dtype=torch.long)
    for b, (p, o) in enumerate(zip(prompt_ids, output_ids)):
        full_BL[b, : len(p) + len(o)] = torch.tensor(list(p) + list(o), dtype=torch.long)
        is_output_BL[b, len(p) : len(p) + len(o)] = True
        is_real_BL[b, : len(p) + len(o)] = 1
    return {
        "input_ids": full_BL[:, :-1],  # (B, L-1)
        "labels": full_BL[:, 1:],  # (B, L-1): token predicted at each position
        "response_mask": is_output_BL[:, 1:],  # (B, L-1)
        "attention_mask": is_real_BL[:, :-1],  # (B, L-1)
    }


# ---------------------------------------------------------------------------------------------------------
# Reading rows from a jsonl file or the Hub, with locations for error messages
# ---------------------------------------------------------------------------------------------------------


def _is_local(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    looks_like_path = source.startswith(("/", "./", "../", "~")) or source.endswith((".jsonl", ".json"))
    return looks_like_path or Path(source).exists()


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


def _iter_hub(dataset_id: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise ImportError("reading a Hub dataset needs the `datasets` package: pip install datasets") from e
    # "openai/gsm8k:main" selects a config: ':' cannot appear in a Hub repo id.
    repo_id, _, config = dataset_id.partition(":")
    ds = datasets.load_dataset(repo_id, config or None, split=split)
    for index, row in enumerate(ds):
        yield f"{dataset_id} (split {split}) row {index}", row


def iter_source_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` from a local jsonl file, a folder holding ``<split>.jsonl``, a local copy of a
    Hub dataset repo (read by ``datasets``), or a Hub id.

    A line that is not valid JSON is yielded as a ``DataError`` instance in place of the row, so the caller
    decides whether to raise or skip it.
    """
    if not _is_local(source):
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
    yield from _iter_jsonl(path)


def _load_rows(
    source: str | Path,
    split: str,
    convert: Callable[[dict, str], dict],
    on_error: OnError,
    max_rows: int | None,
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
        logger.warning(
            "%s: skipped %d bad row(s) (on_error='skip'); first: %s",
            source,
            len(bad),
            " | ".join(bad[:_MAX_LOGGED_LOCATIONS]),
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Field validation and answer extraction
# ---------------------------------------------------------------------------------------------------------


def _require_str(row: dict, field: str, loc: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise DataError(f"{loc}: field {field!r} is missing")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{loc}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{loc}: field {field!r} is empty")
    return value


def _answer_str(value: Any, field: str, loc: str) -> str:
    """An answer as a stripped string. Numbers (AMC's 142.0) and lists of strings (OlympiadBench) are accepted."""
    if isinstance(value, bool) or value is None:
        text = None
    elif isinstance(value, str):
        text = value
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        text = ", ".join(v.strip() for v in value)
    else:
        text = None
    if text is None:
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{loc}: field {field!r} must be a string, a number or a list of strings, got {what}")
    if not text.strip():
        raise DataError(f"{loc}: field {field!r} is empty")
    return text.strip()


def _optional(row: dict, out: dict, src: str, dst: str, loc: str, types: tuple[type, ...]) -> None:
    if row.get(src) is None:
        return
    if not isinstance(row[src], types) or isinstance(row[src], bool):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{loc}: field {src!r} must be {names}, got {type(row[src]).__name__}")
    out[dst] = row[src]


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (balanced braces), else None.

    Escaped braces (``\\{``, ``\\}``) do not count towards the balance. The brace-less form
    ``\\boxed 5$`` (two MATH solutions use it) gives the text up to the next ``$``.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i):
        content = text[i + 1 :].split("$", 1)[0].strip()
        return content or None
    if not text.startswith("{", i):
        return None
    depth, j = 0, i
    while j < len(text):
        char = text[j]
        if char == "\\":
            j += 2  # skip the escaped character
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


def gsm8k_final_answer(solution: str) -> str | None:
    """The text after the last ``####`` of a GSM8K solution, thousands separators removed; None if absent."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


# ---------------------------------------------------------------------------------------------------------
# Row converters (one per dataset format) and loaders
# ---------------------------------------------------------------------------------------------------------


def _math_metadata(row: dict, out: dict, loc: str) -> dict:
    _optional(row, out, "solution", "solution", loc, (str,))
    _optional(row, out, "subject", "subject", loc, (str,))
    if "subject" not in out:
        _optional(row, out, "type", "subject", loc, (str,))  # MATH calls the subject "type"
    _optional(row, out, "level", "level", loc, (str, int))  # MATH: "Level 3"; MATH-500: 3
    _optional(row, out, "unique_id", "unique_id", loc, (str,))
    return out


def _convert_math(row: dict, loc: str) -> dict:
    question = _require_str(row, "problem", loc)
    if row.get("answer") not in (None, ""):
        answer = _answer_str(row["answer"], "answer", loc)
    else:
        solution = _require_str(row, "solution", loc)
        answer = last_boxed_answer(solution)
        if not answer or not answer.strip():
            raise DataError(f"{loc}: field 'solution' has no non-empty \\boxed{{...}} answer")
        answer = answer.strip()
    return _math_metadata(row, {"question": question, "answer": answer}, loc)


def _convert_math500(row: dict, loc: str) -> dict:
    question = _require_str(row, "problem", loc)
    answer = _answer_str(row.get("answer"), "answer", loc)
    return _math_metadata(row, {"question": question, "answer": answer}, loc)


def _convert_gsm8k(row: dict, loc: str) -> dict:
    question = _require_str(row, "question", loc)
    solution = _require_str(row, "answer", loc)
    answer = gsm8k_final_answer(solution)
    if answer is None:
        raise DataError(f"{loc}: field 'answer' has no '#### <final answer>' line")
    return {"question": question, "answer": answer, "solution": solution}


def _convert_qa(row: dict, loc: str) -> dict:
    question = _require_str(row, "question", loc)
    out = {"question": question, "answer": _answer_str(row.get("answer"), "answer", loc)}
    return _math_metadata(row, out, loc)


def load_math(
    source: str | Path, split: str = "train", on_error: OnError = "raise", max_rows: int | None = None
) -> list[dict]:
    """MATH rows (problem, solution, level, type, unique_id); answer = last \\boxed{} of the solution."""
    return _load_rows(source, split, _convert_math, on_error, max_rows)


def load_math500(
    source: str | Path, split: str = "test", on_error: OnError = "raise", max_rows: int | None = None
) -> list[dict]:
    """Rows with ``problem`` and ``answer`` (MATH-500; also the answer-only AIME / AMC / OlympiadBench files)."""
    return _load_rows(source, split, _convert_math500, on_error, max_rows)


def load_gsm8k(
    source: str | Path, split: str = "train", on_error: OnError = "raise", max_rows: int | None = None
) -> list[dict]:
    """GSM8K rows; answer = text after ``####`` without commas, ``solution`` = the full worked answer."""
    return _load_rows(source, split, _convert_gsm8k, on_error, max_rows)


def load_qa_jsonl(
    path: str | Path, split: str = "train", on_error: OnError = "raise", max_rows: int | None = None
) -> list[dict]:
    """Already converted ``{"question", "answer"}`` rows (as written by ``write_qa_jsonl``)."""
    return _load_rows(path, split, _convert_qa, on_error, max_rows)


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


def write_qa_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write ``{"question", "answer"}`` lines (UTF-8, one object per line); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(
                json.dumps({"question": row["question"], "answer": row["answer"]}, ensure_ascii=False) + "\n"
            )
            count += 1
    return count


def convert_dataset(
    input_source: str | Path,
    output_path: str | Path,
    kind: DatasetKind = "auto",
    split: str = "train",
    on_error: OnError = "raise",
    max_rows: int | None = None,
) -> int:
    """Load ``input_source`` as ``kind`` and write it as question/answer jsonl; returns the row count."""
    rows = load_dataset_rows(input_source, kind=kind, split=split, on_error=on_error, max_rows=max_rows)
    count = write_qa_jsonl(rows, output_path)
    logger.info("wrote %d rows to %s", count, output_path)
    return count


# ---------------------------------------------------------------------------------------------------------
# SFT rows and tokenization (unshifted labels, -100 where not trained)
# ---------------------------------------------------------------------------------------------------------


def _convert_messages(messages: Any, field: str, loc: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{loc}: field {field!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{loc}: field {where!r} must be an object, got {type(message).__name__}")
        role = _require_str(message, "role", f"{loc}: {where}")
        content = _require_str(message, "content", f"{loc}: {where}", allow_empty=True)
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{loc}: field {field!r} has no non-empty assistant message to train on")
    return out


def load_sft_rows(
    source: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    on_error: OnError = "raise",
    max_rows: int | None = None,
    split: str = "train",
) -> list[dict]:
    """SFT rows as ``{"prompt", "response"}`` or ``{"messages": [{"role", "content"}, ...]}``.

    A row with ``messages_field`` is a conversation; otherwise it needs ``prompt_field`` (a string, may be
    empty) and ``response_field`` (a non-empty string). Output keys are always the canonical names.
    """

    def convert(row: dict, loc: str) -> dict:
        if row.get(messages_field) is not None:
            return {"messages": _convert_messages(row[messages_field], messages_field, loc)}
        if prompt_field not in row and response_field not in row:
            raise DataError(
                f"{loc}: field {messages_field!r} is missing (and so are {prompt_field!r} / {response_field!r})"
            )
        prompt = _require_str(row, prompt_field, loc, allow_empty=True)
        return {"prompt": prompt, "response": _require_str(row, response_field, loc)}

    return _load_rows(source, split, convert, on_error, max_rows)


def _has_trainable_target(labels: list[int]) -> bool:
    # labels[0] is never a target once the trainer shifts, so it does not count.
    return any(label != IGNORE_INDEX for label in labels[1:])


def _plain_ids(
    row: dict, tokenizer: PreTrainedTokenizerBase, prompt_template: str | None
) -> tuple[list[int], list[int]]:
    if "prompt" not in row:
        raise ValueError("this row has 'messages' and no prompt/response: use use_chat_template=True")
    prompt_text, suffix = row["prompt"], ""
    if prompt_template is not None:
        prompt_text = format_prompt(prompt_template, row["prompt"])
        suffix = _split_template(prompt_template)[1]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(row["response"] + suffix, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]  # the model must learn to stop
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _check_generation_markers(tokenizer: PreTrainedTokenizerBase) -> None:
    template = tokenizer.chat_template
    texts = template.values() if isinstance(template, dict) else [template or ""]
    if not any(_GENERATION_MARKER.search(t) for t in texts):
        raise ValueError(
            "use_chat_template=True trains on assistant tokens only, found through the chat template's "
            "{% generation %} ... {% endgeneration %} markers, and this tokenizer's chat template has none. "
            "Use a template that wraps assistant content in {% generation %}, or plain prompt/response mode."
        )


def _chat_ids(
    row: dict, tokenizer: PreTrainedTokenizerBase, prompt_template: str | None
) -> tuple[list[int], list[int]]:
    _check_generation_markers(tokenizer)
    messages = row.get("messages")
    if messages is None:
        user = format_prompt(prompt_template, row["prompt"]) if prompt_template else row["prompt"]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    input_ids = list(encoded["input_ids"])
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, encoded["assistant_masks"])]
    return input_ids, labels


def tokenize_sft_example(
    row: dict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_template: str | None = None,
    use_chat_template: bool = False,
) -> dict | None:
    """Token ids and UNSHIFTED labels (-100 where not trained) for one SFT row, at most ``max_length`` long.

    Plain mode: prompt (through ``prompt_template`` if given) + response + EOS, tokenized without special
    tokens; response and EOS are trained. Chat mode: the chat template, trained on its assistant
    ({% generation %}) tokens; a prompt/response row becomes one user and one assistant turn, the user turn
    formatted through ``prompt_template`` if given. ``prompt_template`` is template text or a name / path
    (see ``resolve_prompt_template``). Longer rows are cut from the right and get ``num_truncated = 1`` (else 0);
    a row with no trainable target left (its prompt fills ``max_length``) gives None.
    """
    if prompt_template is not None:
        prompt_template = resolve_prompt_template(prompt_template)
    build = _chat_ids if use_chat_template else _plain_ids
    input_ids, labels = build(row, tokenizer, prompt_template)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if not _has_trainable_target(labels):
        return None
    return {"input_ids": input_ids, "labels": labels, "num_truncated": int(truncated)}


def tokenize_sft_dataset(
    rows: Sequence[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    prompt_template: str | None = None,
    use_chat_template: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Tokenize every row; returns the examples and ``{"truncated": n, "dropped": n}``, logged."""
    if prompt_template is not None:
        prompt_template = resolve_prompt_template(prompt_template)
    if use_chat_template:
        _check_generation_markers(tokenizer)
    examples: list[dict] = []
    stats = {"truncated": 0, "dropped": 0}
    for row in rows:
        example = tokenize_sft_example(row, tokenizer, max_length, prompt_template, use_chat_template)
        if example is None:
            stats["dropped"] += 1
            continue
        stats["truncated"] += example["num_truncated"]
        examples.append(example)
    log = logger.warning if stats["truncated"] or stats["dropped"] else logger.info
    log(
        "SFT tokenization: %d examples kept of %d; %d truncated to max_length=%d; "
        "%d dropped (no response token within max_length)",
        len(examples),
        len(rows),
        stats["truncated"],
        max_length,
        stats["dropped"],
    )
    return examples, stats


# ---------------------------------------------------------------------------------------------------------
# Collators and packing
# ---------------------------------------------------------------------------------------------------------


def _padded_length(length: int, multiple: int | None) -> int:
    return length if not multiple else -(-length // multiple) * multiple


def _pad_stack(seqs: list[list[int]], length: int, value: int) -> torch.Tensor:
    out_BT = torch.full((len(seqs), length), value, dtype=torch.long)
    for b, seq in enumerate(seqs):
        out_BT[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out_BT


@dataclass
class SFTCollator:
    """Right-pads ``{input_ids, labels}`` examples: ``input_ids`` with ``pad_token_id``, ``labels`` with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = _padded_length(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        input_ids_BT = _pad_stack([f["input_ids"] for f in features], length, self.pad_token_id)
        mask_BT = _pad_stack([[1] * len(f["input_ids"]) for f in features], length, 0)
        labels_BT = _pad_stack([f["labels"] for f in features], length, IGNORE_INDEX)
        return {"input_ids": input_ids_BT, "attention_mask": mask_BT, "labels": labels_BT}


def pack_examples(examples: Iterable[dict], max_length: int) -> list[dict]:
    """Concatenate examples, in order (next-fit), into rows of at most ``max_length`` tokens.

    Each row has ``input_ids``, ``labels`` and ``position_ids``; positions restart at 0 for every sample and
    the first label of every sample is -100, so no target is predicted from a previous sample's tokens.
    """
    rows: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        if n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens > max_length={max_length}; tokenize with max_length first"
            )
        if n == 0:
            continue
        if len(current["input_ids"]) + n > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"].extend(example["input_ids"])
        current["labels"].extend([IGNORE_INDEX, *example["labels"][1:]])
        current["position_ids"].extend(range(n))
    if current["input_ids"]:
        rows.append(current)
    return rows


@dataclass
class PackedCollator:
    """Batches packed rows into ``input_ids``, ``labels`` and ``position_ids``, with NO attention mask.

    Padding: pad id, -100, and positions continuing the last sample (so padding is never read by a real
    token, and does not look like an extra sample). ``flatten=True`` instead concatenates the whole batch
    into one (1, total) row with no padding: flash attention only finds sample boundaries in a batch of
    one row. The model must be called with ``use_cache=False`` for transformers to derive the
    block-diagonal mask from the positions (see the module docstring).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flatten: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.flatten:
            features = [
                {
                    key: [t for f in features for t in f[key]]
                    for key in ("input_ids", "labels", "position_ids")
                }
            ]
        length = _padded_length(max(len(f["input_ids"]) for f in features), self.pad_to_multiple_of)
        positions = []
        for f in features:
            pos = list(f["position_ids"])
            positions.append(pos + list(range(pos[-1] + 1, pos[-1] + 1 + length - len(pos))))
        return {
            "input_ids": _pad_stack([f["input_ids"] for f in features], length, self.pad_token_id),
            "labels": _pad_stack([f["labels"] for f in features], length, IGNORE_INDEX),
            "position_ids": torch.tensor(positions, dtype=torch.long),  # (B, T), B = 1 when flatten
        }


# ---------------------------------------------------------------------------------------------------------
# Command line: python -m hf_align.data convert --input X --kind math --output Y.jsonl
# ---------------------------------------------------------------------------------------------------------


def convert_main(argv: list[str] | None = None) -> int:
    """Convert a MATH / MATH-500 / GSM8K / QA source (jsonl or Hub id) to question/answer jsonl."""
    parser = argparse.ArgumentParser(description=convert_main.__doc__)
    parser.add_argument(
        "--input", required=True, help="jsonl file, folder with <split>.jsonl, or Hub dataset id"
    )
    parser.add_argument("--output", required=True, help="where to write the question/answer jsonl")
    parser.add_argument("--kind", default="auto", choices=["auto", *_LOADERS], help="input format")
    parser.add_argument("--split", default="train", help="split (Hub ids and folders)")
    parser.add_argument(
        "--on-error", default="raise", choices=["raise", "skip"], help="what to do with bad rows"
    )
    parser.add_argument("--max-rows", type=int, default=None, help="keep at most this many rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    count = convert_dataset(args.input, args.output, args.kind, args.split, args.on_error, args.max_rows)
    print(f"wrote {count} rows to {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"convert": convert_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m hf_align.data {{{','.join(commands)}}} [options]  (try: convert --help)")
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
