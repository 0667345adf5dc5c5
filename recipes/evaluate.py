"""Evaluate a model on question/answer data: accuracy, format rate, mean reward; per-example jsonl.

    python recipes/evaluate.py --model models/smollm2-135m-instruct \
        --dataset ../shared/datasets/math500/test.jsonl --max_examples 20 --output_dir outputs/eval/smollm2
    python recipes/evaluate.py --config recipes/configs/evaluate/smollm2_math500.yaml [--field value ...]
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Literal

from hf_align.cli import parse_args
from hf_align.data import load_dataset_rows
from hf_align.evaluation import evaluate
from hf_align.modeling import load_model_and_tokenizer
from hf_align.rewards import Grader
from hf_align.rollout import SamplingConfig, make_engine


@dataclass
class EvaluateArguments:
    model: str | None = field(default=None, metadata={"help": "Hub model id or local folder (required)."})
    gguf_file: str | None = field(default=None, metadata={"help": "A .gguf file inside --model to load."})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "Weights dtype; 'auto': bf16 on a capable GPU, else fp32."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for the model (default: where it loads)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code from the model repository (off: it executes remote code)."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "A .jsonl path or Hub dataset id (required)."}
    )
    dataset_kind: str = field(default="auto", metadata={"help": "auto, math, math500, gsm8k or qa."})
    split: str = field(default="test", metadata={"help": "Split to read for a Hub dataset."})
    max_examples: int | None = field(default=None, metadata={"help": "Evaluate the first N rows only."})
    prompt: str = field(
        default="r1_zero", metadata={"help": "Prompt template name in hf_align/prompts or a file."}
    )
    reward_fn: str = field(default="r1_zero", metadata={"help": "Reward function of hf_align.rewards."})
    engine: Literal["hf", "vllm"] = field(default="hf", metadata={"help": "Rollout engine."})
    batch_size: int = field(default=8, metadata={"help": "Sequences generated together (hf engine)."})
    n: int = field(default=1, metadata={"help": "Samples per question (pass_at_n is reported when > 1)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Completion token budget."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    stop: list[str] = field(
        default_factory=lambda: ["</answer>"],
        metadata={"help": "Stop strings, kept at the end of the response (r1_zero ends at </answer>)."},
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    grader_timeout_s: float = field(default=5.0, metadata={"help": "Time limit per graded response."})
    grader_workers: int = field(default=2, metadata={"help": "Grader worker processes."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Write examples.jsonl and summary.json here."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("--model is required: a Hub id or a local folder")
        if not self.dataset:
            raise ValueError("--dataset is required: a .jsonl path or a Hub dataset id")


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((EvaluateArguments,), argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_model_and_tokenizer(
        args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    rows = load_dataset_rows(
        args.dataset, kind=args.dataset_kind, split=args.split, max_rows=args.max_examples
    )
    engine_kwargs = {"batch_size": args.batch_size} if args.engine == "hf" else {}
    engine = make_engine(args.engine, model, tokenizer, **engine_kwargs)
    sampling = SamplingConfig(
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=list(args.stop),
        seed=args.seed,
    )
    metadata = {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "dataset": args.dataset,
        "prompt": args.prompt,
    }
    metadata["reward_fn"] = args.reward_fn
    try:
        with Grader(
            args.reward_fn, timeout_s=args.grader_timeout_s, num_workers=args.grader_workers
        ) as grader:
            summary = evaluate(
                engine,
                rows,
                args.prompt,
                grader,
                sampling,
                args.output_dir,
                progress=args.progress,
                metadata=metadata,
            )
    finally:
        engine.close()
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
