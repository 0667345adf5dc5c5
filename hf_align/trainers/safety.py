"""What every hf_align trainer adds to `transformers.Trainer` so that a crash never costs a finished checkpoint.

Choices:
- **Atomic checkpoints.** A checkpoint is written into ``<output_dir>/.partial-checkpoint-N`` and renamed to
  ``checkpoint-N`` only when every process has finished writing. A process killed mid-save leaves a
  ``.partial-*`` folder that ``get_last_checkpoint`` / ``--resume_from_checkpoint`` never pick (it is removed
  by the next save), so the last complete checkpoint is always the one resumed. Pushing to the Hub and
  pruning old checkpoints (``save_total_limit``) happen after the rename.
- **Non-finite stops.** Trainer by default replaces a NaN / inf loss by the running average in its log
  (``logging_nan_inf_filter``) and lets the optimizer apply NaN gradients. We check the gradient norm of
  every optimizer step *before* the update (it is all-reduced, so every process sees the same value and
  stops together) and raise `NonFiniteError` naming the step: the weights were never touched by the bad
  step and the last checkpoint on disk stays as it was. A non-finite micro-batch loss is reported in the
  same message.
- **No silent non-learning.** A step whose gradient norm is exactly 0 although it had something to learn
  (``_step_has_learning_signal``: always for SFT / DPO / reward models; GRPO: a non-zero advantage on a kept
  token) before any step has had a non-zero gradient raises `NoLearningError`: a run whose weights are cut off
  from its loss never "succeeds".
- **Rollout engine faults** (vLLM engine death, out of memory, an unreachable server) surface as
  `RolloutEngineError` naming the engine, what it was doing, the step and the last checkpoint to resume from.
  Nothing is saved after the failure, so that checkpoint is intact.
- Subclasses add their own files to a checkpoint through ``_save_extra_state(folder)``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager

import torch
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from hf_align.rollout.base import RolloutEngineError

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"


def last_checkpoint_hint(output_dir: str) -> str:
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        return "No checkpoint was written yet. "
    return f"Last checkpoint: {last} (resume with --resume_from_checkpoint {last}). "


@contextmanager
def engine_faults(trainer, engine_kind: str, action: str):
    """Turn any failure of a rollout-engine call into a `RolloutEngineError` that says what to do next."""
    try:
        yield
    except RolloutEngineError:
        raise
    except Exception as e:
        # CUDA OOM, vLLM's "No available memory for the cache blocks", ...
        oom = isinstance(e, torch.OutOfMemoryError) or "memory" in str(e).lower()
        raise RolloutEngineError(
            f"rollout engine {engine_kind!r} failed while {action} before optimizer step "
            f"{trainer.state.global_step + 1}: {type(e).__name__}: {str(e)[:500]}. Training stopped. "
            + last_checkpoint_hint(trainer.args.output_dir)
            + (
                "Out of memory: lower vllm_gpu_memory_utilization, generation_batch_size, hf_generate_batch_size or "
                "max_completion_length, or enable vllm_enable_sleep_mode."
                if oom
                else "If the engine died (a vLLM server crashed or was stopped), restart it and resume."
            )
        ) from e


class UnsupportedEngineError(RuntimeError):
    """The distributed engine asked for is one hf_align cannot yet train under correctly."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def refuse_unsupported_sharding(state) -> None:
    """Stop before training under FSDP or DeepSpeed ZeRO-3, which would train wrongly or crash.

    The fused log-prob output layer runs the LM head outside the wrapped forward and reads the head's weight
    shape: under ZeRO-3 that weight is an empty partition (every log-prob 0, so loss and gradient are 0 and the
    run "succeeds" without learning); under FSDP it is a shard (a size mismatch, or a segfault with FSDP2).
    Reference copies and rollout weight syncs do not gather shards either. The launcher's environment is read
    too: on a machine without CUDA, accelerate drops an FSDP plugin without a word and would run plain DDP.
    """
    fsdp = getattr(state, "fsdp_plugin", None) is not None or _env_flag("ACCELERATE_USE_FSDP")
    plugin = getattr(state, "deepspeed_plugin", None)
    stage = getattr(plugin, "zero_stage", None) if plugin is not None else None
    if stage is None and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
    if not fsdp and stage != 3:
        return
    engine = "FSDP" if fsdp else "DeepSpeed ZeRO stage 3"
    raise UnsupportedEngineError(
        f"{engine} is not supported by hf_align yet: its parameters are sharded, and the log-prob output layer, "
        "the reference model and the rollout weight sync would read shards (a silent zero loss under ZeRO-3, "
        "a crash under FSDP). Launch with DDP (accelerate_configs/multi_gpu.yaml or multi_cpu.yaml) or "
        "DeepSpeed ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml) instead."
    )


