"""How GRPOTrainer calls its reward functions: TRL's protocol, bounded in time, failures counted, never silent.

Once per generation round each function gets this process's completions, ``f(prompts=..., completions=...,
completion_ids=..., trainer_state=..., **columns)`` (every dataset column but ``prompt``, one entry per
completion), and returns one ``float | None`` per completion; None, NaN and inf mean "no reward from this
function" (TRL). A registered name (``hf_align.rewards.REWARD_FUNCTIONS``) becomes a ``GraderReward``, which bounds
each completion itself in worker processes (``grader_timeout_s``); ``"package.module:function"`` is imported;
another string, or a sequence-classification model, is a reward model scoring prompt + completion with its own
tokenizer (``logits[:, 0]``); any callable (``async def`` too) runs in this process within ``reward_timeout_s``: a
SIGUSR2 interrupts the main thread, and a call stuck in C code that ignores it makes the process exit after as
long again. A call that raises scores None for its completions (counted, the first exception kept); a round in
which no completion got any reward stops training with ``RewardFunctionError`` naming each function's failure.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import inspect
import logging
import math
import os
import signal
import threading
from collections import defaultdict
from contextlib import contextmanager

import torch

from hf_align.rewards import REWARD_FUNCTIONS, get_reward_fn
from hf_align.rewards.functions import NO_ANSWER, GraderReward
from hf_align.trainers.base import load_processing_class, model_name
from hf_align.trainers.grpo_rollouts import reward_inputs, total_rewards

logger = logging.getLogger(__name__)

MAX_CALLS_RAISING = 3  # a reward function raising in this many calls in a row stops training


class RewardFunctionError(RuntimeError):
    """A reward function gave no usable reward for a whole generation round, or ran past its time limit."""


def reward_name(fn) -> str:
    if isinstance(fn, torch.nn.Module):
        return model_name(fn, fallback=type(fn).__name__)
    return getattr(fn, "__name__", None) or type(fn).__name__


def _run_coroutine(coroutine):
    """``asyncio.run``, or in a helper thread when this thread already runs an event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(asyncio.run, coroutine).result()
    finally:
        pool.shutdown(wait=False)


class _Timeout(BaseException):  # not an Exception: a reward function's `except Exception` must not swallow it
    pass


