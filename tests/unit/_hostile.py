"""Hostile and pathological grader inputs, and a reward function that grader workers can import.

Kept apart from the test modules so that a `Grader` worker importing `fuzz_reward_fn` loads only this file
and `hf_align.rewards` (not pytest or hypothesis). Nothing here evaluates model text: the payloads are plain
strings that would create a canary file only if some grader ever ran them as code (or as TeX with
shell escape).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from hf_align.rewards.math import REWARD_FUNCTIONS

CANARY_PREFIX = "canary"


def digit_free_name(length: int = 16) -> str:
    """A random name without digits. Canary paths go inside hostile answers, and free-form graders take the
    last number of a text as its answer: a random hex name ending in e.g. "42" or "0" would then equal the
    ground truth by chance (a flaky test, not a grader bug)."""
    return uuid.uuid4().hex[:length].translate(str.maketrans("0123456789", "ghijklmnop"))


def hostile_answers(canary_rel: str, canary_abs: str) -> list[tuple[str, str, str]]:
    """`(category, label, answer text)` triples. `canary_rel` is a bare file name (relative to the workers'
    working directory), `canary_abs` an absolute path; a payload that ran would create one of them.

    Categories: "code" (Python / TeX payloads), "huge" (towers, factorials, huge numbers, 0/0), "nested"
    (deep or unbalanced braces, fractions, structures, matrices), "text" (NUL bytes and odd unicode),
    "tags" (unbalanced R1-Zero tags), "megabyte" (1 to 4 MB strings).
    """
    rel, path = canary_rel, canary_abs
    code = [
        ("os_system_rel", f"__import__('os').system('touch {rel}')"),
        ("os_system_abs", f"__import__('os').system('touch {path}')"),
        ("open_rel", f"open('{rel}', 'w').write('pwned')"),
        ("open_abs", f"open('{path}','w')"),
        ("pathlib_rel", f'__import__("pathlib").Path("{rel}").touch()'),
        ("pathlib_abs", f'__import__("pathlib").Path("{path}").touch()'),
        ("lambda", f"(lambda: __import__('os').system('touch {rel}'))()"),
        ("lambda_default_arg", f"(lambda f=open: f('{rel}', 'w'))()"),
        (
            "subclasses_popen",
            "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen'][0]"
            f"(['touch', '{rel}'])",
        ),
        ("exec_string", f"exec(\"import os; os.system('touch {rel}')\")"),
        ("eval_compile", f"eval(compile(\"open('{path}', 'w')\", '<x>', 'exec'))"),
        ("getattr_builtins", f"getattr(__builtins__, '__import__')('os').system('touch {rel}')"),
        ("subprocess_call", f"x = __import__('subprocess').call(['touch', '{path}'])"),
        (
            "sympy_globals",
            f"Symbol('x').__class__.__init__.__globals__['__builtins__']['open']('{rel}', 'w')",
        ),
        ("sympy_statement", f"Integer(1); __import__('os').system('touch {rel}')"),
        ("list_comprehension", f"[open('{rel}', 'w') for _ in range(1)]"),
        ("fstring", f"f\"{{open('{path}', 'w')}}\""),
        ("multiline_import", f"import os\nos.system('touch {rel}')\nx = 1"),
        ("fullwidth_identifier", f"__ｉｍｐｏｒｔ__('os').system('touch {rel}')"),  # NFKC: == __import__
        ("latex_escaped_dunder", f"\\_\\_import\\_\\_('os').system('touch {rel}')"),
        ("in_text", f"\\text{{__import__('os').system('touch {rel}')}}"),
        ("in_mathrm", f"\\mathrm{{open('{path}','w')}}"),
        ("in_operatorname", f"\\operatorname{{__import__}}('os').system('touch {rel}')"),
        ("in_frac", f"\\frac{{__import__('os').system('touch {rel}')}}{{1}}"),
        ("in_sqrt", f"\\sqrt{{open('{rel}', 'w')}}"),
        ("in_exponent", f"2^{{__import__('os').system('touch {path}')}}"),
        ("nested_boxed", f"\\boxed{{\\boxed{{__import__('os').system('touch {rel}')}}}}"),
        ("in_display_math", f"$$\n__import__('pathlib').Path('{rel}').touch()\n$$"),
        ("pickle_opcodes", f"cos\nsystem\n(S'touch {rel}'\ntR."),
        ("tex_write18", f"\\immediate\\write18{{touch {rel}}}"),
        ("tex_input", "\\input{/etc/passwd}"),
        ("tex_recursive_macro", "\\def\\x{\\x\\x}\\x"),
        ("tex_newcommand_bomb", "\\newcommand{\\a}{\\a\\a}\\a"),
    ]
    huge = [
        ("tower_9", "9^{9^{9^{9^{9}}}}"),
        ("tower_python", "10**10**10**10"),
        ("tower_factorial", "(2^{2^{2^{100}}})!"),
        ("tower_e", "e^{e^{e^{e^{e^{e}}}}}"),
        ("power_1e9", "2^{1000000000}"),
        ("factorial_of_factorial", "((10^{100})!)!"),
        ("multifactorial", "9!!!!!!!!!!!!!!!!"),
        ("binomial_huge", "\\binom{10^{100}}{10^{50}}"),
        ("sum_huge", "\\sum_{n=1}^{10^{100}} n^{n}"),
        ("product_huge", "\\prod_{k=1}^{10^{10}} k"),
        ("integral_tower", "\\int_0^{10^{100}} x^{x^{x}} \\, dx"),
        ("root_huge_index", "\\sqrt[10^{10}]{2}"),
        ("exponent_float_overflow", "1e999999"),
        ("tiny_power", "10^{-10^{10}}"),
        ("digits_999", "7" * 999),
        ("digits_1e6", "9" * 1_000_000),
        ("divide_by_zero", "\\frac{1}{0}"),
        ("zero_over_zero", "\\frac{0}{0}"),
        ("zero_pow_zero", "0^{0}"),
        ("inf_minus_inf", "\\infty - \\infty"),
        ("log_zero", "\\log(0)"),
        ("nan_word", "nan"),
    ]
    nested = [
        ("braces_10k_balanced", "{" * 10_000 + "42" + "}" * 10_000),
        ("braces_10k_open", "{" * 10_000 + "42"),
        ("braces_10k_close", "42" + "}" * 10_000),
        ("braces_under_cap", "{" * 480 + "42" + "}" * 480),
        ("parens_deep", "(" * 480 + "1" + ")" * 480),
        ("frac_nest_deep", "\\frac{" * 120 + "1" + "}{2}" * 120),
        ("frac_nest_huge", "\\frac{" * 20_000 + "1" + "}{2}" * 20_000),
        ("sqrt_nest", "\\sqrt{" * 150 + "2" + "}" * 150),
        ("left_right_nest", "\\left(" * 100 + "x" + "\\right)" * 100),
        ("exponent_nest_small_base", "x^{" * 100 + "2" + "}" * 100),
        ("boxed_unclosed", "\\boxed{42"),
        ("boxed_many_unclosed", "\\boxed{" * 2_000),
        ("boxed_close_only", "\\boxed}42}"),
        ("set_64_symbolic", ",".join(f"x+{k}" for k in range(60))),
        ("tuple_nest", "(" * 10 + "1,2" + "),3" * 10),
        ("union_chain", "\\cup".join(f"[{k},{k + 1}]" for k in range(50))),
        ("matrix", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"),
        (
            "matrix_big_det",
            "\\det\\begin{pmatrix}"
            + "\\\\".join("&".join(f"x_{{{i}{j}}}" for j in range(12)) for i in range(12))
            + "\\end{pmatrix}",
        ),
        ("matrix_unclosed", "\\begin{pmatrix} 1 & 2 \\\\ 3"),
    ]
    text = [
        ("nul_bytes", "4\x002"),
        ("nul_run", "\x00" * 1000),
        ("nul_in_latex", "\\frac{1\x00}{2}"),
        ("lone_high_surrogate", "\ud80042"),
        ("lone_low_surrogate", "4\udfff2"),
        ("rtl_override", "\u202e24\u202c"),
        ("zero_width_joiner", "4\u200d2"),
        ("zero_width_space", "\u200b42\u200b"),
        ("bom", "\ufeff42"),
        ("combining_marks", "4\u0301\u0302\u0303" + "2"),
        ("combining_flood", "4" + "\u0301" * 100_000),
        ("fullwidth_digits", "４２"),
        ("arabic_indic_digits", "٤٢"),
        ("superscript_digits", "⁴²"),
        ("emoji_and_private_use", "\U0001f600\ue000\uffff42"),
        ("control_chars", "".join(chr(c) for c in range(32)) + "42"),
    ]
    tags = [
        ("think_flood", "<think>" * 1000 + "42"),
        ("answer_close_first", "</answer>42<answer>"),
        ("answer_nested", "<answer><answer>42</answer>"),
        ("answer_unclosed", "</think> <answer>42"),
        ("format_flood", "</think> <answer>" * 100_000),
        ("answer_in_boxed", "\\boxed{</answer>42<answer>}"),
        ("html_script", "<script>alert(1)</script>42"),
    ]
    megabyte = [
        ("mb_letters", "x" * 1_000_000),
        ("mb_brace_paren", "{(" * 2_000_000),  # 4 MB
        ("mb_boxed_open", "\\boxed{" * 150_000),
        ("mb_frac_open", "\\frac{" * 170_000),
        ("mb_answer_phrase", "the answer is 1 " * 65_000),
        ("mb_mixed_unicode", ("\u202e\x00{" + "\ud800" + "}") * 250_000),
    ]
    groups = {"code": code, "huge": huge, "nested": nested, "text": text, "tags": tags, "megabyte": megabyte}
    return [(category, label, answer) for category, items in groups.items() for label, answer in items]


def wrap_r1(answer: str) -> str:
    return f"Let me think. </think> <answer>{answer}</answer>"


def wrap_r1_boxed(answer: str) -> str:
    return f"Let me think. </think> <answer>\\boxed{{{answer}}}</answer>"


def wrap_question_only(answer: str) -> str:
    return f"So the answer is \\boxed{{{answer}}}."


def wrap_bare(answer: str) -> str:
    return answer


WRAPPERS = {"r1": wrap_r1, "r1_boxed": wrap_r1_boxed, "question_only": wrap_question_only, "bare": wrap_bare}


def fuzz_reward_fn(response: str, spec: tuple[str, Any]) -> dict[str, float]:
    """Grade with `REWARD_FUNCTIONS[name]` where `spec = (name, ground_truth)`; adds the seconds it took
    (measured in the worker) as `elapsed_s`, so the test can bound every item that did not time out.

    `name == "control_touch"` is the test's own control, never model text: it creates the file named by
    `ground_truth` (a path the test chose) from inside the worker, to show the canary check would notice.
    """
    name, ground_truth = spec
    start = time.perf_counter()
    if name == "control_touch":
        Path(ground_truth).touch()
        out = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    else:
        out = REWARD_FUNCTIONS[name](response, ground_truth)
    return {**out, "elapsed_s": time.perf_counter() - start}
