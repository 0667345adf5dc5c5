"""Unit tests for answer extraction, normalization, equivalence and the reward functions (in-process)."""

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_align.rewards import (
    REWARD_FUNCTIONS,
    extract_boxed,
    extract_final_answer,
    gsm8k_reward_fn,
    math_answers_equal,
    normalize_answer,
    parse_gsm8k_response,
    parse_mmlu_response,
    question_only_reward_fn,
    r1_zero_format_reward_fn,
    r1_zero_reward_fn,
)
from tests.unit._hostile import digit_free_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (prediction, ground truth, expected)
EQUIVALENCE_CASES = [
    # fractions and decimals
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{1}{2}", "1/2", True),
    (r"\tfrac12", r"\frac{1}{2}", True),
    (r"\frac12", "0.5", True),
    (".5", "0.5", True),
    ("0.50", r"\frac{1}{2}", True),
    (r"-\frac{3}{4}", "-0.75", True),
    (r"\frac{-3}{4}", "-3/4", True),
    ("1/3", "0.33", False),
    ("0.333", r"\frac{1}{3}", False),
    ("3/4", "4/3", False),
    ("-3", "3", False),
    ("1e3", "1000", True),
    # sqrt and symbolic forms
    (r"\sqrt2", r"\sqrt{2}", True),
    (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),
    (r"2\sqrt{3}", r"\sqrt{12}", True),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    ("2^{10}", "1024", True),
    ("x+1", "1+x", True),
    ("(x-1)(x+1)", "x^2-1", True),
    ("x^2+1", "x^2-1", False),
    (r"\pi", "3.14", False),
    (r"2\pi", r"\pi \cdot 2", True),
    # \left / \right, spacing, text wrappers
    (r"\left( 1, 2 \right)", "(1,2)", True),
    (r"1\!000", "1000", True),
    (r"10\,000", "10000", True),
    (r"\text{Monday}", "Monday", True),
    (r"\text{Monday}", "monday", True),
    (r"\text{Tuesday}", "Monday", False),
    (r"\mathrm{(C)}", "C", True),
    (r"\textbf{(B)}", r"\text{(C)}", False),
    # units, degrees, percent, dollars
    (r"5 \text{ cm}", "5", True),
    ("12 inches", "12", True),
    ("5 square feet", "5", True),
    (r"5\text{ cm}^2", "5", True),
    ("10 dollars", "10", True),
    (r"\$10", "10", True),
    (r"\$10.50", "10.5", True),
    (r"90 \text{ degrees}", "90", True),
    (r"30^\circ", "30", True),
    (r"30^{\circ}", "30", True),
    (r"30^\circ", "60", False),
    (r"50\%", "50", True),
    ("50%", "50", True),
    (r"50\%", "0.5", False),
    ("5m", "5", False),  # a glued single letter is a variable, not metres
    # intervals, tuples, sets, unions
    ("[1,2)", "[1,2]", False),
    ("[1, 2)", "[1,2)", True),
    (r"(-\infty, 3]", r"(-\infty,3]", True),
    (r"(-\infty, 3]", r"(-\infty,3)", False),
    (r"(-\infty, 3] \cup [4, \infty)", r"[4,\infty)\cup(-\infty,3]", True),
    (r"[0, \infty)", r"[0, +\infty)", True),
    ("(1,2)", "(2,1)", False),
    ("(1, 2)", "(1,2)", True),
    (r"\left(\frac{1}{2}, 3\right)", "(0.5, 3)", True),
    ("(1,2,3)", "(1,2)", False),
    (r"\{1,2\}", r"\{2,1\}", True),
    (r"\{1,2\}", r"\{1,3\}", False),
    ("3, 5", "5, 3", True),
    ("3, 5", "3, 5, 7", False),
    ("(1,2)", "1,2", False),
    # thousands separators
    ("1,000", "1000", True),
    ("1,000,000", "1000000", True),
    ("58,500.", "58500", True),
    ("(1,000)", "1000", False),
    ("1,23", "123", False),
    # MATH's `,\!` thousands separator (41 test golds), in the gold and in the answer
    ("10080", r"10,\!080", True),
    ("10,080", r"10,\!080", True),
    (r"10,\!080", "10080", True),
    (r"10,\!080", "10,080", True),
    (r"\$15,\!000", "15000", True),
    ("1000000", r"1,\!000,\!000", True),
    (r"\frac{12}{5525}", r"\frac{12}{5,\!525}", True),
    (r"\frac{12}{5,525}", r"\frac{12}{5,\!525}", True),
    ("90900909", r"90{,}900{,}909", True),
    ("10081", r"10,\!080", False),
    ("10, 080", r"10,\!080", False),  # a space after the comma: a list, not a number
    ("1080", r"10,\!080", False),
    # a gold list of two answers (MATH writes `70,110`) and bare thousands golds (`15,600`)
    ("70, 110", "70,110", True),
    ("110, 70", "70,110", False),  # ... so its list reading keeps the gold's order: `600, 15` != `15,600`
    ("600, 15", "15,600", False),
    ("15, 600", "15,600", True),
    (r"\{70, 110\}", "70,110", True),
    ("70110", "70,110", True),  # the gold alone cannot tell `70,110` from seventy thousand ...
    ("15600", "15,600", True),
    ("70, 111", "70,110", False),
    ("70", "70,110", False),
    ("123,456", "456,123", False),  # two ambiguous answers compare as numbers
    # count nouns and units in \text{}
    ("60", r"60 \text{ handshakes}", True),
    (r"60 \text{ handshakes}", "60", True),
    ("8", r"8\text{ meals}", True),
    ("12", r"12 \text{ gm}", True),
    ("9", r"9\text{ a.m.}", True),
    ("65", r"65 \text{ children tickets }", True),
    ("61", r"60 \text{ handshakes}", False),
    (r"x \text{ handshakes}", "x", False),  # a word after a letter is not a count noun
    (r"2 \text{ and } 3", "2", False),  # only a trailing \text{} after a number goes
    (r"\text{Monday}", r"\text{Tuesday}", False),
    # assignments, trailing dots, boxed on either side
    ("x = 5", "5", True),
    ("x=5", "x = 5", True),
    ("y = 2x + 3", "2x+3", True),
    (r"x \in [1, 2]", "[1,2]", True),
    ("5.", "5", True),
    (r"\boxed{7}", "7", True),
    ("7", r"\boxed{7}", True),
    (r"$\frac{3}{4}$", "0.75", True),
    (r"\infty", "infinity", True),
    # matrices
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}", False),
    # ground truth as int / float / list / tuple
    ("7", 7, True),
    ("7.0", 7, True),
    ("8", 7, False),
    ("0.25", 0.25, True),
    (r"\frac{1}{4}", 0.25, True),
    ("4", ["3", "4"], True),
    ("5", ("3", "4"), False),
    # numpy scalars (a gold column read through pandas / numpy); np.float64 is a float whose repr names numpy
    ("1.5", np.float64(1.5), True),
    ("1.25", np.float64(1.5), False),
    ("2", np.float64(2.0), True),
    ("1.5", np.float32(1.5), True),
    ("3", np.int64(3), True),
    ("", "0", False),
    (None, "0", False),
]


