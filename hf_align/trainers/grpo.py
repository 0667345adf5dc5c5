"""GRPOTrainer: group-relative policy optimisation on top of `transformers.Trainer`.

The loop, in one paragraph: each rollout step takes the next ``rollout_batch_size / group_size`` prompts
(this process's share), samples ``group_size`` completions per prompt from the rollout engine (HF generate,
a colocated vLLM, or a vLLM server; the engine gets the trained weights whenever an optimizer step has
happened since the last sync), grades them in the grader's worker pool, normalises rewards within each
group into advantages, and cuts the batch into micro-batches. Trainer's own loop then runs
``epochs_per_rollout_batch x rollout_batch_size / optimizer_batch_size`` optimizer steps of
``gradient_accumulation_steps`` micro-batches over it; ``_prepare_inputs`` hands out the micro-batches and
``compute_loss`` applies ``hf_align.losses.grpo.policy_loss`` with the optimizer step's global counts (so
every reduction is exact under any micro-batch / accumulation / process split) times the number of
processes (DDP averages gradients).

Choices:
- Trainer's data loader iterates a placeholder of the right length; prompts come from our own seeded
  stream, so the number of optimizer steps is ``max_steps`` exactly.
- Old log-probs (for ratio losses) are computed once per rollout batch with the policy as it was when
  sampling; the engine's own sampling log-probs are not used for the ratio (vLLM's kernels differ slightly).
- The reference policy for the KL term is the policy with its LoRA adapters disabled when training LoRA,
  otherwise a frozen copy (or ``ref_model``).
- The rollout state (prompt cursor, unused micro-batches) is saved with every checkpoint and restored on
  ``resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer

from hf_align.config import GRPOConfig
from hf_align.data import load_prompt_template
from hf_align.logprobs import get_response_log_probs, masked_mean_or_zero
from hf_align.losses.grpo import policy_loss
from hf_align.rewards import Grader
from hf_align.rollout import make_engine
from hf_align.trainers import grpo_rollouts as R
from hf_align.trainers.metrics import merge_metrics, weighted_mean
from hf_align.trainers.safety import SafeTrainingMixin, engine_faults

logger = logging.getLogger(__name__)

ROLLOUT_STATE = "rollout_state_rank{rank}.pt"


class _Placeholder(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _placeholder_collate(items: list[int]) -> dict[str, torch.Tensor]:
    return {"index": torch.tensor(items)}


class GRPOTrainer(SafeTrainingMixin, Trainer):
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        args: GRPOConfig,
        train_dataset: list[dict],
        eval_dataset: list[dict] | None = None,
        processing_class=None,
        reward_funcs: list | None = None,
        rollout_engine=None,
        ref_model=None,
        peft_config=None,
        callbacks=None,
    ):
        if args.max_steps <= 0:
            raise ValueError("GRPO needs max_steps > 0 (optimizer steps); epochs over prompts are not used")
        if processing_class is None:
            raise ValueError("GRPOTrainer needs processing_class (the tokenizer)")
        if not train_dataset:
            raise ValueError("train_dataset is empty: GRPO needs rows with 'question' and 'answer'")
        if peft_config is not None:
            from hf_align.modeling import wrap_lora

            model = wrap_lora(model, peft_config)
        super().__init__(
            model=model,
            args=args,
            train_dataset=_Placeholder(args.max_steps * args.optimizer_batch_size),
            eval_dataset=_Placeholder(len(eval_dataset))
            if eval_dataset
            else None,  # evaluate() uses the rows
            data_collator=_placeholder_collate,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        self.eval_rows = list(eval_dataset or [])
        self.template = load_prompt_template(args.prompt_template)
        self.prompts = R.PromptStream(
            list(train_dataset), self.template, processing_class, args.max_prompt_length, args.seed
        )
        funcs = reward_funcs if reward_funcs is not None else args.reward_funcs
        self.reward_weights = args.reward_weights or [1.0] * len(funcs)
        if len(self.reward_weights) != len(funcs):
            raise ValueError(f"{len(self.reward_weights)} reward weights for {len(funcs)} reward functions")
        self._reward_funcs = list(funcs)
        self._graders: list[Grader] | None = None
        self._engine = rollout_engine
        self.ref_model = self._reference_policy(ref_model)
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._synced_step = -1
        self._rollout_s = 0.0  # seconds spent making rollout batches (kept out of time/training_s)
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def _reference_policy(self, ref_model):
        """The frozen model for the KL term, or None when the LoRA policy with adapters off serves (or beta = 0)."""
        a, lora = self.args, hasattr(self.model, "disable_adapter")
        if a.beta == 0:
            if ref_model is not None:
                logger.warning("ref_model is unused: beta = 0 (no KL penalty)")
            return None
        mode = a.ref_mode or ("adapter_disabled" if lora and ref_model is None else "copy")
        if mode == "adapter_disabled":
            if not lora:
                raise ValueError(
                    f"beta={a.beta} with ref_mode='adapter_disabled' needs a LoRA policy (use_peft: true); "
                    "set ref_mode: copy (a frozen copy of the initial model), pass ref_model, or set beta: 0"
                )
            return None
        if ref_model is not None:
            return ref_model
        from hf_align.modeling import create_reference_model

        return create_reference_model(self.model)

    # ------------------------------------------------------------------ rollouts

    @property
    def graders(self) -> list[Grader]:
        if self._graders is None:
            a = self.args
            self._graders = [Grader(f, a.grader_timeout_s, a.grader_num_workers) for f in self._reward_funcs]
        return self._graders

    def close(self) -> None:
        """Stop grader workers and the rollout engine (a later call to train / evaluate restarts them)."""
        for g in self._graders or []:
            g.close()
        self._graders = None
        if self._engine is not None and self.args.rollout_engine != "hf":
            self._engine.close()
            self._engine = None

    def _faults(self, action: str):
        return engine_faults(self, self.args.rollout_engine, action)

    @property
    def engine(self):
        if self._engine is None:
            a, kind = self.args, self.args.rollout_engine
            source, kwargs = self.accelerator.unwrap_model(self.model), {}
            if kind == "hf":
                kwargs = {"batch_size": a.generation_batch_size}
            elif kind == "vllm":
                kwargs = {
                    "gpu_memory_utilization": a.vllm_gpu_memory_utilization,
                    "enable_sleep_mode": a.vllm_enable_sleep_mode,
                    "seed": a.seed,
                }
            else:  # the server already holds the model; weights are pushed before the first rollout
                source = a.vllm_server_url
            with self._faults("starting"):
                self._engine = make_engine(kind, source, self.processing_class, **kwargs)
        return self._engine

    def _sync_engine(self) -> None:
        if self._synced_step == self.state.global_step:
            return
        start = time.perf_counter()
        with self._faults("syncing weights"):
            self.engine.sync_weights(self.accelerator.unwrap_model(self.model))
        self._synced_step = self.state.global_step
        self._metrics["time/weight_sync_s"].append(time.perf_counter() - start)

    @contextmanager
    def _engine_awake(self):
        """A colocated vLLM in sleep mode is woken for syncing and sampling and put back to sleep for training,
        so its KV cache (and, at level 1, its weights) do not sit in GPU memory during the backward pass."""
        sleepy = self.args.vllm_enable_sleep_mode and hasattr(self.engine, "sleep")
        if sleepy:
            with self._faults("waking up"):
                self.engine.wake_up()
        try:
            yield
        finally:
            if sleepy:
                with self._faults("going to sleep"):
                    self.engine.sleep()

    def _make_rollout_batch(self) -> None:
        a = self.args
        world = self.accelerator.num_processes
        want_groups = a.rollout_batch_size // a.group_size // world
        with self._engine_awake():
            self._sync_engine()
            keep, filler = R.ScoredGroups(), R.ScoredGroups()
            gen_time = grade_time = 0.0
            tokens = invalid = rounds = 0
            while len(keep) < want_groups * a.group_size and rounds < max(1, a.max_dynamic_sampling_rounds):
                rounds += 1
                need = want_groups - len(keep) // a.group_size
                prompts = self.prompts.take(need, self.accelerator.process_index, world)
                start = time.perf_counter()
                sampling = R.sampling_for(a, [p["position"] for p in prompts])
                with self._faults("generating"):
                    groups = self.engine.generate([p["prompt"] for p in prompts], sampling)
                gen_time += time.perf_counter() - start
                tokens += sum(len(r.completion_ids) for g in groups for r in g)
                start = time.perf_counter()
                scored, bad = R.score_groups(
                    groups, [p["answer"] for p in prompts], self.graders, self.reward_weights
                )
                grade_time += time.perf_counter() - start
                invalid += bad
                if rounds == 1:
                    for k, v in R.rollout_metrics(scored, a.group_size, a.max_completion_length).items():
                        self._metrics[k].append(v)
                R.select_groups(scored, a.group_size, keep, want_groups, filler, a.dynamic_sampling)
                if not a.dynamic_sampling:
                    break
            if len(keep) < want_groups * a.group_size:  # dynamic sampling ran out of rounds
                keep.extend(filler, 0, want_groups * a.group_size - len(keep))
        rewards_B, advantages_B = R.advantages_for(keep, a.group_size, a.advantage_eps, a.normalize_by_std)
        micro = R.build_micro_batches(
            keep, rewards_B, advantages_B, self.processing_class.pad_token_id,
            a.per_device_train_batch_size, a.gradient_accumulation_steps,
        )  # fmt: skip
        self._add_reference_logprobs(micro)
        R.attach_global_counts(micro, self.accelerator, a.optimizer_batch_size)
        self._buffer = [b for _ in range(a.epochs_per_rollout_batch) for b in micro]
        m = self._metrics
        m["time/generation_s"].append(gen_time)
        m["time/grading_s"].append(grade_time)
        m["generation_tokens_per_s"].append(tokens / max(gen_time, 1e-9))
        m["dynamic_sampling_rounds"].append(rounds)
        m["reward_invalid"].append(invalid)
        m["grader_timeouts"].append(sum(g.stats.get("timeouts", 0) for g in self.graders))
        m["prompts_dropped_too_long"].append(self.prompts.dropped)

    @torch.no_grad()
    def _add_reference_logprobs(self, micro: list[dict]) -> None:
        """Old log-probs (ratio losses) and reference log-probs (KL), computed once per rollout batch."""
        a = self.args
        need_old = a.loss_type in ("grpo_clip", "grpo_no_clip")
        if not need_old and a.beta == 0:
            return
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for b in micro:
                if need_old:
                    b["old_log_probs"] = self._logps(model, b)
                if a.beta > 0:
                    if self.ref_model is not None:
                        b["ref_log_probs"] = self._logps(self.ref_model, b)
                    else:
                        with self.accelerator.unwrap_model(model).disable_adapter():
                            b["ref_log_probs"] = self._logps(model, b)
        finally:
            model.train(was_training)

    def _logps(self, model, b: dict, with_entropy: bool = False) -> dict[str, torch.Tensor] | torch.Tensor:
        device = self.accelerator.device
        out = get_response_log_probs(
            model,
            b["input_ids"].to(device),
            b["labels"].to(device),
            return_token_entropy=with_entropy,
            temperature=self.args.temperature,
            attention_mask=b["attention_mask"].to(device),
            chunk_tokens=self.args.logprob_chunk_tokens,
            logprob_mask=b["response_mask"].to(device),  # the output layer skips prompt positions
            share_prompts=self.args.share_prompt_prefix,  # a group's prompt goes through the decoder once
        )
        return out if with_entropy else out["log_probs"]

    # ------------------------------------------------------------------ Trainer hooks

    def _prepare_inputs(self, inputs):
        if not self._buffer:
            start = time.perf_counter()
            self._make_rollout_batch()
            self._rollout_s += time.perf_counter() - start
        return self._buffer.pop(0)

    def _get_num_items_in_batch(self, batch_samples, device):
        return None  # counts come with each micro-batch (see grpo_rollouts.attach_global_counts)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a, device = self.args, self.accelerator.device
        out = self._logps(model, inputs, with_entropy=True)
        mask_BT = inputs["response_mask"].to(device)
        opt = {k: inputs[k].to(device) for k in ("old_log_probs", "ref_log_probs") if k in inputs}
        loss, metrics = policy_loss(
            out["log_probs"],
            mask_BT,
            loss_type=a.loss_type,
            reduction=a.loss_reduction,
            advantages_B=inputs["advantages"].to(device),
            raw_rewards_B=inputs["raw_rewards"].to(device),
            old_log_probs_BT=opt.get("old_log_probs"),
            ref_log_probs_BT=opt.get("ref_log_probs"),
            cliprange=a.cliprange,
            cliprange_low=a.cliprange_low,
            cliprange_high=a.cliprange_high,
            ratio_level=a.ratio_level,
            beta=a.beta,
            num_sequences=inputs["num_sequences"].item(),
            num_tokens=inputs["num_tokens"].item(),
            max_completion_length=a.max_completion_length,
        )
        for k, v in metrics.items():
            if k != "loss":
                self._metrics[k].append(v.item())
        self._metrics["entropy"].append(masked_mean_or_zero(out["token_entropy"], mask_BT).item())
        loss = loss * self.accelerator.num_processes
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, rollout_before = time.perf_counter(), self._rollout_s
        loss = super().training_step(model, inputs, num_items_in_batch)  # may run a rollout step first
        elapsed = time.perf_counter() - start - (self._rollout_s - rollout_before)
        self._metrics["time/training_s"].append(elapsed)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(k.startswith("eval_") for k in logs):
            logs.update(merge_metrics(self.accelerator, self._metrics))
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation, checkpoints, curves

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        from hf_align.evaluation import evaluate as run_eval

        rows = list(eval_dataset) if eval_dataset is not None else self.eval_rows
        rows = rows[: self.args.eval_max_examples] if self.args.eval_max_examples else rows
        if not rows:
            return {}
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        sampling = R.sampling_for(self.args)
        sampling.n, sampling.temperature = 1, self.args.eval_temperature
        with self._engine_awake():
            self._sync_engine()
            with self._faults("generating for evaluation"):
                summary = run_eval(
                    self.engine, rows[rank::world], self.template, self.graders[0], sampling, progress=False
                )
        keys = ("accuracy", "format_rate", "mean_reward")
        acc, fmt, rew = weighted_mean(self.accelerator, [summary[k] for k in keys], summary["n"])
        metrics = {
            f"{metric_key_prefix}_accuracy": acc,
            f"{metric_key_prefix}_format_rate": fmt,
            f"{metric_key_prefix}_mean_reward": rew,
        }
        self.log(metrics)
        # As Trainer.evaluate does: callbacks see the metrics, and the pending-evaluation flag is cleared (without
        # this the epoch-end hook evaluates a second time).
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save_extra_state(self, folder: str) -> None:
        state = {**self.prompts.state_dict(), "buffer": self._buffer}
        torch.save(state, Path(folder) / ROLLOUT_STATE.format(rank=self.accelerator.process_index))

    def _load_rollout_state(self, checkpoint: str) -> None:
        path = Path(checkpoint) / ROLLOUT_STATE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by GRPOTrainer")
        state = torch.load(path, weights_only=False)
        self.prompts.load_state_dict(state)
        self._buffer = state["buffer"]

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            found = os.path.isdir(self.args.output_dir) and get_last_checkpoint(self.args.output_dir)
            if not found:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint"
                )
            resume_from_checkpoint = found
        if resume_from_checkpoint:
            self._load_rollout_state(resume_from_checkpoint)
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            for g in self._graders or []:
                g.close()
            self._graders = None
        if self.args.plot_curves and self.is_world_process_zero():
            from hf_align.plotting import plot_training_curves

            path = plot_training_curves(
                self.state.log_history, os.path.join(self.args.output_dir, "curves.png")
            )
            logger.info("wrote %s", path)
            with open(os.path.join(self.args.output_dir, "log_history.json"), "w") as f:
                json.dump(self.state.log_history, f, indent=1)
        return result