@contextmanager
def _time_limit(seconds: float | None, name: str, hint: str):
    """Raise in the main thread after ``seconds`` (a real signal, SIGUSR2, so a blocking call is interrupted too);
    if it does not come back within as long again, exit. Without ``seconds``, or off the main thread, no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()
    message = (
        f"reward function {name!r} ran for more than reward_timeout_s={seconds:g} s. Training stopped. {hint}"
    )

    def on_signal(signum, frame):
        if not done.is_set():
            raise _Timeout

    def on_timeout():
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
        if not done.wait(seconds):
            logger.critical("%s It did not respond to the interrupt: exiting.", message)
            os._exit(1)

    previous = signal.signal(signal.SIGUSR2, on_signal)
    timer = threading.Timer(seconds, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield
    except _Timeout:
        raise RewardFunctionError(message) from None
    finally:
        done.set()
        timer.cancel()
        signal.signal(signal.SIGUSR2, previous)


class RewardRunner:
    """Holds the reward functions of a trainer, calls them, and keeps per-function failure counts."""

    def __init__(self, reward_funcs, reward_processing_classes, weights, args, device):
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty: pass at least one reward function")
        procs = reward_processing_classes
        procs = list(procs) if isinstance(procs, (list, tuple)) else [procs] * len(funcs)
        if len(procs) != len(funcs):
            raise ValueError(f"{len(procs)} reward_processing_classes for {len(funcs)} reward_funcs")
        self.funcs, self.processing = zip(*(self._resolve(f, p, args, device) for f, p in zip(funcs, procs)))
        self.names = [reward_name(f) for f in self.funcs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ValueError(
                f"reward_weights has {len(self.weights)} values for {len(self.funcs)} reward_funcs"
            )
        self.timeout_s = args.reward_timeout_s
        self.hint = ""
        self._raised = dict.fromkeys(self.names, 0)  # calls in a row in which each function raised
        # what reward functions logged through TRL's log_metric / log_extra since the trainer last took it
        self.logged_metrics: dict[str, list[float]] = defaultdict(list)
        self.logged_extra: dict[str, list] = defaultdict(list)

    @staticmethod
    def _resolve(fn, proc, args, device):
        if isinstance(fn, str) and fn in REWARD_FUNCTIONS:
            return GraderReward(fn, args.grader_timeout_s, args.grader_num_workers), None
        if isinstance(fn, str) and ":" in fn:  # "package.module:function" from a YAML / command line
            return get_reward_fn(fn), None
        if isinstance(fn, str):  # TRL: any other string is a reward model id / path
            from transformers import AutoModelForSequenceClassification

            kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
            fn = AutoModelForSequenceClassification.from_pretrained(fn, num_labels=1, **kwargs)
        if isinstance(fn, torch.nn.Module):
            trust = argparse.Namespace(trust_remote_code=args.trust_remote_code)  # not the policy's revision
            proc = load_processing_class(fn, proc, trust)
            fn.config.pad_token_id = getattr(proc, "tokenizer", proc).pad_token_id
            return fn.to(device).eval(), proc
        if not callable(fn):
            raise TypeError(
                f"a reward function must be a callable, a model or a string, got {type(fn).__name__}"
            )
        return fn, None

    def close(self) -> None:
        for grader in self.graders():
            grader.close()

    def graders(self) -> list[GraderReward]:
        return [f for f in self.funcs if isinstance(f, GraderReward)]

    def grader_columns(self) -> dict[str, torch.Tensor]:
        """The first built-in grader's last call, per completion: ``accuracy`` (its answer reward) and
        ``format_rate`` (its format reward), NaN where the row had no ground truth; {} without a grader."""
        graders = self.graders()
        details = graders[0].last_details if graders else []
        if not details:
            return {}

        def column(field: str) -> torch.Tensor:
            values = [math.nan if NO_ANSWER in d else d.get(field, 0.0) for d in details]
            return torch.tensor(values, dtype=torch.float64)

        return {"accuracy": column("answer_reward"), "format_rate": column("format_reward")}

    def grader_metrics(self) -> dict[str, float]:
        """accuracy / format_rate of the first built-in grader's last call (rows with a ground truth), and
        grader timeouts."""
        columns = self.grader_columns()
        if not columns or columns["accuracy"].isnan().all():  # no grader, or no row with a ground truth
            return {}
        timeouts = sum(g.stats.get("timeouts", 0) for g in self.graders())
        return {**{k: v.nanmean().item() for k, v in columns.items()}, "grader_timeouts": timeouts}

    def __call__(self, prompts, completions, completion_ids, columns: dict, trainer_state):
        """``(rewards (N, F) float64 with NaN for "no reward", {name: first failure or None})``."""
        n = len(completions)
        out = torch.full((n, len(self.funcs)), float("nan"), dtype=torch.float64)
        failures: dict[str, str | None] = {}
        kwargs = {**columns, "trainer_state": trainer_state, "log_metric": self._log_metric,
                  "log_extra": self._log_extra}  # fmt: skip
        for k, (fn, proc, name) in enumerate(zip(self.funcs, self.processing, self.names)):
            failures[name] = None
            bounded = not isinstance(fn, GraderReward)  # a grader's pool bounds each of its items itself
            try:
                with _time_limit(self.timeout_s if bounded else None, name, self.hint):
                    if isinstance(fn, torch.nn.Module):
                        values = self._score_model(fn, proc, prompts, completions)
                    else:
                        values = fn(
                            prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs
                        )
                        if inspect.iscoroutine(values):  # async def
                            values = _run_coroutine(values)
            except RewardFunctionError:
                raise
            except Exception as e:
                failures[name], self._raised[name] = f"{type(e).__name__}: {e}", self._raised[name] + 1
                if self._raised[name] >= MAX_CALLS_RAISING:  # a bug, not a bad item: training would ignore it
                    raise RewardFunctionError(
                        f"reward function {name!r} raised in {MAX_CALLS_RAISING} calls in a row, the last with "
                        f"{failures[name]}. Training stopped. {self.hint}"
                    ) from e
                logger.warning(
                    "reward function %r raised on %d completions (scored None): %s", name, n, failures[name]
                )
                continue
            self._raised[name] = 0
            out[:, k] = _reward_column(values, n, name)
            if torch.isnan(out[:, k]).all():
                failures[name] = failures[name] or "returned None / NaN for every completion"
        return out, failures

    def score_groups(self, prompts: list[dict], groups, trainer_state, strict: bool = True):
        """Per-function rewards (N, F; NaN: none), their weighted totals and TRL's reward inputs for the rollout
        ``groups`` of ``prompts`` (``{"row": dataset row}`` each); with ``strict``, a round in which no completion
        got any reward stops training."""
        inputs = reward_inputs(prompts, groups)
        rewards_NF, failures = self(**inputs, trainer_state=trainer_state)
        if strict:
            check_some_reward(rewards_NF, failures, self.hint)
        return rewards_NF, total_rewards(rewards_NF, self.weights), inputs

    def _log_metric(self, name: str, value: float) -> None:
        self.logged_metrics[name].append(float(value))

    def _log_extra(self, column: str, values: list) -> None:
        self.logged_extra[column].extend(values)

    def pop_logged_metrics(self) -> dict[str, float]:
        """The mean of each metric reward functions logged since the last call (TRL's ``log_metric``)."""
        logged = {k: sum(v) / len(v) for k, v in self.logged_metrics.items() if v}
        self.logged_metrics.clear()
        return logged

    @torch.no_grad()
    def _score_model(self, model, tokenizer, prompts, completions) -> list[float]:
        pairs = zip(prompts, completions)
        if isinstance(prompts[0], list):
            texts = [tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in pairs]
        else:
            texts = [p + c for p, c in pairs]
        batch = tokenizer(
            texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
        )
        device = next(model.parameters()).device
        return model(**{k: v.to(device) for k, v in batch.items()}).logits[:, 0].float().tolist()


def _reward_column(values, n: int, name: str) -> torch.Tensor:
    """A reward function's return as (n,) float64, NaN for None / NaN / inf ("no reward")."""
    try:
        floats = [math.nan if v is None else float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"reward function {name!r} must return a list of {n} floats (None: no reward), one per completion; "
            f"got {type(values).__name__} ({e})"
        ) from None
    if len(floats) != n:
        raise ValueError(f"reward function {name!r} returned {len(floats)} rewards for {n} completions")
    column = torch.tensor(floats, dtype=torch.float64)
    return torch.where(column.isfinite(), column, math.nan)


def check_some_reward(rewards_NF: torch.Tensor, failures: dict, hint: str) -> None:
    """Item 5 of the GRPO contract: a round in which no completion got any reward stops training."""
    if rewards_NF.numel() and torch.isnan(rewards_NF).all():
        named = "; ".join(f"{name!r}: {why or 'no reward'}" for name, why in failures.items())
        raise RewardFunctionError(
            f"no completion of this generation round got a reward from any reward function ({named}). "
            f"Training stopped: it would not learn. {hint}"
        )
