"""Train every trainer variant of the sharding matrix in one process group, logging each step to jsonl.

    PYTHONPATH=. python -m accelerate.commands.launch --config_file CONFIG --num_processes 2 \
        tests/integration/_sharding_driver.py OUT VARIANT [VARIANT ...]

Also runs as plain ``python`` (one process). Each variant trains on _train_driver.py's toy task at the same global
batch whatever the number of processes (per-process batch = global / processes), without dropout (its masks
depend on the process layout); ``OUT/<variant>/steps.jsonl`` gets ``{"run", "step", "loss", "grad_norm"}`` per
logged step; every trainer built prints ``ENGINE <accelerate's distributed type>[ <ZeRO stage>]``.
``<variant>+resume`` trains 4 steps with a checkpoint at step 2, then a second trainer resumes from it (its steps
logged as run "resume"). ``grpo_uneven``: dynamic sampling (processes draw different numbers of
rounds) and an eval set of 3 prompts (processes evaluate 2 and 1), evaluated every step. ``sft_cut``: SFT with
the vocabulary read as 0, as the fused output layer once read it from a ZeRO-3 partition (every log-prob 0, loss and
gradient exactly 0): the run must stop with NoLearningError. ``sft`` ends with ``trainer.save_model(OUT/sft/final)``.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tests.integration._train_driver import StepLog, build_trainer  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
STEPS = 3


def variant(name: str) -> tuple[str, dict]:
    """(trainer kind, config overrides) of a matrix variant, batch sizes divided over the processes."""
    cpu = {
        "use_cpu": False
    }  # True would make accelerate drop DeepSpeed; without CUDA training runs on CPU anyway
    sft = {"per_device_train_batch_size": 4 // WORLD, **cpu}
    dpo = {"per_device_train_batch_size": 2 // WORLD, "gradient_accumulation_steps": 2, "beta": 0.5, **cpu}
    grpo = {"per_device_train_batch_size": 8 // WORLD, "generation_batch_size": 32}
    rm = {"per_device_train_batch_size": 4 // WORLD, "gradient_accumulation_steps": 2, **cpu}
    table = {
        "sft": ("sft", sft),
        "sft_cut": ("sft", sft),
        "dpo": ("dpo", {**dpo, "ref_mode": "copy"}),
        "dpo_pre": ("dpo", {**dpo, "precompute_ref_log_probs": True, "precompute_ref_batch_size": 3}),
        "grpo": ("grpo", {**grpo, "beta": 0.0}),
        "grpo_kl": ("grpo", {**grpo, "beta": 0.1}),
        "rm": ("rm", rm),
        "grpo_uneven": (
            "grpo",
            {
                **grpo,
                "beta": 0.1,
                "dynamic_sampling": True,
                "max_dynamic_sampling_rounds": 3,
                "eval_strategy": "steps",
                "eval_steps": 1,
            },
        ),  # fmt: skip
    }
    return table[name]


def rank_skewed_reward(completions, **kwargs) -> list[float]:
    """letter_e_reward on process 0, a constant elsewhere: with dynamic sampling, process 1 draws every round it
    may and process 0 one (different numbers of generate calls between the same collectives)."""
    from tests.integration.test_grpo_trainer import letter_e_reward

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return letter_e_reward(completions) if rank == 0 else [1.0] * len(completions)


def run(out: Path, name: str) -> None:
    base, _, resume = name.partition("+")
    kind, overrides = variant(base)
    folder = out / name
    if base == "sft_cut":
        import hf_align.logprobs as logprobs

        scored = logprobs._scored_positions
        logprobs._scored_positions = lambda labels, vocab, mask: scored(labels, 0, mask)
    folder.mkdir(parents=True, exist_ok=True)
    steps, save = (4, 2) if resume else (STEPS, 100)
    for run_name in ("fresh", "resume") if resume else ("fresh",):
        log = StepLog(folder / "steps.jsonl", run_name)
        if base == "grpo_uneven":
            from tests.integration.test_grpo_trainer import ROWS

            overrides |= {"eval_dataset": ROWS[:3], "reward_funcs": [rank_skewed_reward]}
        trainer = build_trainer(kind, folder, steps, save, [log], dropout=0.0, **overrides)
        state = trainer.accelerator.state
        plugin = getattr(state, "deepspeed_plugin", None)
        # one write per line: the processes share the test's pipe (print writes the newline apart)
        sys.stdout.write(
            f"ENGINE {state.distributed_type.value}{f' {plugin.zero_stage}' if plugin else ''}\n"
        )
        sys.stdout.flush()
        trainer.train(resume_from_checkpoint=str(folder / "checkpoint-2") if run_name == "resume" else None)
        if (
            base == "sft" and not resume
        ):  # the user's final save: a model from_pretrained loads, whatever the engine
            trainer.save_model(str(folder / "final"))
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where a hung process is
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import importlib

        # DeepSpeed's optional shared-memory all-reduce is a C++ extension compiled at the first init (minutes on a
        # busy CI machine, and a compiler needed): the tests use plain gloo collectives instead.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: (
            None
        )  # (deepspeed.comm.torch is torch)
    torch.set_num_threads(1)
    for name in sys.argv[2:]:
        run(Path(sys.argv[1]), name)
    if torch.distributed.is_initialized():  # joins gloo's threads now: left to exit, one once aborted in them
        torch.distributed.destroy_process_group()
    print("DONE", flush=True)