@pytest.mark.parametrize("prediction,ground_truth,expected", EQUIVALENCE_CASES)
def test_math_answers_equal(prediction, ground_truth, expected):
    assert math_answers_equal(prediction, ground_truth) is expected


def test_case_count():
    assert len(EQUIVALENCE_CASES) >= 50
    assert sum(not c[2] for c in EQUIVALENCE_CASES) >= 20


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{5}", "5"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{12}", "12"),
        (r"\boxed 7$", "7"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"\boxed{unclosed", None),
        ("no box here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\left( \dfrac{1}{2}, 3 \right)", r"(\frac{1}{2},3)"),
        (r"\$1{,}000", "1000"),
        (r"x = \sqrt2", r"\sqrt{2}"),
        (r"\text{(A)}", "A"),
        (r"12^{\circ}", "12"),
        (r"\pi r^2", r"\pi r^2"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# --------------------------------------------------------------------------------------------------
# Reward functions
# --------------------------------------------------------------------------------------------------


def r1(answer_block: str) -> str:
    return "Let me think step by step. 2 + 3 = 5." + answer_block


@pytest.mark.parametrize(
    "response,ground_truth,expected",
    [
        (r1("</think> <answer>5</answer>"), "5", (1.0, 1.0, 1.0)),
        (r1(r"</think> <answer>\boxed{5}</answer>"), "5", (1.0, 1.0, 1.0)),
        (r1("</think> <answer>x = 5 </answer><|endoftext|>"), 5, (1.0, 1.0, 1.0)),
        (r1("</think> <answer>6</answer>"), "5", (1.0, 0.0, 0.0)),
        (r1(r"</think> <answer>\boxed{6</answer>"), "6", (1.0, 0.0, 0.0)),  # unclosed boxed grades wrong
        (
            r1("</think> <answer>4</answer> wait </think> <answer>5</answer>"),
            "5",
            (1.0, 1.0, 1.0),
        ),  # last tag
        (r1("</think> <answer>5</answer> no, <answer>4</answer>"), "5", (1.0, 0.0, 0.0)),
        (r1("</think> <answer>5"), "5", (0.0, 0.0, 0.0)),  # missing </answer>
        (r1("<answer>5</answer>"), "5", (0.0, 0.0, 0.0)),  # missing </think> <answer>
        (r1("</think><answer>5</answer>"), "5", (0.0, 0.0, 0.0)),  # the format asks for the space
        (r1("<answer>5</answer> then </think> <answer>"), "5", (0.0, 0.0, 0.0)),  # answer before think
        (r1("</think> <answer>   </answer>"), "0", (0.0, 0.0, 0.0)),  # empty answer
        (r1("</think> <answer>0.5</answer>"), ["1/2", "half"], (1.0, 1.0, 1.0)),
        (r1("</think> <answer>2.5</answer>"), 2.5, (1.0, 1.0, 1.0)),
    ],
)
def test_r1_zero_reward(response, ground_truth, expected):
    out = r1_zero_reward_fn(response, ground_truth)
    assert (out["format_reward"], out["answer_reward"], out["reward"]) == expected


def test_r1_zero_format_reward_rewards_format_only():
    out = r1_zero_format_reward_fn(r1("</think> <answer>6</answer>"), "5")
    assert out == {"format_reward": 1.0, "answer_reward": 0.0, "reward": 1.0}
    assert r1_zero_format_reward_fn(r1("<answer>5</answer>"), "5")["reward"] == 0.0


@pytest.mark.parametrize(
    "response,ground_truth,expected",
    [
        (r"So the answer is $\boxed{\frac{1}{2}}$.", "0.5", (1.0, 1.0, 1.0)),
        (r"\boxed{3}", "4", (1.0, 0.0, 0.0)),
        ("The answer is 42.", "42", (0.0, 1.0, 1.0)),
        ("Final answer: $x = 7$", "7", (0.0, 1.0, 1.0)),
        ("The answer to this question is surely 12 apples", "12", (0.0, 1.0, 1.0)),
        ("We get 3 then 4, so it is 9", "9", (0.0, 1.0, 1.0)),
        ("I do not know", "9", (0.0, 0.0, 0.0)),
    ],
)
def test_question_only_reward(response, ground_truth, expected):
    out = question_only_reward_fn(response, ground_truth)
    assert (out["format_reward"], out["answer_reward"], out["reward"]) == expected


def test_extract_final_answer_reports_boxed():
    assert extract_final_answer(r"so \boxed{2}") == ("2", True)
    assert extract_final_answer("answer: 3") == ("3", False)
    assert extract_final_answer("nothing") == (None, False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("She pays 1,234 dollars.", "1234"),
        ("It is -3.", "-3"),
        ("Total: $12.50.", "12.50"),
        ("from 3 to 5 then 7", "7"),
        ("10-3 = 7", "7"),
        ("x-5", "5"),
        ("1,000,000 people", "1000000"),
        ("value .5", ".5"),
        ("no digits", None),
        ("", None),
    ],
)
def test_parse_gsm8k_response(text, expected):
    assert parse_gsm8k_response(text) == expected


