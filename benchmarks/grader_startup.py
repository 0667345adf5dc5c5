"""Grader workers: time to the first graded batch and memory per worker, ours vs multiprocessing's pools.

The parent is what a training script is: it has imported torch and transformers. `hf_align.rewards.Grader`
starts each worker as a fresh interpreter running `pool.py` (imports only the grader); the peers are
`concurrent.futures.ProcessPoolExecutor` on the spawn and forkserver contexts, whose workers re-import the
parent's `__main__` (this script, hence torch) and `hf_align/__init__`. Each pool grades the same 8 responses
with `r1_zero_reward_fn`; resident memory is read from `/proc/<pid>/status` of each worker afterwards.

    python benchmarks/grader_startup.py
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch  # noqa: F401  (the parent of a real run has it; spawn / forkserver workers re-import it)
import transformers  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import load_average, machine_info  # noqa: E402

from hf_align.rewards import Grader, r1_zero_reward_fn  # noqa: E402

RESPONSES = [f"think</think> <answer>\\frac{{{i}}}{{2}}</answer>" for i in range(8)]
GOLDS = [f"{i / 2}" for i in range(8)]
WORKERS = 2


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def summary(seconds: float, mib: list[float], rewards: list[dict]) -> dict:
    return {
        "seconds": seconds,
        "worker_mib": sum(mib) / len(mib),
        "correct": sum(r["reward"] for r in rewards),
    }


def ours() -> dict:
    start = time.perf_counter()
    with Grader("r1_zero", timeout_s=60.0, num_workers=WORKERS) as grader:
        rewards = grader.grade(RESPONSES, GOLDS)
        seconds = time.perf_counter() - start
        mib = [rss_mib(w.proc.pid) for w in grader._workers]
    return summary(seconds, mib, rewards)


def peer(method: str) -> dict:
    start = time.perf_counter()
    with ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context(method)) as pool:
        rewards = list(pool.map(r1_zero_reward_fn, RESPONSES, GOLDS))
        seconds = time.perf_counter() - start
        mib = [rss_mib(pid) for pid in pool._processes]
    return summary(seconds, mib, rewards)


def main() -> None:
    print(json.dumps({"machine": machine_info(), "load": load_average()}))
    results = {"hf_align Grader": ours(), "spawn pool": peer("spawn"), "forkserver pool": peer("forkserver")}
    base = results["hf_align Grader"]
    for name, r in results.items():
        assert r["correct"] == base["correct"], results  # the same verdicts
        print(
            f"{name:16s} first batch {r['seconds']:6.1f} s ({r['seconds'] / base['seconds']:5.1f}x ours)  "
            f"RSS per worker {r['worker_mib']:6.0f} MiB ({r['worker_mib'] / base['worker_mib']:5.1f}x ours)"
        )


if __name__ == "__main__":
    main()
