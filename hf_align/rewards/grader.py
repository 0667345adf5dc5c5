"""Equivalence of math answers: `normalize_answer`, then `math_answers_equal(prediction, ground_truth)`.

Model output is untrusted and nothing here evaluates it: regular expressions, bracket matching, exact `Fraction`s
from a strict grammar, then latex2sympy (an ANTLR grammar building sympy objects) and `math_verify.verify`; never
`math_verify.parse` with `ExprExtractionConfig`, `sympify` or `parse_expr`, which run Python's `eval`.
Normalization is math-verify's basic-LaTeX and malformed-operator passes (`$`, `\\left`, `\\dfrac`, `\\!`, `\\frac12`)
inside our rules for MATH's answers: `10,\\!080` and a bare `1,000` are one number; units and count nouns after a
number go (`60 \\text{ handshakes}`; math-verify's unit pass would also strip `5m` and `x \\text{ handshakes}`);
degree and percent signs (`50\\%` == `50` != `0.5`), `\\text{}` wrappers, `x =` and spaces go.

`math_answers_equal`, first decision wins: answers over `MAX_ANSWER_CHARS` compare as strings; equal normalized
strings (words case-insensitively) are equal. A bare `a,bbb` is a number or a list (MATH golds hold both: `15,600`
and the two answers `70,110`): either may match, the list only in the gold's order, and two such answers compare as
numbers. A top-level `\\cup` is an unordered union; `(a, b)`, `[a, b)` are ordered and their brackets must match;
`\\{a, b\\}` and `a, b` are unordered; a structure never equals a non-structure (math-verify equates `(1,2)` and
`\\{1,2\\}`). Plain numbers compare as exact fractions (`0.3333333 != 1/3`, equal under math-verify's rounding).
The rest is `math_verify.verify`, whose `signal.alarm` bound works in the main thread only: elsewhere the worker
pool (`hf_align.rewards.pool`) bounds time.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache
from itertools import product
from typing import Any

from hf_align.rewards.extract import extract_boxed, match_brace

# Longer answers are compared by exact string match only: no normalization, no sympy.
MAX_ANSWER_CHARS = 1_000
_SIGNAL_TIMEOUT_S = 3  # math_verify's own (main-thread) bound per comparison
_MAX_DEPTH = 4  # nesting of structures (tuples of sets of intervals ...) we recurse into
_MAX_ELEMENTS = 64

_UNIT_WORDS = (
    "centimeters|centimetres|centimeter|centimetre|millimeters|millimeter|kilometers|kilometer|meters|metres|"
    "meter|metre|cm|mm|km|m|inches|inch|feet|foot|ft|yards|yard|yd|miles|mile|mi|mph|kph|"
    "kilograms|kilogram|kg|grams|gram|g|pounds|pound|lbs|lb|ounces|ounce|oz|tons|ton|"
    "liters|litres|liter|litre|milliliters|ml|mL|gallons|gallon|quarts|quart|cups|cup|"
    "seconds|second|sec|s|minutes|minute|min|mins|hours|hour|hrs|hr|days|day|weeks|week|months|month|"
    "years|year|dollars|dollar|cents|cent|euros|euro|degrees|degree|radians|units|unit|"
    "people|persons|students|children|items|ways|points|marbles|apples|cookies|pages|times"
)
_UNIT_PHRASE = rf"(?:(?:square|sq\.?|cubic)\s*)?(?:{_UNIT_WORDS})\.?(?:\s*\^\s*\{{?[23]\}}?)?"
_UNIT_ONLY_RE = re.compile(rf"^\s*{_UNIT_PHRASE}\s*$")
_TRAILING_UNIT_RE = re.compile(rf"(\s*)(?<![A-Za-z\\])({_UNIT_PHRASE})\s*$")
# math-verify has already turned \mathrm, \mathbf, \textbf, ... into \text.
_TEXT_CMD_RE = re.compile(r"\\(?:text|textsf|texttt|mathsf|mathtt|mbox|hbox|boldsymbol|bm)\s*\{")
_SIZING_RE = re.compile(r"\\(?:left|right|[bB]igg?[lr]?|textstyle|scriptstyle)(?![a-zA-Z])")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])")
_ASSIGN_LHS_RE = re.compile(
    r"^\s*(?:[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?|\\[a-zA-Z]+|\([a-zA-Z](?:\s*,\s*[a-zA-Z])+\))\s*=(?!=)"
)
_IN_LHS_RE = re.compile(r"^\s*[a-zA-Z]\s*\\in(?![a-zA-Z])\s*")
_INFINITY_RE = re.compile(r"\\infty|\\infin(?![a-zA-Z])|∞|(?i:infinity)|(?<![a-zA-Z\\])inf(?![a-zA-Z])")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
# MATH's thousands separators `10,\!080`, `10{,}080`, `10\,080`, removed before math-verify turns `,\!` into `,`.
_THOUSANDS_SEP_RE = re.compile(r"(?<=\d)(?:,\s*\\!|\{,\}|\\,)(?=\d{3}(?!\d))")
# Inside a `{}` argument (`\frac{12}{5,525}`) a comma between 3-digit groups can only be a thousands separator.
_BRACED_THOUSANDS_RE = re.compile(r"(?<=(?<!\\)\{)\d{1,3}(?:,\d{3})+(?=\})")
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)$")
_WORDS_RE = re.compile(r"^\s*[A-Za-z][A-Za-z.' ]*$")


def _math_verify_normalize(s: str, basic: bool) -> str:
    """math-verify's basic-LaTeX pass (`basic`), or its malformed-operator pass (after our units and wrappers)."""
    from latex2sympy2_extended import NormalizationConfig, normalize_latex  # imports sympy: first use only

    config = NormalizationConfig(basic_latex=basic, units=False, malformed_operators=not basic, boxed="none")
    return normalize_latex(s, config)


