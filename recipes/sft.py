"""Supervised fine-tuning with a completion-only loss.

accelerate launch recipes/sft.py --config recipes/configs/sft/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_align.cli import parse_args, train_and_save
from hf_align.config import ModelArguments, ScriptArguments, SFTConfig
from hf_align.data import load_prompt_template, load_sft_rows, pack_examples, tokenize_sft_dataset
from hf_align.modeling import load_from_args
from hf_align.trainers.sft import SFTTrainer

logger = logging.getLogger(__name__)


def build_dataset(source, split, script_args, cfg: SFTConfig, tokenizer, max_rows):
    rows = load_sft_rows(
        source,
        split=split,
        prompt_field=cfg.prompt_field,
        response_field=cfg.response_field,
        messages_field=cfg.messages_field,
        on_error=script_args.on_bad_rows,
        max_rows=max_rows,
    )
    template = load_prompt_template(cfg.prompt_template) if cfg.prompt_template else None
    examples, stats = tokenize_sft_dataset(rows, tokenizer, cfg.max_length, template, cfg.use_chat_template)
    logger.info("%s: %d rows -> %d examples (%s)", source, len(rows), len(examples), stats)
    return pack_examples(examples, cfg.max_length) if cfg.packing else examples


def main(argv: list[str] | None = None) -> SFTTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, SFTConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required: a .jsonl path or a Hub dataset id")
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args)
    train = build_dataset(
        script_args.dataset_name,
        script_args.dataset_split,
        script_args,
        cfg,
        tokenizer,
        script_args.max_train_samples,
    )
    evals = None
    if script_args.eval_dataset_name:
        evals = build_dataset(
            script_args.eval_dataset_name,
            script_args.eval_dataset_split,
            script_args,
            cfg,
            tokenizer,
            script_args.max_eval_samples,
        )
    trainer = SFTTrainer(model, cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    train_and_save(trainer, cfg)
    return trainer


if __name__ == "__main__":
    main()
