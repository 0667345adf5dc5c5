"""Tests for the time-bounded worker pool (`Grader`).

Pool start-up costs a second or two per worker on a busy machine, so the tests share one module-scoped
`Grader` running `probe_reward_fn` below: it grades with the real `r1_zero_reward_fn` unless the response
asks it to misbehave. Reward functions by name are covered by `test_reward_fn_by_name`.
"""

import logging
import os
import sys
import threading
import time
import types
import uuid

import pytest

from hf_align.rewards import ZERO_REWARDS, Grader, r1_zero_reward_fn
from hf_align.rewards.pool import ERROR_FLAG

TIMEOUT_S = 2.0


def probe_reward_fn(response: str, ground_truth) -> dict:
    """Top-level (picklable) reward fn for the tests; the response selects what it does."""
    if response == "raise":
        raise ValueError("boom")
    if response == "exit":
        os._exit(3)
    if response == "hang":
        while True:
            pass
    if response == "not a dict":
        return [1.0]
    if response == "modules":
        heavy = [m for m in ("torch", "transformers", "trl") if m in sys.modules]
        return {"reward": 0.0 if heavy else 1.0}
    return r1_zero_reward_fn(response, ground_truth)


def answer(text: str) -> str:
    return f"Thinking. </think> <answer>{text}</answer>"


PATHOLOGICAL = answer(r"\boxed{9^{9^{9^{9^{9}}}}}")


@pytest.fixture(scope="module")
def grader():
    with Grader(probe_reward_fn, timeout_s=TIMEOUT_S, num_workers=2) as g:
        yield g


def test_grades_in_order(grader):
    responses = [answer(r"\frac{1}{2}"), answer("3"), "no format", answer("(1,2)"), answer("[1,2)")]
    gold = ["0.5", "4", "1", "(1, 2)", ["[1,2]", "(1,2)"]]
    out = grader.grade(responses, gold)
    assert [o["reward"] for o in out] == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert out == [r1_zero_reward_fn(r, g) for r, g in zip(responses, gold)]
    assert grader.grade([], []) == []


def _check_pathological(grader) -> None:
    before = dict(grader.stats)
    start = time.monotonic()
    out = grader.grade([PATHOLOGICAL], ["1"])
    elapsed = time.monotonic() - start
    assert out[0]["reward"] == 0.0
    assert elapsed < TIMEOUT_S + 2.0
    assert grader.stats["graded"] == before["graded"] + 1


def test_pathological_expression_is_time_bounded(grader, caplog):
    timeouts = grader.stats["timeouts"]
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards.pool"):
        _check_pathological(grader)
    if grader.stats["timeouts"] > timeouts:  # (a fast wrong answer would be fine too)
        assert any("item 0 timed out" in r.getMessage() for r in caplog.records)


def test_timeout_from_a_non_main_thread(grader):
    errors = []

    def run():
        try:
            _check_pathological(grader)
        except BaseException as exc:  # surface assertion failures from the thread
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert not errors, errors


def test_keeps_grading_correctly_after_a_timeout(grader, caplog):
    stats = dict(grader.stats)
    responses = [answer("1"), "hang", answer("2"), answer("3")]
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards.pool"):
        start = time.monotonic()
        out = grader.grade(responses, ["1", "2", "2", "4"])
        elapsed = time.monotonic() - start
    assert [o["reward"] for o in out] == [1.0, 0.0, 1.0, 0.0]
    assert out[1] == ZERO_REWARDS
    assert grader.stats["timeouts"] == stats["timeouts"] + 1
    assert grader.stats["worker_restarts"] == stats["worker_restarts"] + 1
    assert any("item 1 timed out" in r.getMessage() for r in caplog.records)
    assert elapsed < TIMEOUT_S + 30.0  # includes one worker restart on a busy machine
    assert [o["reward"] for o in grader.grade([answer("5")], ["5"])] == [1.0]


def test_errors_in_reward_fn_grade_zero(grader, caplog):
    errors = grader.stats["errors"]
    with caplog.at_level(logging.WARNING, logger="hf_align.rewards.pool"):
        out = grader.grade(["raise", answer("7"), "not a dict"], ["1", "7", "1"])
    failed = {**ZERO_REWARDS, ERROR_FLAG: 1.0}  # zeros, flagged so a trainer can zero the advantage
    assert out == [failed, r1_zero_reward_fn(answer("7"), "7"), failed]
    assert grader.stats["errors"] == errors + 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("item 0 failed" in m and "ValueError: boom" in m for m in messages)
    assert any("item 2 failed" in m and "TypeError" in m for m in messages)


