"""Grader fuzzing: hostile and pathological responses through the real worker pool.

Every response goes through one module-scoped `Grader` (2 workers, 2 s per item) running
`_hostile.fuzz_reward_fn`, which dispatches to a reward function by name and reports the seconds the item
took in the worker. For every batch we check: no canary file exists (the payloads write it relative to the
workers' working directory, a fresh tmp dir we chdir into before the pool starts, or at an absolute path);
the call returned within `TIMEOUT_S * ceil(n / workers)` plus slack (plus a start-up allowance per replaced
worker); no item that finished took more than the timeout plus slack; every result is a dict of finite
floats with the reward in [0, 1]; no reward function raised and no worker died. After the fuzz the same
pool must still grade known pairs right, which shows it recovered from the timeouts it went through. A
control test first shows that a file a worker creates at either canary path is found.

Two sources of responses: the hand list (`_hostile.hostile_answers`, ~100 inputs), each graded as its own
gold and against a normal gold, in and out of the R1-Zero format; and hypothesis-generated answers (LaTeX
fragments, braces, tags, operators, numbers, odd unicode, the same payloads, composed recursively), each
graded in and out of the R1-Zero format. Only distinct (response, reward function, gold) cases are
counted: ~1,000 in the fast test, more than 10,000 in the slow one. Hand inputs that reach sympy against a
different gold (towers, deep nests, long code) run into the timeout and cost a worker restart each, so the
fast test grades most of them only as their own gold, which compares equal strings.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hf_align.rewards import ZERO_REWARDS, Grader
from tests.unit._hostile import CANARY_PREFIX, WRAPPERS, digit_free_name, fuzz_reward_fn, hostile_answers

TIMEOUT_S = 2.0
NUM_WORKERS = 2
BATCH_SLACK_S = 10.0  # per grade call: dispatch, pickling megabyte strings, a busy machine
RESTART_S = 15.0  # per replaced worker: a fresh interpreter imports sympy on a busy machine
ITEM_SLACK_S = 1.0
REWARD_KEYS = {"format_reward", "answer_reward", "reward"}
SELF = "<self>"  # gold marker: the hostile answer is its own ground truth

# (wrapper, gold, reward function) for the hand list. The self-gold variants compare equal strings and are
# cheap; the others send every answer into extraction and sympy against "42".
SELF_VARIANTS = [
    ("r1", SELF, "r1_zero"),
    ("r1_boxed", SELF, "r1_zero_format_shaped"),
    ("question_only", SELF, "question_only"),
    ("bare", SELF, "gsm8k"),
]
GOLD_VARIANTS = [
    ("r1", "42", "r1_zero"),
    ("question_only", "42", "question_only"),
    ("bare", "42", "question_only"),
]
# The fast test also grades these against "42": the payloads, and one tower that is known to time out.
FAST_GOLD_CATEGORIES = {"code", "text", "tags"}
FAST_GOLD_LABELS = {"tower_9"}

# (answer, ground truth, expected r1_zero reward): grading must still be right after the fuzz.
KNOWN_PAIRS = [
    (r"\frac{1}{2}", "0.5", 1.0),
    ("42", "42", 1.0),
    ("3", "4", 0.0),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1.0),
    ("2^{10}", "1024", 1.0),
    ("(1,2)", "(2,1)", 0.0),
    ("[1,2)", "[1,2)", 1.0),
    ("0.33", r"\frac{1}{3}", 0.0),
    ("x = 5", "5", 1.0),
    ("10", "1,0", 0.0),
]


def case_key(response: str, spec: tuple) -> str:
    """A short identity for a (response, (reward fn, gold)) case, to count distinct cases only."""
    return hashlib.blake2b(repr((response, spec)).encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class FuzzEnv:
    grader: Grader
    workdir: Path
    canary_rel: str
    canary_abs: Path
    home: Path  # the working directory before the test: where a relative write would land otherwise
    slowest_item_s: float = 0.0
    timed_out: list[str] = field(default_factory=list)  # labels of the items that ran into the timeout

    def canaries(self) -> list[Path]:
        paths = (self.canary_abs, self.workdir / self.canary_rel, self.home / self.canary_rel)
        return sorted({p for p in paths if p.exists()} | set(self.workdir.rglob(f"*{CANARY_PREFIX}*")))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz_cwd")
    # Short names: sympy's time on a payload grows with the number of letters in it.
    canary_abs = tmp_path_factory.mktemp("fuzz_abs") / f"{CANARY_PREFIX}_{digit_free_name(8)}"
    home = Path.cwd()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # before the pool starts: workers (and their replacements) inherit it
        with Grader(fuzz_reward_fn, timeout_s=TIMEOUT_S, num_workers=NUM_WORKERS) as grader:
            yield FuzzEnv(grader, workdir, f"{CANARY_PREFIX}_{digit_free_name(8)}", canary_abs, home)


def grade_checked(env: FuzzEnv, responses: list[str], specs: list[tuple], labels: list[str]) -> list[dict]:
    """Grade one batch and check the invariants every fuzz batch must satisfy."""
    assert os.getcwd() == str(env.workdir)
    before = dict(env.grader.stats)
    start = time.monotonic()
    out = env.grader.grade(responses, specs)
    elapsed = time.monotonic() - start
    stats = {k: env.grader.stats[k] - before[k] for k in before}

    assert not env.canaries(), f"a payload ran: {env.canaries()}"
    bound = TIMEOUT_S * math.ceil(len(responses) / NUM_WORKERS) + BATCH_SLACK_S
    bound += RESTART_S * stats["worker_restarts"]
    assert elapsed <= bound, f"batch of {len(responses)} took {elapsed:.1f} s > {bound:.1f} s ({stats})"
    assert stats["graded"] == len(responses)
    assert stats["errors"] == 0, f"a reward function raised or a worker died: {stats}"
    assert len(out) == len(responses)
    for label, result in zip(labels, out):
        assert isinstance(result, dict), label
        assert all(isinstance(v, float) and math.isfinite(v) for v in result.values()), (label, result)
        assert REWARD_KEYS <= set(result), (label, result)
        assert 0.0 <= result["reward"] <= 1.0, (label, result)
        assert {result["format_reward"], result["answer_reward"]} <= {0.0, 1.0}, (label, result)
        if "elapsed_s" in result:
            assert result["elapsed_s"] <= TIMEOUT_S + ITEM_SLACK_S, (label, result)
            env.slowest_item_s = max(env.slowest_item_s, result["elapsed_s"])
        else:  # only a timeout (or an error, excluded above) returns the pool's zeros
            assert result == ZERO_REWARDS, (label, result)
            env.timed_out.append(label)
    return out


def assert_still_grades_correctly(env: FuzzEnv) -> None:
    timeouts = env.grader.stats["timeouts"]
    pairs = KNOWN_PAIRS * 2  # enough items that both workers (replacements included) take some
    responses = [WRAPPERS["r1"](r) for r, _, _ in pairs]
    out = grade_checked(env, responses, [("r1_zero", g) for _, g, _ in pairs], [r for r, _, _ in pairs])
    assert [o["reward"] for o in out] == [expected for _, _, expected in pairs]
    assert env.grader.stats["timeouts"] == timeouts


# --------------------------------------------------------------------------------------------------
# Hand list
# --------------------------------------------------------------------------------------------------


def hand_cases(env: FuzzEnv, fast: bool) -> list[tuple[str, str, tuple, str]]:
    """(name, response, (reward fn, gold), category) for every hostile answer in its variants."""
    cases = []
    for category, label, answer in hostile_answers(env.canary_rel, str(env.canary_abs)):
        variants = list(SELF_VARIANTS)
        if not fast:
            variants += GOLD_VARIANTS
        elif category in FAST_GOLD_CATEGORIES or label in FAST_GOLD_LABELS:
            variants.append(GOLD_VARIANTS[0])
        for wrapper, gold, fn in variants:
            ground_truth = answer if gold == SELF else gold
            cases.append(
                (f"{label}/{wrapper}/{fn}/{gold}", WRAPPERS[wrapper](answer), (fn, ground_truth), category)
            )
    return cases


def grade_hand_list(env: FuzzEnv, seen: set[str], fast: bool, batch_size: int = 64) -> int:
    cases = hand_cases(env, fast)
    for i in range(0, len(cases), batch_size):
        batch = cases[i : i + batch_size]
        out = grade_checked(env, [c[1] for c in batch], [c[2] for c in batch], [c[0] for c in batch])
        for (name, response, spec, category), result in zip(batch, out):
            seen.add(case_key(response, spec))
            if category != "code":
                continue
            if spec[1] == "42":
                assert result["answer_reward"] == 0.0, name  # code is never the right answer
            elif name.endswith(f"/r1/r1_zero/{SELF}") and result != ZERO_REWARDS:
                assert result["reward"] == 1.0, name  # and equals itself, by string, without running
    return len(cases)


# --------------------------------------------------------------------------------------------------
# Hypothesis
# --------------------------------------------------------------------------------------------------

LATEX_TOKENS = [
    "\\frac", "\\dfrac", "\\sqrt", "\\boxed", "\\fbox", "\\text", "\\mathrm", "\\operatorname",
    "\\left", "\\right", "\\cdot", "\\times", "\\div", "\\pm", "\\pi", "\\infty", "\\cup", "\\in",
    "\\{", "\\}", "\\!", "\\,", "\\%", "\\circ", "\\sum", "\\prod", "\\int", "\\lim", "\\log", "\\ln",
    "\\sin", "\\binom", "\\begin{pmatrix}", "\\end{pmatrix}", "\\begin{array}{c}", "\\end{array}",
    "\\\\", "&", "^", "_", "{", "}", "(", ")", "[", "]", "+", "-", "*", "**", "/", "=", ",", ".", "!",
    "$", "$$", "\\$", " ", "\n", "x", "y", "e", "i", "n", "cm", "degrees", "answer is", "####",
]  # fmt: skip
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "</think> <answer>", "<answer/>", "< /answer >"]
NORMAL_GOLDS = ["42", "\\frac{1}{2}", "(1, 2)", "x^2+1", "\\{1, 2\\}", "[0, \\infty)", "-3", ["3", "4"]]


def answer_strategy(payloads: list[str]) -> st.SearchStrategy[str]:
    atoms = st.one_of(
        st.sampled_from(LATEX_TOKENS),
        st.sampled_from(TAGS),
        st.integers(-(10**4), 10**4).map(str),  # towers of big numbers: the hand list has them
        st.sampled_from(["0", "1", "9", "42", "0.5", ".5", "1e3", "1,000", "3.14159", "10^{100}"]),
        st.text(st.characters(exclude_categories=()), max_size=4),  # includes NUL, surrogates, marks
        st.sampled_from(["\x00", "\u202e", "\u200d", "\u200b", "\ufeff", "\u0301", "\ud800", "\udfff"]),
        st.sampled_from(payloads),
    )

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            inner.map("{{{}}}".format),
            st.tuples(inner, inner).map(lambda t: "\\frac{{{}}}{{{}}}".format(*t)),
            inner.map("\\sqrt{{{}}}".format),
            st.tuples(inner, inner).map(lambda t: "{}^{{{}}}".format(*t)),
            inner.map("\\left({}\\right)".format),
            inner.map("\\boxed{{{}}}".format),
            inner.map("\\text{{{}}}".format),
            st.tuples(inner, inner).map(lambda t: "{}, {}".format(*t)),
            inner.map("<answer>{}</answer>".format),
        )

    return st.recursive(atoms, extend, max_leaves=10)


def pair_strategy(payloads: list[str]) -> st.SearchStrategy[list[tuple[str, tuple]]]:
    """One generated answer as two cases sharing a gold: in the R1-Zero format (graded by an R1-Zero
    reward) and without it (graded by `question_only`, `gsm8k` or an R1-Zero reward that must reject it)."""
    answer = answer_strategy(payloads)

    @st.composite
    def pair(draw):
        body = draw(answer)
        prefix = draw(st.sampled_from(["", "Let me think. ", "<think>", "x" * 200, "The answer is 7. "]))
        gold = draw(st.one_of(st.sampled_from(NORMAL_GOLDS), st.just(body), answer))
        r1_fn = draw(st.sampled_from(["r1_zero", "r1_zero_format", "r1_zero_format_shaped"]))
        r1_wrap = WRAPPERS[draw(st.sampled_from(["r1", "r1_boxed"]))]
        plain_wrap = WRAPPERS[draw(st.sampled_from(["question_only", "bare"]))]
        plain_fn = draw(st.sampled_from(["question_only", "gsm8k", "r1_zero_format_shaped"]))
        return [(prefix + r1_wrap(body), (r1_fn, gold)), (prefix + plain_wrap(body), (plain_fn, gold))]

    return pair()


def grade_hypothesis(env: FuzzEnv, seen: set[str], examples: int, pairs_per_batch: int) -> int:
    """Grade `examples` hypothesis-drawn batches; returns how many new distinct cases were graded (cases
    already in `seen` are skipped, so every counted response is a different one)."""
    payloads = [a for c, _, a in hostile_answers(env.canary_rel, str(env.canary_abs)) if c == "code"]
    count = 0

    @settings(
        max_examples=examples,
        derandomize=True,  # reproducible in CI
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.lists(
            pair_strategy(payloads),
            min_size=pairs_per_batch,
            max_size=pairs_per_batch,
            unique_by=lambda p: p[0][0],
        )
    )
    def fuzz(pairs):
        nonlocal count
        new = {case_key(*case): case for cases in pairs for case in cases}
        batch = [case for key, case in new.items() if key not in seen]
        if not batch:
            return
        labels = [f"hypothesis:{response[:120]!r}" for response, _ in batch]
        grade_checked(env, [r for r, _ in batch], [spec for _, spec in batch], labels)
        seen.update(new)
        count += len(batch)

    fuzz()
    return count


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def run_fuzz(env: FuzzEnv, fast: bool, examples: int, pairs_per_batch: int = 20) -> int:
    """Hand list, then hypothesis, then the known pairs; returns the number of distinct cases graded."""
    seen: set[str] = set()
    timeouts, start = len(env.timed_out), time.monotonic()
    hand = grade_hand_list(env, seen, fast)
    hand_s, hand_timeouts = time.monotonic() - start, len(env.timed_out) - timeouts
    generated = grade_hypothesis(env, seen, examples, pairs_per_batch)
    assert_still_grades_correctly(env)
    print(
        f"\n{'fast' if fast else 'long'}: {hand} hand cases in {hand_s:.1f} s ({hand_timeouts} timeouts), "
        f"{generated} hypothesis cases in {time.monotonic() - start - hand_s:.1f} s "
        f"({len(env.timed_out) - timeouts - hand_timeouts} timeouts); slowest finished item "
        f"{env.slowest_item_s:.2f} s; pool stats {env.grader.stats}"
    )
    print("timed out:", ", ".join(label[:60] for label in env.timed_out[timeouts:]))
    assert len(seen) == hand + generated
    return hand + generated


def test_canary_check_sees_a_write_from_a_worker(env):
    """Control: a file a worker creates at the relative or the absolute canary path is found (and the hand
    list is what the docstring says). The write is the test's own `control_touch`, not model text."""
    answers = hostile_answers(env.canary_rel, str(env.canary_abs))
    assert len(answers) >= 40 and len({label for _, label, _ in answers}) == len(answers)
    assert all(env.canary_rel in a or str(env.canary_abs) in a for c, _, a in answers if "touch" in a)
    for path in (env.canary_rel, str(env.canary_abs)):
        env.grader.grade(["control"], [("control_touch", path)])
        try:
            assert env.canaries(), path
        finally:
            for found in env.canaries():
                found.unlink()
    assert not env.canaries()


def test_fuzz_fast(env):
    assert run_fuzz(env, fast=True, examples=16) >= 1_000


@pytest.mark.slow
def test_fuzz_long(env):
    assert run_fuzz(env, fast=False, examples=250) >= 10_000