class NoLearningError(RuntimeError):
    """An optimizer step that should have learned something has an exactly zero gradient."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN / inf loss or gradient norm; the optimizer step was not applied."""


class SafeTrainingMixin:
    """Mix in before `transformers.Trainer`: ``class SFTTrainer(SafeTrainingMixin, Trainer)``."""

    _step_losses: list[torch.Tensor] | None = None  # this optimizer step's micro-batch losses, on the device
    _has_learned = False  # some optimizer step of this process had a non-zero gradient

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        refuse_unsupported_sharding(self.accelerator.state)

    # ------------------------------------------------------------------ non-finite loss / gradient

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Kept on the device: checked once per optimizer step, not with a sync per micro-batch.
        self._step_losses = [*(self._step_losses or []), loss.detach().float().reshape(())]
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer's hook between gradient clipping and the optimizer step (private: pyproject pins the tested
        # transformers range, and the NaN test of tests/integration/test_resume_after_kill.py fails if the hook is not called).
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
        losses, self._step_losses = self._step_losses, None
        bad = [x for x in torch.stack(losses).tolist() if not math.isfinite(x)] if losses else []
        bad_loss = bad[0] if bad else None
        if not math.isfinite(value) or bad_loss is not None:
            step = self.state.global_step + 1
            raise NonFiniteError(
                f"optimizer step {step}: non-finite "
                + (f"loss ({bad_loss}) and " if bad_loss is not None else "")
                + f"gradient norm ({value}); training stopped before this update. "
                + last_checkpoint_hint(self.args.output_dir)
                + "Lower the learning rate, check the data / rewards of this step, or use bf16 instead of fp16."
            )
        signal = self._step_has_learning_signal()  # called every step: it also resets GRPO's per-step flag
        # Only until the first non-zero gradient: later, a policy that has become certain of its samples (every
        # log-prob exactly 0 in float32) or a fully clipped ratio legitimately gives a zero gradient.
        self._has_learned = self._has_learned or value > 0.0
        if value == 0.0 and signal and not self._has_learned:
            raise NoLearningError(
                f"optimizer step {self.state.global_step + 1}: the gradient norm is exactly 0 although this step "
                "had something to learn (trainable tokens, or non-zero advantages), and no step of this run has "
                "had a non-zero gradient yet; nothing would be learned. "
                "Likely causes: weights sharded by the engine and read as empty, every parameter frozen, or a "
                "loss detached from the model. " + last_checkpoint_hint(self.args.output_dir)
            )
        return grad_norm

    def _step_has_learning_signal(self) -> bool:
        """Hook: whether this optimizer step's loss should give a non-zero gradient (GRPO: some advantage != 0)."""
        return True

    # ------------------------------------------------------------------ atomic checkpoints

    def _save_extra_state(self, folder: str) -> None:
        """Hook: write trainer-specific state into the checkpoint folder (every process calls it)."""

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint (model, optimizer, scheduler, scaler, RNG, trainer state), written to a staging
        folder and renamed into place once complete."""
        args, state = self.args, self.state
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        final, staging = os.path.join(run_dir, name), os.path.join(run_dir, PARTIAL_PREFIX + name)
        if args.should_save:
            for leftover in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
                if leftover.startswith(PARTIAL_PREFIX):  # from a process killed mid-save
                    shutil.rmtree(os.path.join(run_dir, leftover), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging, _internal_call=True)
        if not args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        # with save_only_model, a process other than the saving one may not have written anything yet
        os.makedirs(staging, exist_ok=True)
        self._save_extra_state(staging)
        if args.should_save:
            for cb in self.callback_handler.callbacks + [self.control]:
                if isinstance(cb, ExportableState):
                    name_cb = type(cb).__name__
                    if isinstance(state.stateful_callbacks.get(name_cb), list):
                        state.stateful_callbacks[name_cb].append(cb.state())
                    else:
                        state.stateful_callbacks[name_cb] = cb.state()
            state.save_to_json(os.path.join(staging, "trainer_state.json"))
        self.accelerator.wait_for_everyone()  # every process has written its files
        if args.should_save:
            if os.path.exists(final):  # the same step saved twice (e.g. a final save): replace it
                shutil.rmtree(final)
            os.replace(staging, final)
            logger.info("checkpoint written: %s", final)
        self.accelerator.wait_for_everyone()
        if state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
            if os.path.exists(best):
                state.best_model_checkpoint = best
        if args.push_to_hub:
            self._push_from_checkpoint(final)
        if args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=args.save_total_limit,
                best_model_checkpoint=state.best_model_checkpoint,
                use_mtime=True,
            )
