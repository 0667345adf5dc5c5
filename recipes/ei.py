"""Expert iteration: sample, keep what the grader marks correct, fine-tune on it, repeat.

accelerate launch recipes/ei.py --config recipes/configs/ei/smollm2_gsm8k_cpu.yaml [--field value ...]

Choices:
- Iteration i takes the next `questions_per_iteration` questions of a seeded permutation of the training rows
  (wrapping into a new permutation when they run out), samples `samples_per_question` completions per
  question from the CURRENT model (the engine is synced with its weights first) and grades them.
- Keep rule: by default a sample is kept when the grader says its answer is right (`answer_reward == 1`);
  with `keep_threshold` set (custom reward functions) it is kept when `reward >= keep_threshold`. Every kept
  sample is its own SFT row {prompt, completion}: duplicates of a question are kept, as in the seed.
- The SAME model object is fine-tuned every iteration by `SFTTrainer` (a fresh optimizer and schedule per
  iteration, `SFTConfig` settings, output in `{output_dir}/iter_{i}`, with the kept rows in `kept.jsonl`);
  an iteration that keeps nothing (or whose kept rows all exceed `max_length`) is logged and not fine-tuned.
  The prompt already ends with the template's opening (`<think>` for r1_zero), so rows are tokenized as
  plain prompt + completion + EOS (TRL's prompt-completion format), with no second template.
- Logged per iteration, one line in `{output_dir}/ei_log.jsonl` (the file is restarted by a new run):
  train accuracy (mean answer_reward over all samples), kept count, mean response length in tokens (all
  samples and kept ones), mean token entropy of the kept responses under the model BEFORE fine-tuning (a
  token mean over all kept response tokens), SFT loss, and eval accuracy / format rate / mean reward from
  `hf_align.evaluation.evaluate` on the eval rows (if any) after fine-tuning.
- The question template is `--prompt_template` (default r1_zero); one process only (every process
  would otherwise sample and train on the same rows).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import set_seed

from hf_align.cli import parse_args
from hf_align.config import ModelArguments, ScriptArguments, SFTConfig
from hf_align.data import format_prompt, load_dataset_rows, load_prompt_template
from hf_align.evaluation import evaluate
from hf_align.formats import SFTCollator, prepare_sft_dataset
from hf_align.logprobs import get_response_log_probs, masked_mean_or_zero
from hf_align.modeling import load_from_args
from hf_align.rewards import Grader
from hf_align.rollout import SamplingConfig, make_engine
from hf_align.trainers.sft import SFTTrainer

logger = logging.getLogger(__name__)


@dataclass
class EIArguments:
    prompt_template: str = field(
        default="r1_zero", metadata={"help": "Question template name in data/prompts, or a template file."}
    )
    n_iterations: int = field(
        default=5, metadata={"help": "Expert-iteration steps (sample, filter, fine-tune)."}
    )
    questions_per_iteration: int = field(default=512, metadata={"help": "Questions sampled per iteration."})
    samples_per_question: int = field(default=8, metadata={"help": "Completions sampled per question."})
    max_completion_length: int = field(default=1024, metadata={"help": "Maximum new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold of the rollouts."})
    stop_strings: list[str] = field(
        default_factory=lambda: ["</answer>"],
        metadata={"help": "Generation stops after any of these strings (kept in the response)."},
    )
    reward_fn: str = field(
        default="r1_zero",
        metadata={
            "help": "Grader reward function: a name (r1_zero, gsm8k, ...) or 'package.module:function'."
        },
    )
    keep_threshold: float | None = field(
        default=None,
        metadata={"help": "None: keep samples with answer_reward == 1. A number: keep reward >= it."},
    )
    grader_timeout_s: float = field(default=5.0, metadata={"help": "Per-completion grading time limit."})
    grader_num_workers: int = field(default=2, metadata={"help": "Grader worker processes (0: in-process)."})
    rollout_engine: Literal["hf", "vllm"] = field(
        default="hf", metadata={"help": "hf: model.generate; vllm: an in-process vLLM colocated on the GPU."}
    )
    generation_batch_size: int = field(default=64, metadata={"help": "Sequences per generate call (hf)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory vLLM may take (rollout_engine=vllm)."}
    )
    entropy_batch_size: int = field(default=8, metadata={"help": "Kept responses per entropy forward pass."})
    eval_temperature: float = field(default=0.0, metadata={"help": "Sampling temperature for evaluation."})

    def __post_init__(self) -> None:
        for name in (
            "n_iterations",
            "questions_per_iteration",
            "samples_per_question",
            "max_completion_length",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def keep_mask(rewards: list[dict], keep_threshold: float | None) -> list[bool]:
    """Which graded samples become SFT rows (see the module docstring)."""
    if keep_threshold is None:
        return [r["answer_reward"] == 1.0 for r in rewards]
    return [r["reward"] >= keep_threshold for r in rewards]


def next_questions(rows: list[dict], start: int, count: int, seed: int) -> list[dict]:
    """Questions start .. start+count of an endless sequence of seeded permutations of `rows`."""
    out = []
    for position in range(start, start + count):
        epoch, index = divmod(position, len(rows))
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        out.append(rows[perm[index].item()])
    return out


@torch.no_grad()
def mean_response_entropy(
    model, examples: list[dict], pad_token_id: int, batch_size: int, chunk: int
) -> float:
    """Token-mean entropy of the model's next-token distribution over the response tokens of `examples`."""
    collate = SFTCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for lo in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[lo : lo + batch_size]).items()}
            labels_BT = batch["labels"][:, 1:]
            mask_BT = labels_BT != -100
            out = get_response_log_probs(
                model,
                batch["input_ids"][:, :-1],
                labels_BT,
                return_token_entropy=True,
                attention_mask=batch["attention_mask"][:, :-1],
                chunk_tokens=chunk,
            )
            n = int(mask_BT.sum())
            total += masked_mean_or_zero(out["token_entropy"].float(), mask_BT).item() * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else 0.0


