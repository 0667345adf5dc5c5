"""The only place that turns logits into per-token log-probabilities and entropies.

Log-probs are ``logit[label] - logsumexp(logits)`` in float32, ``chunk_tokens`` positions at a time (never a
(B, T, V) log-softmax), and only where one is wanted (a label in [0, V) inside ``logprob_mask``; 0 elsewhere).
``get_response_log_probs`` runs the wrapped (DDP / FSDP / DeepSpeed) model with ``logits_to_keep=1``, hooks
the decoder's final hidden states and applies the output layer by chunks under activation checkpointing: extra
memory chunk x V, forward and backward. A plain bias-free ``nn.Linear`` head takes ``_LinearHeadLogprob``
instead (one chunk-sized buffer in backward, not about four). Entropy comes detached from the same logits
chunk, or (an entropy bonus) differentiable from a checkpointed chunk. Full logits, still reduced by chunks,
serve models without a separable decoder or ``logits_to_keep``, and sharded ones (FSDP, DeepSpeed ZeRO-3: the
output layer holds a shard and must run inside the wrapped forward; said once in the log). ``share_prompts``
runs a prompt shared by several rows (a GRPO group, a DPO pair) through the decoder once and continues each
row on its key/value cache: exact under causal attention, and under non-reentrant activation checkpointing (a
layer's replay in backward reads the cache unchanged); where that is not known to be exact (sharded or
engine-wrapped models, other attention kernels or caches, checkpointing not done by transformers' layers) one
pass runs, with a warning where the cache or the checkpointing is why. ``masked_mean`` of a fully masked slice
is NaN (0/0, the course assignment's contract); losses use ``masked_mean_or_zero``: an empty completion must
never poison a loss.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256
logger = logging.getLogger(__name__)


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> torch.Tensor:
    """Sum of ``tensor`` over entries where ``mask`` (bool or 0/1) is true, divided by ``normalize_constant``."""
    return (tensor * mask.to(tensor.dtype)).sum(dim=dim) / normalize_constant


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` where ``mask`` is true, along ``dim`` (None: all); an empty slice is 0/0 = NaN."""
    return masked_normalize(tensor, mask, dim=dim) / mask.to(tensor.dtype).sum(dim=dim)


def masked_mean_or_zero(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``masked_mean``, except that a slice with no true entry has mean 0 (never NaN, zero gradient)."""
    return masked_normalize(tensor, mask, dim=dim) / mask.to(tensor.dtype).sum(dim=dim).clamp(min=1.0)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, (..., V) -> (...), in float32: ``H = logsumexp(z) - sum_v
    softmax(z)_v z_v``, which never exponentiates an unshifted logit."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return lse - (probs * logits).sum(dim=-1)


def log_probs_from_logits(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    return_token_entropy: bool | str = False,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Per-token log p(label) (B, T) from logits that already exist, ``chunk_tokens`` tokens at a time (the
    output layer of ``_score`` is then the identity). Labels outside [0, V) (e.g. -100) get 0."""
    B, T, V = logits_BTV.shape
    valid_N, labels_N = _scored_positions(labels_BT, V, None)
    logits_NV = logits_BTV.reshape(B * T, V)  # (B*T, V)
    scores = _score(torch.nn.Identity(), logits_NV, labels_N, temperature, chunk_tokens, return_token_entropy)
    return _to_rows(scores, None, valid_N, B, T)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are split over processes (FSDP1 / FSDP2 modules, DeepSpeed ZeRO-3 parameters).
    Decided by module type and ``ds_id``, not by a weight's current type or shape: FSDP2 leaves the output layer
    unsharded after a forward until the next backward, and ZeRO-3 leaves an empty partition."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules()) or any(
        hasattr(p, "ds_id") for p in model.parameters()
    )


