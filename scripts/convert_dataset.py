"""Convert MATH / MATH-500 / GSM8K / question-answer data to {"question", "answer"} jsonl.

    python scripts/convert_dataset.py --input ../shared/datasets/math/train.jsonl --kind math --output data/math_train_qa.jsonl
    python scripts/convert_dataset.py --input openai/gsm8k:main --kind gsm8k --split test --output data/gsm8k_test_qa.jsonl

Same as `python -m hf_align.data convert ...`; see `hf_align.data` for the answer-extraction rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from hf_align.data import convert_main
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from hf_align.data import convert_main
    raise SystemExit(convert_main())
