"""What every hf_align trainer adds to `transformers.Trainer` so that a crash never costs a finished checkpoint.

- **Atomic checkpoints.** Trainer's own checkpoint save runs with its run folder redirected to
  ``<output_dir>/.partial-checkpoint-N``; the finished ``checkpoint-N`` inside is renamed into ``output_dir`` once
  every process has written its files. A process killed mid-save leaves a ``.partial-*`` folder that
  ``get_last_checkpoint`` never picks (the next save removes it). Hub pushes and ``save_total_limit`` pruning
  happen after the rename.
- **Non-finite stops.** Trainer would log a NaN / inf loss as the running average and let the optimizer apply NaN
  gradients. We read every optimizer step's gradient norm before the update (all-reduced: every process stops
  together) and raise `NonFiniteError` naming the step, so the bad step never touches the weights. The norm comes
  from Trainer's private ``_get_grad_norm``: no public hook sees it before the update, and recomputing it would
  read partitioned gradients under DeepSpeed. pyproject.toml pins the tested transformers range
  (tests/unit/test_dependency_pins.py).
- **No silent non-learning.** A step that had something to learn (``_step_has_learning_signal``) but an exactly
  zero gradient, before any step had a non-zero one, raises `NoLearningError`: a run whose weights are cut off
  from its loss never "succeeds". So does a ``train()`` in which no optimizer step had anything to learn (GRPO:
  every advantage 0, or every completion masked), at its end, agreed over processes.
- **Rollout engine faults** surface as `RolloutEngineError` naming the engine, the action, the step and the
  checkpoint to resume from; nothing is saved after the failure.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import contextmanager

import torch
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from hf_align.launch import env_flag
from hf_align.rollout.base import RolloutEngineError

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"


def last_checkpoint_hint(output_dir: str) -> str:
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None:
        return "No checkpoint was written yet. "
    return f"Last checkpoint: {last} (resume with --resume_from_checkpoint {last}). "


def resume_hint(trainer) -> str:
    """Where a failure happened and what to resume from, for error messages."""
    step, last = trainer.state.global_step + 1, last_checkpoint_hint(trainer.args.output_dir)
    return f"(before optimizer step {step}) {last}"


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


def _claim(path: str) -> bool:
    """Create ``path`` if no one has (atomic, also across nodes on a shared disk); whether this call made it."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


class UnsupportedEngineError(RuntimeError):
    """The distributed engine asked for is one hf_align cannot yet train under correctly."""


def sharded_engine(state) -> str | None:
    """ "FSDP2" or "DeepSpeed ZeRO-3" when the accelerator shards the model's parameters over processes, else None."""
    plugin = getattr(state, "deepspeed_plugin", None)
    if getattr(state, "fsdp_plugin", None) is not None:
        return f"FSDP{state.fsdp_plugin.fsdp_version}"
    return "DeepSpeed ZeRO-3" if plugin is not None and plugin.zero_stage == 3 else None


def refuse_unsupported_sharding(state) -> None:
    """Stop before training under an engine hf_align cannot train under correctly, or one the launcher asked for
    and accelerate silently dropped.

    FSDP2 and DeepSpeed ZeRO-3 train (log-probs step aside from the fused output layer, references are sharded
    like the policy, HF rollouts gather the weights: tests/integration/test_sharding_matrix.py). FSDP1 is refused:
    untested here (its flat parameters gave size mismatches). Without CUDA, accelerate drops an FSDP plugin (and,
    with ``use_cpu``, DeepSpeed) without a word and would run plain DDP: the launcher's environment is compared
    with the state, and a dropped engine is refused, pointing at the CPU launch helper (hf_align/launch.py).
    """
    name = sharded_engine(state)
    if name is None and env_flag(
        "ACCELERATE_USE_FSDP"
    ):  # the launch's FSDP version, dropped by accelerate or not
        name = f"FSDP{os.environ.get('FSDP_VERSION', '1')}"
    if name is not None and name.startswith("FSDP") and name != "FSDP2":
        raise UnsupportedEngineError(
            f"{name} is not supported by hf_align (its flat parameters are not handled): use FSDP2 "
            "(fsdp_version: 2 in the accelerate config), DeepSpeed ZeRO-3 or DDP."
        )
    if env_flag("ACCELERATE_USE_FSDP") and getattr(state, "fsdp_plugin", None) is None:
        raise UnsupportedEngineError(
            "the launcher asked for FSDP but accelerate dropped it (it does on a machine without CUDA) and would "
            "train plain DDP. On CPU, launch with HF_ALIGN_FSDP_ON_CPU=1 and accelerate_configs/fsdp2_cpu.yaml "
            "(hf_align/launch.py); on GPUs, check that CUDA is visible."
        )
    if env_flag("ACCELERATE_USE_DEEPSPEED") and getattr(state, "deepspeed_plugin", None) is None:
        raise UnsupportedEngineError(
            "the launcher asked for DeepSpeed but accelerate dropped it (it does with use_cpu: true) and would "
            "train plain DDP: set use_cpu false (a machine without CUDA still runs on CPU), see "
            "accelerate_configs/deepspeed_zero3_cpu.yaml."
        )


