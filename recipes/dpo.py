"""Direct preference optimisation (DPO, cDPO, rDPO, SLiC hinge, IPO) on preference pairs.

accelerate launch recipes/dpo.py --config recipes/configs/dpo/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_align.cli import parse_args, train_and_save
from hf_align.config import DPOConfig, ModelArguments, ScriptArguments
from hf_align.modeling import load_from_args
from hf_align.trainers.dpo import DPOTrainer, build_preference_dataset

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> DPOTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, DPOConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required: a .jsonl path or a Hub dataset id with preference pairs")
    if cfg.ref_mode == "adapter_disabled" and not model_args.use_peft:
        raise ValueError("ref_mode=adapter_disabled needs LoRA: add --use_peft true (or use ref_mode=copy)")
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args)  # LoRA-wrapped when use_peft
    s = script_args
    train = build_preference_dataset(
        s.dataset_name, s.dataset_split, cfg, tokenizer, s.on_bad_rows, s.max_train_samples
    )
    evals = None
    if s.eval_dataset_name:
        evals = build_preference_dataset(
            s.eval_dataset_name, s.eval_dataset_split, cfg, tokenizer, s.on_bad_rows, s.max_eval_samples
        )
    trainer = DPOTrainer(model, cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    train_and_save(trainer, cfg)
    return trainer


if __name__ == "__main__":
    main()
