"""Time-bounded, batched grading in worker processes.

A reward function runs on untrusted model output, and sympy can spend minutes (or all memory) on
`9^{9^{9^{9}}}`. `Grader` runs it in a few long-lived worker processes and gives each item a wall-clock
budget: when an item overruns, its worker is killed (SIGKILL) and replaced, the item grades as all zeros and
counts in `stats["timeouts"]`. The parent only waits on pipes with a timeout, so this works from any
thread (no `signal.alarm`). An exception in the reward function (or a return value that is not a dict of numbers)
grades the item as zeros flagged `grader_error` and counts in `stats["errors"]`; so does a worker that dies
mid-item.

Why not `multiprocessing.Pool`: its workers cannot be killed one at a time, and the "spawn" /
"forkserver" start methods re-import the parent's `__main__` (a training script importing torch and
transformers: seconds and gigabytes per worker, again at each replacement). Workers here are fresh
interpreters started with `subprocess` (fork + exec, so it is safe with a threaded, torch-loaded
parent), which import only `hf_align.rewards` (the `hf_align` package's own `__init__` is not run) and talk
to the parent over two pipes with `multiprocessing.connection.Connection` (pickle). Each worker imports
sympy and math_verify once, then signals ready; an item's clock starts when it is sent to a ready worker,
so start-up never counts against it. Workers are started by the `Grader` constructor (not at import)
and reused across `grade` calls; `close()` (or the context manager, or garbage collection) stops them.

A reward function given as a callable must be picklable by reference (a top-level function in an
importable module, not `__main__` or a lambda); the worker imports its module with the parent's `sys.path`.
POSIX only (pipes are passed as inherited file descriptors).
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

ZERO_REWARDS: dict[str, float] = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
# An item whose reward function raised, returned something that is not a dict of numbers, or whose worker
# died: zeros plus this flag, so a trainer can tell "no reward" from "reward 0" (GRPO zeroes its advantage).
ERROR_FLAG = "grader_error"

# Generous: on a busy 2-core machine a cold worker's `import sympy` can take several seconds.
_STARTUP_TIMEOUT_S = 120.0
_HF_ALIGN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter. Registers `hf_align` as a bare package so that importing
# `hf_align.rewards.pool` skips `hf_align/__init__.py` (which may import torch), then serves.
_BOOTSTRAP = """
import sys, types
hf_align_dir, task_fd, result_fd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if "hf_align" not in sys.modules:
    pkg = types.ModuleType("hf_align")
    pkg.__path__ = [hf_align_dir]
    pkg.__package__ = "hf_align"
    sys.modules["hf_align"] = pkg