def _sampling(ei: EIArguments, n: int, temperature: float, seed: int) -> SamplingConfig:
    return SamplingConfig(
        n=n,
        max_new_tokens=ei.max_completion_length,
        temperature=temperature,
        top_p=ei.top_p,
        stop=list(ei.stop_strings),
        seed=seed,
    )


def _fine_tune(model, tokenizer, examples: list[dict], cfg: SFTConfig, output_dir: str) -> float:
    """SFT of `model` in place on tokenized kept rows with the `cfg` settings; returns the mean train loss."""
    args = copy.deepcopy(cfg)
    args.output_dir = output_dir
    trainer = SFTTrainer(model, args, train_dataset=examples, processing_class=tokenizer)
    result = trainer.train()
    return float(result.training_loss)


def run_iteration(i, model, tokenizer, engine, grader, questions, evals, template, ei, cfg) -> dict:
    """One sample -> grade -> keep -> fine-tune -> evaluate step; returns its log record."""
    engine.sync_weights(model)
    prompts = [format_prompt(template, row["question"]) for row in questions]
    groups = engine.generate(prompts, _sampling(ei, ei.samples_per_question, ei.temperature, cfg.seed + i))
    flat = [(q, rollout) for q, group in enumerate(groups) for rollout in group]
    rewards = grader.grade([r.text for _, r in flat], [questions[q]["answer"] for q, _ in flat])
    kept = [(q, r) for (q, r), keep in zip(flat, keep_mask(rewards, ei.keep_threshold)) if keep]
    sft_rows = [{"prompt": prompts[q], "completion": r.text} for q, r in kept]
    n_tokens = [len(r.completion_ids) for _, r in flat]
    record = {
        "iteration": i,
        "questions": len(questions),
        "samples": len(flat),
        "train_accuracy": sum(r["answer_reward"] for r in rewards) / len(rewards),
        "train_mean_reward": sum(r["reward"] for r in rewards) / len(rewards),
        "kept": len(kept),
        "questions_with_kept": len({q for q, _ in kept}),
        "mean_response_tokens": sum(n_tokens) / len(n_tokens),
        "kept_mean_response_tokens": sum(len(r.completion_ids) for _, r in kept) / len(kept) if kept else 0.0,
        "kept_entropy": None,
        "sft_loss": None,
        "fine_tuned": False,
    }
    iter_dir = Path(cfg.output_dir) / f"iter_{i}"
    iter_dir.mkdir(parents=True, exist_ok=True)
    with (iter_dir / "kept.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in sft_rows)
    examples = []
    if kept:
        prepared = prepare_sft_dataset(
            sft_rows, tokenizer, cfg, packing=False, completion_only_loss=True, name="ei"
        )
        examples = [dict(row) for row in prepared]
    if examples:
        record["kept_entropy"] = mean_response_entropy(
            model, examples, tokenizer.pad_token_id, ei.entropy_batch_size, cfg.logprob_chunk_tokens
        )
        record["sft_loss"] = _fine_tune(model, tokenizer, examples, cfg, str(iter_dir))
        record["fine_tuned"] = True
        engine.sync_weights(model)
    else:
        logger.warning("iteration %d: no kept sample to train on; fine-tuning skipped", i)
    if evals:
        eval_sampling = _sampling(ei, 1, ei.eval_temperature, cfg.seed)
        summary = evaluate(engine, evals, template, grader, eval_sampling, iter_dir / "eval", progress=False)
        record.update({f"eval_{k}": summary[k] for k in ("accuracy", "format_rate", "mean_reward")})
    return record


def main(argv: list[str] | None = None):
    model_args, script_args, cfg, ei = parse_args(
        (ModelArguments, ScriptArguments, SFTConfig, EIArguments), argv
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = script_args
    if s.dataset_name is None:
        raise ValueError(
            "dataset_name is required: a .jsonl path or a Hub dataset id with question/answer rows"
        )
    set_seed(cfg.seed)
    model, tokenizer = load_from_args(model_args)
    model.to(cfg.device)
    train = load_dataset_rows(
        s.dataset_name,
        kind=s.dataset_kind,
        split=s.dataset_split,
        on_error=s.on_bad_rows,
        max_rows=s.max_train_samples,
    )
    evals = []
    if s.eval_dataset_name:
        evals = load_dataset_rows(
            s.eval_dataset_name, kind=s.eval_dataset_kind, split=s.eval_dataset_split, on_error=s.on_bad_rows,
            max_rows=s.max_eval_samples,
        )  # fmt: skip
    template = load_prompt_template(ei.prompt_template)
    kwargs = {"batch_size": ei.generation_batch_size}
    if ei.rollout_engine == "vllm":
        kwargs = {"gpu_memory_utilization": ei.vllm_gpu_memory_utilization, "seed": cfg.seed}
    engine = make_engine(ei.rollout_engine, model, tokenizer, **kwargs)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "ei_log.jsonl"
    log_path.write_text("")
    logger.info("expert iteration: %d train questions, %d eval rows", len(train), len(evals))
    with Grader(ei.reward_fn, ei.grader_timeout_s, ei.grader_num_workers) as grader:
        for i in range(ei.n_iterations):
            n = ei.questions_per_iteration
            questions = next_questions(train, i * n, n, cfg.seed)
            record = run_iteration(i, model, tokenizer, engine, grader, questions, evals, template, ei, cfg)
            logger.info("ei iteration %d: %s", i, record)
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    if ei.rollout_engine != "hf":
        engine.close()
    model.save_pretrained(cfg.output_dir)
    tokenizer.save_pretrained(cfg.output_dir)
    return model


if __name__ == "__main__":
    main()
