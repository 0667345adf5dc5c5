"""One training step of hf_align's trainers vs TRL's on the same model, weights and token ids.

    python benchmarks/train_step.py --algo all --model smollm2                 # CPU, SmolLM2-135M fp32
    python benchmarks/train_step.py --algo grpo --model qwen2-tiny             # CPU, 4-layer Qwen2, real vocab
    python benchmarks/train_step.py --algo all --model qwen2.5-1.5b-shape --device cuda   # GPU, bf16

Each (library, algorithm) pair runs in a fresh process that builds the model (seeded, so both libraries get
the same weights), the library's real trainer, and one fixed batch in that library's own input format:

- GRPO: one rollout batch of ``batch`` sequences (one prompt, a group of ``batch`` completions), fixed
  advantages. hf_align: ``GRPOTrainer`` with ``policy_loss=grpo_clip`` and ``loss_type=grpo`` (GRPO's
  per-sequence mean) and its default ``share_prompt_prefix`` (the group's prompt goes through the decoder
  once; ``--impls hf_align_one_pass`` adds a run with it off), the micro-batch prepared as its rollout
  step prepares it (old log-probs, global counts: not timed, they belong to the rollout phase). TRL: ``GRPOTrainer`` with ``loss_type=grpo``,
  ``num_iterations=1`` (old log-probs = the current ones, detached), its ``prompt_ids / completion_ids /
  advantages`` dict handed to ``training_step`` with generation bypassed. beta = 0, epsilon = 0.2 for both.
- DPO: ``batch / 2`` pairs (so ``batch`` rows, like the others), sigmoid loss, beta 0.1, a separate frozen
  reference model; each library's own collator builds its batch from the same ``prompt/chosen/rejected`` ids.
- SFT: ``batch`` rows of prompt + response with a completion-only loss normalized by response tokens.

A timed step is ``trainer.training_step`` (forward, each trainer's ``compute_loss``, backward) and
``model.zero_grad(set_to_none=True)`` as Trainer does. The optimizer is left out by default: AdamW over the same
parameters is the same work for both libraries, and on this CPU it takes ~15 s for SmolLM2's 135M parameters,
which would swamp the difference being measured (``--optimizer-step`` puts clipping + AdamW back in). Gradient
checkpointing is off unless ``--gradient-checkpointing`` (then non-reentrant for both, enabled as
``Trainer.train()`` would) and the dtype is the same for both (TRL's configs default to checkpointing and bf16
autocast: both are set explicitly; the 1.5B shape runs with bf16 weights). Tokens/s counts every input token of the policy's batch
(batch x (prompt + completion)) per step, the same count for both libraries.

Memory: the baseline is read (and the peak counter reset) after setup, once every weight of the policy and
reference model has been read (from_pretrained maps the file lazily); with ``--optimizer-step`` the AdamW
state is created before it. Then the warm-up and timed steps run. "step MiB" = peak above that baseline
(activations, gradients, log-prob temporaries); "total MiB" = the absolute peak (RSS on CPU, allocated on
CUDA). The gradient norm of the first step is printed for both libraries as a check that they computed the
same loss on the same inputs.

MFU (printed on a known GPU, or anywhere with ``--peak-tflops``) = 6 x parameters x tokens/s / peak FLOP/s,
with every parameter counted (embeddings too) and the same batch-token count as tokens/s. With the shared-prompt
forward hf_align does fewer FLOPs than that count implies, so its GRPO / DPO figure is an effective MFU; SFT's
is exact up to attention FLOPs, which the formula leaves out.

``--profile`` profiles one extra
step and splits its time into output-layer matmuls, decoder matmuls and other ops. ``--chunk-tokens`` sets
hf_align's ``logprob_chunk_tokens``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import MIB, PeakMemory, load_average, load_tokenizer, machine_info, run_worker  # noqa: E402

SMOLLM2_DIR = ROOT / "models" / "smollm2-135m-instruct"
ALGOS = ("grpo", "dpo", "sft")
IMPLS = ("hf_align", "trl", "hf_align_one_pass")  # the last: GRPO with share_prompt_prefix off


# ------------------------------------------------------------------------------------------------ models


def build_model(name: str, device: str, tokenizer_dir: str | None = None):
    """(model, tokenizer, dtype). Random-init models are seeded, so every process gets the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    # Any tokenizer will do for the random models: the batches are token ids, the tokenizer only gives pad id
    # (SmolLM2's when its folder is here, else one built in code: a GPU machine may have no model folder).
    tokenizer = load_tokenizer(SMOLLM2_DIR if name == "smollm2" else tokenizer_dir or SMOLLM2_DIR)
    if name == "smollm2":
        dtype = torch.float32
        model = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=dtype)
    elif name in ("qwen2-tiny", "qwen2.5-1.5b-shape"):
        if name == "qwen2-tiny":  # the real Qwen vocabulary on a tiny body: the output layer dominates
            shape = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
            shape |= dict(num_attention_heads=4, num_key_value_heads=2)
            dtype = torch.float32
        else:  # Qwen2.5-1.5B's config.json
            shape = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28)
            shape |= dict(num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6)
            dtype = torch.bfloat16
        cfg = Qwen2Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).to(dtype)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.config.use_cache = False
    return model.to(device), tokenizer, dtype


