"""TRL's dataset formats, prepared for training in one place: used by the SFT, DPO and reward trainers.

Rows come as a ``datasets.Dataset``, an ``IterableDataset`` or a list of dicts, in any format of TRL's
dataset-formats page, standard (strings) or conversational (``{role, content}`` messages): language modeling,
prompt-completion, and preference (``chosen`` / ``rejected``, with an explicit or implicit ``prompt``).
Preparation is one ``datasets.map`` that reproduces TRL 1.16 token for token, so first-step losses agree:

- Standard text gets EOS appended unless it ends with it; conversational rows get the chat template.
- Prompt and prompt + answer are tokenized whole, and the answer starts where the two token lists stop agreeing
  (``common_prefix_length``): a token merging across the seam stays one token, as at inference.
- SFT labels are the input ids with -100 outside the completion (``completion_only_loss``) and / or the
  assistant turns (``assistant_only_loss``). Longer rows are cut to ``max_length`` and rows left with no
  trained token dropped (logged); DPO pairs are cut in the collator (``truncate_pair``), too long reward-model
  rows dropped, as in TRL.
- Packing is best-fit decreasing (TRL's ``bfd``: same bins, same order, per ``map`` batch of 1000 rows).
  ``SFTCollator`` flattens a batch's samples into one row with ``transformers.DataCollatorWithFlattening``
  (positions restart per sample), so no token attends to another sample, whatever the batch size.
- A row that cannot be used raises ``DataError`` naming the dataset, the row index and the field;
  ``drop_bad_rows`` skips such rows instead, counted and logged (recipes' ``on_bad_rows: skip``). A list of rows
  keeps every key any row has (``rows_to_dataset``); a reward model's ``margin`` must be a finite number in every row.
"""

from __future__ import annotations

import json
import logging
import math
from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from hf_align.data import IGNORE_INDEX, DataError

logger = logging.getLogger(__name__)


def is_conversational(row: dict) -> bool:
    """Whether a row's prompt / completion / chosen / rejected / messages is a list of ``{role, ...}`` messages."""
    values = (row.get(key) for key in ("prompt", "completion", "chosen", "rejected", "messages"))
    return any(isinstance(v, list) and v and isinstance(v[0], dict) and "role" in v[0] for v in values)


def _check_text(row: dict, field: str, where: str, optional: bool = False) -> None:
    value = row.get(field)
    if value is None and not optional:
        raise DataError(f"{where}: field {field!r} is missing")
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a string or a non-empty list of {{role, content}}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: field '{field}[{i}]' must be a message with a string 'role'")
        content = message.get("content")
        if content is None and message.get("tool_calls"):
            continue  # an assistant turn that only calls tools
        if not isinstance(content, str | list):  # a list: multimodal content parts
            got = "missing" if content is None else f"a {type(content).__name__}"
            raise DataError(
                f"{where}: field '{field}[{i}].content' is {got} (a message needs string content)"
            )


