"""Answer extraction, normalization and equivalence for math rewards.

Model output is untrusted text. Nothing in this module evaluates it: extraction and normalization are
regular expressions and brace matching written here; numbers are compared as exact `fractions.Fraction`s
built from a strict numeric grammar (at most 60 characters, exponents of at most 3 digits); everything
else goes to latex2sympy (an ANTLR LaTeX grammar that builds sympy objects directly) and
`math_verify.verify`. We never call `math_verify.parse` with `ExprExtractionConfig`, `sympify` or
`parse_expr` on model text, because those run Python's `eval`.

`math_answers_equal(prediction, ground_truth)` decides in this order, first decision wins:

1. Answers over `MAX_ANSWER_CHARS` characters are compared as stripped strings only.
2. Both sides go through `normalize_answer`; equal non-empty strings are equal (words compare
   case-insensitively).
3. Structures: a top-level `\\cup` gives a union (unordered); `(a, b)`, `[a, b)`, `(-\\infty, 3]` give
   ordered tuples/intervals whose brackets must match exactly (`[1,2)` != `[1,2]`, `(1,2)` != `(2,1)`);
   `\\{a, b\\}` and a bare `a, b` are unordered collections (MATH's "enter all solutions separated by
   commas"). Elements are compared recursively. A structure never equals a non-structure.
4. Two plain numbers (`-3`, `0.5`, `.5`, `1e3`, `1/2`, `\\frac{1}{2}`) compare as exact fractions:
   `0.5 == \\frac12 == 1/2`, but `0.33 != 1/3`.
5. Anything else is parsed by latex2sympy and compared by `math_verify.verify` (numeric with 6-digit
   rounding, then symbolic), so `\\frac{\\sqrt{2}}{2} == \\sqrt{2}/2` and `2^{10} == 1024`.

Normalization choices (see `normalize_answer`): `\\boxed` is unwrapped; `$`, `\\left`/`\\right`, thin
spaces, `\\text{}`/`\\mathrm{}`/`\\textbf{}` wrappers, degree marks and trailing unit words are dropped;
`\\dfrac`/`\\tfrac` become `\\frac`, `\\frac12` becomes `\\frac{1}{2}`, `\\sqrt2` becomes `\\sqrt{2}`;
`x = 5` becomes `5`; `1,000` becomes `1000` only when the whole answer is one number with 3-digit groups
(so `1,23` stays a list and `(1,000)` stays a tuple). Percent signs are dropped: `50\\%` == `50`, and
`50\\%` != `0.5` (MATH writes percentages as the number before the sign).

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
from typing import Any

# Only the tail of a response is searched for an answer, so a megabyte of output cannot stall a regex.
MAX_RESPONSE_CHARS = 10_000
# Longer answers are compared by exact string match only: no normalization, no sympy.
MAX_ANSWER_CHARS = 1_000
# Per-call budget handed to math_verify's signal-based timeout (main thread only).
_SIGNAL_TIMEOUT_S = 3
# Deepest nesting of structures (tuples of sets of intervals ...) that we recurse into.
_MAX_DEPTH = 4
_MAX_ELEMENTS = 64

# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _match_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the `{` at `open_pos`, skipping escaped `\\{` and `\\}`; None if unclosed."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced.

    `\\boxed 5` (no braces) gives the next token. Returns None when there is no boxed answer or its braces
    never close. Only the last `MAX_RESPONSE_CHARS` characters are searched.
    """
    if not isinstance(text, str):
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        open_pos = start + (len(rest) - len(stripped))
        close = _match_brace(text, open_pos)
        if close is None:
            return None
        return text[open_pos + 1 : close].strip()
    if rest[:1].isspace():
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    return None


_ANSWER_PHRASE_RE = re.compile(r"(?i)\banswer\b(?:\s+is)?\s*[:=]?\s*(?P<ans>[^\n]+)")
_STOP_WORDS_RE = re.compile(r"(?i)\s(?:because|since|as|which|so|and therefore|therefore)\b")


def extract_final_answer(text: str) -> tuple[str | None, bool]:
    """Final answer of a free-form response and whether it came from a `\\boxed{}`.

    Order: the last `\\boxed{}`; else the text after the last "answer is" / "answer:" (cut at the end of
    the sentence; if that still holds several words, its last number); else the last number in the text.
    """
    if not isinstance(text, str):
        return None, False
    text = text[-MAX_RESPONSE_CHARS:]
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, True
    phrases = list(_ANSWER_PHRASE_RE.finditer(text))
    if phrases:
        ans = _cut_phrase(phrases[-1].group("ans"))
        if ans:
            return ans, False
    return parse_gsm8k_response(text), False


def _cut_phrase(ans: str) -> str | None:
    ans = ans.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left):
            end = ans.find(right, len(left))
            if end != -1:
                return ans[len(left) : end].strip() or None
    ans = re.split(r"\.(?:\s|$)", ans, maxsplit=1)[0]
    ans = _STOP_WORDS_RE.split(ans, maxsplit=1)[0].strip().rstrip(".,;:!").strip()
    if len(re.findall(r"[A-Za-z]{2,}", ans)) > 2:
        return parse_gsm8k_response(ans)
    return ans or None


