"""Equivalence of math answers: `math_answers_equal(prediction, ground_truth)`.

Model output is untrusted text. Nothing here evaluates it: extraction (`hf_align.rewards.extract`) and
normalization (`hf_align.rewards.normalize`) are regular expressions and brace matching; numbers are
compared as exact `fractions.Fraction`s built from a strict numeric grammar (at most 60 characters,
exponents of at most 3 digits); everything else goes to latex2sympy (an ANTLR LaTeX grammar that builds sympy objects directly) and
`math_verify.verify`. We never call `math_verify.parse` with `ExprExtractionConfig`, `sympify` or
`parse_expr` on model text, because those run Python's `eval`.

`math_answers_equal(prediction, ground_truth)` decides in this order, first decision wins:

1. Answers over `MAX_ANSWER_CHARS` characters are compared as stripped strings only.
2. Identical strings are equal. Both sides go through `normalize_answer`; equal non-empty strings are equal
   (words compare case-insensitively). A bare `a,bbb` has two readings, the number and the list (MATH
   golds hold both: `15,600` and the two answers `70,110`); either may match, the list only in the gold's
   order (so `600, 15` != `15,600`), and two such answers compare as numbers only (`123,456` != `456,123`).
   So `70, 110` and `70110` both equal `70,110`.
3. Structures: a top-level `\\cup` gives a union (unordered); `(a, b)`, `[a, b)`, `(-\\infty, 3]` give
   ordered tuples/intervals whose brackets must match exactly (`[1,2)` != `[1,2]`, `(1,2)` != `(2,1)`);
   `\\{a, b\\}` and a bare `a, b` are unordered collections (MATH's "enter all solutions separated by
   commas"). Elements are compared recursively. A structure never equals a non-structure.
4. Two plain numbers (`-3`, `0.5`, `.5`, `1e3`, `1/2`, `\\frac{1}{2}`) compare as exact fractions:
   `0.5 == \\frac12 == 1/2`, but `0.33 != 1/3`.
5. Anything else is parsed by latex2sympy and compared by `math_verify.verify` (numeric with 6-digit
   rounding, then symbolic), so `\\frac{\\sqrt{2}}{2} == \\sqrt{2}/2` and `2^{10} == 1024`.

Time: math_verify bounds its own work with `signal.alarm`, which only works in the main thread. We pass it
`_SIGNAL_TIMEOUT_S` when called in the main thread and `None` otherwise; the real bound is the worker
process pool in `hf_align.rewards.pool`, which kills a stuck grader. sympy and math_verify are imported
lazily, on the first comparison that needs them.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from functools import lru_cache
from itertools import product
from typing import Any

from hf_align.rewards.normalize import MAX_ANSWER_CHARS, normalize_answer, outer_group_end

# Per-call budget handed to math_verify's signal-based timeout (main thread only).
_SIGNAL_TIMEOUT_S = 3
# Deepest nesting of structures (tuples of sets of intervals ...) that we recurse into.
_MAX_DEPTH = 4
_MAX_ELEMENTS = 64


def _readings(raw: str) -> list[str]:
    """Normalized readings of an answer: one, or two for a bare `70,110` (the number 70110, or a list)."""
    merged = normalize_answer(raw)
    as_list = normalize_answer(raw, merge_thousands=False) if "," in raw else merged
    return [merged] if as_list == merged else [merged, as_list]


# --------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------

_PLAIN_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?$")
_FRAC_RE = re.compile(r"^(-?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_SLASH_RE = re.compile(r"^([^/]+)/([^/]+)$")


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
    if value is not None:
        return value
    m = _FRAC_RE.match(s) or _SLASH_RE.match(s)
    if m is None:
        return None
    sign, num, den = ("", *m.groups()) if len(m.groups()) == 2 else m.groups()
    num_v, den_v = _plain_number(num.strip()), _plain_number(den.strip())
    if num_v is None or den_v is None or den_v == 0:
        return None
    value = num_v / den_v
    return -value if sign == "-" else value


def _split_top_level(s: str, sep: str) -> list[str]:
    """Split on `sep` where it is outside every ([{ pair."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1 : i + 2] in ("{", "}"):
            c = s[i + 1]
            i += 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _structure(s: str) -> tuple[str, list[str]] | None:
    """("union" | "set" | "(]"-style brackets, elements) for a structured answer; None for a scalar."""
    union = _split_top_level(s, "\\cup")
    if len(union) > 1:
        return "union", union
    opener = None
    if s.startswith("\\{"):
        opener = 0
    elif s[:1] in ("(", "["):
        opener = 0
    if opener is not None and outer_group_end(s, 0) == len(s) - 1:
        if s.startswith("\\{") and s.endswith("\\}"):
            return "set", _split_top_level(s[2:-2], ",")
        inner = _split_top_level(s[1:-1], ",")
        if len(inner) > 1:
            return s[0] + s[-1], inner
        return None
    parts = _split_top_level(s, ",")
    if len(parts) > 1:
        return "set", parts
    return None


def _is_word(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z ']*", s)) and len(s) > 1


def _equivalent(pred: str, gold: str, depth: int) -> bool:
    """Equivalence of two normalized answers."""
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
        p_items = [normalize_answer(x) for x in sp[1]]
        g_items = [normalize_answer(x) for x in sg[1]]
        if sp[0] in ("set", "union"):
            return _match_unordered(p_items, g_items, depth + 1)
        return all(_equivalent(p, g, depth + 1) for p, g in zip(p_items, g_items))
    fp, fg = _to_fraction(pred), _to_fraction(gold)
    if fp is not None and fg is not None:
        return fp == fg
    return _symbolic_equal(pred, gold)


def _same_order(pred: str, gold_list: str) -> bool:
    """A collection answer whose elements equal the bare list `gold_list`'s, in the same order."""
    sp, sg = _structure(pred), _structure(gold_list)
    if sp is None or sg is None or sp[0] != "set" or sg[0] != "set" or len(sp[1]) != len(sg[1]):
        return False
    return all(_equivalent(normalize_answer(p), normalize_answer(g), 1) for p, g in zip(sp[1], sg[1]))


def _match_unordered(pred_items: list[str], gold_items: list[str], depth: int) -> bool:
    unused = list(range(len(gold_items)))
    for p in pred_items:
        hit = next((j for j in unused if _equivalent(p, gold_items[j], depth)), None)
        if hit is None:
            return False
        unused.remove(hit)
    return True


def _signal_timeout() -> int | None:
    # signal.alarm only works in the main thread; elsewhere the caller (the pool) must bound time.
    return _SIGNAL_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=1024)
def _parse_latex(latex: str) -> Any:
    """latex2sympy on a normalized answer (grammar-based: no eval); None when it does not parse."""
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig, latex2sympy
    from math_verify.grader import should_treat_as_complex

    config = NormalizationConfig(
        basic_latex=True, units=False, malformed_operators=True, nits=False, boxed="none"
    )
    try:
        return latex2sympy(latex, is_real=not should_treat_as_complex(latex), normalization_config=config)
    except Exception:
        return None


def _symbolic_equal(pred: str, gold: str) -> bool:
    try:
        import math_verify.grader as mv_grader
        from math_verify import verify
        from math_verify.errors import TimeoutException
    except ImportError:  # math-verify is a core dependency; without it only the rules above apply
        return False
    timeout = _signal_timeout()
    if timeout is None:
        # We provide the time bound ourselves (worker pool); silence math_verify's one-off warning.
        mv_grader.TIMEOUT_WARNING_SHOWN = True
    try:
        gold_expr = _parse_latex(gold)
        pred_expr = _parse_latex(pred)
        if gold_expr is None or pred_expr is None:
            return False
        return bool(verify(gold_expr, pred_expr, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        return False


def _ground_truth_strings(ground_truth: Any) -> list[str]:
    items = list(ground_truth) if isinstance(ground_truth, (list, tuple)) else [ground_truth]
    out = []
    for g in items:
        if g is None:
            continue
        if isinstance(g, bool):
            g = int(g)
        if isinstance(g, float) and g.is_integer():
            g = int(g)
        out.append(g if isinstance(g, str) else repr(g) if isinstance(g, float) else str(g))
    return out


def math_answers_equal(prediction: str | None, ground_truth: Any) -> bool:
    """Whether `prediction` is mathematically the same answer as `ground_truth`.

    `ground_truth` is a string, an int/float, or a list/tuple of acceptable answers (any match counts).
    A `\\boxed{}` on either side is unwrapped. Never evaluates the prediction as code.
    """
    if prediction is None:
        return False
    pred_raw = str(prediction).strip()
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
            # The gold alone cannot tell the number `15,600` from the list `70,110`; its list reading is matched
            # in the gold's order only, so `600, 15` stays wrong against `15,600` (as it always was).
            if _equivalent(preds[0], golds[0], depth=0) or _same_order(preds[0], golds[1]):
                return True
            continue
        # Two ambiguous `a,bbb` answers compare as numbers only (so `123,456` != `456,123`).
        pairs = [(preds[0], golds[0])] if len(preds) == len(golds) == 2 else product(preds, golds)
        # an answer normalized away entirely (e.g. just "$") only matches exactly (above)
        if any(p and g and _equivalent(p, g, depth=0) for p, g in pairs):
            return True
    return False


def warm_up() -> None:
    """Import sympy / latex2sympy / math_verify and build the LaTeX parser once (for pool workers)."""
    math_answers_equal("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
