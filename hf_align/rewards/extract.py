"""Answer extraction from model responses: the last `\\boxed{}`, an "answer is ..." phrase, the last number,
a multiple-choice letter. Model output is untrusted: regular expressions and brace matching only, over the
last `MAX_RESPONSE_CHARS` characters of a response, so a megabyte of output cannot stall a regex.
"""

from __future__ import annotations

import re
from typing import Any

# Only the tail of a response is searched for an answer.
MAX_RESPONSE_CHARS = 10_000

BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def match_brace(text: str, open_pos: int) -> int | None:
    """Index of the `}` closing the `{` at `open_pos`, skipping escaped `\\{` and `\\}`; None if unclosed."""
    depth, i = 0, open_pos
    while i < len(text):
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
    matches = list(BOXED_RE.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    rest, stripped = text[start:], text[start:].lstrip()
    if stripped.startswith("{"):
        open_pos = start + (len(rest) - len(stripped))
        close = match_brace(text, open_pos)
        return None if close is None else text[open_pos + 1 : close].strip()
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
    ans = _cut_phrase(phrases[-1].group("ans")) if phrases else None
    return ans or parse_gsm8k_response(text), False


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
    numbers = _NUMBER_RE.findall(text[-MAX_RESPONSE_CHARS:]) if isinstance(text, str) else None
    return numbers[-1].replace(",", "") if numbers else None


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
        simple = {k: v for k, v in zip("ABCD", (_simple_text(str(o)) for o in options)) if v}
        phrase = list(_ANSWER_PHRASE_RE.finditer(text))[-1:]
        candidates = [_simple_text(m.group("ans")) for m in phrase] + [_simple_text(text)]
        for cand in candidates:
            for letter, opt in simple.items():
                if cand == opt:
                    return letter
        hits = [letter for letter, opt in simple.items() if f" {opt} " in f" {candidates[-1]} "]
        if len(hits) == 1:
            return hits[0]
    parens = _MMLU_PAREN_RE.findall(text)
    return parens[-1] if parens else None