# Thousands groups first so "1,234" is one number; a minus only where it cannot be a binary minus.
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\.\d+")


def parse_gsm8k_response(text: str) -> str | None:
    """The last number in `text`, as a string without thousands commas; None if there is none.

    `"1,234"` -> `"1234"`, `"-3.5."` -> `"-3.5"`, `"$12"` -> `"12"`. Only the tail of the text is searched.
    """
    if not isinstance(text, str):
        return None
    numbers = _NUMBER_RE.findall(text[-MAX_RESPONSE_CHARS:])
    if not numbers:
        return None
    return numbers[-1].replace(",", "")


_MMLU_LETTERS = ("A", "B", "C", "D")
_MMLU_ANSWER_RE = re.compile(
    r"(?i:answer)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:=]?\s*(?i:option|choice)?\s*[\(\[*]*([ABCD])(?![A-Za-z])"
)
_MMLU_LONE_RE = re.compile(r"^[\s(\[*]*([ABCD])[\s)\].:*]*$")
_MMLU_LEADING_RE = re.compile(r"^[\s(\[*]*([ABCD])[)\].:]\s")
_MMLU_PAREN_RE = re.compile(r"\(([ABCD])\)")


def _simple_text(s: str) -> str:
    return re.sub(r"[\W_]+", " ", s.lower()).strip()


def parse_mmlu_response(example: dict[str, Any], text: str) -> str | None:
    """The chosen option letter ("A".."D") in a multiple-choice response, or None.

    Tried in order: the last "answer is B" / "Answer: (C)" / "correct answer is option D"; the whole response
    being a lone letter ("B", "(B)", "B."); a response starting with "B) ..."; the response (or the text
    after "answer is") equal to one option's text from `example["options"]`; exactly one option's text
    appearing in the response; the last "(B)". Capital letters only, so the article "a" is not an answer.
    """
    if not isinstance(text, str):
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    found = _MMLU_ANSWER_RE.findall(text)
    if found:
        return found[-1]
    for regex in (_MMLU_LONE_RE, _MMLU_LEADING_RE):
        m = regex.match(text)
        if m:
            return m.group(1)
    options = example.get("options") if isinstance(example, dict) else None
    if options:
        simple_options = [_simple_text(str(o)) for o in options][: len(_MMLU_LETTERS)]
        candidates = [_simple_text(text)]
        phrase = list(_ANSWER_PHRASE_RE.finditer(text))
        if phrase:
            candidates.insert(0, _simple_text(phrase[-1].group("ans")))
        for cand in candidates:
            for letter, opt in zip(_MMLU_LETTERS, simple_options):
                if opt and cand == opt:
                    return letter
        padded = f" {_simple_text(text)} "
        hits = [letter for letter, opt in zip(_MMLU_LETTERS, simple_options) if opt and f" {opt} " in padded]
        if len(hits) == 1:
            return hits[0]
    parens = _MMLU_PAREN_RE.findall(text)
    if parens:
        return parens[-1]
    return None


# --------------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------------

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
_TEXT_COMMANDS = (
    "text",
    "textbf",
    "textit",
    "textrm",
    "textnormal",
    "textsf",
    "texttt",
    "mathrm",
    "mathbf",
    "mathit",
    "mathsf",
    "mathtt",
    "mbox",
    "hbox",
    "boldsymbol",
    "bm",
)
_TEXT_CMD_RE = re.compile(r"\\(" + "|".join(_TEXT_COMMANDS) + r")\s*\{")
_SIZING_RE = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])"
)
_SPACING_RE = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad(?![a-zA-Z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])")
_ASSIGN_LHS_RE = re.compile(
    r"^\s*(?:[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?|\\[a-zA-Z]+|\([a-zA-Z](?:\s*,\s*[a-zA-Z])+\))\s*=(?!=)"
)
_IN_LHS_RE = re.compile(r"^\s*[a-zA-Z]\s*\\in(?![a-zA-Z])\s*")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)$")


def _unwrap_text_commands(s: str) -> str:
    """Replace `\\text{X}` (and friends) by X; a wrapper holding only a unit ("cm", "square feet") goes."""
    for _ in range(32):  # bounded: each pass removes one wrapper
        m = _TEXT_CMD_RE.search(s)
        if m is None:
            return s
        open_pos = m.end() - 1
        close = _match_brace(s, open_pos)
        if close is None:
            return s[: m.start()] + s[open_pos + 1 :]
        inner = s[open_pos + 1 : close]
        after = s[close + 1 :]
        if _UNIT_ONLY_RE.match(inner) and s[: m.start()].strip():
            inner = ""
            after = re.sub(r"^\s*\^\s*\{?[23]\}?", "", after)
        s = s[: m.start()] + inner + after
    return s