class NoLearningError(RuntimeError):
    """An optimizer step that should have learned something has an exactly zero gradient."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN / inf loss or gradient norm; the optimizer step was not applied."""


class SafeTrainingMixin:
    """Mix in before `transformers.Trainer`: ``class SFTTrainer(SafeTrainingMixin, Trainer)``."""

    _step_losses: list[torch.Tensor] | None = None  # this optimizer step's micro-batch losses, on the device
    _has_learned = False  # some optimizer step of this process had a non-zero gradient
    _signal_seen = False  # some optimizer step of this train() call had something to learn
    _steps_run = 0  # optimizer steps of this train() call
    _staging_dir: str | None = None  # Trainer's run folder while a checkpoint is being written

    def create_accelerator_and_postprocess(self) -> None:
        from hf_align.launch import fsdp_on_cpu_if_asked

        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu_if_asked(self.accelerator):  # HF_ALIGN_FSDP_ON_CPU=1; Trainer prepares the model later
            self.is_fsdp_enabled = True
        refuse_unsupported_sharding(self.accelerator.state)

    # ------------------------------------------------------------------ non-finite loss / gradient

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Kept on the device: checked once per optimizer step, not with a sync per micro-batch.
        self._step_losses = [*(self._step_losses or []), loss.detach().float().reshape(())]
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
        losses, self._step_losses = self._step_losses, None
        bad = [x for x in torch.stack(losses).tolist() if not math.isfinite(x)] if losses else []
        step, hint = self.state.global_step + 1, last_checkpoint_hint(self.args.output_dir)
        if not math.isfinite(value) or bad:
            raise NonFiniteError(
                f"optimizer step {step}: non-finite "
                + (f"loss ({bad[0]}) and " if bad else "")
                + f"gradient norm ({value}); training stopped before this update. {hint}"
                + "Lower the learning rate, check the data / rewards of this step, or use bf16 instead of fp16."
            )
        signal = self._step_has_learning_signal()  # called every step: it also resets GRPO's per-step flag
        self._signal_seen, self._steps_run = self._signal_seen or signal, self._steps_run + 1
        # Only until the first non-zero gradient: later, a policy that has become certain of its samples (every
        # log-prob exactly 0 in float32) or a fully clipped ratio legitimately gives a zero gradient.
        self._has_learned = self._has_learned or value > 0.0
        if value == 0.0 and signal and not self._has_learned:
            raise NoLearningError(
                f"optimizer step {step}: the gradient norm is exactly 0 although this step had something to "
                "learn (trainable tokens, or non-zero advantages), and no step of this run has had a non-zero "
                "gradient yet; nothing would be learned. Likely causes: weights sharded by the engine and read "
                f"as empty, every parameter frozen, or a loss detached from the model. {hint}"
            )
        return grad_norm

    def _step_has_learning_signal(self) -> bool:
        """Hook: whether this optimizer step's loss should give a non-zero gradient (GRPO: some advantage != 0)."""
        return True

    # ------------------------------------------------------------------ checkpoints: atomic save, exact resume

    def _save_extra_state(self, folder: str) -> None:
        """Hook: write trainer-specific state into the checkpoint folder (every process calls it)."""

    def _load_extra_state(self, folder: str) -> None:
        """Hook: read back what ``_save_extra_state`` wrote, before training resumes from ``folder``."""

    def train(self, resume_from_checkpoint=None, **kwargs):
        out = self.args.output_dir
        if resume_from_checkpoint is True and os.path.isdir(out):  # Trainer's reading, needed here first
            resume_from_checkpoint = get_last_checkpoint(out) or True  # none: Trainer raises its own error
        if resume_from_checkpoint and resume_from_checkpoint is not True:
            self._load_extra_state(str(resume_from_checkpoint))
        self._signal_seen, self._steps_run = False, 0
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        seen = torch.tensor(float(self._signal_seen), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            seen = self.accelerator.reduce(seen, reduction="sum")
        if self._steps_run and not seen.item():
            raise NoLearningError(
                f"none of the {self._steps_run} optimizer steps of this run had anything to learn, so the weights "
                "never moved: every group's rewards were equal (frac_reward_zero_std 1: a task too hard or too "
                "easy for the model, or a reward that does not tell completions apart), or every completion was "
                "left out of the loss (mask_truncated_completions with completions all cut at "
                "max_completion_length)."
            )
        return output

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        plugin = self.accelerator.state.fsdp_plugin if self.is_fsdp_enabled else None
        if _internal_call or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type):
            return super().save_model(output_dir, _internal_call)
        # Under FSDP with a sharded state dict, Trainer's save_model writes no model at all (checkpoints keep
        # their shards through accelerate): the user's save gathers a full one that from_pretrained loads.
        sharded = plugin.state_dict_type
        plugin.set_state_dict_type("FULL_STATE_DICT")
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            plugin.set_state_dict_type(sharded)

    def _save(self, output_dir=None, state_dict=None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not (self.args.should_save and self.args.process_index != 0):
            return super()._save(output_dir, state_dict)
        # transformers' save_pretrained writes weights only on global rank 0 once torch.distributed is up,
        # whatever save_on_each_node says: another node's checkpoint would lack its model and fail to resume.
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.should_save_on_this_rank

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written into a staging folder and renamed into place once complete."""
        args, run_dir = self.args, self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staged = os.path.join(run_dir, name), os.path.join(run_dir, PARTIAL_PREFIX + name, name)
        if args.should_save:
            for leftover in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
                if leftover.startswith(PARTIAL_PREFIX):  # from a process killed mid-save
                    shutil.rmtree(os.path.join(run_dir, leftover), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        push, args.push_to_hub = args.push_to_hub, False  # pushed below, from the renamed folder
        self._staging_dir = os.path.dirname(staged)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir, args.push_to_hub = None, push
        os.makedirs(staged, exist_ok=True)  # with save_only_model, this process may have written nothing
        self._save_extra_state(staged)
        if self.state.best_model_checkpoint == staged:  # Trainer found it the best: record its final path
            self.state.best_model_checkpoint = final
            if args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its files
        # With save_on_each_node, every node's main process saves. On a shared disk they all wrote the same
        # staged folder, and exactly one of them may move it into place: an exclusive claim file picks it. On
        # separate disks each claims its own.
        claim = os.path.join(run_dir, PARTIAL_PREFIX + name + ".claim")
        owner = args.should_save and _claim(claim)
        if owner:
            if os.path.exists(final):  # the same step saved twice (e.g. a final save): replace it
                shutil.rmtree(final)
            os.replace(staged, final)
            os.rmdir(os.path.dirname(staged))
            logger.info("checkpoint written: %s", final)
        self.accelerator.wait_for_everyone()  # every saver has tried its claim
        if owner:
            os.remove(claim)
        elif self.accelerator.is_local_main_process and os.path.isdir(os.path.dirname(staged)):
            # A node that does not save (no save_on_each_node) on a disk of its own: only its processes' RNG
            # files were staged there, never to become a checkpoint; don't strand them.
            shutil.rmtree(os.path.dirname(staged), ignore_errors=True)
        if push:
            self._push_from_checkpoint(final)
        if owner:
            rotate_checkpoints(
                run_dir, args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