def check_row(row: Any, kind: str, where: str, text_field: str = "text") -> None:
    """Raise ``DataError`` (naming ``where`` and the field) if ``row`` is not a usable ``sft`` / ``preference`` row."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a dict, got {type(row).__name__}")
    if "input_ids" in row or "chosen_ids" in row:
        return  # already tokenized
    if kind == "preference":
        fields = {"chosen": False, "rejected": False, "prompt": True}  # field -> optional
    elif row.get("prompt") is not None or row.get("completion") is not None:
        fields = {"prompt": False, "completion": False}
    elif row.get("messages") is not None:
        fields = {"messages": False}
    elif not isinstance(row.get(text_field), str):
        got = "missing" if row.get(text_field) is None else f"a {type(row[text_field]).__name__}"
        raise DataError(
            f"{where}: field {text_field!r} is {got} (an SFT row needs {text_field!r}, 'messages' or "
            "'prompt' + 'completion')"
        )
    else:
        fields = {}
    for field, optional in fields.items():
        _check_text(row, field, where, optional)
    strings = [
        isinstance(row[k], str)
        for k in ("prompt", "completion", "chosen", "rejected")
        if row.get(k) is not None
    ]
    if any(strings) and not all(strings):
        raise DataError(
            f"{where}: mixes strings and message lists across prompt / completion / chosen / rejected"
        )


def as_dataset(data, kind: str, name: str, text_field: str = "text"):
    """A ``Dataset`` / ``IterableDataset`` as is; a list of dicts checked row by row, then a ``Dataset``."""
    import datasets

    if isinstance(data, datasets.Dataset | datasets.IterableDataset):
        return data
    if isinstance(data, list | tuple):
        where = [f"{name} dataset row {i}" for i in range(len(data))]
        for row, loc in zip(data, where):
            check_row(row, kind, loc, text_field)
        return rows_to_dataset(list(data), where)
    raise TypeError(
        f"{name}_dataset must be a datasets.Dataset, IterableDataset or list, got {type(data).__name__}"
    )


def column_names(dataset) -> list[str]:  # an IterableDataset may not know its features
    return list(dataset.column_names or next(iter(dataset)).keys())


def _value_kind(value) -> str:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return "number" if number else type(value).__name__


def rows_to_dataset(rows: list[dict], where: list[str]):
    """A ``Dataset`` of ``rows`` with every key any row has (None where a row lacks it): ``Dataset.from_list`` takes
    the columns of row 0 only and drops the rest silently. A column whose values arrow cannot hold together
    (a string in one row, a list in another) raises ``DataError`` naming ``where[i]`` of the first odd row."""
    import datasets
    import pyarrow as pa

    columns = {key: [row.get(key) for row in rows] for key in dict.fromkeys(k for row in rows for k in row)}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        for key, values in columns.items():
            kinds = [(i, _value_kind(v)) for i, v in enumerate(values) if v is not None]
            odd = next((i for i, k in kinds if k != kinds[0][1]), None)
            if odd is not None:
                raise DataError(
                    f"{where[odd]}: field {key!r} is a {kinds[odd][1]} but a {kinds[0][1]} in {where[kinds[0][0]]}"
                    " (one type per field across rows)"
                ) from e
        raise DataError(f"{where[0] if where else 'dataset'}: rows cannot form one table: {e}") from e


BAD_ROW = "__bad_row_reason__"


def drop_bad_rows(dataset, kind: str, name: str = "train", text_field: str = "text"):
    """``dataset`` without the rows ``check_row`` rejects; how many were dropped (and the first reasons) is logged.
    The reasons are a column computed by ``map`` and read back, so a rerun answered by the datasets cache counts and
    logs them too; an ``IterableDataset`` is checked as it streams, each skipped row logged."""
    import datasets

    def reason(row: dict, idx: int) -> dict:
        try:
            check_row(row, kind, f"{name} dataset row {idx}", text_field)
            return {BAD_ROW: ""}
        except DataError as e:
            return {BAD_ROW: str(e)}

    if not isinstance(dataset, datasets.Dataset):

        def usable(row: dict, idx: int) -> bool:
            bad = reason(row, idx)[BAD_ROW]
            if bad:
                logger.warning("%s: skipped a bad row: %s", name, bad)
            return not bad

        return dataset.filter(usable, with_indices=True)
    reasons = dataset.map(reason, with_indices=True, remove_columns=dataset.column_names)[BAD_ROW]
    bad = [r for r in reasons if r]
    if not bad:
        return dataset
    logger.warning("%s: skipped %d bad row(s); first: %s", name, len(bad), " | ".join(bad[:5]))
    return dataset.select([i for i, r in enumerate(reasons) if not r])


def extract_prompt(chosen, rejected) -> dict:
    """Implicit prompt: the longest common prefix of chosen and rejected (characters or messages), as TRL cuts it."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # the space before the answers stays with them
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))


def _tokenize(tokenizer, value, row: dict, **template_kwargs) -> dict:
    """Token ids of a string (``tokenizer(text=...)``) or of messages (the chat template), as a dict."""
    if isinstance(value, str):
        return tokenizer(text=value)
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    extra = row.get("chat_template_kwargs") or {}
    return tokenizer.apply_chat_template(
        value, tokenize=True, return_dict=True, tools=tools, **extra, **template_kwargs
    )