@functools.cache
def _full_logits_instead(why: str) -> None:
    logger.warning("fused log-prob output layer off: %s; log-probs come from the model's full logits", why)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output layer) of a transformers causal LM, or None where the model does not separate them or
    its weights are sharded (the output layer must then run inside the wrapped forward; said once)."""
    if _sharded(model):
        _full_logits_instead("the parameters are sharded (FSDP / DeepSpeed ZeRO-3)")
        return None
    inner = _unwrap(model)
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return None if decoder is None or head is None or decoder is inner else (decoder, head)


def _label_logprobs(logits_NV, labels_N, temperature: float) -> tuple[torch.Tensor, ...]:
    """(float32 logits / temperature (N, V), their logsumexp (N,), ``log p(label)`` (N,))."""
    logits_NV = logits_NV.float()
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    return logits_NV, lse_N, logits_NV.gather(-1, labels_N.unsqueeze(-1)).squeeze(-1) - lse_N


def _head_chunk(head, hidden_NH, labels_N, temperature: float, entropy_out: list | None = None):
    """Log-probs of one chunk; its entropy is appended to ``entropy_out`` if that list is still empty (so the
    recomputation in a checkpointed backward pass does not compute it again). ``entropy_out=True``: returns
    (log-probs, entropy), the entropy differentiable (an entropy bonus in the loss)."""
    logits_NV, _, log_probs_N = _label_logprobs(head(hidden_NH), labels_N, temperature)
    if entropy_out is True:
        return log_probs_N, compute_entropy(logits_NV)
    if entropy_out is not None and not entropy_out:
        with torch.no_grad():
            entropy_out.append(compute_entropy(logits_NV))
    return log_probs_N


class _LinearHeadLogprob(torch.autograd.Function):
    """log p(label) of one chunk through a bias-free linear output layer (and its detached entropy).

    Saves the chunk's hidden states and per-token logsumexp; backward recomputes the logits and turns them into
    their own gradient in place (softmax, minus one-hot, times the incoming gradient): one (chunk x V) float32
    buffer instead of the ~4 of autograd through a checkpointed log-softmax + gather. Autocast is replayed in
    the backward matmuls. With ``keep`` the softmax is kept from the forward pass instead of recomputed.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, labels_N, temperature: float, with_entropy: bool, keep: bool):
        logits_NV, lse_N, logp_N = _label_logprobs(hidden_NH @ weight_VH.t(), labels_N, temperature)
        probs_NV = logits_NV.sub(lse_N.unsqueeze(-1)).exp_() if keep or with_entropy else None
        entropy_N = logp_N.new_zeros(0)
        if with_entropy:  # H = lse - sum p * logits (a batched dot product: no second buffer)
            entropy_N = lse_N - (probs_NV.unsqueeze(1) @ logits_NV.unsqueeze(2)).reshape(-1)
        ctx.probs = probs_NV if keep else None  # for the backward pass, which then needs no recomputation
        device = hidden_NH.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.temperature = temperature
        ctx.save_for_backward(hidden_NH, weight_VH, labels_N, lse_N)
        ctx.mark_non_differentiable(entropy_N)
        return logp_N, entropy_N

    @staticmethod
    def backward(ctx, grad_logp_N, _grad_entropy):
        hidden_NH, weight_VH, labels_N, lse_N = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        if ctx.probs is not None:
            probs_NV, ctx.probs = ctx.probs, None  # used up in place below: a second backward recomputes
        else:
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits_NV = (hidden_NH @ weight_VH.t()).float()
            if ctx.temperature != 1.0:
                logits_NV.div_(ctx.temperature)  # a fresh buffer: safe to change in place
            probs_NV = logits_NV.sub_(lse_N.unsqueeze(-1)).exp_()
        # d logp / d logits = onehot(label) - softmax; chain with the incoming gradient and 1 / temperature
        grad_NV = probs_NV.mul_(-grad_logp_N.unsqueeze(-1))
        grad_NV.scatter_add_(-1, labels_N.unsqueeze(-1), grad_logp_N.unsqueeze(-1).to(grad_NV.dtype))
        if ctx.temperature != 1.0:
            grad_NV.div_(ctx.temperature)
        grad_hidden = grad_weight = None
        if not enabled:  # e.g. a bf16 model without autocast: the matmuls run in the weights' dtype
            grad_NV = grad_NV.to(weight_VH.dtype)
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            if ctx.needs_input_grad[0]:
                grad_hidden = (grad_NV @ weight_VH).to(hidden_NH.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = (grad_NV.t() @ hidden_NH).to(weight_VH.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _plain_linear(head: torch.nn.Module) -> bool:
    """True when the output layer is an ordinary bias-free ``nn.Linear`` whose full weight is right there (not a
    LoRA / quantised wrapper, not sharded by FSDP or DeepSpeed ZeRO-3, no hooks that gather or change it)."""
    from torch.nn.modules import module as nn_module

    weight = getattr(head, "weight", None)
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and type(weight) is torch.nn.Parameter
        and type(weight.data) is torch.Tensor  # a DTensor (FSDP2) is a subclass
        and weight.shape == (head.out_features, head.in_features)
        and not hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter
        and not (head._forward_hooks or head._forward_pre_hooks)
        and not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)
    )


