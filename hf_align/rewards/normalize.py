"""Canonical string form of a math answer (`normalize_answer`), before `hf_align.rewards.grader` compares.

Regular expressions and brace matching on untrusted text; the `\\frac12` / `\\sqrt2` / `2^(10)` repairs are
latex2sympy's own regex normalization (`_fix_malformed_macros`). Choices: `\\boxed` is unwrapped; `$`,
`\\left`/`\\right`, spacing, `\\text{}`/`\\mathrm{}`/`\\textbf{}` wrappers, degree marks and unit words after a
number are dropped, and so is any `\\text{words}` that ends an answer after a number (a count noun:
`60 \\text{ handshakes}` is `60`); `\\dfrac`/`\\tfrac` become `\\frac`; `x = 5` becomes `5`. MATH's thousands
separators (`10,\\!080`, `10{,}080`, `10\\,080`) go, and `\\!` (a negative space) never separates anything. A
bare `1,000` becomes `1000` only when the whole answer is one number with 3-digit groups (so `1,23` stays a
list and `(1,000)` a tuple), or inside a `{}` argument (`\\frac{12}{5,525}`); `merge_thousands=False` keeps
it a list, for golds such as `70,110` (two answers). Percent signs are dropped: `50\\%` == `50`, and
`50\\%` != `0.5` (MATH writes percentages as the number before the sign).
"""

from __future__ import annotations

import re
from typing import Any

from hf_align.rewards.extract import BOXED_RE, extract_boxed, match_brace

# Longer answers are compared by exact string match only: no normalization, no sympy.
MAX_ANSWER_CHARS = 1_000

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
    "text|textbf|textit|textrm|textnormal|textsf|texttt|mathrm|mathbf|mathit|mathsf|mathtt|mbox|hbox"
)
_TEXT_CMD_RE = re.compile(rf"\\(?:{_TEXT_COMMANDS}|boldsymbol|bm)\s*\{{")
_SIZING_RE = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|Biggl|Biggr|big|Big|bigg|Bigg)(?![a-zA-Z])"
)
_SPACING_RE = re.compile(r"(?<!\\)\\[,;: ]|\\q?quad(?![a-zA-Z])|~")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°|\\degree(?![a-zA-Z])")
_ASSIGN_LHS_RE = re.compile(
    r"^\s*(?:[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?|\\[a-zA-Z]+|\([a-zA-Z](?:\s*,\s*[a-zA-Z])+\))\s*=(?!=)"
)
_IN_LHS_RE = re.compile(r"^\s*[a-zA-Z]\s*\\in(?![a-zA-Z])\s*")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)$")
_WORDS_RE = re.compile(r"^\s*[A-Za-z][A-Za-z.' ]*$")
_NUMBER_END = tuple("0123456789}")
# MATH's thousands separators: `10,\!080`, `10{,}080`, `10\,080`.
# Inside a `{}` argument (`\frac{12}{5,525}`) a comma between 3-digit groups can only be a thousands separator.
_BRACED_THOUSANDS_RE = re.compile(r"(?<=(?<!\\)\{)\d{1,3}(?:,\d{3})+(?=\})")
_THOUSANDS_SEP_RE = re.compile(r"(?<=\d)(?:,\s*\\!|\{,\}|\\,)(?=\d{3}(?!\d))")


def _unwrap_text_commands(s: str) -> str:
    """Replace `\\text{X}` (and friends) by X; a wrapper holding only a unit ("cm", "square feet") goes."""
    for _ in range(32):  # bounded: each pass removes one wrapper
        m = _TEXT_CMD_RE.search(s)
        if m is None:
            return s
        open_pos = m.end() - 1
        close = match_brace(s, open_pos)
        if close is None:
            return s[: m.start()] + s[open_pos + 1 :]
        inner = s[open_pos + 1 : close]
        after = s[close + 1 :]
        before = s[: m.start()].strip()
        after_unit = re.sub(r"^\s*\^\s*\{?[23]\}?", "", after)
        # a unit ("cm") after anything, or any words after a number at the end ("60 \text{ handshakes}")
        count_noun = _WORDS_RE.match(inner) and not after_unit.strip() and before[-1:] in _NUMBER_END
        if before and (_UNIT_ONLY_RE.match(inner) or count_noun):
            inner, after = "", after_unit
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


def _fix_malformed_macros(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\sqrt2` -> `\\sqrt{2}`, `2^(10)` -> `2^{10}`: latex2sympy's regex repairs."""
    from latex2sympy2_extended.math_normalization import NormalizationConfig, normalize_latex

    config = NormalizationConfig(
        basic_latex=False, units=False, malformed_operators=True, nits=False, boxed="none"
    )
    return normalize_latex(s, config)


def _strip_spaces(s: str) -> str:
    # Keep one space where it separates a command from a letter (`\pi r`), drop all others.
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", s)
    return s.replace(" ", "").replace("\x00", " ")


def outer_group_end(s: str, open_pos: int) -> int | None:
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


def _strip_markup(s: str) -> str:
    """Drop what only typesets: math delimiters, `\\left`, spacing, degree and percent signs, text wrappers."""
    s = s.replace("\\$", "").replace("$", "")
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)]
    s = re.sub(r"\\(?:displaystyle|textstyle|scriptstyle)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _SIZING_RE.sub("", s)
    s = s.replace("\\lbrace", "\\{").replace("\\rbrace", "\\}")
    s = s.replace("\\langle", "(").replace("\\rangle", ")")
    s = _THOUSANDS_SEP_RE.sub("", s)
    s = s.replace("\\!", "").replace("{,}", ",")  # \! is a negative space: it never separates anything
    s = _BRACED_THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_text_commands(s)
    return re.sub(r"(?i)(?<![a-z])percent(?:age)?\s*$", "", s).strip()


def normalize_answer(text: Any, merge_thousands: bool = True) -> str:
    """Canonical string form of an answer (see the module docstring for the rules).

    A bare `1,000` is read as one number unless `merge_thousands` is False (then it is the list 1, 000).
    Answers longer than `MAX_ANSWER_CHARS` are only stripped.
    """
    s = str(text).strip()
    if len(s) > MAX_ANSWER_CHARS:
        return s
    if BOXED_RE.search(s):
        boxed = extract_boxed(s)
        if boxed is not None:
            s = boxed
    s = _strip_markup(s)
    for _ in range(2):  # "5 cm", "10 square feet", "3 cm^2"
        s = _strip_trailing_unit(s)
    s = _fix_malformed_macros(s)
    m = _ASSIGN_LHS_RE.match(s)
    if m and s[m.end() :].strip():
        s = s[m.end() :]
    s = _IN_LHS_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    if merge_thousands and _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = _strip_spaces(s)
    s = re.sub(r"\\infty|\\infin(?![a-zA-Z])|∞|(?i:infinity)|(?<![a-zA-Z\\])inf(?![a-zA-Z])", r"\\infty", s)
    s = s.replace("+\\infty", "\\infty")
    s = s.rstrip(".").rstrip("\\").rstrip(".")
    while s.startswith("{") and outer_group_end(s, 0) == len(s) - 1:
        s = s[1:-1]
    if re.match(r"^\+\d", s):
        s = s[1:]
    choice = _CHOICE_RE.match(s)
    return choice.group(1).upper() if choice else s
