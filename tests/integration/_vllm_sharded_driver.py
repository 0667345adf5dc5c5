"""One GRPO optimizer step with a vLLM engine, then greedy rollouts from the engine, under whatever `accelerate launch`
set up (FSDP2 on CPU, DeepSpeed ZeRO-3) or in one plain process (the reference).

    PYTHONPATH=. HF_ALIGN_FSDP_ON_CPU=1 python -m accelerate.commands.launch --config_file CONFIG --num_processes 2 \
        tests/integration/_vllm_sharded_driver.py OUT MODEL_DIR ENGINE MODE [SERVER_URL GROUP_PORT]

ENGINE: vllm (in-process), vllm_server:group or vllm_server:file (the server's weight sync). MODE: full (all
weights trained), late (full, with rank 1 starting training 5 s after rank 0: the server's first weight push
begins while rank 1 still has requests to make), lora (LoRA adapters on every linear layer: the engine gets them
merged), save (full, 2 steps, a checkpoint after each), resume (the same 2 steps, resumed from
``OUT/out/checkpoint-1``, in a new launch as a user resumes) or uneven.

The global batch is the same whatever the number of processes (per-process batch = 16 / processes). Writes
``OUT/steps.jsonl`` (loss, grad_norm of each step), ``OUT/rollouts.<rank>.json`` (greedy completion ids of
test_vllm_cpu.PROMPTS, by the trainer's engine after it synced step 1's weights) and, on rank 0,
``OUT/weights.safetensors`` (``checkpoint_weights`` of the trained policy: what the engine was sent). ``uneven``, full weights:
2 steps of _sharding_driver.py's ``grpo_uneven`` (dynamic sampling with a reward that makes the processes draw
different numbers of rounds, an eval set of 3 prompts that processes split 2 / 1, evaluated every step); prints
``EVALS n``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

WORLD = int(os.environ.get("WORLD_SIZE", "1"))
RANK = int(os.environ.get("RANK", "0"))


def say(line: str) -> None:
    """One line in one write: the processes share the test's pipe (print writes the newline apart)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(
    out: Path, model_dir: str, engine: str, mode: str, url: str | None = None, group_port: str | None = None
):
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_align.rollout.weights import checkpoint_weights
    from hf_align.trainers.grpo import GRPOTrainer
    from hf_align.trainers.safety import sharded_engine
    from tests.integration._sharding_driver import rank_skewed_reward
    from tests.integration._train_driver import StepLog
    from tests.integration.test_grpo_trainer import ROWS, _config, letter_e_reward
    from tests.integration.test_vllm_cpu import GREEDY, PROMPTS

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, _, weight_sync = engine.partition(":")
    fields = dict(
        generation_batch_size=16, num_generations=4, per_device_train_batch_size=16 // WORLD,
        gradient_accumulation_steps=1, max_steps=1, beta=0.0, learning_rate=5e-2, use_vllm=True, plot_curves=False,
        vllm_mode="colocate" if engine == "vllm" else "server",
    )  # fmt: skip
    if engine == "vllm_server":
        fields |= {
            "vllm_server_base_url": url,
            "vllm_weight_sync": weight_sync,
            "vllm_group_port": int(group_port),
            "vllm_request_timeout": 120.0,  # a deadlock with the server fails in minutes, not at the test's timeout
        }
    if mode in ("save", "resume"):
        fields |= {"max_steps": 2, "save_strategy": "steps", "save_steps": 1}
    if mode == "uneven":
        fields |= {"dynamic_sampling": True, "max_dynamic_sampling_rounds": 3, "eval_strategy": "steps",
                   "eval_steps": 1, "max_steps": 2}  # fmt: skip
    config = _config(out, **fields)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear")
    reward = rank_skewed_reward if mode == "uneven" else letter_e_reward
    trainer = GRPOTrainer(
        model, [reward], config, train_dataset=ROWS, processing_class=tokenizer,
        eval_dataset=ROWS[:3] if mode == "uneven" else None, peft_config=lora if mode == "lora" else None,
        callbacks=[StepLog(out / "steps.jsonl", "resume" if mode == "resume" else "fresh")],
    )  # fmt: skip
    say(f"SHARDED BY {sharded_engine(trainer.accelerator.state)}")
    # late: the main process starts its first weight push before this one has reached it
    if mode == "late" and RANK == 1:
        time.sleep(5)
    trainer.train(
        resume_from_checkpoint=str(Path(config.output_dir) / "checkpoint-1") if mode == "resume" else None
    )
    say(f"EVALS {sum('eval_reward' in h for h in trainer.state.log_history)}")
    with trainer._engine_ready() as rollout_engine:  # syncs the last step's weights (every rank takes part)
        groups = rollout_engine.generate(PROMPTS, GREEDY)
    (out / f"rollouts.{RANK}.json").write_text(json.dumps([[r.completion_ids for r in g] for g in groups]))
    weights = {n: t.clone() for n, t in checkpoint_weights(trainer.accelerator.unwrap_model(trainer.model))}
    if RANK == 0:
        save_file(weights, str(out / "weights.safetensors"))
    trainer.accelerator.wait_for_everyone()
    trainer.close()
    if torch.distributed.is_initialized():  # joins gloo's threads now: once in ~30 runs, exit aborted in them
        torch.distributed.destroy_process_group()
    say("DONE")


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID`: where a hung process is
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: (
            None
        )  # no C++ build: plain gloo
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), *sys.argv[2:])
