"""Time-bounded, batched grading in worker processes: `Grader`.

A reward function runs on untrusted model output, and sympy can spend minutes (or all memory) on `9^{9^{9^{9}}}`.
`Grader` runs it in a few long-lived workers with a wall-clock budget per item: an item that overruns has its
worker killed (SIGKILL) and replaced, and grades as zeros (`stats["timeouts"]`). The parent only waits on pipes
with a timeout, so this works from any thread. A reward function that raises or returns no dict of numbers, or
a worker that dies mid-item, grades as zeros flagged `grader_error` (`stats["errors"]`).

A worker is this file run as a script (`_serve`) by a fresh interpreter (fork + exec: safe in a threaded,
torch-loaded parent), over a `multiprocessing.Pipe`. It imports only `hf_align.rewards` and sympy, then says it
is ready; an item's clock starts when it is sent to a ready worker. Not multiprocessing's spawn or forkserver (nor
`concurrent.futures` on them): their workers re-import the parent's `__main__` (a training script: torch,
transformers) and `hf_align/__init__` (torch) at start and at every replacement, and a pool cannot kill one
worker. A reward function given as a callable must be picklable by reference (a top-level function of an
importable module), imported with the parent's `sys.path`. POSIX only.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

ZERO_REWARDS: dict[str, float] = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
# An item whose reward function raised, returned something that is not a dict of numbers, or whose worker
# died: zeros plus this flag, so a trainer can tell "no reward" from "reward 0" (GRPO zeroes its advantage).
ERROR_FLAG = "grader_error"

# Generous: on a busy 2-core machine a cold worker's `import sympy` can take several seconds.
_STARTUP_TIMEOUT_S = 120.0


def _call(fn: Callable, response: str, ground_truth: Any) -> dict[str, float]:
    out = fn(response, ground_truth)
    if not isinstance(out, dict):
        raise TypeError(f"reward function returned {type(out).__name__}, expected dict")
    return {str(k): float(v) for k, v in out.items()}


def _serve(fd: int) -> None:
    """A worker: the init message, then `(response, ground_truth)` items until `None` or EOF."""
    conn = Connection(fd)
    try:
        sys_path, max_memory_mb, fn_spec = conn.recv()
        sys.path[:] = sys_path + [p for p in sys.path if p and p not in sys_path]
        # `hf_align` as a bare package: its `__init__` imports torch, which grading does not need.
        package = types.ModuleType("hf_align")
        package.__path__ = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        sys.modules["hf_align"] = package
        if max_memory_mb:
            import resource

            with suppress(ValueError, OSError):  # not allowed here: the timeout still bounds the item
                resource.setrlimit(resource.RLIMIT_AS, (max_memory_mb << 20, max_memory_mb << 20))
        from hf_align.rewards.grader import warm_up
        from hf_align.rewards.math import get_reward_fn

        fn = get_reward_fn(fn_spec) if isinstance(fn_spec, str) else pickle.loads(fn_spec)
        warm_up()
    except Exception as exc:  # report why we cannot serve, then exit
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            conn.send(("ok", _call(fn, *task)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    deadline: float  # start-up's until ready, then the running item's; inf while idle
    ready: bool = False
    index: int | None = None  # item being graded


def _stop(worker: _Worker, graceful: bool) -> None:
    """Stop a worker: wait up to 1 s for it to exit after a `None` task (if graceful), then SIGKILL."""
    with suppress(subprocess.TimeoutExpired):
        if graceful:
            worker.proc.wait(timeout=1.0)
    if worker.proc.poll() is None:
        worker.proc.kill()
        with suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=5.0)
    worker.conn.close()


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
        if getattr(reward_fn, "__module__", None) == "__main__":
            raise ValueError(
                "reward_fn is defined in __main__, which grader workers cannot import; "
                "move it to a module or pass a name from REWARD_FUNCTIONS"
            )
        try:
            self._fn_spec = reward_fn if isinstance(reward_fn, str) else pickle.dumps(reward_fn)
        except Exception as exc:
            raise TypeError(
                f"reward_fn must be picklable (a top-level function), got {reward_fn!r}: {exc}"
            ) from exc
        self.timeout_s, self.num_workers, self.max_memory_mb = float(timeout_s), num_workers, max_memory_mb
        self.stats: dict[str, int] = {"graded": 0, "timeouts": 0, "errors": 0, "worker_restarts": 0}
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_all, self._workers)
        self._workers.extend(self._start_worker() for _ in range(num_workers))

    def grade(self, responses: Sequence[str], ground_truths: Sequence[Any]) -> list[dict[str, float]]:
        """One reward dict per response, in order. Timed-out or failing items get `ZERO_REWARDS`."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        with self._lock:
            if self._closed:
                raise RuntimeError("Grader is closed")
            if self.num_workers == 0:
                return [self._grade_here(i, r, g) for i, (r, g) in enumerate(zip(responses, ground_truths))]
            return self._grade_in_workers(list(responses), list(ground_truths))

    def close(self) -> None:
        """Stop the workers. Idempotent."""
        with self._lock:
            self._closed = True
            for worker in self._workers:  # ask all to exit first, so they shut down in parallel
                with suppress(OSError):
                    worker.conn.send(None)
            while self._workers:
                _stop(self._workers.pop(), graceful=True)
            self._finalizer.detach()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _grade_here(self, index: int, response: str, ground_truth: Any) -> dict[str, float]:
        try:
            out = _call(self._fn, response, ground_truth)
        except Exception as exc:
            return self._record_error(index, f"{type(exc).__name__}: {exc}")
        self.stats["graded"] += 1
        return out

    def _start_worker(self) -> _Worker:
        conn, child_conn = Pipe()
        try:  # `-I` keeps this file's folder (which holds a `math.py`) off the worker's sys.path
            cmd = [sys.executable, "-I", os.path.abspath(__file__), str(child_conn.fileno())]
            proc = subprocess.Popen(cmd, pass_fds=(child_conn.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child_conn.close()
        sys_path = [p or os.getcwd() for p in sys.path]  # "" means the parent's working directory
        conn.send((sys_path, self.max_memory_mb, self._fn_spec))
        return _Worker(proc, conn, deadline=time.monotonic() + _STARTUP_TIMEOUT_S)

    def _replace(self, worker: _Worker) -> None:
        _stop(worker, graceful=False)
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.stats["worker_restarts"] += 1

    def _record_error(self, index: int, message: str) -> dict[str, float]:
        self.stats["errors"] += 1
        self.stats["graded"] += 1
        logger.warning("grader: item %d failed (%s); graded as zero", index, message)
        return {**ZERO_REWARDS, ERROR_FLAG: 1.0}

    def _fail(self, message: str) -> None:
        self._closed = True
        _stop_all(self._workers)
        raise RuntimeError(message)

    def _grade_in_workers(self, responses: list[str], ground_truths: list[Any]) -> list[dict[str, float]]:
        results: list[dict[str, float] | None] = [None] * len(responses)
        pending = deque(range(len(responses)))
        while True:
            for worker in list(self._workers):
                if worker.ready and worker.index is None:
                    self._dispatch(worker, pending, (responses, ground_truths), results)
            if not pending and all(w.index is None for w in self._workers):
                return [r if r is not None else dict(ZERO_REWARDS) for r in results]
            by_conn = {w.conn: w for w in self._workers}
            for conn in wait(
                list(by_conn), max(0.0, min(w.deadline for w in self._workers) - time.monotonic())
            ):
                self._receive(by_conn[conn], results)
            self._enforce_deadlines(results)

    def _dispatch(
        self, worker: _Worker, pending: deque[int], items: tuple[list, list], results: list
    ) -> None:
        """Send an idle worker the next pending item it can be sent."""
        while pending:
            index = pending.popleft()
            try:
                worker.conn.send((items[0][index], items[1][index]))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # nothing was written
                results[index] = self._record_error(index, f"cannot send item: {exc}")
                continue
            except OSError:  # the worker died while idle: retry the item on a fresh one
                pending.appendleft(index)
                self._replace(worker)
                return
            worker.index, worker.deadline = index, time.monotonic() + self.timeout_s
            return

    def _receive(self, worker: _Worker, results: list[dict[str, float] | None]) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            message = ("died",)
        if message[0] == "ready":
            worker.ready, worker.deadline = True, float("inf")
        elif message[0] == "init_error":
            self._fail(f"grader worker could not start: {message[1]}")
        elif message[0] == "died":
            if not worker.ready:
                self._fail(f"grader worker exited during start-up (exit code {worker.proc.poll()})")
            if worker.index is not None:
                error = f"worker exited with code {worker.proc.wait()}"
                results[worker.index] = self._record_error(worker.index, error)
            self._replace(worker)
        else:  # ("ok", rewards) or ("error", message) for the item this worker is grading
            if message[0] == "ok":
                results[worker.index] = message[1]
                self.stats["graded"] += 1
            else:
                results[worker.index] = self._record_error(worker.index, message[1])
            worker.index, worker.deadline = None, float("inf")

    def _enforce_deadlines(self, results: list[dict[str, float] | None]) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if now < worker.deadline or worker.conn.poll():
                continue  # (a message that arrived just in time is read on the next round)
            if not worker.ready:
                self._fail(f"grader worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            self.stats["timeouts"] += 1
            self.stats["graded"] += 1
            results[worker.index] = dict(ZERO_REWARDS)
            logger.warning(
                "grader: item %d timed out after %.1f s; graded as zero, worker restarted",
                worker.index,
                self.timeout_s,
            )
            self._replace(worker)


if __name__ == "__main__":  # a worker, started by Grader._start_worker
    _serve(int(sys.argv[1]))