def _score(head, hidden_NH, labels_N, temperature: float, chunk_tokens: int, with_entropy) -> tuple:
    """Log-probs (N,) of ``labels_N`` under ``head(hidden_NH)``, chunk by chunk, and entropies if asked
    (``with_entropy="grad"``: differentiable ones, through the checkpointed chunk, not the fused layer)."""
    log_probs, entropies = [], []
    use_ckpt = torch.is_grad_enabled() and hidden_NH.requires_grad
    entropy_grad = with_entropy == "grad" and use_ckpt
    fused = use_ckpt and _plain_linear(head) and not entropy_grad
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        hidden_CH, labels_C = hidden_NH[start : start + chunk_tokens], labels_N[start : start + chunk_tokens]
        ent: list[torch.Tensor] | None = [] if with_entropy else None
        if entropy_grad:
            lp, ent_C = checkpoint(
                _head_chunk, head, hidden_CH, labels_C, temperature, True, use_reentrant=False
            )
            ent = [ent_C]
        elif fused:
            # the last chunk's backward runs first, at the memory peak: it keeps its softmax, saving a matmul
            last = start + chunk_tokens >= hidden_NH.shape[0]
            lp, ent_C = _LinearHeadLogprob.apply(
                hidden_CH, head.weight, labels_C, temperature, with_entropy, last
            )
            ent = [ent_C]
        elif use_ckpt:  # recompute this chunk's logits in backward instead of storing them: O(chunk x V)
            lp = checkpoint(_head_chunk, head, hidden_CH, labels_C, temperature, ent, use_reentrant=False)
        else:
            lp = _head_chunk(head, hidden_CH, labels_C, temperature, ent)
        log_probs.append(lp)
        entropies += ent or []
    log_probs_N = torch.cat(log_probs) if log_probs else hidden_NH.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return log_probs_N, None
    return log_probs_N, torch.cat(entropies) if entropies else log_probs_N.detach()


def _run_capturing_hidden(model, decoder: torch.nn.Module, **kwargs) -> torch.Tensor | None:
    """The decoder's final hidden states in ``model(**kwargs, logits_to_keep=1)``, or None without that kwarg."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(hook)
    try:
        model(logits_to_keep=1, **kwargs)
    except TypeError:
        return None
    finally:
        handle.remove()
    return captured.get("hidden")


def _checkpointed_layers(inner: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The layers that transformers checkpoints (``GradientCheckpointingLayer`` with checkpointing on; [] when
    nothing is checkpointed), or None when checkpointing is done otherwise: by older or remote modeling code
    without such layers, or with a function we cannot make non-reentrant (torch's ``checkpoint`` or a
    ``functools.partial`` of it, or of a wrapper taking ``use_reentrant`` such as transformers' offloading)."""
    flagged = [m for m in inner.modules() if getattr(m, "gradient_checkpointing", False)]
    layers = [m for m in flagged if hasattr(type(m), "_can_checkpoint_with_cache")]
    if flagged and not layers:
        return None
    for module in layers:
        func = module._gradient_checkpointing_func
        partial = isinstance(func, functools.partial)
        if not (
            func is checkpoint or partial and (func.func is checkpoint or "use_reentrant" in func.keywords)
        ):
            return None
    return layers


