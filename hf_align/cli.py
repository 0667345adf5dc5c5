"""Parse a YAML ``--config`` plus command-line overrides into config dataclasses; the recipes' shared steps.

Precedence: dataclass defaults < YAML < command line. A YAML key that no dataclass knows is an error that
names the key and the file (a typo must not be silently ignored). ``--help`` lists every field with its help.
``load_rows`` reads a recipe's data (local json / jsonl or a Hub id) as a ``datasets.Dataset`` in TRL's formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser


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
        parser.set_defaults(**values)
    return parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)


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


def load_rows(script_args, kind: str, evaluation: bool = False, text_field: str = "text"):
    """The recipe's train (or eval) rows as a ``Dataset``: a local .json / .jsonl file through
    ``load_dataset("json")``, else a Hub id (``repo:config`` selects a config). Our prompt/response files become
    TRL's prompt/completion; ``on_bad_rows: skip`` drops unusable rows (counted, logged)."""
    import datasets

    from hf_align.formats import drop_bad_rows

    s = script_args
    source = str(s.eval_dataset_name if evaluation else s.dataset_name)
    max_rows = s.max_eval_samples if evaluation else s.max_train_samples
    if source.endswith((".json", ".jsonl")):
        ds = datasets.load_dataset("json", data_files=source, split="train")
    else:
        repo, _, config = source.partition(":")
        ds = datasets.load_dataset(
            repo, config or None, split=s.eval_dataset_split if evaluation else s.dataset_split
        )
    if "response" in ds.column_names and "completion" not in ds.column_names:
        ds = ds.rename_column("response", "completion")
    if s.on_bad_rows == "skip":
        ds = drop_bad_rows(ds, kind, "eval" if evaluation else "train", text_field)
    return ds.select(range(min(max_rows, len(ds)))) if max_rows is not None else ds
