"""GRPO with a vLLM engine while the policy is replicated (DDP) or sharded over 2 processes on CPU (FSDP2 through
hf_align/launch.py, DeepSpeed ZeRO-3): one optimizer step, then the engine's greedy rollouts.

Run: `.venv-vllm/bin/python -m pytest -q tests/integration/test_vllm_sharded.py` (`make test-vllm`). Each case
launches _vllm_sharded_driver.py with `accelerate launch` (a timeout turns a hang into a failure) and compares it
with the same driver in one plain process at the same global batch: the step's loss and gradient norm, the weights
the engine was sent (gathered by `checkpoint_weights`; LoRA merged), and the greedy rollouts of every process's
engine (in-process: one engine per process; server: one server, the weights pushed by rank 0 over the
torch.distributed weight group or a file), which must be transformers' greedy generation from those weights and
differ from the initial model's (the engine did follow the step). A run resumed from its step-1 checkpoint in a new
launch repeats step 2 exactly (the engine is sent the restored weights before it samples). With uneven dynamic-sampling rounds and eval sets
the run must finish.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_align.rollout import HFEngine
from tests.conftest import free_port
from tests.integration.test_vllm_cpu import GREEDY, PROMPTS, _ids, _served, vllm_test

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "integration" / "_vllm_sharded_driver.py"
CONFIGS = {"ddp": "multi_cpu.yaml", "fsdp2": "fsdp2_cpu.yaml", "zero3": "deepspeed_zero3_cpu.yaml"}
TIMEOUT_S = 600
LR = 5e-2  # _vllm_sharded_driver.py's learning rate


def _run(out: Path, model_dir: Path, engine: str, url: str | None, sharding: str | None, mode="full") -> dict:
    args = [str(DRIVER), str(out), str(model_dir), engine, mode]
    args += [url, str(free_port())] if engine.startswith("vllm_server") else []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *args]
    if sharding is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" /
               CONFIGS[sharding]), "--num_processes", "2", "--main_process_port", str(free_port()), *args]  # fmt: skip
        env["HF_ALIGN_FSDP_ON_CPU"] = "1"
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and output.count("DONE") == (2 if sharding else 1), output[-5000:]
    engine_name = {None: "None", "ddp": "None", "fsdp2": "FSDP2", "zero3": "DeepSpeed ZeRO-3"}[sharding]
    assert output.count(f"SHARDED BY {engine_name}\n") == (2 if sharding else 1), output[-5000:]
    if mode == "uneven":
        return {"output": output}
    from safetensors.torch import load_file

    return {
        "steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()],
        "rollouts": [json.loads(p.read_text()) for p in sorted(out.glob("rollouts.*.json"))],
        "weights": load_file(str(out / "weights.safetensors")),
    }


@pytest.fixture(scope="module")
def server_url(tiny_model_dir, tmp_path_factory):
    with _served(tiny_model_dir, tmp_path_factory.mktemp("server")) as (_, url):
        yield url


@pytest.fixture(scope="module")
def references(tiny_model_dir, tmp_path_factory):
    """engine kind -> the one-process run (computed once per module)."""
    cache: dict[str, dict] = {}

    def get(engine: str, url: str | None, mode: str) -> dict:
        mode = "full" if mode == "late" else mode  # the same run in one process
        if (engine, mode) not in cache:
            out = tmp_path_factory.mktemp(f"ref_{engine.replace(':', '_')}_{mode}")
            cache[engine, mode] = _run(out, tiny_model_dir, engine, url, None, mode)
        return cache[engine, mode]

    return get


def _hf_greedy(model_dir: Path, weights: dict[str, torch.Tensor]) -> list:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if weights:
        missing = model.load_state_dict(weights, strict=False).missing_keys
        assert missing == ["lm_head.weight"]  # tied: not sent, vLLM ties it itself
        model.tie_weights()
    return _ids(HFEngine(model, AutoTokenizer.from_pretrained(model_dir)).generate(PROMPTS, GREEDY))


# Every engine under DDP and both shardings (the server with its distributed-group weight push), the server's file
# push and LoRA once per sharding, and the group push begun while rank 1 still had requests to make of the server.
CASES = [
    *[(sharding, engine, "full") for sharding in CONFIGS for engine in ("vllm", "vllm_server:group")],
    ("fsdp2", "vllm_server:file", "full"),
    ("fsdp2", "vllm", "lora"),
    ("zero3", "vllm_server:file", "lora"),
    ("fsdp2", "vllm_server:group", "late"),
]


@vllm_test
@pytest.mark.parametrize(("sharding", "engine", "mode"), CASES)
def test_rollouts_follow_the_sharded_policy(
    sharding, engine, mode, tiny_model_dir, references, request, tmp_path
):
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed in this environment (scripts/setup_vllm_env.sh installs it)")
    url = request.getfixturevalue("server_url") if engine.startswith("vllm_server") else None
    ref = references(engine, url, mode)
    got = _run(tmp_path, tiny_model_dir, engine, url, sharding, mode)
    assert [s["step"] for s in got["steps"]] == [s["step"] for s in ref["steps"]] == [1]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(got["steps"][0][key], ref["steps"][0][key], rtol=1e-5, atol=1e-6)
    assert list(got["weights"]) == list(ref["weights"])
    # Adam's first step is lr * g / (|g| + eps): +-lr wherever the gradient is not ~0, but float noise in a ~0
    # gradient (another reduction order) can flip it: a few elements may differ by up to 2 lr, the count below
    # keeps them few
    for name, tensor in ref["weights"].items():
        torch.testing.assert_close(
            got["weights"][name], tensor, rtol=0, atol=2 * LR, msg=lambda m, name=name: f"{name}: {m}"
        )
    off = sum(int((got["weights"][n] - t).abs().gt(1e-5).sum()) for n, t in ref["weights"].items())
    assert off < 1e-3 * sum(t.numel() for t in ref["weights"].values()), off
    want = _hf_greedy(tiny_model_dir, got["weights"])
    assert len(got["rollouts"]) == 2 and all(r == want for r in got["rollouts"])
    assert want == ref["rollouts"][0]
    assert ref["rollouts"] == [_hf_greedy(tiny_model_dir, ref["weights"])]
    assert want != _hf_greedy(tiny_model_dir, {}), "one step should change the greedy rollouts"


@vllm_test
@pytest.mark.parametrize(("sharding", "engine"), [("fsdp2", "vllm"), ("zero3", "vllm_server:group")])
def test_uneven_rounds_and_eval_do_not_hang(sharding, engine, tiny_model_dir, request, tmp_path):
    """Processes draw different numbers of dynamic-sampling rounds and evaluate 2 and 1 prompts: the weight sync
    (a collective under sharding) happens once per generation batch and evaluation, where every process comes."""
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed in this environment (scripts/setup_vllm_env.sh installs it)")
    url = request.getfixturevalue("server_url") if engine.startswith("vllm_server") else None
    output = _run(tmp_path, tiny_model_dir, engine, url, sharding, mode="uneven")["output"]
    assert output.count("EVALS 2\n") == 2, output[-5000:]  # one evaluation per step, on every process


# Both engines (the server through its group push) under DDP and each sharding: a run saves after steps 1 and 2; a
# new launch, in its own folder holding a copy of checkpoint-1, resumes from it and must repeat step 2 exactly: its
# rollouts come from the engine synced with the restored weights, sampled with the restored prompt stream.
RESUMED = [(sharding, engine) for sharding in CONFIGS for engine in ("vllm", "vllm_server:group")]


@vllm_test
@pytest.mark.parametrize(("sharding", "engine"), RESUMED)
def test_resume_is_exact(sharding, engine, tiny_model_dir, request, tmp_path):
    if sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed in this environment (scripts/setup_vllm_env.sh installs it)")
    url = request.getfixturevalue("server_url") if engine.startswith("vllm_server") else None
    fresh = _run(tmp_path / "fresh", tiny_model_dir, engine, url, sharding, mode="save")
    checkpoint = Path("out") / "checkpoint-1"
    shutil.copytree(tmp_path / "fresh" / checkpoint, tmp_path / "resumed" / checkpoint)
    resumed = _run(tmp_path / "resumed", tiny_model_dir, engine, url, sharding, mode="resume")
    assert [s["step"] for s in fresh["steps"]] == [1, 2] and [s["step"] for s in resumed["steps"]] == [2]
    assert resumed["steps"][0] == dict(fresh["steps"][1], run="resume")
    assert resumed["rollouts"] == fresh["rollouts"] and len(fresh["rollouts"]) == 2
    assert list(resumed["weights"]) == list(fresh["weights"])
    for name, tensor in fresh["weights"].items():
        assert torch.equal(resumed["weights"][name], tensor), name
