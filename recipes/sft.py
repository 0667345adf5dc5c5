"""Supervised fine-tuning on TRL's SFT formats (prompt-completion, messages, text).

accelerate launch recipes/sft.py --config recipes/configs/sft/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_align.cli import load_rows, parse_args, train_and_save
from hf_align.config import ModelArguments, ScriptArguments, SFTConfig
from hf_align.modeling import load_from_args
from hf_align.trainers.sft import SFTTrainer


def main(argv: list[str] | None = None) -> SFTTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, SFTConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required: a .jsonl path or a Hub dataset id")
    set_seed(cfg.seed)  # LoRA adapters are initialised at random
    model, tokenizer = load_from_args(
        model_args, trust_remote_code=cfg.trust_remote_code
    )  # LoRA when use_peft
    train = load_rows(script_args, "sft", text_field=cfg.dataset_text_field)
    evals = (
        load_rows(script_args, "sft", True, cfg.dataset_text_field) if script_args.eval_dataset_name else None
    )
    trainer = SFTTrainer(model, cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    train_and_save(trainer, cfg)
    return trainer


if __name__ == "__main__":
    main()
