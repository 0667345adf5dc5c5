"""The in-process vLLM engine's layout check (hf_align/rollout/vllm.py colocated_gpu_problem): refused exactly when
several processes on a node each see several GPUs (every engine would load onto cuda:0)."""

import pytest

from hf_align.rollout.vllm import colocated_gpu_problem


@pytest.mark.parametrize(
    ("local_processes", "visible_gpus", "refused"),
    [(1, 1, False), (1, 8, False), (8, 1, False), (2, 2, True), (8, 8, True)],
)
def test_refused_only_when_processes_share_every_gpu(local_processes, visible_gpus, refused):
    problem = colocated_gpu_problem(local_processes, visible_gpus)
    assert (problem is not None) == refused
    if refused:
        assert f"{local_processes} processes" in problem and "vllm_mode: server" in problem