from hf_align.rewards.pool import _worker_main
_worker_main(task_fd, result_fd)
"""


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


def _worker_main(task_fd: int, result_fd: int) -> None:
    """Worker loop: init message, then `(index, response, ground_truth)` until `None` or EOF."""
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    try:
        sys_path, max_memory_mb, fn_spec = tasks.recv()
        sys.path[:] = sys_path + [p for p in sys.path if p and p not in sys_path]
        if max_memory_mb:
            _limit_memory(max_memory_mb)
        from hf_align.rewards import grader
        from hf_align.rewards.math import get_reward_fn

        fn = get_reward_fn(fn_spec) if isinstance(fn_spec, str) else pickle.loads(fn_spec)
        grader.warm_up()
    except Exception as exc:  # report why we cannot serve, then exit
        results.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    results.send(("ready",))
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        index, response, ground_truth = task
        try:
            out = fn(response, ground_truth)
            if not isinstance(out, dict):
                raise TypeError(f"reward function returned {type(out).__name__}, expected dict")
            results.send(("ok", index, {str(k): float(v) for k, v in out.items()}))
        except Exception as exc:
            results.send(("error", index, f"{type(exc).__name__}: {exc}"))


def _limit_memory(max_memory_mb: int) -> None:
    try:
        import resource

        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):  # not available here: the timeout still bounds the item
        pass


# --------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    proc: subprocess.Popen
    tasks: Connection  # parent -> worker
    results: Connection  # worker -> parent
    started: float
    ready: bool = False
    index: int | None = None  # item being graded
    deadline: float = float("inf")


def _stop(worker: _Worker, graceful: bool) -> None:
    """Stop a worker: wait up to 1 s for it to exit after a `None` task (if graceful), then SIGKILL."""
    if graceful and worker.proc.poll() is None:
        try:
            worker.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    if worker.proc.poll() is None:
        worker.proc.kill()
        try:
            worker.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.warning("grader worker pid %d did not exit after SIGKILL", worker.proc.pid)
    for conn in (worker.tasks, worker.results):
        try:
            conn.close()
        except OSError:
            pass


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        _stop(workers.pop(), graceful=False)


class Grader:
    """Grade (response, ground truth) pairs in worker processes, each item within `timeout_s` seconds.

    `reward_fn` is a name in `REWARD_FUNCTIONS` or a top-level (picklable) function returning a dict of
    floats. `num_workers=0` grades in the calling process with no time bound (debugging only).
    `max_memory_mb` caps each worker's address space (None: no cap). `grade` is thread-safe (calls are
    serialized). Use as a context manager or call `close()`.

    `stats` counts, over the grader's life: `graded` (items returned, including the failed ones),
    `timeouts`, `errors` (exceptions, bad return values, workers that died) and `worker_restarts`.
    """

    def __init__(
        self,
        reward_fn: str | Callable[[str, Any], dict[str, float]] = "r1_zero",
        timeout_s: float = 5.0,
        num_workers: int = 2,
        max_memory_mb: int | None = 4096,
    ) -> None:
        from hf_align.rewards.math import get_reward_fn

        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._fn = get_reward_fn(reward_fn)
        if isinstance(reward_fn, str):
            self._fn_spec: str | bytes = reward_fn
        else:
            if getattr(reward_fn, "__module__", None) == "__main__":
                raise ValueError(
                    "reward_fn is defined in __main__, which grader workers cannot import; "
                    "move it to a module or pass a name from REWARD_FUNCTIONS"
                )
            try:
                self._fn_spec = pickle.dumps(reward_fn)
            except Exception as exc:
                raise TypeError(
                    f"reward_fn must be picklable (a top-level function), got {reward_fn!r}: {exc}"
                ) from exc
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.max_memory_mb = max_memory_mb
        self.stats: dict[str, int] = {"graded": 0, "timeouts": 0, "errors": 0, "worker_restarts": 0}
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    # -- public API ---------------------------------------------------------------------------------

    def grade(self, responses: Sequence[str], ground_truths: Sequence[Any]) -> list[dict[str, float]]:
        """One reward dict per response, in order. Timed-out or failing items get `ZERO_REWARDS`."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        with self._lock:
            if self._closed:
                raise RuntimeError("Grader is closed")
            if self.num_workers == 0:
                return [
                    self._grade_in_process(i, r, g) for i, (r, g) in enumerate(zip(responses, ground_truths))
                ]
            return self._grade_in_workers(list(responses), list(ground_truths))

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        with self._lock:
            self._closed = True
            for worker in self._workers:  # ask all to exit first, so they shut down in parallel
                try:
                    worker.tasks.send(None)
                except OSError:
                    pass
            while self._workers:
                _stop(self._workers.pop(), graceful=True)
            self._finalizer.detach()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _grade_in_process(self, index: int, response: str, ground_truth: Any) -> dict[str, float]:
        try:
            out = {str(k): float(v) for k, v in self._fn(response, ground_truth).items()}
        except Exception as exc:
            return self._record_error(index, f"{type(exc).__name__}: {exc}")
        self.stats["graded"] += 1
        return out

    def _start_worker(self) -> _Worker:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, _HF_ALIGN_DIR, str(task_r), str(result_w)],
                pass_fds=(task_r, result_w),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            for fd in (task_r, task_w, result_r, result_w):
                os.close(fd)
            raise
        os.close(task_r)
        os.close(result_w)
        worker = _Worker(
            proc, Connection(task_w, readable=False), Connection(result_r, writable=False), time.monotonic()
        )
        sys_path = [p or os.getcwd() for p in sys.path]  # "" means the parent's working directory
        worker.tasks.send((sys_path, self.max_memory_mb, self._fn_spec))
        return worker

    def _replace(self, worker: _Worker) -> None:
        _stop(worker, graceful=False)
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.stats["worker_restarts"] += 1

    def _record_error(self, index: int, message: str) -> dict[str, float]:
        self.stats["errors"] += 1
        self.stats["graded"] += 1
        logger.warning("grader: item %d failed (%s); graded as zero", index, message)
        return {**ZERO_REWARDS, ERROR_FLAG: 1.0}

    def _grade_in_workers(self, responses: list[str], ground_truths: list[Any]) -> list[dict[str, float]]:
        results: list[dict[str, float] | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        while pending or any(w.index is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.index is None and pending:
                    self._dispatch(worker, pending, responses, ground_truths, results)
            if not pending and all(w.index is None for w in self._workers):
                break  # the last items could not be sent; nothing to wait for
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in self._workers]
            wait_s = max(0.0, min(deadlines) - now)
            by_conn = {w.results: w for w in self._workers}
            for conn in wait(list(by_conn), timeout=wait_s):
                self._receive(by_conn[conn], results)
            self._enforce_deadlines(results)
        return [r if r is not None else dict(ZERO_REWARDS) for r in results]

    def _dispatch(
        self,
        worker: _Worker,
        pending: deque[int],
        responses: list[str],
        ground_truths: list[Any],
        results: list[dict[str, float] | None],
    ) -> None:
        index = pending.popleft()
        try:
            worker.tasks.send((index, responses[index], ground_truths[index]))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:  # nothing was written
            results[index] = self._record_error(index, f"cannot send item: {exc}")
            return
        except OSError:  # the worker died while idle: retry the item on a fresh one
            pending.appendleft(index)
            self._replace(worker)
            return
        worker.index = index
        worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, worker: _Worker, results: list[dict[str, float] | None]) -> None:
        try:
            message = worker.results.recv()
        except (EOFError, OSError):
            message = ("died",)
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            return
        if kind == "init_error":
            self._fail(f"grader worker could not start: {message[1]}")
        if kind == "died":
            if not worker.ready:
                self._fail(f"grader worker exited during start-up (exit code {worker.proc.poll()})")
            if worker.index is not None:
                message = f"worker exited with code {worker.proc.wait()}"
                results[worker.index] = self._record_error(worker.index, message)
            self._replace(worker)
            return
        index = message[1]
        if index != worker.index:  # a reply for an item we already gave up on; cannot happen after a kill
            return
        if kind == "ok":
            results[index] = message[2]
            self.stats["graded"] += 1
        else:
            results[index] = self._record_error(index, message[2])
        worker.index = None
        worker.deadline = float("inf")

    def _enforce_deadlines(self, results: list[dict[str, float] | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.index is not None and now >= worker.deadline:
                if worker.results.poll():
                    continue  # the answer arrived just in time: read it on the next round
                index = worker.index
                self.stats["timeouts"] += 1
                self.stats["graded"] += 1
                results[index] = dict(ZERO_REWARDS)
                logger.warning(
                    "grader: item %d timed out after %.1f s; graded as zero, worker restarted",
                    index,
                    self.timeout_s,
                )
                self._replace(worker)
            elif not worker.ready and now >= worker.started + _STARTUP_TIMEOUT_S:
                self._fail(f"grader worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")

    def _fail(self, message: str) -> None:
        self._closed = True
        _stop_all(self._workers)
        raise RuntimeError(message)


def grade_batch(
    reward_fn: str | Callable[[str, Any], dict[str, float]],
    responses: Sequence[str],
    ground_truths: Sequence[Any],
    timeout_s: float = 5.0,
    num_workers: int = 2,
) -> list[dict[str, float]]:
    """Grade one batch with a throwaway `Grader` (start-up cost each call: keep a `Grader` to reuse workers)."""
    with Grader(reward_fn, timeout_s=timeout_s, num_workers=num_workers) as grader:
        return grader.grade(responses, ground_truths)