def fixed_ids(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()  # 0-2 are special tokens in SmolLM2


# ------------------------------------------------------------------------------------------------ trainers


def _common_args(output_dir: str, args: argparse.Namespace) -> dict:
    device = args.device
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        optim="adamw_torch",
        max_grad_norm=1.0,
        gradient_checkpointing=args.gradient_checkpointing,  # enabled by the worker: Trainer does it in train()
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        use_cpu=device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )


def _chunk(args: argparse.Namespace) -> dict:
    """hf_align's ``logprob_chunk_tokens`` when ``--chunk-tokens`` is given (else the library default)."""
    return {} if args.chunk_tokens is None else {"logprob_chunk_tokens": args.chunk_tokens}


def setup_grpo(impl: str, model, tok, args: argparse.Namespace, out: str):
    """(trainer, batch, num_items_in_batch) for one GRPO micro-batch = one optimizer step."""
    import torch

    B, P, C = args.batch, args.prompt_len, args.completion_len
    vocab = model.config.vocab_size
    prompt = fixed_ids(1, P, vocab, seed=1)[0]
    completions = fixed_ids(B, C, vocab, seed=2)
    rewards_B = torch.tensor([float(i % 3 == 0) for i in range(B)])
    advantages_B = (rewards_B - rewards_B.mean()) / (rewards_B.std() + 1e-6)
    base = _common_args(out, args) | dict(per_device_train_batch_size=B, max_steps=1)
    if impl.startswith("hf_align"):
        from hf_align.config import GRPOConfig
        from hf_align.trainers import grpo_rollouts as R
        from hf_align.trainers.grpo import GRPOTrainer

        cfg = GRPOConfig(
            **base,
            generation_batch_size=B,
            num_generations=B,
            policy_loss="grpo_clip",
            loss_type="grpo",
            epsilon=0.2,
            beta=0.0,
            max_completion_length=C,
            grader_num_workers=0,
            plot_curves=False,
            share_prompt_prefix=impl == "hf_align",
            **_chunk(args),
        )
        trainer = GRPOTrainer(
            model, lambda completions, **kw: [0.0] * len(completions), cfg,
            train_dataset=[{"prompt": "q", "answer": "a"}], processing_class=tok,
        )  # fmt: skip
        scored = R.ScoredGroups(
            prompt_ids=[prompt] * B, completion_ids=completions, rewards=rewards_B.tolist()
        )
        micro = R.build_micro_batches(scored, rewards_B, advantages_B, tok.pad_token_id, B, 1)
        trainer._add_reference_log_probs(micro)  # old log-probs: rollout phase, as in _make_rollout_batch
        R.attach_global_counts(micro, trainer.accelerator, cfg.optimizer_batch_size)  # as _make_rollout_batch
        batch = micro[0] | {"policy_version": 0}  # sampled by the current weights

        def prepare(b):  # what _make_rollout_batch leaves for _prepare_inputs to hand out
            trainer._buffer = [b]
            return b

        return trainer, batch, None, prepare
    import trl
    from datasets import Dataset

    cfg = trl.GRPOConfig(
        **base,
        num_generations=B,
        max_completion_length=C,
        loss_type="grpo",
        beta=0.0,
        epsilon=0.2,
        num_iterations=1,
        temperature=1.0,
        use_vllm=False,
    )
    data = Dataset.from_dict({"prompt": ["q"] * B})
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
        train_dataset=data, processing_class=tok,
    )  # fmt: skip
    dev = args.device
    batch = {
        "prompt_ids": torch.tensor([prompt] * B, device=dev),
        "prompt_mask": torch.ones(B, P, dtype=torch.long, device=dev),
        "completion_ids": torch.tensor(completions, device=dev),
        "completion_mask": torch.ones(B, C, dtype=torch.long, device=dev),
        "advantages": advantages_B.to(dev),
        "num_items_in_batch": torch.tensor(float(B * C), device=dev),
    }
    trainer._prepare_inputs = lambda b: b  # the generation batch is already made: skip generation
    return trainer, batch, None, lambda b: b


