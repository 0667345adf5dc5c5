"""`checkpoint_weights` under sharding, without vllm: 2 processes over gloo shard a tiny Qwen2 (plain and LoRA) with
FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3, and every process must get exactly the unsharded model's tensors (LoRA
merged), in order, as plain tensors (_gather_driver.py). A hang fails by the subprocess timeout."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_checkpoint_weights_gathers_the_unsharded_model(engine):
    if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed here")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--standalone", str(ROOT / "tests" / "integration" / "_gather_driver.py"), engine]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "GATHER OK" in output, output[-4000:]
    assert output.count("lora: 26 tensors equal") == 2, output[-4000:]
