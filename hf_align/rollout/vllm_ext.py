"""`WeightSyncExtension`: the methods hf_align adds to every vLLM worker, to load new policy weights in place.

vLLM mixes this class into its worker class when an engine is built with
`worker_extension_cls="hf_align.rollout.vllm_ext.WeightSyncExtension"`; the engine side then calls its methods
by name with `LLM.collective_rpc("hf_align_load_weights", args=(...))` (in process, or through the server's
dev-mode `/collective_rpc` endpoint). `self` is then the worker, so `self.model_runner` is vLLM's.

Choices:
- Weights go through `model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`: the
  model's own `load_weights` maps Hugging Face checkpoint names onto vLLM's fused layers (qkv, gate_up) and
  then re-runs each layer's post-loading processing. On vLLM's CPU backend this is the only route that works:
  that processing repacks every linear layer for the CPU GEMM kernels and drops the original parameter, so a
  plain `model.load_weights` (TRL's colocate path) fails with "'Parameter' object has no attribute
  'weight_loader'" (measured; see ../shared/ENVIRONMENT.md).
- Tied embeddings on CPU: the tied `lm_head` is skipped when loading (its name is not in the checkpoint) and
  keeps the GEMM handle packed from the *old* embedding, so after a reload it is pointed back at the
  embedding and re-packed with vLLM's `dispatch_cpu_unquantized_gemm`. Without this, logits come from stale
  output weights while the input embedding is new. vLLM logs "RotaryEmbedding / ParallelLMHead: Failed to
  load weights" at each reload: expected, those layers have no checkpoint tensors and keep their own.
- Weights arrive either as an in-process sequence of `(name, tensor)` pairs (no copy, no pickling), or as a
  path (a string: the only thing the server's RPC endpoint can carry, and what a multiprocess engine gets) to
  one safetensors file, read lazily tensor by tensor.
- vllm is imported inside the methods only, so this module imports anywhere; it does not depend on the rest
  of hf_align (safetensors and torch are already in every vLLM worker).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


def _iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _fix_tied_lm_head(model: torch.nn.Module) -> bool:
    """On CPU, point a tied `lm_head` at the (reloaded) input embedding and re-pack it. True if it did."""
    from vllm.platforms import current_platform

    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not current_platform.is_cpu() or not getattr(text_config, "tie_word_embeddings", False):
        return False
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not hasattr(embed, "weight"):
        logger.warning(
            "tied embeddings but no model.lm_head / model.model.embed_tokens: lm_head not re-packed"
        )
        return False
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    lm_head.weight = embed.weight
    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)
    return True


class WeightSyncExtension:
    """Mixed into vLLM's worker class; method names are prefixed so they cannot clash with the worker's."""

    def hf_align_load_weights(self, weights: str | Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Load checkpoint-format weights in place: a safetensors file path, or `(name, tensor)` pairs.

        Returns a small JSON-able summary (the server endpoint sends it back to the client).
        """
        iterator = _iter_safetensors(weights) if isinstance(weights, str) else iter(weights)
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for name, tensor in iterator:
                count += 1
                yield name, tensor

        self.model_runner.reload_weights(weights_iterator=counted(), is_checkpoint_format=True)
        tied = _fix_tied_lm_head(self.model_runner.get_model())
        return {"tensors": count, "tied_lm_head_repacked": tied}

    def hf_align_weight_checksum(self, name: str) -> float:
        """Sum of one vLLM parameter (by vLLM's own name); a cheap probe for tests and debugging."""
        params = dict(self.model_runner.get_model().named_parameters())
        return float(params[name].detach().double().sum())