def _with_eos(text: str, tokenizer) -> str:
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def _map(dataset, fn, args, name: str, desc: str, **kwargs):
    import datasets

    if isinstance(dataset, datasets.Dataset):  # IterableDataset.map takes neither
        kwargs.update(num_proc=getattr(args, "dataset_num_proc", None), desc=f"{desc} {name} dataset")
    return dataset.map(fn, **kwargs)


def _filter(dataset, predicate, args, name: str, what: str):
    import datasets

    before = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    if before is None:  # counting would need a pass over the stream
        logger.warning("%s dataset streams (IterableDataset): rows with %s are dropped uncounted", name, what)
    dataset = dataset.filter(predicate, **({} if before is None else {"num_proc": args.dataset_num_proc}))
    if before is not None and len(dataset) < before:
        logger.warning("%s dataset: dropped %d of %d rows (%s)", name, before - len(dataset), before, what)
    return dataset


def _sft_ids(row: dict, tokenizer, text_field: str, assistant_only_loss: bool) -> dict:
    """``input_ids`` plus ``completion_mask`` (prompt-completion rows) and ``assistant_masks`` (when asked)."""
    out, chat = {}, {"return_assistant_tokens_mask": assistant_only_loss}
    if row.get("prompt") is not None:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str):
            completion, chat = _with_eos(completion, tokenizer), {}
        prompt_ids = _tokenize(tokenizer, prompt, row, **({"add_generation_prompt": True} if chat else {}))
        full = _tokenize(tokenizer, prompt + completion, row, **chat)
        n = common_prefix_length(prompt_ids["input_ids"], full["input_ids"])
        out["completion_mask"] = [0] * n + [1] * (len(full["input_ids"]) - n)
    elif row.get("messages") is not None:
        full = _tokenize(tokenizer, row["messages"], row, **chat)
    else:
        full = _tokenize(tokenizer, _with_eos(row[text_field], tokenizer), row)
    out["input_ids"] = list(full["input_ids"])
    if "assistant_masks" in full:
        out["assistant_masks"] = list(full["assistant_masks"])
    return out


def _sft_example(row, idx, tokenizer, cfg: dict) -> dict:
    where = f"{cfg['name']} dataset row {idx}"
    check_row(row, "sft", where, cfg["text_field"])
    if "input_ids" in row:
        out = dict(row)
    else:
        out = _sft_ids(row, tokenizer, cfg["text_field"], cfg["assistant_only_loss"])
    if cfg["assistant_only_loss"] and 1 not in (out.get("assistant_masks") or []):
        raise DataError(
            f"{where}: assistant_only_loss=True but no token is marked as assistant: the chat template needs "
            "{% generation %} ... {% endgeneration %} around assistant turns, and the row an assistant message"
        )
    labels = out.get("labels")
    if labels is None:
        masks = [out["assistant_masks"]] if out.get("assistant_masks") is not None else []
        if cfg["completion_only_loss"] and out.get("completion_mask") is not None:
            masks.append(out["completion_mask"])
        labels = [t if all(bits) else IGNORE_INDEX for t, *bits in zip(out["input_ids"], *masks)]
    cut = cfg["slice"] or slice(None)
    return {"input_ids": list(out["input_ids"])[cut], "labels": list(labels)[cut]}


def prepare_sft_dataset(dataset, tokenizer, args, *, packing: bool, completion_only_loss: bool, name: str):
    """Tokenized SFT rows ``{input_ids, labels}`` (packed: plus ``seq_lengths``) from any TRL SFT format."""
    dataset = as_dataset(dataset, "sft", name, args.dataset_text_field)
    cut = None
    if args.max_length is not None and not packing:
        keep_start = args.truncation_mode == "keep_start"
        cut = slice(None, args.max_length) if keep_start else slice(-args.max_length, None)
    cfg = {
        "name": name,
        "text_field": args.dataset_text_field,
        "assistant_only_loss": args.assistant_only_loss,
        "completion_only_loss": completion_only_loss,
        "slice": cut,
    }
    with args.main_process_first(desc=f"preparing {name} dataset"):
        dataset = _map(
            dataset, _sft_example, args, name, "Tokenizing", with_indices=True,
            fn_kwargs={"tokenizer": tokenizer, "cfg": cfg}, remove_columns=column_names(dataset),
        )  # fmt: skip
        if cut is not None:
            trained = lambda row: any(t != IGNORE_INDEX for t in row["labels"])  # noqa: E731
            dataset = _filter(dataset, trained, args, name, "no trained token within max_length")
        if packing:
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            fn_kwargs = {"seq_length": args.max_length, "split": args.packing_strategy == "bfd_split"}
            dataset = _map(dataset, pack_bfd, args, name, "Packing", batched=True, fn_kwargs=fn_kwargs)
    return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset


