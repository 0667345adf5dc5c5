"""Rollout engines behind one protocol (`rollout/base.py`); `make_engine(kind, model, tokenizer, **kwargs)`
picks one by name: "hf" (`model.generate`), "vllm" (an in-process `vllm.LLM`), "vllm_server" (a client of
`python -m hf_align.rollout.vllm_server serve`). vllm itself is imported only when a "vllm" engine is built,
so the package works without it.
"""

from __future__ import annotations

from collections.abc import Callable

from hf_align.rollout.base import Rollout, RolloutEngine, RolloutEngineError, SamplingConfig
from hf_align.rollout.hf import HFEngine
from hf_align.rollout.vllm import VLLMEngine
from hf_align.rollout.vllm_server import VLLMServerEngine

__all__ = ["HFEngine", "Rollout", "RolloutEngine", "RolloutEngineError", "SamplingConfig", "make_engine"]

ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": HFEngine,
    "vllm": VLLMEngine,
    "vllm_server": VLLMServerEngine,
}


def make_engine(kind: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """Build the rollout engine named `kind` ("hf", "vllm" or "vllm_server")."""
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine {kind!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[kind](model, tokenizer, **kwargs)
