"""Build R1-Zero-formatted SFT traces (prompt/response jsonl) from MATH or GSM8K solutions.

    python scripts/build_sft_data.py --kind gsm8k --input ../shared/datasets/gsm8k/train.jsonl \
        --output outputs/data/gsm8k_r1_sft.jsonl --max_rows 512

prompt   = the r1_zero template with the question (it ends with the assistant's opening "<think>")
response = " <worked solution> </think> <answer> <final answer> </answer>"
GSM8K's calculator annotations (<<48/2=24>>) are removed from the worked solution.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_align.data import format_prompt, load_dataset_rows, load_prompt_template  # noqa: E402

_CALC = re.compile(r"<<[^>]*>>")


def reasoning_text(row: dict, kind: str) -> str:
    solution = row.get("solution", "")
    if kind == "gsm8k":
        solution = _CALC.sub("", solution.rsplit("####", 1)[0])
    return " ".join(solution.split())


def build(
    input_path: str, kind: str, output: str, template_name: str, max_rows: int | None, split: str
) -> int:
    rows = load_dataset_rows(input_path, kind=kind, split=split, on_error="skip", max_rows=max_rows)
    template = load_prompt_template(template_name)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            response = f" {reasoning_text(row, kind)} </think> <answer> {row['answer']} </answer>"
            f.write(
                json.dumps({"prompt": format_prompt(template, row["question"]), "response": response}) + "\n"
            )
    return len(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="MATH / GSM8K jsonl path (or Hub id)")
    p.add_argument("--kind", choices=["math", "gsm8k"], required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--template", default="r1_zero")
    p.add_argument("--split", default="train")
    p.add_argument("--max_rows", type=int, default=None)
    a = p.parse_args(argv)
    n = build(a.input, a.kind, a.output, a.template, a.max_rows, a.split)
    print(f"wrote {n} rows to {a.output}")


if __name__ == "__main__":
    main()
