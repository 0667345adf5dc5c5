"""Peak memory of per-token log-probs: hf_align's chunked `get_response_log_probs` vs naive log_softmax+gather.

    python benchmarks/logprob_memory.py                      # CPU: peak RSS above the baseline
    python benchmarks/logprob_memory.py --device cuda        # GPU: max allocated above the baseline

Both compute log p(label) for every position of a (batch x seq) input through the same model: a one-layer
Qwen2 with the real vocabulary (151,936, and 32,000), so the output layer dominates as in a real model.
naive: `torch.log_softmax(model(ids).logits.float(), -1).gather(...)` (what most trainers did);
ours: `hf_align.get_response_log_probs`. Each measurement runs in a fresh process; on CPU the kernel's peak
RSS counter is reset (/proc/self/clear_refs) after setup so only the log-prob computation counts. Workers run
with glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` (unless set): by default glibc raises its mmap threshold after
the first freed block, up to 32 MiB, so later blocks below that (32,000-vocabulary chunks are 31 MiB) come from
the heap and the resident peak depends on fragmentation, not on what is alive. Both sides run the same way.
Modes: `no_grad` (old / reference log-probs) and `train` (forward + backward of the summed log-probs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import PeakMemory, run_worker  # noqa: E402


def worker(
    impl: str, mode: str, vocab: int, batch: int, seq: int, hidden: int, device: str, dtype: str
) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hf_align.logprobs import get_response_log_probs

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype))
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    labels = torch.randint(0, vocab, (batch, seq), device=device)

    def run():
        if impl == "naive":
            logits = model(input_ids=ids).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        else:
            log_probs = get_response_log_probs(model, ids, labels)["log_probs"]
        if mode == "train":
            log_probs.sum().backward()
        return log_probs.detach().sum().item()

    mem = PeakMemory(device)
    mem.start()  # baseline, and the peak counter reset to it
    with torch.no_grad() if mode == "no_grad" else torch.enable_grad():
        checksum = run()
    peak = mem.peak_above_baseline()
    return {"impl": impl, "mode": mode, "vocab": vocab, "peak_bytes": peak, "checksum": checksum}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[151936, 32000])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", nargs="+", default=["no_grad", "train"])
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "VOCAB"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, mode, vocab = args.worker
        out = worker(impl, mode, int(vocab), args.batch, args.seq, args.hidden, args.device, args.dtype)
        print(json.dumps(out))
        return

    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--hidden", str(args.hidden)]
    common += ["--device", args.device, "--dtype", args.dtype]
    print(f"log-prob peak memory, batch {args.batch} x seq {args.seq}, {args.dtype} on {args.device}")
    print(f"{'vocab':>8} {'mode':>8} {'naive MiB':>10} {'ours MiB':>10} {'ours/naive':>10}")
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")}
    for vocab in args.vocab:
        for mode in args.modes:
            res = {}
            for impl in ("naive", "ours"):
                res[impl] = run_worker([__file__, "--worker", impl, mode, str(vocab), *common], env=env)
            n, o = res["naive"]["peak_bytes"], res["ours"]["peak_bytes"]
            same = abs(res["naive"]["checksum"] - res["ours"]["checksum"]) <= 1e-3 * abs(
                res["naive"]["checksum"]
            )
            flag = "" if same else "  (checksums differ!)"
            print(f"{vocab:>8} {mode:>8} {n / 2**20:>10.0f} {o / 2**20:>10.0f} {o / n:>10.2f}{flag}")


if __name__ == "__main__":
    main()
