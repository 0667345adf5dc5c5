"""GRPOTrainer: group-relative policy optimisation on top of `transformers.Trainer`, with TRL's interface.

The loop, in one paragraph: each generation step takes the next ``generation_batch_size / num_generations``
prompts (this process's share of the dataset's ``prompt`` column), samples ``num_generations`` completions per
prompt from the rollout engine (HF generate, a colocated vLLM, or a vLLM server; the engine gets the trained
weights whenever an optimizer step has happened since the last sync), scores them with the reward functions
(``hf_align.trainers.grpo_rewards``: TRL's protocol, bounded in time, failures counted), normalises rewards
within each group into advantages, and cuts the batch into micro-batches. Trainer's own loop then runs
``num_iterations x generation_batch_size / optimizer_batch_size`` optimizer steps of
``gradient_accumulation_steps`` micro-batches over it; ``_prepare_inputs`` hands out the micro-batches and
``compute_loss`` applies ``hf_align.losses.grpo.policy_loss`` with the reduction of ``loss_type`` and the
optimizer step's global counts (so every reduction but bnpo is exact under any micro-batch / accumulation /
process split) times the number of processes (DDP averages gradients).

Choices:
- Trainer's data loader iterates a placeholder of the right length; prompts come from our own seeded
  stream, so the number of optimizer steps is ``max_steps`` exactly.
- Old log-probs (for ratio losses) are computed once per generation batch with the policy as it was when
  sampling, unless the batch makes a single optimizer step (then they equal the current ones, detached, as in
  TRL); the engine's own sampling log-probs are not used for the ratio (vLLM's kernels differ slightly).
- The reference policy for the KL term is the policy with its LoRA adapters disabled when training LoRA,
  otherwise a frozen copy (or ``ref_model``).
- The rollout state (prompt cursor, unused micro-batches) is saved with every checkpoint and restored on
  ``resume_from_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Trainer

from hf_align.config import GRPO_LOSS_TYPES, GRPOConfig
from hf_align.logprobs import get_response_log_probs, masked_mean_or_zero
from hf_align.losses.grpo import policy_loss
from hf_align.rollout import make_engine
from hf_align.trainers import grpo_rollouts as R
from hf_align.trainers.base import MetricsMixin, prepare_trainer_inputs
from hf_align.trainers.grpo_rewards import RewardRunner, check_some_reward
from hf_align.trainers.metrics import weighted_mean
from hf_align.trainers.safety import SafeTrainingMixin, engine_faults, last_checkpoint_hint

logger = logging.getLogger(__name__)

ROLLOUT_STATE = "rollout_state_rank{rank}.pt"
# policy_loss's metric names -> TRL's
_TRL_NAMES = {
    "kl_mean": "kl",
    "clip_fraction_low": "clip_ratio/low_mean",
    "clip_fraction_high": "clip_ratio/high_mean",
    "clip_fraction": "clip_ratio/region_mean",
}


class _Placeholder(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _placeholder_collate(items: list[int]) -> dict[str, torch.Tensor]:
    return {"index": torch.tensor(items)}


def _in_memory(dataset):
    """An ``IterableDataset`` read into a list: prompts are drawn by a seeded permutation (exact resume), which
    needs random access. A stream that never ends cannot be used for GRPO."""
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return dataset
    if isinstance(dataset, IterableDataset):
        dataset = list(dataset)
        logger.info("read an IterableDataset of %d prompts into memory", len(dataset))
    return dataset


def _check_prompts(dataset, name: str) -> None:
    first = dataset[0] if dataset is not None and len(dataset) else None
    if first is None:
        raise ValueError(f"{name} is empty: GRPO needs rows with a 'prompt' column")
    if "prompt" not in first:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {sorted(first)}): GRPO takes TRL's prompt-only format. "
            "For question/answer rows, build the prompt from the question (recipes/grpo.py does it with a template)"
        )


class GRPOTrainer(MetricsMixin, SafeTrainingMixin, Trainer):
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model,
        reward_funcs,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        ref_model=None,
        rollout_engine=None,
    ):
        model, args, processing_class = prepare_trainer_inputs(
            model,
            args,
            processing_class,
            peft_config,
            GRPOConfig,
            "GRPO",
            quantization_config=quantization_config,
        )
        train_dataset, eval_dataset = _in_memory(train_dataset), _in_memory(eval_dataset)
        _check_prompts(train_dataset, "train_dataset")
        # max_steps unset: TRL's num_train_epochs passes over the prompts, each sampled num_generations times
        if args.max_steps <= 0:
            per_pass = math.ceil(len(train_dataset) * args.num_generations / args.generation_batch_size)
            args.max_steps = math.ceil(args.num_train_epochs * per_pass) * args.steps_per_rollout
        if eval_dataset is not None:
            _check_prompts(eval_dataset, "eval_dataset")
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        evals = _Placeholder(len(eval_dataset)) if eval_dataset else None  # evaluate() reads the rows
        super().__init__(
            model=model,
            args=args,
            train_dataset=_Placeholder(args.max_steps * args.optimizer_batch_size),
            eval_dataset=evals,
            data_collator=_placeholder_collate,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._init_metrics()
        self.eval_rows = eval_dataset
        self.prompts = R.PromptStream(
            train_dataset, processing_class, args.max_prompt_length, args.seed, args.shuffle_dataset,
            args.chat_template_kwargs,
        )  # fmt: skip
        self.rewards = RewardRunner(
            reward_funcs, reward_processing_classes, args.reward_weights, args, self.accelerator.device
        )
        self.reward_func_names = self.rewards.names
        self._engine = rollout_engine
        self.ref_model = self._reference_policy(ref_model)
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._synced_step = -1
        self._rollout_s = 0.0  # seconds spent making generation batches (kept out of time/training_s)

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

    def close(self) -> None:
        """Stop grader workers and the rollout engine (a later call to train / evaluate restarts them)."""
        self.rewards.close()
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
                kwargs = {"batch_size": a.hf_generate_batch_size}
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
        self.record({"time/weight_sync_s": time.perf_counter() - start}, training=True)

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

    def _score(
        self, prompts: list[dict], groups, strict: bool = True
    ) -> tuple[torch.Tensor, list[float], dict]:
        """Per-function rewards (N, F; NaN: none), their weighted totals and the reward inputs; a training round
        (``strict``) in which no completion got a reward stops training."""
        inputs = R.reward_inputs(prompts, groups)
        hint = f"(before optimizer step {self.state.global_step + 1}) " + last_checkpoint_hint(
            self.args.output_dir
        )
        self.rewards.hint = hint
        rewards_NF, failures = self.rewards(
            inputs["prompts"], inputs["completions"], inputs["completion_ids"], inputs["columns"], self.state
        )
        if strict:
            check_some_reward(rewards_NF, failures, hint)
        return rewards_NF, R.total_rewards(rewards_NF, self.rewards.weights), inputs

    def _grader_metrics(self) -> dict[str, float]:
        """accuracy / format_rate of the first built-in grader's last call, and grader timeouts."""
        graders = self.rewards.graders()
        if not graders or not graders[0].last_details:
            return {}
        details = graders[0].last_details
        return {
            "accuracy": sum(d.get("answer_reward", 0.0) for d in details) / len(details),
            "format_rate": sum(d.get("format_reward", 0.0) for d in details) / len(details),
            "grader_timeouts": sum(g.stats.get("timeouts", 0) for g in graders),
        }

    def _make_rollout_batch(self) -> None:
        a = self.args
        world = self.accelerator.num_processes
        G = a.num_generations
        want_groups = a.generation_batch_size // G // world
        with self._engine_awake():
            self._sync_engine()
            keep, filler = R.ScoredGroups(), R.ScoredGroups()
            gen_time = grade_time = 0.0
            tokens = rounds = 0
            while len(keep) < want_groups * G and rounds < max(1, a.max_dynamic_sampling_rounds):
                rounds += 1
                need = want_groups - len(keep) // G
                prompts = self.prompts.take(need, self.accelerator.process_index, world)
                start = time.perf_counter()
                sampling = R.sampling_for(a, [p["position"] for p in prompts])
                with self._faults("generating"):
                    groups = self.engine.generate([p["text"] for p in prompts], sampling)
                gen_time += time.perf_counter() - start
                tokens += sum(len(r.completion_ids) for g in groups for r in g)
                start = time.perf_counter()
                rewards_NF, totals, inputs = self._score(prompts, groups)
                grade_time += time.perf_counter() - start
                scored = R.scored_groups(groups, totals)
                if rounds == 1:
                    lengths = [len(c) for c in scored.completion_ids]
                    m = R.rollout_metrics(
                        rewards_NF, self.rewards.names, totals, lengths, scored.finish_reasons, G
                    )
                    self.record({**m, **self._grader_metrics()}, training=True)
                    self._log_completions(inputs, totals)
                R.select_groups(scored, G, keep, want_groups, filler, a.dynamic_sampling)
                if not a.dynamic_sampling:
                    break
            if len(keep) < want_groups * G:  # dynamic sampling ran out of rounds
                keep.extend(filler, 0, want_groups * G - len(keep))
        batch_std = None
        if a.scale_rewards == "batch":
            batch_std = R.rewards_std(
                self.accelerator.gather(torch.tensor(keep.rewards, device=self.accelerator.device)).cpu()
            )
        rewards_B, advantages_B = R.advantages_for(keep, G, a.advantage_eps, a.scale_rewards, batch_std)
        micro = R.build_micro_batches(
            keep, rewards_B, advantages_B, self.processing_class.pad_token_id,
            a.per_device_train_batch_size, a.gradient_accumulation_steps, a.mask_truncated_completions,
        )  # fmt: skip
        self._add_reference_logprobs(micro)
        R.attach_global_counts(micro, self.accelerator, a.optimizer_batch_size)
        self._buffer = [b for _ in range(a.num_iterations) for b in micro]
        self.record(
            {
                "time/generation_s": gen_time,
                "time/grading_s": grade_time,
                "generation_tokens_per_s": tokens / max(gen_time, 1e-9),
                "dynamic_sampling_rounds": rounds,
                "prompts_dropped_too_long": self.prompts.dropped,
            },
            training=True,
        )

    def _log_completions(self, inputs: dict, totals: list[float]) -> None:
        if self.args.log_completions and self.is_world_process_zero():
            rows = zip(inputs["prompts"], inputs["completions"], totals)
            for p, c, r in list(rows)[: self.args.num_completions_to_print or 4]:
                logger.info("reward %.3f\nprompt: %.300r\ncompletion: %.300r", r, p, c)

    @property
    def _needs_old_logprobs(self) -> bool:
        """Ratio losses over a batch that lasts more than one optimizer step need the sampling policy's log-probs."""
        return self.args.policy_loss in ("grpo_clip", "grpo_no_clip") and self.args.steps_per_rollout > 1

    @torch.no_grad()
    def _add_reference_logprobs(self, micro: list[dict]) -> None:
        """Old log-probs (ratio losses) and reference log-probs (KL), computed once per generation batch."""
        a = self.args
        need_old = self._needs_old_logprobs
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

    _signal = False  # this optimizer step had something to learn (see _step_has_learning_signal)

    def _step_has_learning_signal(self) -> bool:
        """Some completion of this step has tokens in the loss and a non-zero advantage (reward, for
        no_baseline): then an exactly zero gradient means the loss is cut off from the weights."""
        signal, self._signal = self._signal, False
        return signal

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a, device = self.args, self.accelerator.device
        weight_B = inputs[
            "raw_rewards" if a.policy_loss == "no_baseline" else "advantages"
        ]  # on the CPU: no sync
        self._signal = self._signal or bool(((weight_B != 0) & inputs["response_mask"].any(-1)).any())
        out = self._logps(model, inputs, with_entropy=True)
        mask_BT = inputs["response_mask"].to(device)
        opt = {k: inputs[k].to(device) for k in ("old_log_probs", "ref_log_probs") if k in inputs}
        if a.policy_loss in ("grpo_clip", "grpo_no_clip") and "old_log_probs" not in opt:
            opt["old_log_probs"] = out["log_probs"].detach()  # on-policy: the sampling policy is this one
        reduction, global_counts = GRPO_LOSS_TYPES[a.loss_type]
        loss, metrics = policy_loss(
            out["log_probs"],
            mask_BT,
            loss_type=a.policy_loss,
            reduction=reduction,
            advantages_B=inputs["advantages"].to(device),
            raw_rewards_B=inputs["raw_rewards"].to(device),
            old_log_probs_BT=opt.get("old_log_probs"),
            ref_log_probs_BT=opt.get("ref_log_probs"),
            cliprange_low=a.epsilon,
            cliprange_high=a.epsilon_high if a.epsilon_high is not None else a.epsilon,
            ratio_level=a.importance_sampling_level,
            beta=a.beta,
            num_sequences=inputs["num_sequences"].item() if global_counts else None,
            num_tokens=max(inputs["num_tokens"].item(), 1.0) if global_counts else None,  # all masked: 0
            max_completion_length=a.max_completion_length,
        )
        metrics = {_TRL_NAMES.get(k, k): v for k, v in metrics.items() if k != "loss"}
        metrics["entropy"] = masked_mean_or_zero(out["token_entropy"], mask_BT)
        self.record(metrics, training=True)
        # DDP averages gradients over processes: global counts need the world size back; bnpo (TRL's per
        # micro-batch token mean) is averaged over accumulation steps and processes instead.
        loss = (
            loss * self.accelerator.num_processes if global_counts else loss / a.gradient_accumulation_steps
        )
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, rollout_before = time.perf_counter(), self._rollout_s
        loss = super().training_step(model, inputs, num_items_in_batch)  # may run a rollout step first
        elapsed = time.perf_counter() - start - (self._rollout_s - rollout_before)
        self.record({"time/training_s": elapsed}, training=True)
        return loss

    # ------------------------------------------------------------------ evaluation, checkpoints, curves

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """One completion per eval prompt (``eval_temperature``), scored by the reward functions:
        ``eval_reward``, ``eval_rewards/<name>/mean`` and, with a built-in grader, ``eval_accuracy`` /
        ``eval_format_rate``. Means over all prompts of all processes."""
        rows = eval_dataset if eval_dataset is not None else self.eval_rows
        if rows is None or not len(rows):
            return {}
        n = min(len(rows), self.args.eval_max_examples or len(rows))
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        prompts = [{"row": rows[i], "position": i} for i in range(rank, n, world)]
        for p in prompts:
            p["text"] = R.render_prompt(
                p["row"]["prompt"], self.processing_class, self.args.chat_template_kwargs
            )
        sampling = R.sampling_for(self.args)
        sampling.n, sampling.temperature = 1, self.args.eval_temperature
        summary: dict[str, float] = {}
        if prompts:
            with self._engine_awake():
                self._sync_engine()
                with self._faults("generating for evaluation"):
                    groups = self.engine.generate([p["text"] for p in prompts], sampling)
            rewards_NF, totals, _ = self._score(prompts, groups, strict=False)
            summary = {"reward": float(torch.tensor(totals).nan_to_num(0.0).mean())}
            for k, name in enumerate(self.rewards.names):
                summary[f"rewards/{name}/mean"] = float(rewards_NF[:, k].nan_to_num(0.0).mean())
            summary.update({k: v for k, v in self._grader_metrics().items() if k != "grader_timeouts"})
        keys = ["reward", *(f"rewards/{name}/mean" for name in self.rewards.names)]
        if self.rewards.graders():
            keys += ["accuracy", "format_rate"]
        values = weighted_mean(self.accelerator, [summary.get(k, 0.0) for k in keys], len(prompts))
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in zip(keys, values)}
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
            self.rewards.close()
        if self.args.plot_curves and self.is_world_process_zero():
            from hf_align.plotting import plot_training_curves

            path = plot_training_curves(
                self.state.log_history, os.path.join(self.args.output_dir, "curves.png")
            )
            logger.info("wrote %s", path)
            with open(os.path.join(self.args.output_dir, "log_history.json"), "w") as f:
                json.dump(self.state.log_history, f, indent=1)
        return result
