"""GRPOTrainer: group-relative policy optimisation on top of `transformers.Trainer`, with TRL's interface.

One optimizer step reads top to bottom in this file. ``_prepare_inputs`` hands Trainer the next micro-batch of a
rollout buffer, which ``_make_rollout_batch`` refills when empty: the rollout engine (HF generate, a colocated vLLM
or a vLLM server) gets the trained weights if an optimizer step happened since its last sync and samples
``num_generations`` completions per prompt, the reward functions score them (grpo_rewards.py), grpo_rollouts.py
turns rewards into group-normalised advantages and micro-batches carrying their optimizer step's global counts,
and old and reference log-probs are added once per batch. ``compute_loss`` applies
``hf_align.losses.grpo.policy_loss`` (plus TRL's ``entropy_bonus``: ``entropy_coef`` / ``use_adaptive_entropy``).
A batch lasts ``GRPOConfig.steps_per_rollout`` optimizer steps.

Choices:
- The loss is normalised by the optimizer step's global sequence / token counts, times the number of processes
  (DDP averages gradients): every ``loss_type`` but bnpo is exact under any micro-batch / accumulation / process
  split. Trainer's data loader iterates a range of the right length: ``max_steps`` optimizer steps exactly.
- Old log-probs (ratio losses) are the trainer's at sampling time, unless the batch makes a single optimizer
  step (then they equal the current ones, detached, as in TRL). Where the sampler is not the trainer's forward
  (vLLM's kernels, truncated sampling: ``GRPOConfig.corrects_sampling``) the engine's log-probs give an
  importance-sampling weight old / sampler on each token's policy-gradient loss (TRL's decoupled correction).
  The KL reference is the policy with its LoRA adapters disabled when training LoRA, else a frozen copy (or
  ``ref_model``), which ``sync_ref_model`` moves towards the policy (TR-DPO, ``trainers/base.py``).
- The rollout buffer lives on the device (no host-device copy per micro-batch) and is checkpointed with the
  prompt cursor: a resume is exact.
- ``async_rollouts``: batch j + ``max_staleness`` is queued (``RolloutQueue``: one thread generates and scores,
  in order) when training on batch j starts, from the weights of that moment, so generation overlaps training and
  every batch's staleness is fixed by the schedule, not by timing (``sample/staleness_mean``, in optimizer steps).
  The weights go to the engine at once when it is idle, else as a copy pushed by the thread before that batch.
  Rollouts keep the log-probs of the weights that sampled them, which the importance-sampling correction weighs
  against the trainer's old log-probs (still the ratio's denominator: the trainer's weights when the batch's
  training starts). Queued batches are checkpointed (finished first): their weights no longer exist.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from hf_align.config import GRPO_LOSS_TYPES, GRPOConfig
from hf_align.logprobs import get_response_log_probs, masked_mean_or_zero
from hf_align.losses.grpo import (
    adaptive_entropy_coef,
    applied_entropy_coef,
    entropy_bonus,
    high_entropy_mask,
    importance_sampling_weight,
    policy_loss,
)
from hf_align.modeling import create_reference_model
from hf_align.rollout import make_engine
from hf_align.rollout.vllm import colocated_gpu_problem
from hf_align.trainers import grpo_rollouts as R
from hf_align.trainers.base import AlignTrainer
from hf_align.trainers.grpo_rewards import RewardRunner
from hf_align.trainers.safety import UnsupportedEngineError, engine_faults, resume_hint, sharded_engine
from hf_align.trainers.sharding import full_weights

logger = logging.getLogger(__name__)

ROLLOUT_STATE = "rollout_state_rank{rank}.pt"
RATIO_LOSSES = ("grpo_clip", "grpo_no_clip")
_TRL_NAMES = {  # policy_loss's metric names -> TRL's
    "kl_mean": "kl",
    "clip_fraction_low": "clip_ratio/low_mean",
    "clip_fraction_high": "clip_ratio/high_mean",
    "clip_fraction": "clip_ratio/region_mean",
    "is_ratio_min": "sampling/importance_sampling_ratio/min",  # TRL's names; ours is the ratio before
    "is_ratio_mean": "sampling/importance_sampling_ratio/mean",  # truncation / masking (README)
    "is_ratio_max": "sampling/importance_sampling_ratio/max",
    "is_clipped_fraction": "sampling/importance_sampling_ratio/clipped_fraction",
    "logp_diff_mean": "sampling/sampling_logp_difference/mean",
    "logp_diff_max": "sampling/sampling_logp_difference/max",
}


def _loader_batch(indices: list[int]) -> dict[str, torch.Tensor]:
    return {"index": torch.tensor(indices)}  # what Trainer's loader yields: _prepare_inputs replaces it


class GRPOTrainer(AlignTrainer):
    config_class, suffix = GRPOConfig, "GRPO"

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
        model, args, processing_class = self._trl_inputs(
            model, args, processing_class, peft_config, quantization_config
        )
        rows = R.prompt_rows(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):  # TRL: several eval sets, each logged as eval_<name>_*
            self.eval_rows = {k: R.prompt_rows(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        else:
            self.eval_rows = R.prompt_rows(eval_dataset, "eval_dataset")
        if args.max_steps <= 0:
            # TRL's num_train_epochs: passes over the prompts, each sampled num_generations times
            per_pass = math.ceil(len(rows) * args.num_generations / args.generation_batch_size)
            args.max_steps = math.ceil(args.num_train_epochs * per_pass) * args.steps_per_rollout
        super().__init__(
            model=model,
            args=args,
            train_dataset=range(args.max_steps * args.optimizer_batch_size),  # counts micro-batch rows only
            eval_dataset=range(len(self.eval_rows)) if self.eval_rows else None,  # evaluate() reads the rows
            data_collator=_loader_batch,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._init_metrics()
        self._check_rollout_layout(rollout_engine)
        self.prompts = R.PromptStream(
            rows, processing_class, args.max_prompt_length, args.seed, args.shuffle_dataset,
            args.chat_template_kwargs,
        )  # fmt: skip
        self.rewards = RewardRunner(
            reward_funcs, reward_processing_classes, args.reward_weights, args, self.accelerator.device
        )
        self.reward_func_names = self.rewards.names
        self.ref_model = self._reference_policy(ref_model)
        self._add_reference_sync()
        self._engine, self._synced_step = rollout_engine, -1
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._queue = R.RolloutQueue()  # async_rollouts: batches generated ahead
        self._signal = False  # this optimizer step has something to learn (see _step_has_learning_signal)
        # entropy bonus: the coefficient, the last optimizer step's entropy (adaptive control; inf: none yet) and
        # this step's [entropy sum, token count] so far
        self._entropy_coef, self._last_entropy, self._entropy_window = args.entropy_coef, math.inf, None
        self._rollout_s = 0.0  # seconds spent making generation batches (kept out of time/training_s)

    def _check_rollout_layout(self, rollout_engine) -> None:
        """Refuse the rollout layouts that cannot work (README, distributed engines); say what async gives up."""
        a, sharded = self.args, sharded_engine(self.accelerator.state)
        if a.rollout_engine == "vllm" and torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            if (problem := colocated_gpu_problem(local, torch.cuda.device_count())) is not None:
                raise UnsupportedEngineError(problem)
        if not a.async_rollouts:
            return
        if sharded:  # vLLM engines gather it: rollout/weights.py checkpoint_weights
            raise UnsupportedEngineError(
                f"GRPO under {sharded} cannot use async_rollouts: the rollout thread's copy of the policy would be a "
                "shard, and its weight pushes would run collectives off the main thread. Use DDP or ZeRO-2."
            )
        logger.warning(
            "async_rollouts: reward functions run on the rollout thread, where reward_timeout_s cannot "
            "interrupt them (built-in graders keep their per-item limit), and see trainer_state as it is then"
        )
        if a.rollout_engine != "hf" or rollout_engine is not None:
            return
        # The HF engine's thread seeds torch's global RNG (hf.py): training must not draw from it meanwhile.
        if getattr(getattr(self.model, "config", None), "attention_dropout", 0) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()
        ):
            raise ValueError(
                "async_rollouts with the HF engine needs a model without dropout (the generating thread and "
                "training share torch's random generator): set disable_dropout: true (and attention_dropout 0), "
                "or use vllm_mode: server"
            )

    def _reference_policy(self, ref_model):
        """The frozen model for the KL term, or None when the LoRA policy with adapters off serves (or beta = 0)."""
        a, lora = self.args, hasattr(self.model, "disable_adapter")
        if a.beta == 0 and ref_model is not None:
            logger.warning("ref_model is unused: beta = 0 (no KL penalty)")
        mode = a.ref_mode or ("adapter_disabled" if lora and ref_model is None else "copy")
        if a.beta != 0 and mode == "adapter_disabled" and not lora:
            raise ValueError(
                f"beta={a.beta} with ref_mode='adapter_disabled' needs a LoRA policy (use_peft: true); "
                "set ref_mode: copy (a frozen copy of the initial model), pass ref_model, or set beta: 0"
            )
        if a.beta == 0 or mode == "adapter_disabled":
            return None
        return ref_model if ref_model is not None else create_reference_model(self.model)

    # ------------------------------------------------------------------ one optimizer step, in order

    def _prepare_inputs(self, inputs):
        """Trainer's hook for every micro-batch: the next one of the rollout buffer, made anew when empty."""
        if not self._buffer:
            start = time.perf_counter()
            self._make_rollout_batch()
            self._rollout_s += time.perf_counter() - start
        batch = self._buffer.pop(0)
        self.record(
            {"sample/staleness_mean": self.state.global_step - batch["policy_version"]}, training=True
        )
        return batch

    def _make_rollout_batch(self) -> None:
        a, acc = self.args, self.accelerator
        self.rewards.hint = resume_hint(self)
        version, keep, metrics = self._next_groups()
        self.record(metrics, training=True)
        batch_std = None
        if a.scale_rewards == "batch":  # TRL: the std of the whole generation batch, all processes
            batch_std = R.rewards_std(acc.gather(torch.tensor(keep.rewards, device=acc.device)).cpu())
        rewards_B, advantages_B = R.advantages_for(
            keep, a.num_generations, a.advantage_eps, a.scale_rewards, batch_std
        )
        micro = R.build_micro_batches(
            keep, rewards_B, advantages_B, self.processing_class.pad_token_id,
            a.per_device_train_batch_size, a.gradient_accumulation_steps, a.mask_truncated_completions,
        )  # fmt: skip
        for b in micro:
            b["policy_version"] = torch.tensor(version)
        R.attach_global_counts(micro, acc, a.optimizer_batch_size)
        self._add_reference_log_probs(micro)
        self._buffer = [b for _ in range(a.num_iterations) for b in micro]

    def _next_groups(self) -> tuple[int, R.ScoredGroups, dict]:
        """The next generation batch: (policy version, scored groups, metrics), sampled now or, with
        ``async_rollouts``, taken from the queue after queueing the batches up to ``max_staleness`` ahead."""
        a, queue = self.args, self._queue
        if not a.async_rollouts:
            with self._engine_ready():
                return self.state.global_step, *self._sample_groups()
        # generation batches in the run (Trainer sets state.max_steps, also for an epoch-based run) and this one
        batches = math.ceil(self.state.max_steps / a.steps_per_rollout)
        j = self.state.global_step // a.steps_per_rollout
        if not queue.pending:
            self._queue_batch()
        out = queue.pop()
        while len(queue.pending) < a.max_staleness and j + 1 + len(queue.pending) < batches:
            self._queue_batch()
        return out

    def _queue_batch(self) -> None:
        """Queue a generation batch sampled from the current weights: pushed now if the engine is idle, else a copy
        pushed by the queue's thread after the batches ahead of it (training changes the live weights meanwhile)."""
        step, push, engine = self.state.global_step, None, self.engine
        policy = self.accelerator.unwrap_model(self.model)
        if self._synced_step != step:
            if self._queue.idle():
                with self._faults("syncing weights"):
                    engine.sync_weights(policy)
            else:
                push = copy.deepcopy(policy)
            self._synced_step = step

        def job():
            if push is not None:
                with self._faults("syncing weights"):
                    self.engine.sync_weights(push)
            return self._sample_groups()

        self._queue.submit(step, job)

    def _sample_groups(self) -> tuple[R.ScoredGroups, dict]:
        """This process's share of the generation batch as whole scored groups, and its metrics (recorded by the
        caller: this may run on the async thread); with ``dynamic_sampling``, more generation rounds until enough
        groups have unequal rewards."""
        a, G, acc = self.args, self.args.num_generations, self.accelerator
        want = a.generation_batch_size // G // acc.num_processes
        keep, filler = R.ScoredGroups(), R.ScoredGroups()
        gen_s = grade_s = 0.0
        tokens = rounds = 0
        while len(keep) < want * G and rounds < max(1, a.max_dynamic_sampling_rounds):
            rounds += 1
            prompts = self.prompts.take(want - len(keep) // G, acc.process_index, acc.num_processes)
            start = time.perf_counter()
            with self._faults("generating"):
                groups = self.engine.generate(
                    [p["text"] for p in prompts], R.sampling_for(a, [p["position"] for p in prompts])
                )
            gen_s += time.perf_counter() - start
            tokens += sum(len(r.completion_ids) for g in groups for r in g)
            start = time.perf_counter()
            rewards_NF, totals, inputs = self.rewards.score_groups(prompts, groups, self.state)
            grade_s += time.perf_counter() - start
            scored = R.scored_groups(groups, totals)
            if rounds == 1:  # TRL's metrics and logged completions: the first round's
                metrics = {**R.rollout_metrics(rewards_NF, self.rewards.names, scored, G),
                           **self.rewards.grader_metrics()}  # fmt: skip
                if a.log_completions and self.is_world_process_zero():
                    self._print_completions(inputs, totals)
            self.rewards.logged_extra.clear()
            R.select_groups(scored, G, keep, want, filler, a.dynamic_sampling)
        keep.extend(filler, 0, want * G - len(keep))  # dynamic sampling ran out of rounds
        metrics |= self.rewards.pop_logged_metrics()  # TRL's log_metric, from the reward functions
        metrics |= {"time/generation_s": gen_s, "time/grading_s": grade_s, "dynamic_sampling_rounds": rounds,
                    "generation_tokens_per_s": tokens / max(gen_s, 1e-9), "prompts_dropped_too_long": self.prompts.dropped}  # fmt: skip
        return keep, metrics

    def _print_completions(self, inputs: dict, totals: list[float]) -> None:
        """``log_completions``: the first few (prompt, completion, reward) rows, with TRL's ``log_extra`` columns."""
        extra = self.rewards.logged_extra
        rows = zip(inputs["prompts"], inputs["completions"], totals)
        for i, (prompt, completion, reward) in enumerate(
            list(rows)[: self.args.num_completions_to_print or 4]
        ):
            more = "".join(f"\n{k}: {v[i]!r:.300}" for k, v in extra.items() if i < len(v))
            logger.info("reward %.3f\nprompt: %.300r\ncompletion: %.300r%s", reward, prompt, completion, more)

    @torch.no_grad()
    def _add_reference_log_probs(self, micro: list[dict]) -> None:
        """Old log-probs (ratio losses over a batch lasting several optimizer steps) and reference log-probs (KL),
        computed once per generation batch; the engine's log-probs are kept only where the importance-sampling
        correction applies (``GRPOConfig.corrects_sampling``)."""
        a, model = self.args, self.model
        for b in micro:
            if not a.corrects_sampling:
                b.pop("sampling_log_probs", None)
            elif "sampling_log_probs" not in b:
                raise ValueError(
                    f"the {a.rollout_engine!r} rollout engine returned no sampling log-probs: the importance-"
                    "sampling correction needs them (or set vllm_importance_sampling_correction: false)"
                )
        need_old = a.policy_loss in RATIO_LOSSES and a.steps_per_rollout > 1
        if not need_old and a.beta == 0:
            return
        was_training = model.training
        model.eval()
        try:
            for b in micro:
                if need_old:
                    b["old_log_probs"] = self._log_probs(model, b)
                if a.beta > 0 and self.ref_model is not None:
                    b["ref_log_probs"] = self._log_probs(self._reference(), b)
                elif a.beta > 0:
                    with self.accelerator.unwrap_model(model).disable_adapter():
                        b["ref_log_probs"] = self._log_probs(model, b)
        finally:
            model.train(was_training)

    def _log_probs(
        self, model, b: dict, with_entropy: bool | str = False
    ) -> dict[str, torch.Tensor] | torch.Tensor:
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        a = self.args
        bonus = a.entropy_coef != 0 or a.use_adaptive_entropy
        out = self._log_probs(model, inputs, with_entropy="grad" if bonus else True)
        mask_BT = inputs["response_mask"]
        weight_B = inputs["raw_rewards" if a.policy_loss == "no_baseline" else "advantages"]
        # a device flag, read once per optimizer step by the no-learning guard: no sync here
        self._signal = ((weight_B != 0) & mask_BT.any(-1)).any() | self._signal
        # on-policy: the sampling policy is this one (the same gradient as a separate no-grad pass, tested)
        old_BT = inputs.get("old_log_probs", out["log_probs"].detach())
        pg_weight_BT, is_metrics, keep_BT = self._policy_gradient_weight(inputs, old_BT, out["token_entropy"])
        reduction, global_counts = GRPO_LOSS_TYPES[a.loss_type]
        loss, metrics = policy_loss(
            out["log_probs"],
            mask_BT,
            loss_type=a.policy_loss,
            reduction=reduction,
            advantages_B=inputs["advantages"],
            raw_rewards_B=inputs["raw_rewards"],
            old_log_probs_BT=old_BT,
            ref_log_probs_BT=inputs.get("ref_log_probs"),
            cliprange_low=a.epsilon,
            cliprange_high=a.epsilon_high if a.epsilon_high is not None else a.epsilon,
            ratio_level=a.importance_sampling_level,
            delta=a.delta,
            beta=a.beta,
            is_weight_BT=pg_weight_BT,
            num_sequences=inputs["num_sequences"] if global_counts else None,
            num_tokens=inputs["num_tokens"].clamp(min=1) if global_counts else None,  # all masked: 0 tokens
            max_completion_length=a.max_completion_length,
        )
        metrics = {_TRL_NAMES.get(k, k): v for k, v in {**metrics, **is_metrics}.items() if k != "loss"}
        metrics["entropy"] = masked_mean_or_zero(out["token_entropy"], mask_BT)
        self.record(metrics, training=True)
        # DDP averages gradients over processes: global counts need the world size back; bnpo (TRL's per
        # micro-batch token mean) is averaged over accumulation steps and processes instead.
        world = self.accelerator.num_processes
        loss = loss * world if global_counts else loss / a.gradient_accumulation_steps
        if bonus:
            loss = loss + self._entropy_term(out["token_entropy"], keep_BT, inputs["num_tokens"])
        return (loss, out) if return_outputs else loss

    def _entropy_term(self, entropy_BT, keep_BT, num_tokens):
        """TRL's entropy bonus, a token mean over the tokens with a policy gradient: over the optimizer step's
        (``num_tokens``, every process) when that is all of them, else (``top_entropy_quantile < 1``, kept tokens
        known per micro-batch only) each micro-batch's mean, averaged as TRL does. With ``use_adaptive_entropy``
        the coefficient follows ``adaptive_entropy_coef`` once per optimizer step, from the step's entropy over
        every micro-batch and process."""
        a, acc = self.args, self.accelerator
        coef = self._entropy_coef
        if a.use_adaptive_entropy:
            coef = applied_entropy_coef(coef, self._last_entropy, a.entropy_target)
        if coef != 0:  # the bonus moves the weights even where every advantage is 0
            self._signal = keep_BT.any() | self._signal
        if a.top_entropy_quantile == 1.0:
            term = entropy_bonus(entropy_BT, keep_BT, coef, num_tokens.clamp(min=1))[0] * acc.num_processes
        else:
            term = entropy_bonus(entropy_BT, keep_BT, coef)[0] / a.gradient_accumulation_steps
        if a.use_adaptive_entropy:
            keep_BT = keep_BT.to(entropy_BT.dtype)
            stats = torch.stack([(entropy_BT.detach() * keep_BT).sum(), keep_BT.sum()])
            self._entropy_window = stats if self._entropy_window is None else self._entropy_window + stats
            if acc.sync_gradients:  # the optimizer step's last micro-batch: one sync per step
                total, count = acc.reduce(self._entropy_window, reduction="sum").tolist()
                self._last_entropy = total / max(count, 1.0)
                self._entropy_coef = adaptive_entropy_coef(
                    self._entropy_coef, self._last_entropy, a.entropy_target, a.entropy_coef_delta,
                    a.entropy_coef_min, a.entropy_coef_max,
                )  # fmt: skip
                self._entropy_window = None
        if acc.sync_gradients:
            self.record({"entropy_coef": self._entropy_coef}, training=True)
        return term

    def _policy_gradient_weight(self, inputs: dict, old_BT, entropy_BT):
        """What multiplies each token's policy-gradient loss, or None: the importance-sampling weight (sampler vs
        trainer) times, with ``top_entropy_quantile < 1``, the high-entropy mask (threshold over every process's
        valid tokens, as TRL); its metrics; the tokens with a policy gradient (the mask, or the high-entropy one)."""
        a, mask_BT, weight_BT, metrics = self.args, inputs["response_mask"], None, {}
        if a.vllm_importance_sampling_correction and "sampling_log_probs" in inputs:
            level, mode = a.vllm_importance_sampling_mode.split("_")
            weight_BT, metrics = importance_sampling_weight(
                old_BT, inputs["sampling_log_probs"], mask_BT, level, mode,
                a.vllm_importance_sampling_clip_max, a.vllm_importance_sampling_clip_min,
            )  # fmt: skip
        if a.top_entropy_quantile < 1.0:
            entropy_BT = entropy_BT.detach()
            pool = entropy_BT[mask_BT.bool()]
            if self.accelerator.num_processes > 1:  # -1 pads: entropies are >= 0
                pool = self.accelerator.gather(self.accelerator.pad_across_processes(pool, pad_index=-1.0))
                pool = pool[pool >= 0]
            keep_BT = high_entropy_mask(entropy_BT, mask_BT, a.top_entropy_quantile, pool)
            weight_BT = keep_BT if weight_BT is None else weight_BT * keep_BT
            return weight_BT, metrics, keep_BT
        return weight_BT, metrics, mask_BT

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, rollout_before = time.perf_counter(), self._rollout_s
        loss = super().training_step(model, inputs, num_items_in_batch)  # may run a rollout step first
        elapsed = time.perf_counter() - start - (self._rollout_s - rollout_before)
        self.record({"time/training_s": elapsed}, training=True)
        return loss

    def _step_has_learning_signal(self) -> bool:
        # some completion of this step had tokens in the loss and a non-zero advantage (reward, for no_baseline)
        signal, self._signal = bool(self._signal), False
        return signal

    # ------------------------------------------------------------------ the rollout engine

    def _faults(self, action: str):
        return engine_faults(self, self.args.rollout_engine, action)

    @property
    def engine(self):
        if self._engine is None:
            a, kind, source = self.args, self.args.rollout_engine, self.accelerator.unwrap_model(self.model)
            kwargs = {"batch_size": a.hf_generate_batch_size}
            if kind == "hf" and a.async_rollouts:  # the thread generates with its own copy of the weights
                source = copy.deepcopy(source)
            elif kind == "vllm":
                kwargs = {"gpu_memory_utilization": a.vllm_gpu_memory_utilization, "seed": a.seed,
                          "enable_sleep_mode": a.vllm_enable_sleep_mode}  # fmt: skip
            elif kind != "hf":  # a server holds the model: weights are pushed before the first rollout
                source, kwargs = a.vllm_server_url, {
                    "server_timeout": a.vllm_server_timeout, "timeout": a.vllm_request_timeout,
                    "weight_sync": a.vllm_weight_sync, "group_port": a.vllm_group_port,
                }  # fmt: skip
            start = time.perf_counter()
            with self._faults("starting"):
                self._engine = make_engine(kind, source, self.processing_class, **kwargs)
            if kind != "vllm_server":  # built from the live weights: already in sync
                self._synced_step = self.state.global_step
            self.record({"time/engine_start_s": time.perf_counter() - start}, training=True)
        return self._engine

    @contextmanager
    def _engine_ready(self):
        """The engine with the current weights (synced at most once per optimizer step). A colocated vLLM in sleep
        mode is woken for this and put back to sleep afterwards, so its KV cache (and, at level 1, its weights)
        do not sit in GPU memory during the backward pass."""
        sleepy = self.args.vllm_enable_sleep_mode and hasattr(self.engine, "sleep")
        if sleepy:
            with self._faults("waking up"):
                self.engine.wake_up()
        try:
            engine = self.engine  # (built now, it already holds the current weights)
            if self._synced_step != self.state.global_step:
                start = time.perf_counter()
                with self._faults("syncing weights"):
                    engine.sync_weights(self.accelerator.unwrap_model(self.model))
                self._synced_step = self.state.global_step
                self.record({"time/weight_sync_s": time.perf_counter() - start}, training=True)
            # HF engine: the policy itself generates; sharded, it is gathered once for all of this batch's rounds
            with full_weights(self.model) if self.args.rollout_engine == "hf" else nullcontext():
                yield engine
        finally:
            if sleepy:
                with self._faults("going to sleep"):
                    self.engine.sleep()

    def close(self) -> None:
        """Stop grader workers and the rollout engine (a later call to train / evaluate restarts them)."""
        self._queue.close()
        self.rewards.close()
        if self._engine is not None and self.args.rollout_engine != "hf":
            self._engine.close()
            self._engine = None

    # ------------------------------------------------------------------ evaluation, checkpoints, curves

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """``num_generations_eval`` (None: ``num_generations``) completions per eval prompt at ``eval_temperature``
        (one when greedy: the copies would be equal), scored by the reward functions: ``eval_reward``,
        ``eval_rewards/<name>/mean`` and, with a built-in grader, ``eval_accuracy`` / ``eval_format_rate``. Means
        over the completions of all processes that got a reward (as in training). A dict of eval datasets (TRL)
        gives ``eval_<name>_*`` per dataset."""
        rows = eval_dataset if eval_dataset is not None else self.eval_rows
        rows = self.eval_rows[rows] if isinstance(rows, str) else rows  # Trainer passes a dict's names
        if isinstance(rows, dict):
            metrics = {}
            for name, dataset in rows.items():
                metrics |= self.evaluate(dataset, ignore_keys, f"{metric_key_prefix}_{name}")
            return metrics
        if rows is None or not len(rows):
            return {}
        a, acc = self.args, self.accelerator
        n = min(len(rows), a.eval_max_examples or len(rows))
        prompts = [{"row": rows[i]} for i in range(acc.process_index, n, acc.num_processes)]
        texts = [
            R.render_prompt(p["row"]["prompt"], self.processing_class, a.chat_template_kwargs)
            for p in prompts
        ]
        per_prompt = (a.num_generations_eval or a.num_generations) if a.eval_temperature > 0 else 1
        sampling = dataclasses.replace(R.sampling_for(a), n=per_prompt, temperature=a.eval_temperature)
        self.rewards.hint = resume_hint(self)
        self._queue.state_dict()  # async: queued batches finished, so the engine is free
        # every process, with prompts or not: sharded weights gather here
        with self._engine_ready() as engine:
            if prompts:
                with self._faults("generating for evaluation"):
                    groups = engine.generate(texts, sampling)
        metrics = self._eval_means(prompts, groups if prompts else [], metric_key_prefix)
        self.log(metrics)
        # As Trainer.evaluate does: callbacks see the metrics, and the pending-evaluation flag is cleared (without
        # this the epoch-end hook evaluates a second time).
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_means(self, prompts: list[dict], groups, prefix: str) -> dict[str, float]:
        """Each eval metric's mean over the completions of every process that got a value (a sum and a count per
        key, in one collective); a metric no completion got is left out, never a NaN or a 0 standing for None."""
        keys = ["reward", *(f"rewards/{name}/mean" for name in self.rewards.names)]
        keys += ["accuracy", "format_rate"] if self.rewards.graders() else []
        sums_counts = torch.zeros(2 * len(keys), dtype=torch.float64)
        if prompts:
            rewards_NF, totals, _ = self.rewards.score_groups(prompts, groups, self.state)
            columns = [torch.tensor(totals, dtype=torch.float64), *rewards_NF.T]
            columns += list(self.rewards.grader_columns().values())  # accuracy, format_rate: as ``keys``
            for i, column in enumerate(columns):
                seen = ~column.isnan()
                sums_counts[i], sums_counts[len(keys) + i] = column[seen].sum(), seen.sum()
            self.record(self.rewards.pop_logged_metrics(), training=False)  # log_metric calls: eval_<name>
        sums_counts = sums_counts.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sums_counts = self.accelerator.reduce(sums_counts, reduction="sum")
        sums, counts = sums_counts.tolist()[: len(keys)], sums_counts.tolist()[len(keys) :]
        return {f"{prefix}_{k}": s / c for k, s, c in zip(keys, sums, counts) if c > 0}

    def _save_extra_state(self, folder: str) -> None:
        super()._save_extra_state(folder)
        queued = self._queue.state_dict()  # first: the thread moves the prompt cursor
        state = {**self.prompts.state_dict(), "buffer": self._buffer, "queued": queued}
        state["entropy_control"] = (self._entropy_coef, self._last_entropy)
        torch.save(state, Path(folder) / ROLLOUT_STATE.format(rank=self.accelerator.process_index))

    def _load_extra_state(self, folder: str) -> None:
        path = Path(folder) / ROLLOUT_STATE.format(rank=self.accelerator.process_index)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: this checkpoint was not written by GRPOTrainer")
        super()._load_extra_state(folder)
        state = torch.load(path, weights_only=False, map_location=self.accelerator.device)
        self.prompts.load_state_dict(state)
        self._buffer = state["buffer"]
        self._queue.load_state_dict(state.get("queued", []))
        self._entropy_coef, self._last_entropy = state.get(
            "entropy_control", (self.args.entropy_coef, math.inf)
        )

    def train(self, resume_from_checkpoint=None, **kwargs):
        try:
            result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        finally:
            self.rewards.close()
        if self.args.plot_curves and self.is_world_process_zero():
            from hf_align.plotting import plot_training_curves

            out = self.args.output_dir
            logger.info(
                "wrote %s", plot_training_curves(self.state.log_history, os.path.join(out, "curves.png"))
            )
            Path(out, "log_history.json").write_text(json.dumps(self.state.log_history, indent=1))
        return result
