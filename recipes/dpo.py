"""Direct preference optimisation (DPO, cDPO, rDPO, SLiC hinge, IPO, BCO pair) on preference pairs.

accelerate launch recipes/dpo.py --config recipes/configs/dpo/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import logging

from transformers import set_seed

from hf_align.cli import load_rows, parse_args, train_and_save
from hf_align.config import DPOConfig, ModelArguments, ScriptArguments
from hf_align.modeling import load_from_args
from hf_align.trainers.dpo import DPOTrainer


def main(argv: list[str] | None = None) -> DPOTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, DPOConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required: a .jsonl path or a Hub dataset id with preference pairs")
    set_seed(cfg.seed)  # LoRA adapters are initialised at random
    # LoRA-wrapped when use_peft (reference: adapters off)
    model, tokenizer = load_from_args(model_args, trust_remote_code=cfg.trust_remote_code)
    train = load_rows(script_args, "preference")
    evals = load_rows(script_args, "preference", evaluation=True) if script_args.eval_dataset_name else None
    trainer = DPOTrainer(model, args=cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer)
    train_and_save(trainer, cfg)
    return trainer


if __name__ == "__main__":
    main()