@contextlib.contextmanager
def _cache_through_checkpoints(model: torch.nn.Module):
    """While the shared-prompt passes run, checkpointed layers keep the cache and checkpoint non-reentrantly.

    transformers drops the cache in a checkpointed layer because replaying the layer in backward would write
    into it a second time; ours (``_replay_safe_cache``) gives a replay the same keys / values and stores
    nothing, which is what the layers' ``_can_checkpoint_with_cache`` is for. A reentrant checkpoint runs the
    forward without a graph and differentiates only positional inputs: the completions' gradient through the
    cached keys / values would never reach the prompt, so those layers use the non-reentrant checkpoint (same
    recomputation, same memory). Both are restored on exit; the backward replay needs neither.
    """
    layers = _checkpointed_layers(_unwrap(model)) or []
    saved = [
        (m, m._gradient_checkpointing_func, m.__dict__.get("_can_checkpoint_with_cache")) for m in layers
    ]
    for module, func, _ in saved:
        module._can_checkpoint_with_cache = True
        module._gradient_checkpointing_func = functools.partial(func, use_reentrant=False)
    try:
        yield
    finally:
        for module, func, flag in saved:
            module._gradient_checkpointing_func = func
            if flag is None:
                del module._can_checkpoint_with_cache
            else:
                module._can_checkpoint_with_cache = flag


def _can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether the shared-prompt forward is known to be exact here: a plain (or DDP / PEFT wrapped) decoder with
    sdpa or eager attention, unsharded weights, and activation checkpointing (if on) by transformers' layers."""
    from torch.nn.parallel import DistributedDataParallel

    if hasattr(model, "module") and not isinstance(model, DistributedDataParallel):
        return False  # DeepSpeed / FSDP1 engines: their forward does more than the module's
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if _checkpointed_layers(inner) is None:  # in eval too: old log-probs take the training pass's path
        _one_pass_instead("activation checkpointing here is not transformers' layers with torch's checkpoint")
        return False
    weight = next(inner.parameters(), None)
    return weight is not None and type(weight.data) is torch.Tensor and not hasattr(weight, "ds_id")


def _distinct_prompts(input_ids, attention_mask, valid_BT) -> tuple[torch.Tensor, ...] | None:
    """The layout ``_shared_prompt_hidden`` needs, or None: every row's scored positions are one run
    ``[p - 1, p - 1 + c)`` right after its prompt of ``p`` tokens (the layout of ``build_shifted_sequences``),
    attended up to its end, and some prompt is shared. Returns ``(prompts_UP, prompt_mask_UP, index_B,
    first_B, n_B)``: the U distinct prompts (right-padded), each row's prompt index, ``p - 1`` and ``c``."""
    B, T = input_ids.shape
    n_B = valid_BT.sum(1)  # completion tokens scored per row (c)
    first_B = valid_BT.int().argmax(1)  # p - 1: the last prompt position predicts the first completion token
    if bool((n_B == 0).any()) or bool((first_B == 0).any()):
        return None
    positions_T = torch.arange(T, device=input_ids.device)
    end_B1 = (first_B + n_B)[:, None]
    if not torch.equal((positions_T >= first_B[:, None]) & (positions_T < end_B1), valid_BT):
        return None
    if attention_mask is not None and not bool(((attention_mask != 0) | (positions_T >= end_B1)).all()):
        return None  # padding inside a prompt or a completion: not this layout
    prompt_len, ids = (first_B + 1).tolist(), input_ids.tolist()
    distinct: dict[tuple, int] = {}
    index = [distinct.setdefault(tuple(ids[b][: prompt_len[b]]), len(distinct)) for b in range(B)]
    if len(distinct) == B:
        return None
    prompts_UP = input_ids.new_zeros(len(distinct), max(prompt_len))
    for prompt, u in distinct.items():
        prompts_UP[u, : len(prompt)] = torch.tensor(prompt, dtype=input_ids.dtype)
    lengths_U1 = torch.tensor([len(prompt) for prompt in distinct], device=input_ids.device)[:, None]
    prompt_mask_UP = (torch.arange(prompts_UP.shape[1], device=input_ids.device) < lengths_U1).long()
    return prompts_UP, prompt_mask_UP, torch.tensor(index, device=input_ids.device), first_B, n_B


def _one_pass_instead(why: str) -> None:
    """Say why the shared-prompt forward steps aside (once per call site); the caller then runs one pass."""
    warnings.warn(f"share_prompts: {why}; running each row in one pass instead", stacklevel=3)


def _record_prompt(layer, key, value, *args, **kwargs):
    """Prompt pass: nothing comes before a prompt, so attention needs only its own keys / values; the first call
    keeps them for the completions, a checkpoint's replay in backward gets the same answer and stores nothing."""
    if layer.keys is None:
        layer.keys, layer.values, layer.is_initialized, layer.used = key, value, True, True
    return key, value


