#!/usr/bin/env bash
# The GPU check (issue 14, item 6), about 8 minutes on one H200; every part has its own time limit.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine: numbers appended to BENCHMARKS.md and $OUT
#   bash scripts/gpu_check.sh --dry-run    # anywhere (GPU_CHECK_DRY_RUN=1 too): tiny shape on CPU, 1 step,
#                                          # BENCHMARKS.md untouched
#
# 1. benchmarks/train_step.py at the Qwen2.5-1.5B shape (random weights, bf16, activation checkpointing for
#    both libraries), SFT and GRPO, hf_align vs TRL: tokens/s, memory, MFU. TRL comes from the environment or
#    from gpu_carry/wheels (`make gpu-wheels`, carried to the machine); without it only hf_align is measured.
# 2. scripts/grpo_smoke.py: two GRPO optimizer steps with the HF engine on a small random Qwen2 (finite loss).
# 3. scripts/gpu_check_report.py: a dated "GPU check" section, appended to BENCHMARKS.md and written to $OUT.
# Tokenizer: gpu_carry/tokenizer if carried, else one built in code (the models are random, the ids are ours).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY_RUN:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python3}
RES=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOG=$RES/gpu_check.log
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
say() { echo "$*" | tee -a "$LOG"; }
failed=()

say "== preflight ($(date -u +%FT%TZ), dry run: $DRY)"
if ! "$PY" -c "import trl" 2>/dev/null; then
    wheel=$(ls gpu_carry/wheels/trl-*.whl 2>/dev/null | head -n 1)
    if [[ -n "$wheel" ]]; then  # into a folder of our own: the machine's environment may not be writable
        "$PY" -m pip install -q --no-deps --no-index --target .cache/gpu-site "$wheel" 2>&1 | tail -n 3 | tee -a "$LOG"
        export PYTHONPATH="$PWD/.cache/gpu-site:$PYTHONPATH"
    fi
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("torch", "transformers", "accelerate", "peft", "datasets", "trl"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
PYEOF
DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
say "device: ${DEVICE:-none}"
if [[ $DRY == 0 && "$DEVICE" == "cpu" ]]; then
    say "no CUDA device: run on a GPU machine, or pass --dry-run"; exit 2
fi
IMPLS=(hf_align trl)
NOTE="hf_align vs TRL in the same run."
if ! "$PY" -c "import trl" 2>/dev/null; then
    IMPLS=(hf_align); NOTE="TRL could not be imported here (no gpu_carry/wheels?): hf_align only, no peer."
    say "$NOTE"
fi
TOK=()
[[ -d gpu_carry/tokenizer ]] && TOK=(--tokenizer gpu_carry/tokenizer)
if [[ $DRY == 1 ]]; then
    SHAPE=(--model qwen2-tiny --device cpu --batch 2 --prompt-len 16 --completion-len 16 --warmup 1 --steps 1)
    SMOKE=(--device cpu --steps 1); LIMITS=(900 900 600); NOTE="DRY RUN on CPU (plumbing only, numbers mean nothing). $NOTE"
else
    SHAPE=(--model qwen2.5-1.5b-shape --device cuda --batch 8 --prompt-len 128 --completion-len 384 --warmup 2 --steps 5)
    SMOKE=(--device cuda --steps 2); LIMITS=(180 240 75)
fi

say "== 1. training step, SFT and GRPO, ${IMPLS[*]} (limits ${LIMITS[0]} s / ${LIMITS[1]} s)"
timeout "${LIMITS[0]}" "$PY" benchmarks/train_step.py --algo sft "${SHAPE[@]}" --gradient-checkpointing \
    --impls "${IMPLS[@]}" "${TOK[@]}" --json "$RES/train_step.jsonl" 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("train_step sft")
timeout "${LIMITS[1]}" "$PY" benchmarks/train_step.py --algo grpo "${SHAPE[@]}" --gradient-checkpointing \
    --impls hf_align hf_align_one_pass "${IMPLS[@]:1}" "${TOK[@]}" --json "$RES/train_step.jsonl" 2>&1 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("train_step grpo")

say "== 2. GRPO smoke: HF engine, optimizer steps, finite loss (limit ${LIMITS[2]} s)"
timeout "${LIMITS[2]}" "$PY" scripts/grpo_smoke.py "${SMOKE[@]}" "${TOK[@]}" --json "$RES/grpo_smoke.json" \
    2>&1 | grep -v "^{'" | tail -n 5 | tee -a "$LOG"
[[ ${PIPESTATUS[0]} == 0 ]] || failed+=("grpo smoke")

say "== 3. report"
[[ ${#failed[@]} == 0 ]] || NOTE="$NOTE Failed or timed out: ${failed[*]}."
"$PY" scripts/gpu_check_report.py "$RES" "$DEVICE" "bash scripts/gpu_check.sh" "$NOTE" > "$RES/gpu_check.md"
cat "$RES/gpu_check.md" | tee -a "$LOG"
if [[ $DRY == 0 ]]; then
    cat "$RES/gpu_check.md" >> BENCHMARKS.md && say "appended to BENCHMARKS.md"
fi
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" && cp "$RES"/* "$OUT"/ && cp BENCHMARKS.md "$OUT"/ && say "results in $OUT"
fi
say "results in $RES"
if [[ ${#failed[@]} != 0 ]]; then say "FAILED: ${failed[*]}"; exit 1; fi
say "gpu check OK"
