"""FSDP and DeepSpeed ZeRO-3 are refused loudly when the trainer is built (they would train wrongly: issue of
sharded weights read by the log-prob output layer), through the shipped accelerate configs and a real launch.

On this CPU machine accelerate drops the FSDP plugin without a word; the refusal must still happen (it reads the
launcher's environment), or the run would silently be plain DDP. ZeRO-2 is not refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "integration" / "_refusal_driver.py"


def _launch(config: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / config),
    ]
    cmd += ["--num_processes", "1", str(DRIVER), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, engine",
    [
        ("fsdp2.yaml", "FSDP is not supported"),
        ("deepspeed_zero3.yaml", "DeepSpeed ZeRO stage 3 is not supported"),
    ],
)
def test_sharded_engines_are_refused_at_construction(tmp_path, config, engine):
    result = _launch(config, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert "UnsupportedEngineError" in output and engine in output, output[-2000:]
    assert "CONSTRUCTED" not in output


@pytest.mark.slow
def test_zero2_is_not_refused(tmp_path):
    result = _launch("deepspeed_zero2.yaml", tmp_path)
    assert result.returncode == 0 and "CONSTRUCTED" in result.stdout, (result.stdout + result.stderr)[-2000:]
