"""Expert iteration on question-answer data: sample, keep what the reward marks right, fine-tune on it, repeat.

accelerate launch --num_processes 1 recipes/ei.py --config recipes/configs/ei/smollm2_gsm8k_cpu.yaml [--field value ...]

As in recipes/grpo.py, each row's ``question`` goes through ``prompt_template`` (R1-Zero by default) into the
``prompt`` column; ``answer`` stays a column, where the built-in graders find the ground truth. The final model is
saved in ``output_dir``, each iteration's kept rows in ``iter_{i}/kept.jsonl`` and the per-iteration log in
``ei_log.jsonl``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import set_seed

from hf_align.cli import parse_args
from hf_align.config import ExpertIterationConfig, ModelArguments, ScriptArguments
from hf_align.data import format_prompt, load_dataset_rows, load_prompt_template
from hf_align.modeling import load_from_args
from hf_align.trainers.ei import ExpertIterationTrainer


@dataclass
class EIScriptArguments(ScriptArguments):
    reward_funcs: list[str] = field(
        default_factory=lambda: ["r1_zero"],
        metadata={
            "help": "Reward functions, as GRPO's: built-in grader names, 'package.module:function', ..."
        },
    )
    prompt_template: str = field(
        default="r1_zero", metadata={"help": "Question template: a name in hf_align/prompts or a file."}
    )


def main(argv: list[str] | None = None) -> ExpertIterationTrainer:
    model_args, s, cfg = parse_args((ModelArguments, EIScriptArguments, ExpertIterationConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.dataset_name is None:
        raise ValueError(
            "dataset_name is required: a .jsonl path or a Hub dataset id with question/answer rows"
        )
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args, trust_remote_code=cfg.trust_remote_code)
    template = load_prompt_template(s.prompt_template)

    def rows(source, kind, split, max_rows) -> list[dict]:
        loaded = load_dataset_rows(source, kind=kind, split=split, on_error=s.on_bad_rows, max_rows=max_rows)
        return [{**row, "prompt": format_prompt(template, row["question"])} for row in loaded]

    train = rows(s.dataset_name, s.dataset_kind, s.dataset_split, s.max_train_samples)
    evals = None
    if s.eval_dataset_name:
        evals = rows(s.eval_dataset_name, s.eval_dataset_kind, s.eval_dataset_split, s.max_eval_samples)
    trainer = ExpertIterationTrainer(model, s.reward_funcs, cfg, train, evals, processing_class=tokenizer)
    try:
        trainer.train()
    finally:
        trainer.close()
    model.save_pretrained(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    return trainer


if __name__ == "__main__":
    main()
