"""Engines hf_align cannot train under, or that accelerate would silently drop, are refused loudly when the trainer is
built, through the shipped accelerate configs and a real launch (one process: only construction is checked).

On this CPU machine accelerate drops the FSDP plugin without a word: the GPU config fsdp2.yaml must be refused
(pointing at the launch helper) unless HF_ALIGN_FSDP_ON_CPU=1 makes it real FSDP (hf_align/launch.py). FSDP1 stays
refused (checked on the state: on CPU accelerate stops an FSDP1 launch itself). ZeRO-2 and ZeRO-3 are built (training under them: test_sharding_matrix.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "integration" / "_refusal_driver.py"


def _launch(config: str | Path, out: Path, **env) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
    ]
    cmd += ["--num_processes", "1", str(DRIVER), str(out)]
    base = {k: v for k, v in os.environ.items() if k != "HF_ALIGN_FSDP_ON_CPU"}
    env = {**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _refused(result, message: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "UnsupportedEngineError" in output and message in output, output[-2000:]
    assert "CONSTRUCTED" not in output


@pytest.mark.slow
def test_fsdp_dropped_by_accelerate_on_cpu_is_refused(tmp_path):
    _refused(_launch("fsdp2.yaml", tmp_path), "HF_ALIGN_FSDP_ON_CPU=1")


def test_fsdp1_is_refused(monkeypatch):
    # On CPU accelerate itself stops an FSDP1 launch (its plugin wants a GPU): the refusal is checked on the state.
    from types import SimpleNamespace

    from hf_align.trainers.safety import UnsupportedEngineError, refuse_unsupported_sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1), deepspeed_plugin=None)
    with pytest.raises(UnsupportedEngineError, match="FSDP1 is not supported"):
        refuse_unsupported_sharding(state)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "deepspeed_zero3_cpu.yaml"]
)
def test_deepspeed_is_built(tmp_path, config):
    result = _launch(config, tmp_path)
    assert result.returncode == 0 and "CONSTRUCTED" in result.stdout, (result.stdout + result.stderr)[-2000:]
