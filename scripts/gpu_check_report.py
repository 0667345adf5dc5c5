"""Turn ``scripts/gpu_check.sh``'s results into a dated "GPU check" section of BENCHMARKS.md (markdown on stdout).

python scripts/gpu_check_report.py RESULTS_DIR "DEVICE" "COMMAND" "NOTE"
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path


def main() -> None:
    results, device, command, note = Path(sys.argv[1]), *sys.argv[2:5]
    rows = (
        [json.loads(x) for x in (results / "train_step.jsonl").read_text().splitlines()]
        if (results / "train_step.jsonl").exists()
        else []
    )
    smoke_file = results / "grpo_smoke.json"
    smoke = json.loads(smoke_file.read_text()) if smoke_file.exists() else None
    print(f"\n## GPU check ({datetime.date.today().isoformat()}, {device})\n")
    print(f"`{command}`. {note}\n")
    if rows:
        r0 = rows[0]
        print(
            f"Training step (`benchmarks/train_step.py`): {r0['model']}, random weights, {r0['dtype']}, activation "
            f"checkpointing {'on (non-reentrant) for both libraries' if r0['checkpointing'] else 'off'}; "
            f"{r0['tokens_per_step']} tokens per step ({' '.join(r0['shape'][4:10])}), mean of the timed steps.\n"
        )
        print("| algo | impl | tokens/s | step MiB | total MiB | MFU | first grad norm |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(
                f"| {r['algo']} | {r['impl']} | {r['tokens_per_s']:.0f} | {r['step_peak_mib']:.0f} | "
                f"{r['total_peak_mib']:.0f} | {mfu} | {r['first_grad_norm']:.4f} |"
            )
    else:
        print("Training step: no result (see gpu_check.log).")
    if smoke:
        print(
            f"\nGRPO smoke (`scripts/grpo_smoke.py`, HF engine, {smoke['params_M']:.1f}M-parameter random Qwen2, "
            f"activation checkpointing {'on' if smoke['checkpointing'] else 'off'}): {smoke['steps']} optimizer "
            f"steps in {smoke['seconds']:.1f} s, losses {', '.join(f'{x:.4g}' for x in smoke['losses'])}, "
            f"{'all finite: OK' if smoke['ok'] else 'FAILED'}."
        )
    else:
        print("\nGRPO smoke: no result (see gpu_check.log).")


if __name__ == "__main__":
    main()
