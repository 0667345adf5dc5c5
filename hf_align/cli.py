"""Parse a YAML ``--config`` plus command-line overrides into config dataclasses; the recipes' shared steps.

Precedence: dataclass defaults < YAML < command line. A YAML key that no dataclass knows is an error that
names the key and the file (a typo must not be silently ignored). ``--help`` lists every field with its help.
``load_rows`` reads a recipe's data (local json / jsonl or a Hub id) as a ``datasets.Dataset`` in TRL's formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from pathlib import Path

import yaml
from transformers import HfArgumentParser

logger = logging.getLogger(__name__)


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Return one instance per dataclass type, filled from ``--config file.yaml`` and the command line."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known_args, args = pre.parse_known_args(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types)
    if known_args.config is not None:
        path = Path(known_args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of field: value at the top level")
        known = {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config key(s) {unknown}; see --help for the valid fields")
        parser.set_defaults(**typed_yaml_values(values, dataclass_types, path))
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


def _number_type(hint) -> tuple[type | None, bool]:
    """(float or int, whether a list of them) for hints ``float``, ``int``, ``list[float]``, ... (``| None``
    allowed); (None, False) for any other type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
    is_list = typing.get_origin(hint) is list
    if is_list:
        hint = (typing.get_args(hint) or (None,))[0]
    return (hint, is_list) if hint in (float, int) else (None, False)


def _to_number(value, kind: type, key: str, path: Path):
    """``value`` as a ``kind`` (an int stays an int in a float field, as YAML and argparse defaults had it)."""
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        if isinstance(value, int):
            return value
        number = float(value)
        if kind is int and not number.is_integer():
            raise ValueError
        return int(number) if kind is int else number
    except ValueError:
        raise ValueError(
            f"{path}: key {key!r}: {value!r} is not a{'n' if kind is int else ''} {kind.__name__}"
        ) from None


def typed_yaml_values(values: dict, dataclass_types: tuple[type, ...], path: Path) -> dict:
    """YAML values of float / int / list[float] / list[int] fields converted to that type: PyYAML reads ``5e-2``
    (no dot) as a string, and a list default is never converted by argparse, so it would reach the loss as text."""
    hints = {}
    for cls in dataclass_types:
        resolved = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hints.setdefault(f.name, resolved.get(f.name))
    out = dict(values)
    for key, value in values.items():
        kind, is_list = _number_type(hints.get(key))
        if kind is None or value is None:
            continue
        if is_list and isinstance(value, list):
            out[key] = [_to_number(v, kind, key, path) for v in value]
        elif not is_list:
            out[key] = _to_number(value, kind, key, path)
    return out


def resume_target(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint``: "true" / "latest" resume from the newest checkpoint in output_dir; a path must
    be a checkpoint folder (an error names it otherwise); "false" / empty start fresh."""
    if value is None or isinstance(value, bool):
        return value or None
    text = str(value).strip()
    if text.lower() in ("", "false", "no", "none"):
        return None
    if text.lower() in ("true", "yes", "latest", "last"):
        return True
    if not Path(text).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {text}: no such checkpoint folder")
    return text


def train_and_save(trainer, cfg, after_train=None):
    """The recipes' ending: train (resuming as ``--resume_from_checkpoint`` says), run ``after_train(trainer)``
    if given, save the trainer state and the final model, push to the Hub if asked; then stop the trainer's
    workers (``close``, where it has one; also after a failure) and end the process group, as accelerate asks
    (a process that exits still holding it can abort in gloo's threads after the final save)."""
    try:
        trainer.train(resume_from_checkpoint=resume_target(cfg.resume_from_checkpoint))
        if after_train is not None:
            after_train(trainer)
        trainer.save_state()
        trainer.save_model(cfg.output_dir)
        if cfg.push_to_hub:
            trainer.push_to_hub()
    finally:
        if hasattr(trainer, "close"):
            trainer.close()
    trainer.accelerator.end_training()
    return trainer


def _read_local_rows(path: str, kind: str, on_bad_rows: str, text_field: str, max_rows: int | None):
    """Rows of a local .json / .jsonl file as python dicts, each checked by ``formats.check_row`` at its
    ``file:line``: raised, or (``skip``) skipped and counted. Read here rather than by ``load_dataset("json")``,
    whose errors name no line, which cannot skip a broken line, and whose type inference can turn one row's
    string " 19" into the number 19 because another row differs."""
    from hf_align.data import DataError, iter_source_rows
    from hf_align.formats import check_row, rows_to_dataset

    rows, where, bad = [], [], []
    for loc, row in iter_source_rows(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        try:
            if isinstance(row, DataError):
                raise row
            if isinstance(row, dict) and "response" in row and "completion" not in row:
                # our prompt/response files are TRL's prompt/completion
                row["completion"] = row.pop("response")
            check_row(row, kind, loc, text_field)
        except DataError as e:
            if on_bad_rows != "skip":
                raise
            bad.append(str(e))
            continue
        rows.append(row)
        where.append(loc)
    if bad:
        logger.warning("%s: skipped %d bad row(s); first: %s", path, len(bad), " | ".join(bad[:5]))
    return rows_to_dataset(rows, where)


def load_rows(script_args, kind: str, evaluation: bool = False, text_field: str = "text"):
    """The recipe's train (or eval) rows as a ``Dataset``: a local .json / .jsonl file (JSON lines, or one array)
    read row by row (errors name ``file:line``), else a Hub id (``repo:config`` selects a config). Our
    prompt/response files become TRL's prompt/completion; ``on_bad_rows: skip`` drops unusable rows (counted,
    logged)."""
    import datasets

    from hf_align.formats import drop_bad_rows

    s = script_args
    source = str(s.eval_dataset_name if evaluation else s.dataset_name)
    max_rows = s.max_eval_samples if evaluation else s.max_train_samples
    if source.endswith((".json", ".jsonl")):
        return _read_local_rows(source, kind, s.on_bad_rows, text_field, max_rows)
    repo, _, config = source.partition(":")
    ds = datasets.load_dataset(
        repo, config or None, split=s.eval_dataset_split if evaluation else s.dataset_split
    )
    if "response" in ds.column_names and "completion" not in ds.column_names:
        ds = ds.rename_column("response", "completion")
    if s.on_bad_rows == "skip":
        ds = drop_bad_rows(ds, kind, "eval" if evaluation else "train", text_field)
    return ds.select(range(min(max_rows, len(ds)))) if max_rows is not None else ds