def _bfd_bins(lengths: list[int], seq_length: int) -> list[list[int]]:
    """Best-fit decreasing: longest first, each into the bin with the least room that fits it (ties: the bin that got
    that room first), else a new bin. Same bins in the same order as TRL's segment-tree version."""
    rooms: list[int] = []  # sorted distinct free space of open bins
    bins_with_room: dict[int, deque] = defaultdict(deque)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties keep data order
        k = bisect_left(rooms, lengths[i])
        if k < len(rooms):
            room = rooms[k]
            b = bins_with_room[room].popleft()
            if not bins_with_room[room]:
                rooms.pop(k)
        else:
            room, b = seq_length, []
            bins.append(b)
        b.append(i)
        left = room - lengths[i]
        if left > 0:
            if not bins_with_room[left]:
                insort(rooms, left)
            bins_with_room[left].append(b)
    return bins


def pack_bfd(batch: dict[str, list], seq_length: int, split: bool = False) -> dict[str, list]:
    """Batched ``map`` function: samples ``{input_ids, labels}`` -> packed rows with ``seq_lengths``. Longer samples
    are cut to ``seq_length`` (``split=True``: into pieces of ``seq_length``, the last one shorter)."""
    samples = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        for lo in range(0, len(ids), seq_length) if split else range(min(len(ids), 1)):  # empty rows dropped
            samples.append((ids[lo : lo + seq_length], labels[lo : lo + seq_length]))
    bins = _bfd_bins([len(ids) for ids, _ in samples], seq_length)
    return {
        "input_ids": [[t for i in b for t in samples[i][0]] for b in bins],
        "labels": [[t for i in b for t in samples[i][1]] for b in bins],
        "seq_lengths": [[len(samples[i][0]) for i in b] for b in bins],
    }


def pad_right(seqs: list[list[int]], value: int, multiple: int | None = None) -> torch.Tensor:
    """Token lists right-padded with ``value`` into a (B, T) long tensor, T rounded up to a ``multiple``."""
    out_BT = pad_sequence(
        [torch.as_tensor(s, dtype=torch.long) for s in seqs], batch_first=True, padding_value=value
    )
    return F.pad(out_BT, (0, -out_BT.shape[1] % multiple), value=value) if multiple else out_BT


def default_labels(feature: dict) -> list[int]:
    """A row's ``labels``; without them (``skip_prepare_dataset`` rows) the input ids, as TRL's collator makes them,
    -100 where a ``completion_mask`` / ``assistant_masks`` the row carries is 0."""
    if feature.get("labels") is not None:
        return list(feature["labels"])
    masks = [feature[k] for k in ("completion_mask", "assistant_masks") if feature.get(k) is not None]
    return [t if all(bits) else IGNORE_INDEX for t, *bits in zip(feature["input_ids"], *masks)]


@dataclass
class SFTCollator:
    """``{input_ids, labels}`` rows -> a right-padded batch with ``attention_mask``; with ``padding_free``, and for
    packed rows (``seq_lengths``: eval_packing without packing too) every sample of the batch flattened into one row
    by ``DataCollatorWithFlattening``, so packed samples never attend to each other."""

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        labels = [default_labels(f) for f in features]
        if self.padding_free or any(f.get("seq_lengths") for f in features):
            from transformers import DataCollatorWithFlattening

            samples = []
            for f, f_labels in zip(features, labels):  # a packed row goes back to its samples
                ends = list(accumulate(f.get("seq_lengths") or [len(f["input_ids"])]))
                for lo, hi in zip([0, *ends], ends):
                    samples.append({"input_ids": f["input_ids"][lo:hi], "labels": f_labels[lo:hi]})
            return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(samples)
        ids, multiple = [f["input_ids"] for f in features], self.pad_to_multiple_of
        return {
            "input_ids": pad_right(ids, self.pad_token_id, multiple),
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0, multiple),
            "labels": pad_right(labels, IGNORE_INDEX, multiple),
        }


