"""Two "nodes" on one machine: checkpoints with ``save_on_each_node`` on a shared disk and on separate disks.

Each node is its own ``torchrun`` launch (``--nnodes 2``, one process each, gloo over localhost), so both processes
are their node's main process, as on a real cluster. A shared disk is both launches writing the same output
folder; separate disks are two folders. Every run trains SFT (``_train_driver.py``) for 4 steps with a checkpoint
every 2; a killed run dies of SIGKILL right after checkpoint-2 and is resumed. What must hold: resume is exact,
no finished checkpoint is deleted, and no ``.partial-*`` staging folder is left anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_train_driver.py")
TOL = 1e-6


def _two_nodes(outs: tuple[Path, Path], *flags: str) -> list[subprocess.CompletedProcess]:
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = []
    for rank, out in enumerate(outs):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), str(DRIVER),
               "--trainer", "sft", "--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", *flags]  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out.decode(errors="replace")))
    return results


def _records(out: Path, run: str) -> list[dict]:
    lines = (out / "steps.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["run"] == run and r["rank"] == 0]


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != "steps.jsonl")


def _ok(results) -> None:
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[dict], Path, Path]:
    """An uninterrupted run on separate disks without save_on_each_node: the steps every other run must match."""
    root = tmp_path_factory.mktemp("separate_main_only")
    outs = (root / "node0", root / "node1")
    _ok(_two_nodes(outs))
    return _records(outs[0], "fresh"), *outs


@pytest.mark.slow
def test_only_the_main_node_saves_and_the_other_strands_nothing(reference):
    _, node0, node1 = reference
    assert _entries(node0) == ["checkpoint-2", "checkpoint-4"]
    assert _entries(node1) == []  # its RNG files were staged on its own disk, then removed


@pytest.mark.slow
@pytest.mark.parametrize(
    "shared, each_node",
    # Separate disks without save_on_each_node cannot resume (node 1 has no checkpoint): Trainer's design.
    [(True, True), (False, True), (True, False)],
    ids=["shared_disk-save_on_each_node", "separate_disks-save_on_each_node", "shared_disk-main_node_saves"],
)
def test_kill_and_resume_is_exact(tmp_path, reference, shared, each_node):
    want = reference[0]
    outs = (tmp_path / "out", tmp_path / "out") if shared else (tmp_path / "node0", tmp_path / "node1")
    flags = ("--save_on_each_node",) if each_node else ()
    killed = _two_nodes(outs, *flags, "--kill_at_step", "2")
    assert all(r.returncode != 0 for r in killed)
    for out in set(outs):
        assert _entries(out) == ["checkpoint-2"], [r.stdout[-2000:] for r in killed]
    _ok(_two_nodes(outs, *flags, "--resume"))
    got = _records(outs[0], "resume")
    steps = {r["step"]: r for r in got if "step" in r}
    for w in want:
        if w.get("step", 0) > 2:
            for key in ("loss", "grad_norm"):
                assert steps[w["step"]][key] == pytest.approx(w[key], rel=TOL), (w["step"], key)
    final = [r for r in got if r.get("final")][0]
    ref_final = [r for r in want if r.get("final")][0]
    assert final["param_sum"] == pytest.approx(ref_final["param_sum"], rel=TOL)
    for out in set(outs):
        assert _entries(out) == ["checkpoint-2", "checkpoint-4"]  # nothing deleted, nothing stranded
