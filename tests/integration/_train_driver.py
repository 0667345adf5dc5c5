"""Train SFT, DPO or GRPO on the integration tests' toy data in a process that a test can kill and resume.

    PYTHONPATH=. python tests/integration/_train_driver.py --trainer sft|dpo|grpo --output_dir D --max_steps N \
        [--save_steps S] [--resume] [--kill_at_step K] [--kill_during_save_at_step K]

Model, tokenizer, data and config come from tests/conftest.py and the trainers' own integration tests, with
attention dropout on (so training draws from the global RNG and a resume must restore it) and batches that do
not divide the data evenly (so the shuffled data order and the position in it matter).

Every logged step is appended to ``D/steps.jsonl`` when it is logged, ``{"run", "step", "loss", "grad_norm"}``,
so a process that dies keeps what it logged; a run that finishes appends ``{"run", "final": true, "param_sum",
"param_sq_sum"}``. ``run`` is "resume" with ``--resume`` (``train(resume_from_checkpoint=True)``), else "fresh".
``--kill_at_step K`` SIGKILLs the process once checkpoint-K is complete; ``--kill_during_save_at_step K``
SIGKILLs it halfway through writing checkpoint K (after the model, optimizer and RNG files, before
``trainer_state.json`` and the rename).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_align.cli import resume_target
from tests.conftest import build_model, build_tokenizer

DROPOUT = 0.1
TRAINERS = ("sft", "dpo", "grpo", "rm")


def build_trainer(
    kind: str, output_dir: str | Path, max_steps: int, save_steps: int, callbacks=(), tokenizer=None,
    dropout: float = DROPOUT, eval_dataset=None, reward_funcs=None, **overrides,
):  # fmt: skip
    """The trainer of ``kind`` on its toy task, saving every ``save_steps`` steps into ``output_dir``; ``overrides``
    replace config fields (tests/integration/_sharding_driver.py: batch sizes per process, engine settings)."""
    tokenizer = tokenizer or build_tokenizer()
    out = Path(output_dir)
    model = build_model(tokenizer, attention_dropout=dropout)
    common = dict(
        output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=save_steps, seed=0
    )
    if kind == "sft":
        from hf_align.trainers.sft import SFTTrainer
        from tests.integration.test_sft_trainer import TOY, _config

        # 8 examples in batches of 3: steps 1-3 are epoch 0 (3 + 3 + 2), step 4 starts a reshuffled epoch 1, and
        # checkpoint-2 is in the middle of an epoch.
        cfg = _config(out, **{"per_device_train_batch_size": 3, **common, **overrides})
        return SFTTrainer(
            model, cfg, train_dataset=TOY, processing_class=tokenizer, callbacks=list(callbacks)
        )
    if kind == "dpo":
        from hf_align.trainers.dpo import DPOTrainer
        from tests.integration.test_dpo_trainer import TOY, _config

        # 8 pairs, 2 x 2 per step: two steps per epoch, checkpoint-2 at an epoch boundary.
        cfg = _config(out, **{"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                              "disable_dropout": False, **common, **overrides})  # fmt: skip
        return DPOTrainer(
            model,
            args=cfg,
            train_dataset=TOY,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    if kind == "grpo":
        from hf_align.trainers.grpo import GRPOTrainer
        from tests.integration.test_grpo_trainer import ROWS, _config, letter_e_reward

        # A generation batch of 48 lasts 3 optimizer steps of 16: checkpoint-2 holds one unused step of rollouts, and
        # step 4 samples a new batch (temperature 1) from where the prompt stream stopped. The reward is continuous,
        # so every group carries a gradient.
        cfg = _config(out, **{"generation_batch_size": 48, "per_device_train_batch_size": 8,
                              "gradient_accumulation_steps": 2, "plot_curves": False, **common, **overrides})  # fmt: skip
        return GRPOTrainer(
            model,
            reward_funcs or [letter_e_reward],
            cfg,
            train_dataset=ROWS,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    if kind == "rm":
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        from hf_align.trainers.reward_model import RewardTrainer
        from tests.integration.test_reward_model_trainer import SUBJECTS, _config, _pairs, _reward_model

        # 16 pairs, 4 x 2 per step: two steps per epoch. Under ZeRO-3 an earlier config leaves deepspeed.zero.Init on,
        # inside which transformers cannot initialize a model built from a config (its padded embedding row is a
        # partition): the toy model is built outside it, then partitioned by the trainer as any loaded model is.
        unset_hf_deepspeed_config()
        reward_model = _reward_model(tokenizer)
        cfg = _config(out, **{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
                              **common, **overrides})  # fmt: skip
        return RewardTrainer(
            reward_model,
            args=cfg,
            train_dataset=_pairs(SUBJECTS),
            processing_class=tokenizer,
            callbacks=list(callbacks),
        )
    raise ValueError(f"--trainer must be one of {TRAINERS}, got {kind!r}")


class StepLog(TrainerCallback):
    """Appends each logged training step to a jsonl file at once (a SIGKILL loses nothing already logged)."""

    def __init__(self, path: Path, run: str):
        self.path, self.run = path, run

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"run": self.run, "rank": int(os.environ.get("RANK", 0)), **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            self.write({"step": state.global_step, "loss": logs["loss"], "grad_norm": logs.get("grad_norm")})


class KillAfterSave(TrainerCallback):
    """SIGKILL right after checkpoint-``step`` is complete (on_save runs after the rename)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            assert (Path(args.output_dir) / f"checkpoint-{self.step}" / "trainer_state.json").is_file()
            os.kill(os.getpid(), signal.SIGKILL)


def die_while_saving(trainer, step: int) -> None:
    """Make ``trainer`` SIGKILL its own process once the RNG state of checkpoint ``step`` is on disk."""
    save_rng_state = trainer._save_rng_state

    def save_then_die(output_dir):
        save_rng_state(output_dir)
        if trainer.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer._save_rng_state = save_then_die


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainer", choices=TRAINERS, required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--save_steps", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill_at_step", type=int)
    parser.add_argument("--kill_during_save_at_step", type=int)
    parser.add_argument("--save_on_each_node", action="store_true")
    a = parser.parse_args(argv)

    log = StepLog(Path(a.output_dir) / "steps.jsonl", "resume" if a.resume else "fresh")
    callbacks = [log] + ([KillAfterSave(a.kill_at_step)] if a.kill_at_step else [])
    overrides = {"save_on_each_node": True} if a.save_on_each_node else {}
    trainer = build_trainer(a.trainer, a.output_dir, a.max_steps, a.save_steps, callbacks, **overrides)
    if a.kill_during_save_at_step:
        die_while_saving(trainer, a.kill_during_save_at_step)
    Path(a.output_dir).mkdir(parents=True, exist_ok=True)
    # the recipes' reading of `--resume_from_checkpoint latest`
    trainer.train(resume_from_checkpoint=resume_target("latest" if a.resume else None))
    params = [p.detach().double() for p in trainer.model.parameters()]
    log.write(
        {
            "final": True,
            "param_sum": sum(p.sum().item() for p in params),
            "param_sq_sum": sum(p.square().sum().item() for p in params),
        }
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