def test_gsm8k_reward():
    gold = "She has 3 + 4 = 7 apples.\n#### 1,007"
    assert gsm8k_reward_fn("So she has 1007 apples.", gold)["reward"] == 1.0
    assert gsm8k_reward_fn("So she has 1,007.0 apples.", gold)["reward"] == 1.0
    assert gsm8k_reward_fn("So she has 1008 apples.", gold) == {
        "format_reward": 1.0,
        "answer_reward": 0.0,
        "reward": 0.0,
    }
    assert gsm8k_reward_fn("No idea.", 7) == {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    assert gsm8k_reward_fn("it is 7", [6, 7])["reward"] == 1.0


MMLU_EXAMPLE = {"question": "Capital of France?", "options": ["London", "Paris", "Rome", "Berlin"]}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The correct answer is B.", "B"),
        ("Let me think. answer: (C)", "C"),
        ("Answer: D) Berlin", "D"),
        ("The answer is option A", "A"),
        ("B", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("B) Paris is the capital.", "B"),
        ("Paris", "B"),
        ("I think the answer is Rome.", "C"),
        ("It is obviously Berlin, the largest city.", "D"),
        ("Between (A) and (C) I pick (C).", "C"),
        ("The answer is A, not B; I said answer is D", "D"),
        ("London or Paris, hard to say", None),
        ("I am not sure about this one.", None),
    ],
)
def test_parse_mmlu_response(text, expected):
    assert parse_mmlu_response(MMLU_EXAMPLE, text) == expected