def _unwrap_text_commands(s: str) -> str:
    """`\\text{X}` -> X; the wrapper goes with X when X is a unit, or words ending an answer after a number."""
    for _ in range(32):  # bounded: each pass removes one wrapper
        m = _TEXT_CMD_RE.search(s)
        if m is None:
            return s
        open_pos = m.end() - 1
        close = match_brace(s, open_pos)
        if close is None:
            return s[: m.start()] + s[open_pos + 1 :]
        inner, after, before = s[open_pos + 1 : close], s[close + 1 :], s[: m.start()].strip()
        after_unit = re.sub(r"^\s*\^\s*\{?[23]\}?", "", after)
        count_noun = _WORDS_RE.match(inner) and not after_unit.strip() and before[-1:] in "0123456789}"
        if before and (_UNIT_ONLY_RE.match(inner) or count_noun):
            inner, after = "", after_unit
        s = s[: m.start()] + inner + after
    return s


def _strip_trailing_unit(s: str) -> str:
    """Drop a unit word after a number: "5 cm", "5cm", "12 square feet"; but not "5m" or "2x m"."""
    m = _TRAILING_UNIT_RE.search(s)
    prefix = s[: m.start()].rstrip() if m else ""
    if not prefix or prefix[-1] not in "0123456789})":
        return s
    if not m.group(1) and len(re.match(r"[a-zA-Z]*", m.group(2)).group(0)) < 2:
        return s  # a single glued letter is more likely a variable than a unit
    return prefix


def _strip_markup(s: str) -> str:
    """Drop what only typesets: math delimiters, sizing, spacing, degree and percent signs, text wrappers."""
    # A trailing dot goes first: math-verify reads ` .` as ` 0.`, which makes `5 .` fifty.
    s = _math_verify_normalize(_THOUSANDS_SEP_RE.sub("", s.rstrip(".")), basic=True)
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    s = _SIZING_RE.sub("", s).replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\langle", "(").replace("\\rangle", ")")
    s = _BRACED_THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _DEGREE_RE.sub("", _SPACING_RE.sub(" ", s)).replace("\\%", "").replace("%", "")
    s = _unwrap_text_commands(s)
    return re.sub(r"(?i)(?<![a-z])percent(?:age)?\s*$", "", s).strip()