def setup_dpo(impl: str, model, tok, args: argparse.Namespace, out: str, ref_model):
    import torch
    from datasets import Dataset

    pairs, P, C = args.batch // 2, args.prompt_len, args.completion_len
    vocab = model.config.vocab_size
    prompts = fixed_ids(pairs, P, vocab, seed=3)
    chosen = fixed_ids(pairs, C, vocab, seed=4)
    rejected = fixed_ids(pairs, C, vocab, seed=5)
    examples = [
        {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(prompts, chosen, rejected)
    ]
    base = _common_args(out, args) | dict(per_device_train_batch_size=pairs)
    text = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    if impl.startswith("hf_align"):
        from hf_align.config import DPOConfig
        from hf_align.trainers.dpo import DPOTrainer, PreferenceCollator

        cfg = DPOConfig(
            **base,
            beta=0.1,
            loss_type="sigmoid",
            ref_mode="copy",
            max_length=P + C,
            **_chunk(args),
        )
        trainer = DPOTrainer(model, ref_model, args=cfg, train_dataset=examples, processing_class=tok)
        batch = PreferenceCollator(tok.pad_token_id)(examples)
    else:
        import trl
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        cfg = trl.DPOConfig(**base, beta=0.1, loss_type=["sigmoid"], max_length=P + C)
        trainer = trl.DPOTrainer(
            model=model, ref_model=ref_model, args=cfg, train_dataset=text, processing_class=tok
        )
        batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    batch = trainer._prepare_inputs(batch)
    n_items = trainer._get_num_items_in_batch([batch], torch.device(args.device))
    return trainer, batch, n_items, lambda b: b


def setup_sft(impl: str, model, tok, args: argparse.Namespace, out: str):
    import torch
    from datasets import Dataset

    B, P, C = args.batch, args.prompt_len, args.completion_len
    vocab = model.config.vocab_size
    prompts = fixed_ids(B, P, vocab, seed=6)
    responses = fixed_ids(B, C, vocab, seed=7)
    base = _common_args(out, args) | dict(per_device_train_batch_size=B)
    if impl == "hf_align":
        from hf_align.config import SFTConfig
        from hf_align.formats import SFTCollator
        from hf_align.trainers.sft import SFTTrainer

        rows = [{"input_ids": p + r, "labels": [-100] * P + r} for p, r in zip(prompts, responses)]
        cfg = SFTConfig(**base, max_length=P + C, loss_normalization="token_mean", **_chunk(args))
        trainer = SFTTrainer(model, cfg, train_dataset=rows, processing_class=tok)
        batch = SFTCollator(tok.pad_token_id)(rows)
    else:
        import trl
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        # What TRL's own dataset preparation makes of prompt/completion rows with completion_only_loss=True
        rows = [{"input_ids": p + r, "labels": [-100] * P + r} for p, r in zip(prompts, responses)]
        cfg = trl.SFTConfig(
            **base,
            max_length=P + C,
            completion_only_loss=True,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        data = Dataset.from_list(rows)
        trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
    batch = trainer._prepare_inputs(batch)
    n_items = trainer._get_num_items_in_batch([batch], torch.device(args.device))
    return trainer, batch, n_items, lambda b: b


# ------------------------------------------------------------------------------------------------ worker


def worker(impl: str, algo: str, args: argparse.Namespace) -> dict:
    import tempfile

    import torch

    warnings.filterwarnings("ignore")
    model, tok, dtype = build_model(args.model, args.device, args.tokenizer)
    ref_model = build_model(args.model, args.device, args.tokenizer)[0].eval() if algo == "dpo" else None
    out = tempfile.mkdtemp(prefix=f"bench_{impl}_{algo}_")
    if algo == "grpo":
        trainer, batch, n_items, prepare = setup_grpo(impl, model, tok, args, out)
    elif algo == "dpo":
        trainer, batch, n_items, prepare = setup_dpo(impl, model, tok, args, out, ref_model)
    else:
        trainer, batch, n_items, prepare = setup_sft(impl, model, tok, args, out)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we do not run
    model = trainer.model
    if args.gradient_checkpointing:  # what Trainer.train() does, the same call for both libraries
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None
    if args.optimizer_step:
        trainer.create_optimizer()
        opt = trainer.optimizer
        # Optimizer state before the baseline: both libraries use the same AdamW, so it is the same size.
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    model.zero_grad(set_to_none=True)
    # from_pretrained maps the safetensors file: weights become resident only when first read. Read them all
    # now so the baseline holds them and the first step's page-ins are not counted as step memory.
    with torch.no_grad():
        for m in [x for x in (model, ref_model) if x is not None]:
            for t in [*m.parameters(), *m.buffers()]:
                t.sum()

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        loss = trainer.training_step(model, prepare(batch), n_items)
        if opt is not None:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)  # as Trainer does after each optimizer step
        return float(loss)

    mem = PeakMemory(args.device)
    mem.start()
    # warm-up; its loss and gradient norm are the cross-check between the libraries
    first_loss = float(trainer.training_step(model, prepare(batch), n_items))
    first_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    for _ in range(args.warmup - 1):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    tokens = int(batch_tokens(algo, args))
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings once
    tokens_per_s = tokens / (sum(times) / len(times))
    peak = peak_flops(args)
    step_peak, total_peak = mem.peak_above_baseline(), mem.peak_total()  # before the profiler's own memory
    profile = profile_step(step, model.config.vocab_size) if args.profile else None
    return {
        "profile": profile,
        "impl": impl,
        "algo": algo,
        "model": args.model,
        "dtype": str(dtype).replace("torch.", ""),
        "checkpointing": bool(getattr(model, "is_activation_checkpointing", False)),
        "tokens_per_step": tokens,
        "step_s": times,
        "tokens_per_s": tokens_per_s,
        "params": n_params,
        "peak_tflops": None if peak is None else peak / 1e12,
        "mfu": None if peak is None else 6 * n_params * tokens_per_s / peak,
        "step_peak_mib": step_peak / MIB,
        "total_peak_mib": total_peak / MIB,
        "first_loss": first_loss,
        "first_grad_norm": first_norm,
        "load_avg": load_average(),
    }


# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets, by device-name substring.
GPU_PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
}