def test_parse_mmlu_without_options():
    assert parse_mmlu_response({}, "answer is C") == "C"
    assert parse_mmlu_response({}, "Paris") is None


def test_registry():
    assert {"r1_zero", "question_only", "r1_zero_format", "gsm8k"} <= set(REWARD_FUNCTIONS)
    for fn in REWARD_FUNCTIONS.values():
        out = fn("</think> <answer>1</answer>", "1")
        assert set(out) == {"format_reward", "answer_reward", "reward"}
        assert all(isinstance(v, float) for v in out.values())


# --------------------------------------------------------------------------------------------------
# Hostile input: model text must never be executed
# --------------------------------------------------------------------------------------------------


def _hostile_answers(canary: str) -> list[str]:
    cmd = f"touch {canary}"
    return [
        f"__import__('os').system('{cmd}')",
        f"eval(\"__import__('os').system('{cmd}')\")",
        f"exec(\"import os; os.system('{cmd}')\")",
        f"(lambda: __import__('os').system('{cmd}'))()",
        f"().__class__.__bases__[0].__subclasses__()[0]('{cmd}')",
        f"import os; os.system('{cmd}')",
        f"1 + __import__('os').system('{cmd}')",
        f"x = __import__('os').system('{cmd}')",
        f"(__import__('os').system('{cmd}'), 1)",
    ]


@pytest.fixture
def canary_path():
    path = f"/tmp/hf_align_canary_{digit_free_name()}"  # no digits: see digit_free_name
    yield path
    if os.path.exists(path):
        os.remove(path)


def test_hostile_answers_are_graded_wrong_and_never_run(canary_path, monkeypatch):
    import sympy.parsing.sympy_parser as sympy_parser

    math_answers_equal(r"\frac{\sqrt{2}}{2}", "0.5")  # load sympy / latex2sympy before spying
    seen: list[str] = []
    real_parse_expr = sympy_parser.parse_expr

    def spy(s, *args, **kwargs):
        seen.append(str(s))
        return real_parse_expr(s, *args, **kwargs)

    monkeypatch.setattr(sympy_parser, "parse_expr", spy)
    for answer in _hostile_answers(canary_path):
        for fn in (r1_zero_reward_fn, question_only_reward_fn, r1_zero_format_reward_fn):
            for wrap in (
                f"</think> <answer>\\boxed{{{answer}}}</answer>",
                f"</think> <answer>{answer}</answer>",
            ):
                assert fn(wrap, "42")["answer_reward"] == 0.0  # the payloads' only numbers are 0 and 1
        assert question_only_reward_fn(f"The answer is {answer}", "42")["reward"] == 0.0
        assert math_answers_equal(answer, "0") is False
        assert math_answers_equal(answer, answer) is True  # reflexive, by string
    assert not os.path.exists(canary_path)
    # sympy's string parser (which runs eval) only ever saw number tokens from the LaTeX lexer
    assert all(re.fullmatch(r"[0-9.,\s]+", s) for s in seen), seen