def normalize_answer(text: Any, merge_thousands: bool = True) -> str:
    """Canonical string form of an answer (module docstring). A bare `1,000` is one number unless
    `merge_thousands` is False (then the list 1, 000). Answers over `MAX_ANSWER_CHARS` are only stripped."""
    s = str(text).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    boxed = extract_boxed(s)
    s = _strip_markup(s if boxed is None else boxed)
    for _ in range(2):  # "5 cm", "10 square feet", "3 cm^2"
        s = _strip_trailing_unit(s)
    s = _math_verify_normalize(s, basic=False)
    m = _ASSIGN_LHS_RE.match(s)
    if m and s[m.end() :].strip():
        s = s[m.end() :]
    s = _IN_LHS_RE.sub("", s).strip().rstrip(".").strip()
    if merge_thousands and _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    # One space stays where it separates a command from a letter (`\pi r`).
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", re.sub(r"\s+", " ", s).strip())
    s = _INFINITY_RE.sub(r"\\infty", s.replace(" ", "").replace("\x00", " ")).replace("+\\infty", "\\infty")
    s = s.rstrip(".").rstrip("\\").rstrip(".")
    while s.startswith("{") and _top_level(s, ",")[1]:
        s = s[1:-1]
    if re.match(r"^\+\d", s):
        s = s[1:]
    choice = _CHOICE_RE.match(s)
    return choice.group(1).upper() if choice else s


def _top_level(s: str, sep: str) -> tuple[list[str], bool]:
    """`s` split on `sep` outside every ([{ pair (`\\{` counts as `{`), and whether `s` is one bracketed group."""
    parts, depth, start, i, first_close = [], 0, 0, 0, None
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1 : i + 2] in ("{", "}"):
            c, i = s[i + 1], i + 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and first_close is None:
                first_close = i
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i = start = i + len(sep)
            continue
        i += 1
    enclosed = (s.startswith("\\{") or s[:1] in ("(", "[", "{")) and first_close == len(s) - 1
    return [*parts, s[start:]], enclosed


def _structure(s: str) -> tuple[str, list[str]] | None:
    """("union" | "set" | "(]"-style brackets, elements) for a structured answer; None for a scalar."""
    union = _top_level(s, "\\cup")[0]
    if len(union) > 1:
        return "union", union
    parts, enclosed = _top_level(s, ",")
    if enclosed:  # (a normalized answer never starts with a `{` group)
        if s.startswith("\\{") and s.endswith("\\}"):
            return "set", _top_level(s[2:-2], ",")[0]
        inner = _top_level(s[1:-1], ",")[0]
        return (s[0] + s[-1], inner) if len(inner) > 1 else None
    return ("set", parts) if len(parts) > 1 else None


_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?$")
_RATIO_RE = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$|^()([^/]+)/([^/]+)$")