def checked_margin(value, where: str) -> float:
    """A reward-model ``margin`` as a float; anything but a finite number raises naming the row."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        got = "missing (None): give every row a margin, or none" if value is None else f"{value!r}"
        raise DataError(f"{where}: field 'margin' must be a finite number, got {got}")
    return float(value)


def _preference_example(row, idx, tokenizer, name: str, full_sequences: bool) -> dict:
    def ids(value, **template_kwargs) -> list[int]:
        return list(_tokenize(tokenizer, value, row, **template_kwargs)["input_ids"])

    where = f"{name} dataset row {idx}"
    check_row(row, "preference", where)
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None and not full_sequences:  # implicit prompt: what both answers start with
        prompt, chosen, rejected = extract_prompt(chosen, rejected).values()
    if isinstance(chosen, str):
        chosen, rejected = _with_eos(chosen, tokenizer), _with_eos(rejected, tokenizer)
    if full_sequences:  # the reward model scores prompt + answer as one sequence
        if prompt is not None:
            chosen, rejected = prompt + chosen, prompt + rejected
        margin = {"margin": checked_margin(row["margin"], where)} if "margin" in row else {}
        return {"chosen_ids": ids(chosen), "rejected_ids": ids(rejected), **margin}
    gen = {} if isinstance(prompt, str) else {"add_generation_prompt": True}
    prompt_ids, chosen_ids, rejected_ids = ids(prompt, **gen), ids(prompt + chosen), ids(prompt + rejected)
    n = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": chosen_ids[n:], "rejected_ids": rejected_ids[n:]}


def prepare_preference_dataset(dataset, tokenizer, args, *, name: str, full_sequences: bool = False):
    """DPO rows ``{prompt_ids, chosen_ids, rejected_ids}`` or, with ``full_sequences`` (reward model),
    ``{chosen_ids, rejected_ids}`` of prompt + answer (and ``margin`` when the data has one)."""
    import datasets

    dataset = as_dataset(dataset, "preference", name)
    kwargs = {"tokenizer": tokenizer, "name": name, "full_sequences": full_sequences}
    limit = args.max_length
    with args.main_process_first(desc=f"preparing {name} dataset"):
        if "chosen_ids" not in column_names(dataset):
            dataset = _map(
                dataset, _preference_example, args, name, "Tokenizing", with_indices=True, fn_kwargs=kwargs,
                remove_columns=column_names(dataset),
            )  # fmt: skip
        elif full_sequences and isinstance(dataset, datasets.Dataset) and "margin" in dataset.column_names:
            # already tokenized: the margins still need checking
            for i, value in enumerate(dataset["margin"]):
                checked_margin(value, f"{name} dataset row {i}")
        # the length filters apply to already tokenized rows too, as in TRL
        if limit is not None and full_sequences:
            fits = lambda row: max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= limit  # noqa: E731
            return _filter(dataset, fits, args, name, f"an answer longer than max_length={limit}")
        if limit is not None and args.truncation_mode == "keep_start":
            fits = lambda row: len(row["prompt_ids"]) < limit  # noqa: E731
            return _filter(dataset, fits, args, name, f"prompt alone fills max_length={limit}")
    return dataset


def truncate_pair(prompt: list[int], answer: list[int], max_length: int | None, mode: str):
    """``prompt + answer`` cut to ``max_length`` tokens, keeping its start or its end; returns (prompt, answer)."""
    extra = len(prompt) + len(answer) - (max_length or 0)
    if max_length is None or extra <= 0:
        return prompt, answer
    if mode == "keep_start":
        return prompt[:max_length], answer[: max(max_length - len(prompt), 0)]
    return prompt[extra:], answer[max(extra - len(prompt), 0) :]
