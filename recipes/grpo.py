"""GRPO (and REINFORCE / Dr. GRPO / DAPO variants) on question-answer data with a grader as reward.

accelerate launch recipes/grpo.py --config recipes/configs/grpo/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_align.cli import parse_args, train_and_save
from hf_align.config import GRPOConfig, ModelArguments, ScriptArguments
from hf_align.data import load_dataset_rows
from hf_align.modeling import load_from_args
from hf_align.trainers.grpo import GRPOTrainer

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> GRPOTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, GRPOConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError(
            "dataset_name is required: a .jsonl path or a Hub dataset id with question/answer rows"
        )
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args)

    def rows(source, kind, split, max_rows):
        return load_dataset_rows(
            source, kind=kind, split=split, on_error=script_args.on_bad_rows, max_rows=max_rows
        )

    s = script_args
    train = rows(s.dataset_name, s.dataset_kind, s.dataset_split, s.max_train_samples)
    evals = None
    if s.eval_dataset_name:
        evals = rows(s.eval_dataset_name, s.eval_dataset_kind, s.eval_dataset_split, s.max_eval_samples)
    logger.info("prompts: %d train, %d eval", len(train), len(evals or []))
    trainer = GRPOTrainer(model, cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    train_and_save(trainer, cfg)
    trainer.close()
    return trainer


if __name__ == "__main__":
    main()