def test_items_that_cannot_be_sent_grade_as_errors(grader):
    # More unpicklable items than workers: each is an error, the rest of the batch still grades.
    errors = grader.stats["errors"]
    out = grader.grade([answer("1")] * 4, [lambda: 0] * 3 + ["1"])
    assert out == [{**ZERO_REWARDS, ERROR_FLAG: 1.0}] * 3 + [r1_zero_reward_fn(answer("1"), "1")]
    assert grader.stats["errors"] == errors + 3


@pytest.mark.slow
def test_worker_that_dies_is_replaced(grader):
    errors = grader.stats["errors"]
    out = grader.grade(["exit", answer("7")], ["1", "7"])
    assert out[0] == {**ZERO_REWARDS, ERROR_FLAG: 1.0} and out[1]["reward"] == 1.0
    assert grader.stats["errors"] == errors + 1


def test_workers_do_not_import_torch(grader):
    assert grader.grade(["modules"], [None])[0]["reward"] == 1.0


def test_hostile_answer_through_pool(grader):
    canary = f"/tmp/hf_align_canary_{uuid.uuid4().hex}"
    try:
        hostile = [
            answer(rf"\boxed{{__import__('os').system('touch {canary}')}}"),
            answer(f"eval(\"__import__('os').system('touch {canary}')\")"),
            answer(f"().__class__.__bases__[0].__subclasses__(); exec('touch {canary}')"),
        ]
        out = grader.grade(hostile, ["0"] * len(hostile))
        assert all(o["reward"] == 0.0 for o in out)
        assert not os.path.exists(canary)
    finally:
        if os.path.exists(canary):
            os.remove(canary)


def test_concurrent_calls_are_serialized(grader):
    results = {}

    def run(k):
        results[k] = grader.grade([answer(str(k))] * 3, [str(k)] * 3)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o["reward"] == 1.0 for k in range(3) for o in results[k])


def test_argument_validation(grader):
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        grader.grade(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="unknown reward function"):
        Grader("no_such_reward", num_workers=0)
    with pytest.raises(TypeError, match="picklable"):
        Grader(lambda r, g: {"reward": 1.0}, num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Grader(timeout_s=0, num_workers=0)


def test_main_module_callable_is_rejected():
    def fn(response, ground_truth):
        return {"reward": 1.0}

    fn.__module__ = "__main__"
    with pytest.raises(ValueError, match="__main__"):
        Grader(fn, num_workers=0)


def test_unimportable_reward_fn_fails_with_a_clear_error(monkeypatch):
    # Picklable here (its module is in this process's sys.modules) but not importable in a worker.
    module = types.ModuleType("hf_align_test_no_such_module")

    def fn(response, ground_truth):
        return {"reward": 1.0}

    fn.__module__ = module.__name__
    fn.__qualname__ = "fn"
    module.fn = fn
    monkeypatch.setitem(sys.modules, module.__name__, module)
    g = Grader(fn, num_workers=1)
    with pytest.raises(RuntimeError, match="could not start.*hf_align_test_no_such_module"):
        g.grade(["x"], ["1"])
    g.close()


def test_in_process_mode_and_close():
    g = Grader(probe_reward_fn, num_workers=0)
    assert g.grade([answer("2"), "raise"], ["2", "1"]) == [
        r1_zero_reward_fn(answer("2"), "2"),
        {**ZERO_REWARDS, ERROR_FLAG: 1.0},
    ]
    assert g.stats == {"graded": 2, "timeouts": 0, "errors": 1, "worker_restarts": 0}
    g.close()
    g.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([], [])


@pytest.mark.slow
def test_reward_fn_by_name():
    with Grader("question_only", num_workers=1) as grader:
        out = grader.grade([r"\boxed{2}", "the answer is 3"], ["2", "4"])
    assert [o["reward"] for o in out] == [1.0, 0.0]
    assert [o["format_reward"] for o in out] == [1.0, 0.0]