def _plain_number(s: str) -> Fraction | None:
    if len(s) > 60 or not _PLAIN_NUMBER_RE.match(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number or a ratio of plain numbers; None for anything else."""
    s = s.strip()
    if len(s) > 80:
        return None
    value = _plain_number(s)
    m = _RATIO_RE.match(s) if value is None else None
    if m is None:
        return value
    sign, num, den = m.groups()[:3] if m.group(2) is not None else m.groups()[3:]
    num_v, den_v = _plain_number(num.strip()), _plain_number(den.strip())
    if num_v is None or den_v is None or den_v == 0:
        return None
    return -num_v / den_v if sign == "-" else num_v / den_v


def _is_word(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z ']*", s)) and len(s) > 1


def _equivalent(pred: str, gold: str, depth: int = 0, ordered: bool = False) -> bool:
    """Equivalence of two normalized answers; `ordered` compares two lists in order (a gold such as `70,110`)."""
    if not pred or not gold:
        return False
    if pred == gold or (_is_word(pred) and _is_word(gold) and pred.lower() == gold.lower()):
        return True
    sp, sg = _structure(pred), _structure(gold)
    if sp is not None or sg is not None:
        if sp is None or sg is None or sp[0] != sg[0] or len(sp[1]) != len(sg[1]):
            return False
        if depth >= _MAX_DEPTH or len(sp[1]) > _MAX_ELEMENTS:
            return False
        p_items, g_items = [normalize_answer(x) for x in sp[1]], [normalize_answer(x) for x in sg[1]]
        if sp[0] in ("set", "union") and not ordered:
            unused = list(range(len(g_items)))
            for p in p_items:
                hit = next((j for j in unused if _equivalent(p, g_items[j], depth + 1)), None)
                if hit is None:
                    return False
                unused.remove(hit)
            return True
        return all(_equivalent(p, g, depth + 1) for p, g in zip(p_items, g_items))
    fp, fg = _to_fraction(pred), _to_fraction(gold)
    if fp is not None and fg is not None:
        return fp == fg
    return _symbolic_equal(pred, gold)


@lru_cache(maxsize=1024)
def _parse_latex(latex: str) -> Any:
    """latex2sympy on a normalized answer (grammar-based: no eval); None when it does not parse."""
    from latex2sympy2_extended import latex2sympy
    from math_verify.grader import should_treat_as_complex

    try:
        return latex2sympy(latex, is_real=not should_treat_as_complex(latex), normalization_config=None)
    except Exception:
        return None


def _symbolic_equal(pred: str, gold: str) -> bool:
    import math_verify.grader as mv_grader
    from math_verify.errors import TimeoutException

    # signal.alarm only works in the main thread; elsewhere the caller (the pool) bounds time.
    timeout = _SIGNAL_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    mv_grader.TIMEOUT_WARNING_SHOWN = True  # math_verify warns once when it has no timeout: we said why
    try:
        gold_expr, pred_expr = _parse_latex(gold), _parse_latex(pred)
        if gold_expr is None or pred_expr is None:
            return False
        return bool(mv_grader.verify(gold_expr, pred_expr, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def _readings(raw: str) -> list[str]:
    """Normalized readings of an answer: one, or two for a bare `70,110` (the number 70110, or a list)."""
    merged = normalize_answer(raw)
    as_list = normalize_answer(raw, merge_thousands=False) if "," in raw else merged
    return [merged] if as_list == merged else [merged, as_list]


def _ground_truth_strings(ground_truth: Any) -> list[str]:
    out = []
    for g in ground_truth if isinstance(ground_truth, (list, tuple)) else [ground_truth]:
        if isinstance(g, bool) or (isinstance(g, float) and g.is_integer()):
            g = int(g)
        if g is not None:
            # repr of float(g): every digit, and a numpy float64 (a float subclass) without numpy's own repr
            out.append(g if isinstance(g, str) else repr(float(g)) if isinstance(g, float) else str(g))
    return out


def math_answers_equal(prediction: str | None, ground_truth: Any) -> bool:
    """Whether `prediction` is mathematically the same answer as `ground_truth` (a string, a number, or a
    list/tuple of acceptable answers). A `\\boxed{}` on either side is unwrapped. Never evaluates the prediction."""
    pred_raw = str(prediction).strip() if prediction is not None else ""
    if not pred_raw:
        return False
    preds = _readings(pred_raw) if len(pred_raw) <= MAX_ANSWER_CHARS else None
    for gold_raw in _ground_truth_strings(ground_truth):
        gold_raw = gold_raw.strip()
        if not gold_raw:
            continue
        if pred_raw == gold_raw:
            return True
        if preds is None or len(gold_raw) > MAX_ANSWER_CHARS:
            continue
        golds = _readings(gold_raw)
        if len(golds) == 2 and len(preds) == 1 and preds[0]:
            # The gold alone cannot tell the number `15,600` from the list `70,110`: its list reading is matched
            # in the gold's order only, so `600, 15` stays wrong against `15,600`.
            if _equivalent(preds[0], golds[0]) or _equivalent(preds[0], golds[1], ordered=True):
                return True
            continue
        # Two ambiguous `a,bbb` answers compare as numbers only (so `123,456` != `456,123`).
        pairs = [(preds[0], golds[0])] if len(preds) == len(golds) == 2 else product(preds, golds)
        # an answer normalized away entirely (e.g. just "$") only matches exactly (above)
        if any(p and g and _equivalent(p, g) for p, g in pairs):
            return True
    return False


def warm_up() -> None:
    """Import sympy / latex2sympy / math_verify and build the LaTeX parser once (for pool workers)."""
    math_answers_equal("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
