"""GRPO (and REINFORCE / Dr. GRPO / DAPO variants) on question-answer data with a grader as reward.

accelerate launch recipes/grpo.py --config recipes/configs/grpo/smollm2_cpu.yaml [--field value ...]

The rows' ``question`` goes through ``prompt_template`` (R1-Zero by default) into the ``prompt`` column that
GRPOTrainer reads; ``answer`` stays a column, where the built-in graders find the ground truth.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import set_seed

from hf_align.cli import parse_args, train_and_save
from hf_align.config import GRPOConfig, ModelArguments, ScriptArguments
from hf_align.data import format_prompt, load_dataset_rows, load_prompt_template
from hf_align.modeling import load_from_args
from hf_align.trainers.grpo import GRPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class GRPOScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["r1_zero"],
        metadata={
            "help": "Reward functions: names in hf_align.rewards.REWARD_FUNCTIONS, 'package.module:function' (TRL's "
            "protocol), or reward-model ids / paths. Rewards are summed (weights: reward_weights)."
        },
    )
    prompt_template: str = field(
        default="r1_zero",
        metadata={"help": "Template (name in data/prompts or a file) that turns a question into a prompt."},
    )


def main(argv: list[str] | None = None) -> GRPOTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, GRPOScriptArguments, GRPOConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError(
            "dataset_name is required: a .jsonl path or a Hub dataset id with question/answer rows"
        )
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args, trust_remote_code=cfg.trust_remote_code)

    template = load_prompt_template(script_args.prompt_template)

    def rows(source, kind, split, max_rows):
        loaded = load_dataset_rows(
            source, kind=kind, split=split, on_error=script_args.on_bad_rows, max_rows=max_rows
        )
        return [{**row, "prompt": format_prompt(template, row["question"])} for row in loaded]

    s = script_args
    train = rows(s.dataset_name, s.dataset_kind, s.dataset_split, s.max_train_samples)
    evals = None
    if s.eval_dataset_name:
        evals = rows(s.eval_dataset_name, s.eval_dataset_kind, s.eval_dataset_split, s.max_eval_samples)
    logger.info("prompts: %d train, %d eval", len(train), len(evals or []))
    trainer = GRPOTrainer(
        model, s.reward_funcs, cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )
    train_and_save(trainer, cfg)
    return trainer


if __name__ == "__main__":
    main()