def _read_prefix(layer, key, value, *args, **kwargs):
    """Completion pass: the prompt's keys / values, then the completion's own; never stored, so a checkpoint's
    replay sees the cache as the forward saw it."""
    layer.used = True
    return torch.cat([layer.keys, key], dim=-2), torch.cat([layer.values, value], dim=-2)


def _replay_safe_cache(inner: torch.nn.Module, update, prefixes=None):
    """A ``DynamicCache`` for ``inner`` whose layers ``update`` through ``_record_prompt`` or ``_read_prefix``
    (starting from ``prefixes``), or None unless every layer is a plain full-attention ``DynamicLayer`` (its
    sliding-window, quantized, ... relatives would not be exact)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=inner.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return _one_pass_instead("the model's cache is not a plain full-attention DynamicCache")
    for i, layer in enumerate(cache.layers):
        layer.update = functools.partial(update, layer)
        if prefixes is not None:
            layer.keys, layer.values, layer.is_initialized = *prefixes[i], True
    return cache


def _pass_on_cache(model, forward_model, decoder, cache, **inputs) -> torch.Tensor | None:
    """The decoder's final hidden states of one pass of ``forward_model`` on our ``cache``, or None where the
    model did not use every cache layer (it would have dropped the prompt). ``use_cache=False``: the cache is
    ours, transformers need not build or return one (nor warn that checkpointing turns it off)."""
    # transformers >= 5.2x names it ``cache`` (``past_key_values`` deprecated), older versions only the latter
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    with _cache_through_checkpoints(model):
        hidden = _run_capturing_hidden(forward_model, decoder, **{name: cache}, use_cache=False, **inputs)
    if hidden is not None and not all(getattr(layer, "used", False) for layer in cache.layers):
        return _one_pass_instead("the model did not use the key / value cache it was given")
    return hidden


def _shared_prompt_hidden(model, decoder, input_ids, attention_mask, valid_BT) -> torch.Tensor | None:
    """Final hidden states at the scored positions (K, H), row-major, with each distinct prompt run once.

    Under causal attention a prompt's hidden states and keys / values do not depend on what follows it: they are
    indexed out to the rows that share the prompt (backward sums their gradients into the one prompt pass) and
    the completions continue on them at explicit positions. Same numbers as one pass up to rounding, with
    ``1 - 1/rows_per_prompt`` of the prompt's decoder work saved. None (the caller runs one pass) for another
    layout or cache.
    """
    layout = _distinct_prompts(input_ids, attention_mask, valid_BT)
    prompt_cache = None if layout is None else _replay_safe_cache(_unwrap(model), _record_prompt)
    if prompt_cache is None:
        return None
    prompts_UP, prompt_mask_UP, index_B, first_B, n_B = layout
    prompt_model = model.module if hasattr(model, "module") else model  # DDP: one wrapped forward per step
    hidden_UPH = _pass_on_cache(
        model, prompt_model, decoder, prompt_cache, input_ids=prompts_UP, attention_mask=prompt_mask_UP
    )
    if hidden_UPH is None:
        return None
    pieces = [hidden_UPH[index_B, first_B].unsqueeze(1)]  # (B, 1, H): each row's last prompt token
    C = int(n_B.max())
    if C > 1:  # the completions, each on its prompt's keys / values (U -> B rows), at explicit positions
        prefixes = [(layer.keys[index_B], layer.values[index_B]) for layer in prompt_cache.layers]
        cache = _replay_safe_cache(_unwrap(model), _read_prefix, prefixes)
        positions_BC = first_B[:, None] + 1 + torch.arange(C - 1, device=input_ids.device)  # (B, C - 1)
        ids_BC = input_ids.gather(1, positions_BC.clamp(max=input_ids.shape[1] - 1))
        mask_BC = (positions_BC < (first_B + n_B)[:, None]).long()
        inputs = {"input_ids": ids_BC, "attention_mask": torch.cat([prompt_mask_UP[index_B], mask_BC], 1)}
        hidden_BCH = _pass_on_cache(model, model, decoder, cache, position_ids=positions_BC, **inputs)
        if hidden_BCH is None:
            return None
        pieces.append(hidden_BCH)
    keep_BC = torch.arange(C, device=input_ids.device) < n_B[:, None]
    return torch.cat(pieces, 1)[keep_BC]


def _scored_positions(labels_BT, vocab: int | None, logprob_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid_N, labels_N): where a log-prob is wanted (a label in [0, vocab) inside ``logprob_mask``) and the
    labels, 0 elsewhere (a safe index)."""
    labels_N = labels_BT.reshape(-1)
    valid_N = labels_N >= 0 if vocab is None else (labels_N >= 0) & (labels_N < vocab)
    if logprob_mask is not None:
        valid_N = valid_N & logprob_mask.reshape(-1).to(valid_N.device, torch.bool)
    return valid_N, torch.where(valid_N, labels_N, torch.zeros_like(labels_N))