def _strip_trailing_unit(s: str) -> str:
    """Drop a unit word after a number: "5 cm", "5cm", "12 square feet"; but not "5m" or "2x m"."""
    m = _TRAILING_UNIT_RE.search(s)
    if m is None:
        return s
    prefix = s[: m.start()].rstrip()
    if not prefix or prefix[-1] not in "0123456789})":
        return s
    if not m.group(1) and len(re.match(r"[a-zA-Z]*", m.group(2)).group(0)) < 2:
        return s  # a single glued letter is more likely a variable than a unit
    return prefix


def _brace_arg(s: str, i: int) -> tuple[str, int] | None:
    """The argument of a macro starting at index i: `{...}`, a `\\command`, or one character."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        close = _match_brace(s, i)
        return None if close is None else (s[i : close + 1], close + 1)
    if s[i] == "\\":
        m = re.match(r"\\[a-zA-Z]+", s[i:])
        if m:
            return "{" + m.group(0) + "}", i + m.end()
        return None
    if s[i] in "}^_":
        return None
    return "{" + s[i] + "}", i + 1


def _fix_macro_args(s: str, macro: str, nargs: int) -> str:
    """Brace the arguments of `\\frac12` / `\\sqrt2` style macros: `\\frac{1}{2}`, `\\sqrt{2}`."""
    out = []
    pos = 0
    pattern = re.compile(re.escape(macro) + r"(?![a-zA-Z])")
    for _ in range(64):
        m = pattern.search(s, pos)
        if m is None:
            break
        out.append(s[pos : m.end()])
        i = m.end()
        if macro == "\\sqrt" and i < len(s) and s[i] == "[":  # \sqrt[3]{x}: leave the index as is
            pos = i
            continue
        args = []
        for _k in range(nargs):
            arg = _brace_arg(s, i)
            if arg is None:
                break
            args.append(arg[0])
            i = arg[1]
        if len(args) == nargs:
            out.append("".join(args))
            pos = i
        else:
            pos = m.end()
    out.append(s[pos:])
    return "".join(out)


def _strip_spaces(s: str) -> str:
    # Keep one space where it separates a command from a letter (`\pi r`), drop all others.
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", s)
    return s.replace(" ", "").replace("\x00", " ")


def _outer_group_end(s: str, open_pos: int) -> int | None:
    """Index of the bracket closing the one at `open_pos`, by depth over ([{ and )]}."""
    depth = 0
    i = open_pos
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1 : i + 2] in ("{", "}"):
            c = s[i + 1]
            i += 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def normalize_answer(text: Any) -> str:
    """Canonical string form of an answer (see the module docstring for the rules).

    Answers longer than `MAX_ANSWER_CHARS` are only stripped.
    """
    s = str(text).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    if _BOXED_RE.search(s):
        boxed = extract_boxed(s)
        if boxed is not None:
            s = boxed
    s = s.replace("\\$", "").replace("$", "")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _SIZING_RE.sub("", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\langle", "(").replace("\\rangle", ")")
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", "", s)  # 1\,000
    s = s.replace("{,}", ",")
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_text_commands(s)
    s = re.sub(r"(?i)(?<![a-z])percent(?:age)?\s*$", "", s).strip()
    for _ in range(2):  # "5 cm", "10 square feet", "3 cm^2"
        s = _strip_trailing_unit(s)
    s = _fix_macro_args(s, "\\frac", 2)
    s = _fix_macro_args(s, "\\sqrt", 1)
    m = _ASSIGN_LHS_RE.match(s)
    if m and s[m.end() :].strip():
        s = s[m.end() :]
    s = _IN_LHS_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _strip_spaces(s)
    s = re.sub(r"\\infty|\\infin(?![a-zA-Z])|∞|(?i:infinity)|(?<![a-zA-Z\\])inf(?![a-zA-Z])", r"\\infty", s)
    s = s.replace("+\\infty", "\\infty")
    s = s.rstrip(".").rstrip("\\").rstrip(".")
    while s.startswith("{") and _outer_group_end(s, 0) == len(s) - 1:
        s = s[1:-1]
    if re.match(r"^\+\d", s):
        s = s[1:]
    choice = _CHOICE_RE.match(s)
    if choice:
        s = choice.group(1).upper()
    return s


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
    if opener is not None and _outer_group_end(s, 0) == len(s) - 1:
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
    pred = normalize_answer(pred_raw) if len(pred_raw) <= MAX_ANSWER_CHARS else None
    for gold_raw in _ground_truth_strings(ground_truth):
        gold_raw = gold_raw.strip()
        if not gold_raw:
            continue
        if pred is None or len(gold_raw) > MAX_ANSWER_CHARS:
            if pred_raw == gold_raw:
                return True
            continue
        gold = normalize_answer(gold_raw)
        if not pred or not gold:  # normalized away entirely (e.g. just "$"): exact match only
            if pred_raw == gold_raw:
                return True
            continue
        if _equivalent(pred, gold, depth=0):
            return True
    return False


def warm_up() -> None:
    """Import sympy / latex2sympy / math_verify and build the LaTeX parser once (for pool workers)."""
    math_answers_equal("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