def peak_flops(args: argparse.Namespace) -> float | None:
    """Peak FLOP/s for MFU: ``--peak-tflops`` if given, else the table above for a known CUDA device."""
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, tflops in GPU_PEAK_BF16_TFLOPS.items():  # the longer, more specific names come first
        if key in name:
            return tflops * 1e12
    return None


def profile_step(step, vocab: int) -> dict:
    """One more step under torch.profiler: wall time, and the self time of matrix products with a dimension
    >= 8192 (the output layer, whole or in TRL's vocabulary tiles) vs all other matrix products (the decoder;
    its widths and the token count stay below that in the benchmark shapes)."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    wall = time.perf_counter() - start
    head_us = other_mm_us = total_us = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        total_us += ev.self_cpu_time_total
        if ev.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"):
            # vocabulary-sized (or TRL's 16k-32k vocabulary tiles) vs the decoder's hidden / MLP widths
            if any(dim >= min(vocab, 8192) for shape in ev.input_shapes if shape for dim in shape):
                head_us += ev.self_cpu_time_total
            else:
                other_mm_us += ev.self_cpu_time_total
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    sys.stderr.write(table + "\n")
    return {
        "wall_s": wall,
        "head_matmul_s": head_us / 1e6,
        "decoder_matmul_s": other_mm_us / 1e6,
        "other_ops_s": (total_us - head_us - other_mm_us) / 1e6,
        "top_ops": table,
    }


def batch_tokens(algo: str, args: argparse.Namespace) -> int:
    rows = args.batch if algo != "dpo" else 2 * (args.batch // 2)
    return rows * (args.prompt_len + args.completion_len)


# ------------------------------------------------------------------------------------------------ driver


def _median_run(runs: list[dict]) -> dict:
    """One result for several runs of a worker: the run of median tokens/s (the lower middle one for an even
    count), with the largest memory peaks of all runs and every run's tokens/s under ``tokens_per_s_runs``."""
    speeds = [r["tokens_per_s"] for r in runs]
    r = dict(sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2])
    r["tokens_per_s_runs"] = speeds
    for key in ("step_peak_mib", "total_peak_mib"):
        r[key] = max(run[key] for run in runs)
    return r


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=[*ALGOS, "all"], default="all")
    p.add_argument("--model", choices=["smollm2", "qwen2-tiny", "qwen2.5-1.5b-shape"], default="smollm2")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch", type=int, default=8, help="sequences per optimizer step (DPO: batch/2 pairs)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (>= 1)")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    p.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        default=list(IMPLS[:2]),
        help="hf_align_one_pass: GRPO with share_prompt_prefix=false (each row's prompt through the decoder)",
    )
    p.add_argument(
        "--chunk-tokens", type=int, help="hf_align's logprob_chunk_tokens (default: the library's)"
    )
    p.add_argument(
        "--optimizer-step",
        action="store_true",
        help="also clip gradients and run AdamW inside each timed step (identical for both libraries; "
        "on CPU it costs ~15 s for SmolLM2's 135M parameters and swamps the difference)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        help="peak FLOP/s (in TFLOP/s) for MFU; default: the bf16 peak of a known CUDA GPU, none on CPU",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every library's worker this many times, interleaved (A B A B ...), and report the median "
        "tokens/s and the largest memory: at small shapes one run's timing drifts with the machine by up to +-25%%",
    )
    p.add_argument("--json", type=Path, help="append each result as a JSON line to this file")
    p.add_argument(
        "--profile",
        action="store_true",
        help="CPU: profile one extra step; print output-layer vs decoder matmul time and the top ops",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="activation checkpointing (non-reentrant) on for both libraries, as Trainer.train() turns it on",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer folder for the random-weight models (default: SmolLM2's if present, else one built in code)",
    )
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "ALGO"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.warmup = max(1, args.warmup)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return

    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    info = machine_info()
    print("train step: hf_align vs TRL |", ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"model {args.model} on {args.device}, {args.batch} sequences x ({args.prompt_len} prompt + "
        f"{args.completion_len} completion), {args.warmup} warm-up + {args.steps} timed steps, "
        f"activation checkpointing {'on' if args.gradient_checkpointing else 'off'}"
        + (f", {args.rounds} interleaved rounds (median tokens/s)" if args.rounds > 1 else "")
    )
    header = f"{'algo':>5} {'impl':>15} {'tok/s':>9} {'step MiB':>9} {'total MiB':>10} {'grad norm':>10} {'load':>15}"
    algos = ALGOS if args.algo == "all" else (args.algo,)
    flags = ["--model", args.model, "--device", args.device, "--batch", str(args.batch)]
    flags += ["--prompt-len", str(args.prompt_len), "--completion-len", str(args.completion_len)]
    flags += ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    flags += (["--profile"] if args.profile else []) + (["--optimizer-step"] if args.optimizer_step else [])
    flags += [] if args.chunk_tokens is None else ["--chunk-tokens", str(args.chunk_tokens)]
    flags += [] if args.peak_tflops is None else ["--peak-tflops", str(args.peak_tflops)]
    flags += (["--gradient-checkpointing"] if args.gradient_checkpointing else []) + (
        [] if args.tokenizer is None else ["--tokenizer", args.tokenizer]
    )
    summary = []
    for algo in algos:
        print(header)
        impls = [i for i in args.impls if algo == "grpo" or i != "hf_align_one_pass"]
        runs: dict[str, list[dict]] = {impl: [] for impl in impls}
        # interleaved, so a drift in machine speed hits every library alike
        for _ in range(max(1, args.rounds)):
            for impl in impls:
                runs[impl].append(run_worker([__file__, "--worker", impl, algo, *flags], env=env))
        res = {}
        for impl in impls:
            res[impl] = r = _median_run(runs[impl])
            print(
                f"{algo:>5} {impl:>15} {r['tokens_per_s']:9.1f} {r['step_peak_mib']:9.0f} "
                f"{r['total_peak_mib']:10.0f} {r['first_grad_norm']:10.4f} {r['load_avg']:>15}"
            )
            if len(runs[impl]) > 1:
                print(f"{'':>21} tok/s of each round: {' '.join(f'{x:.1f}' for x in r['tokens_per_s_runs'])}")
            if r["checkpointing"] != args.gradient_checkpointing:
                print(
                    f"{'':>21} activation checkpointing is {'on' if r['checkpointing'] else 'off'}, not as asked"
                )
            if r.get("mfu") is not None:
                print(
                    f"{'':>21} MFU {100 * r['mfu']:.1f}% (6 x {r['params'] / 1e6:.0f}M parameters x tokens/s / "
                    f"{r['peak_tflops']:g} TFLOP/s)"
                )
            if r.get("profile"):
                pr = r["profile"]
                print(
                    f"{'':>21} profiled step {pr['wall_s']:.1f} s: output-layer matmuls {pr['head_matmul_s']:.1f} s, "
                    f"decoder matmuls {pr['decoder_matmul_s']:.1f} s, other ops {pr['other_ops_s']:.1f} s (self CPU)"
                )
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({**r, "shape": flags}) + "\n")
        if "trl" not in res:
            continue
        peer = res["trl"]
        for impl in [i for i in res if i != "trl"]:
            ours = res[impl]
            speed = ours["tokens_per_s"] / peer["tokens_per_s"]
            step_mem = ours["step_peak_mib"] / max(peer["step_peak_mib"], 1e-9)
            total_mem = ours["total_peak_mib"] / max(peer["total_peak_mib"], 1e-9)
            gn_o, gn_t = ours["first_grad_norm"], peer["first_grad_norm"]
            same = abs(gn_o - gn_t) <= 1e-3 * max(abs(gn_t), 1e-12)
            print(
                f"{algo:>5} {impl}/TRL: tokens/s {_fmt_ratio(speed)}, step memory {_fmt_ratio(step_mem)}, "
                f"total peak {_fmt_ratio(total_mem)}; gradient norms {'agree' if same else 'DIFFER'}"
            )
            summary.append((algo, impl, speed, step_mem, total_mem, same))
    if summary:
        print(
            f"\nsummary ({args.model}, {args.device}): vs TRL, tokens/s ratio, step-memory ratio, total-peak ratio"
        )
        for algo, impl, speed, step_mem, total_mem, same in summary:
            flag = "" if same else "  (gradient norms differ!)"
            print(f"  {algo:>5} {impl:>15}  {speed:5.2f}x  {step_mem:5.2f}x  {total_mem:5.2f}x{flag}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
