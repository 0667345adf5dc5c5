"""No network I/O when hf_align is imported, and no repository code runs unless the user asks for it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hf_align.config import SFTConfig

# Runs in a fresh interpreter: every socket operation raises, then every hf_align module is imported.
_IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib, pkgutil, socket, sys

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network I/O at import time")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    import hf_align

    imported, skipped = [], []
    for info in pkgutil.walk_packages(hf_align.__path__, "hf_align."):
        try:
            importlib.import_module(info.name)
            imported.append(info.name)
        except ImportError as e:  # the vllm module without vllm installed: says which extra to install
            if "vllm" not in str(e):
                raise
            skipped.append(info.name)
    print("ATTEMPTS", len(attempts), attempts[:3])
    print("IMPORTED", len(imported))
    print("SKIPPED", skipped)
    """
)


def test_importing_every_module_does_no_network_io():
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EVERYTHING], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["ATTEMPTS"].startswith("0 "), lines["ATTEMPTS"]
    assert int(lines["IMPORTED"]) >= 25  # the walk really covered the package
    assert set(eval_free_list(lines["SKIPPED"])) <= {"hf_align.rollout.vllm"}


def eval_free_list(text: str) -> list[str]:
    """Parse the printed list of module names without eval."""
    return [t.strip().strip("'\"") for t in text.strip("[]").split(",") if t.strip()]


def test_trust_remote_code_is_off_by_default():
    assert SFTConfig(output_dir="x").trust_remote_code is False  # TRL 1.16: a trainer-config field


def test_repository_code_is_not_run_without_trust_remote_code(tmp_path, monkeypatch):
    """A model folder whose config points at its own modeling code: loading it with our defaults refuses
    instead of importing that code (which would create the canary)."""
    from hf_align.modeling import load_model_and_tokenizer

    canary = tmp_path / "CANARY"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "hostile_custom",
                "architectures": ["HostileForCausalLM"],
                "auto_map": {
                    "AutoConfig": "modeling_hostile.HostileConfig",
                    "AutoModelForCausalLM": "modeling_hostile.HostileForCausalLM",
                },
            }
        )
    )
    (folder / "modeling_hostile.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, OSError), match="trust_remote_code"):
        load_model_and_tokenizer(str(folder))
    assert not canary.exists()