def _to_rows(scores, keep_K: torch.Tensor | None, valid_N: torch.Tensor, B: int, T: int) -> dict:
    """(log-probs, entropies or None) at the scored positions ``keep_K`` (None: all) -> (B, T), 0 elsewhere."""

    def rows(values_K: torch.Tensor) -> torch.Tensor:
        if keep_K is None:
            return (values_K * valid_N).reshape(B, T)
        return values_K.new_zeros(B * T).index_copy(0, keep_K, values_K).reshape(B, T)

    return {name: rows(v) for name, v in zip(("log_probs", "token_entropy"), scores) if v is not None}


def _hidden_at(model, decoder, input_ids, attention_mask, valid_N, keep_K, share: bool, kwargs: dict):
    """Final hidden states (K, H) at the scored positions, row-major: from the shared-prompt forward when
    ``share`` and it applies, else from one pass; None when the forward does not take ``logits_to_keep``."""
    B, T = input_ids.shape
    if share:
        hidden_KH = _shared_prompt_hidden(model, decoder, input_ids, attention_mask, valid_N.reshape(B, T))
        if hidden_KH is not None:
            return hidden_KH
    hidden_BTH = _run_capturing_hidden(
        model, decoder, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    )
    if hidden_BTH is None:
        return None
    hidden_NH = hidden_BTH.reshape(B * T, -1)
    return hidden_NH if keep_K is None else hidden_NH.index_select(0, keep_K)


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool | str = False,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logprob_mask: torch.Tensor | None = None,
    share_prompts: bool = False,
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """Per-token ``log p(labels | input_ids)`` (B, T) under ``model``, plus token entropy (B, T) if asked
    (detached; ``return_token_entropy="grad"``: with its gradient).

    ``labels[:, t]`` is the token predicted at position t (``tokenize_prompt_and_output``'s layout);
    ``temperature`` divides the logits, as the sampler did. Only positions inside ``logprob_mask`` (B, T) with a
    label in [0, V) are scored; the others get 0 without running the output layer. ``share_prompts``: rows
    with the same prompt (the tokens before their ``logprob_mask`` run) run it through the decoder once.
    ``model_kwargs`` (e.g. ``position_ids`` of packed sequences) go to the model forward.
    """
    found = _decoder_and_head(model)
    if found is not None:
        decoder, head = found
        # the vocabulary of a plain nn.Linear (never a shard here: _decoder_and_head)
        valid_N, labels_N = _scored_positions(labels, getattr(head, "out_features", None), logprob_mask)
        # (K,) positions to score; None: all of them (a fully masked batch too, so the graph stays connected)
        keep_K = None
        if bool(valid_N.any()) and not bool(valid_N.all()):
            keep_K = valid_N.nonzero().squeeze(1)
            labels_N = labels_N.index_select(0, keep_K)  # (K,)
        share = share_prompts and logprob_mask is not None and not model_kwargs and _can_share_prompts(model)
        hidden_KH = _hidden_at(
            model, decoder, input_ids, attention_mask, valid_N, keep_K, share, model_kwargs
        )
        if hidden_KH is not None:
            scores = _score(head, hidden_KH, labels_N, temperature, chunk_tokens, return_token_entropy)
            return _to_rows(scores, keep_K, valid_N, *input_ids.shape)
    # no separable decoder, or a forward without logits_to_keep: full logits, still reduced chunk by chunk
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
    return log_probs_from_logits(logits, labels, return_token_entropy, temperature, chunk_tokens)