# --------------------------------------------------------------------------------------------------
# Size caps and robustness
# --------------------------------------------------------------------------------------------------


def test_megabyte_response_is_fast():
    junk = "blah {(" * 150_000
    start = time.monotonic()
    out = r1_zero_reward_fn(junk + "</think> <answer>\\boxed{3}</answer>", "3")
    assert out["reward"] == 1.0
    assert question_only_reward_fn(junk + r"\boxed{3}", "3")["reward"] == 1.0
    assert r1_zero_reward_fn("</think> <answer>" + "1" * 1_000_000 + "</answer>", "1")["reward"] == 0.0
    assert math_answers_equal("(" * 5000 + "1", "1") is False
    assert parse_gsm8k_response("7 " + junk) == "7" or parse_gsm8k_response("7 " + junk) is None
    assert time.monotonic() - start < 3.0


def test_long_answers_compare_exactly():
    long = "x+" * 600 + "1"
    assert math_answers_equal(long, long)
    assert not math_answers_equal(long, long.replace("+1", "+2"))


_ANSWER_TOKENS = st.sampled_from(
    ["\\frac", "{", "}", "1", "2", "0", ",", ".", "x", "=", " ", "\\boxed", "\\text", "cm", "$", "(", ")"]
    + ["[", "]", "\\{", "\\}", "\\left", "\\right", "-", "^", "\\circ", "\\%", "\\sqrt", "\\infty", "\\cup"]
)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_ANSWER_TOKENS, min_size=1, max_size=12).map("".join))
def test_property_normalize_never_raises_and_equal_is_reflexive(text):
    assert isinstance(normalize_answer(text), str)
    extract_boxed(text)
    if text.strip():
        assert math_answers_equal(text, text)


def test_import_is_light_and_has_no_side_effects():
    # Import our package alone (skipping hf_align/__init__, which other modules own) in a fresh interpreter.
    code = (
        "import sys, types, threading, multiprocessing\n"
        f"pkg = types.ModuleType('hf_align'); pkg.__path__ = [{os.path.join(REPO_ROOT, 'hf_align')!r}]\n"
        "sys.modules['hf_align'] = pkg\n"
        "import hf_align.rewards\n"
        "heavy = [m for m in ('torch', 'transformers', 'sympy', 'math_verify') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert threading.active_count() == 1 and not multiprocessing.active_children()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=60)


@pytest.mark.slow
def test_in_process_main_thread_uses_math_verify_signal_timeout():
    # In the main thread math_verify's own alarm (3 s) ends a runaway comparison; in other threads only
    # the worker pool (tests/unit/test_grader_pool.py) bounds time.
    math_answers_equal(r"\sqrt{2}", "2")  # imports sympy outside the timed part
    start = time.monotonic()
    assert math_answers_equal(r"9^{9^{9^{9^{9}}}}", "1") is False
    assert time.monotonic() - start < 3 + 2.0


@pytest.mark.parametrize(
    "response, reward, fmt",
    [
        ("no tags at all", 0.0, 0.0),
        ("reasoning </think> then nothing", 0.25, 0.0),
        ("reasoning </think>\n<answer> 5", 0.5, 0.0),
        ("reasoning </think>\n<answer> 5 </answer>", 0.75, 0.0),  # newline instead of the exact separator
        ("reasoning </think>\n<answer>  </answer>", 0.5, 0.0),  # empty answer earns no third quarter
        ("<answer> 5 </answer> before </think>", 0.25, 0.0),  # wrong order: only the </think> counts
        ("reasoning </think> <answer> 5 </answer>", 1.0, 1.0),
        ("reasoning </think> <answer> 7 </answer>", 1.0, 1.0),  # format reward ignores correctness
    ],
)
def test_r1_zero_format_shaped_reward(response, reward, fmt):
    from hf_align.rewards import REWARD_FUNCTIONS

    out = REWARD_FUNCTIONS["r1_zero_format_shaped"](response, "5")
    assert out["reward"] == reward and out["format_reward"] == fmt
    assert out["answer_reward"] == float(fmt == 1.0 and "5 </answer>" in response)
