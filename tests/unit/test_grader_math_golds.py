"""Every MATH test gold grades equal to itself and to its plain forms (the grader's acceptance test).

The plain forms are what a correct model answer may look like when it does not copy MATH's typesetting:
without `\\!`, without thousands separators (`10,\\!080` -> `10080`), with `\\frac` for `\\dfrac`, without
`\\left`/`\\right`, without a trailing `\\text{unit}` or count noun (`60 \\text{ handshakes}` -> `60`), without a
degree mark. Each is graded both ways (as prediction and as gold). The file lives outside the repository
(`../shared/datasets/math/test.jsonl`); the test is skipped where it is absent.
"""

import json
import os
import re

import pytest

from hf_align.data import last_boxed_answer
from hf_align.rewards import math_answers_equal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MATH_TEST = os.environ.get(
    "HF_ALIGN_MATH_TEST", os.path.join(REPO_ROOT, "..", "shared", "datasets", "math", "test.jsonl")
)
_NUMBER = r"-?\d[\d.]*"


def plain_forms(gold: str) -> dict[str, str]:
    """The gold's plain rewrites that differ from it, by name."""
    forms = {
        "no_negative_space": gold.replace("\\!", ""),
        "no_thousands_separator": re.sub(r"(?<=\d)(?:,\\!|\{,\}|\\,)(?=\d{3})", "", gold),
        "frac": re.sub(r"\\[dt]frac", r"\\frac", gold),
        "no_left_right": re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", gold),
    }
    unit = re.fullmatch(
        rf"\s*({_NUMBER})\s*\\(?:text|mbox)\{{\s*[a-zA-Z][a-zA-Z .]*\}}(?:\^\{{?[23]\}}?)?\s*", gold
    )
    if unit:
        forms["no_unit"] = unit.group(1)
    degree = re.fullmatch(rf"\s*({_NUMBER})\s*\^\s*\{{?\\circ\}}?\s*", gold)
    if degree:
        forms["no_degree"] = degree.group(1)
    return {name: form for name, form in forms.items() if form != gold}


def test_plain_forms_by_hand():
    assert plain_forms(r"10,\!080") == {"no_negative_space": "10,080", "no_thousands_separator": "10080"}
    assert plain_forms(r"\dfrac{1}{2}") == {"frac": r"\frac{1}{2}"}
    assert plain_forms(r"60 \text{ handshakes}") == {"no_unit": "60"}
    assert plain_forms(r"30^\circ") == {"no_degree": "30"}
    assert plain_forms("7") == {}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(MATH_TEST), reason=f"MATH test set not found at {MATH_TEST}")
def test_every_math_test_gold_equals_itself_and_its_plain_forms():
    with open(MATH_TEST) as f:
        golds = [last_boxed_answer(json.loads(line)["solution"]) for line in f]
    assert len(golds) == 5000 and all(golds)  # every MATH test solution has a boxed answer
    failures, n_forms = [], 0
    for gold in golds:
        assert math_answers_equal(gold, gold), gold
        for name, form in plain_forms(gold).items():
            n_forms += 1
            if not (math_answers_equal(form, gold) and math_answers_equal(gold, form)):
                failures.append((name, form, gold))
    assert not failures, failures
    assert n_forms > 250  # the rewrites really ran (about 300 on this file)
