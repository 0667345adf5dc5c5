"""Two GRPO optimizer steps with the HF ``generate`` engine on a small random-weight Qwen2: the loss must be
finite and every step must complete (exit 1 otherwise). Part of ``scripts/gpu_check.sh``.

    python scripts/grpo_smoke.py --device cuda --steps 2 [--tokenizer DIR] [--json OUT.json]

Activation checkpointing on (the shared-prompt forward runs under it); bf16 on CUDA, fp32 on CPU.
The tokenizer is DIR if given and present, else one built in code (``benchmarks/_common.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_tokenizer  # noqa: E402


def length_reward(completions, **kwargs) -> list[float]:
    """Continuous, so a group's rewards are almost never tied and every step has a loss to take."""
    return [min(len(c), 200) / 200 for c in completions]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tokenizer")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hf_align.config import GRPOConfig
    from hf_align.trainers.grpo import GRPOTrainer

    cuda = args.device == "cuda"
    tok = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    shape = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4) if cuda else {}
    config = Qwen2Config(
        vocab_size=len(tok), num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        **(shape or dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)),
    )  # fmt: skip
    model = Qwen2ForCausalLM(config)
    rows = [{"prompt": f"what is {a} + {b} ?", "answer": str(a + b)} for a in range(4) for b in range(4)]
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_smoke_"), max_steps=args.steps, num_generations=4,
        generation_batch_size=8, per_device_train_batch_size=8, max_completion_length=32 if cuda else 8,
        learning_rate=1e-4, temperature=1.0, grader_num_workers=0, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, plot_curves=False, use_cpu=not cuda,
        bf16=cuda, activation_checkpointing=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model, [length_reward], cfg, train_dataset=rows, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": trainer.state.global_step,
        "losses": losses,
        "rewards": [h["reward"] for h in trainer.state.log_history if "reward" in h],
        "seconds": seconds,
        "checkpointing": bool(model.is_activation_checkpointing),
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }
    result["ok"] = (
        result["steps"] == args.steps and len(losses) == args.steps and all(map(math.isfinite, losses))
    )
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
