"""Bradley-Terry reward model: a one-output sequence classifier trained on preference pairs.

accelerate launch recipes/reward_model.py --config recipes/configs/reward_model/smollm2_cpu.yaml [--field value ...]
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import AutoModelForSequenceClassification, set_seed

from hf_align.cli import load_rows, parse_args, train_and_save
from hf_align.config import ModelArguments, RewardConfig, ScriptArguments
from hf_align.modeling import load_tokenizer, lora_config_from_args, resolve_dtype, wrap_lora
from hf_align.trainers.reward_model import RewardTrainer

logger = logging.getLogger(__name__)


def load_reward_model(model_args: ModelArguments, trust_remote_code: bool = False):
    """``AutoModelForSequenceClassification`` with one output (a fresh score head), its tokenizer, and LoRA
    (the score head fully trained) when ``use_peft``."""
    tokenizer = load_tokenizer(
        model_args.tokenizer_name_or_path or model_args.model_name_or_path,
        gguf_file=None if model_args.tokenizer_name_or_path else model_args.gguf_file,
        revision=model_args.revision,
        trust_remote_code=trust_remote_code,
    )
    kwargs = {"num_labels": 1, "dtype": resolve_dtype(model_args.dtype), "revision": model_args.revision}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.gguf_file:
        kwargs["gguf_file"] = model_args.gguf_file
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, trust_remote_code=trust_remote_code, **kwargs
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    if model_args.use_peft:
        model = wrap_lora(model, dataclasses.replace(lora_config_from_args(model_args), task_type="SEQ_CLS"))
    return model, tokenizer


def main(argv: list[str] | None = None) -> RewardTrainer:
    model_args, script_args, cfg = parse_args((ModelArguments, ScriptArguments, RewardConfig), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if script_args.dataset_name is None:
        raise ValueError("dataset_name is required: a .jsonl path or a Hub dataset id with preference pairs")
    set_seed(cfg.seed)  # the score head is initialised at random
    model, tokenizer = load_reward_model(model_args, cfg.trust_remote_code)
    train = load_rows(script_args, "preference")
    evals = load_rows(script_args, "preference", evaluation=True) if script_args.eval_dataset_name else None
    trainer = RewardTrainer(
        model, args=cfg, train_dataset=train, eval_dataset=evals, processing_class=tokenizer
    )

    def report_accuracy(t) -> None:
        if evals is not None:
            logger.info("held-out pair accuracy: %.3f", t.evaluate()["eval_accuracy"])

    train_and_save(trainer, cfg, after_train=report_accuracy)
    return trainer


if __name__ == "__main__":
    main()
