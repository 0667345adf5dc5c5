"""The only place that turns logits into per-token log-probabilities and entropies.

Choices:
- Per-token log-probs are ``logit[label] - logsumexp(logits)`` computed in float32 over chunks of the
  sequence. We never build a (B, T, V) log-softmax: at Qwen's vocabulary (151,936) that tensor alone is
  ~0.6 MB per token in fp32.
- ``get_response_log_probs`` goes one step further: it captures the decoder's final hidden states (B, T, H)
  with a forward hook, asks the model for only one position of logits (``logits_to_keep=1``), and applies the
  output layer chunk by chunk under activation checkpointing. Peak extra memory then scales with the chunk
  (chunk x V), in the forward *and* the backward pass, instead of B x T x V. The forward still runs through
  the (possibly DDP / FSDP / DeepSpeed wrapped) model, so gradient synchronisation and parameter gathering
  behave as in a plain forward.
- The output layer only runs where a log-prob is wanted: positions whose label is ignored (-100) or outside
  the optional ``logprob_mask`` (e.g. GRPO's response mask: prompt positions are never used) are skipped and
  get log-prob 0 (and entropy 0). On a 128-prompt / 256-completion rollout that is a third of the head's work.
- With an ordinary linear output layer (the common case; not under FSDP / ZeRO-3 sharding or a LoRA'd head)
  the chunk goes through a small autograd function instead of checkpointing: it keeps only the per-token
  logsumexp and rebuilds the logits' gradient in place in the backward pass (one chunk-sized buffer instead of
  about four). Anything else takes the checkpointed path.
- ``share_prompts``: rows with the same prompt (a GRPO group, a DPO pair) run the prompt through the decoder
  once and continue each row on its key/value cache (``_shared_prompt_hidden``). Causal attention makes this
  exact up to float rounding; it saves ``1 - 1/rows_per_prompt`` of the prompt's decoder work, forward and
  backward, and its activations. Where it is not known to be exact (gradient checkpointing, sharded or
  engine-wrapped models, other attention kernels or caches) one pass is used.
- Token entropy, when asked, comes from the same logits chunk as the log-probs (no second pass through the
  output layer); it is detached, and not recomputed when activation checkpointing recomputes the chunk.
- Models that do not expose a decoder or do not accept ``logits_to_keep`` fall back to full logits, still
  reduced chunk by chunk.
- ``masked_mean`` / ``masked_normalize`` accept bool or 0/1 masks. ``masked_mean`` of a fully masked slice
  is NaN (0/0, the seed's contract); losses and metrics reduce with ``masked_mean_or_zero``, which gives 0
  there, because a padding row or an empty completion must never poison a loss.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256


def _masked_sum_and_count(
    tensor: torch.Tensor, mask: torch.Tensor, dim: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = mask.to(tensor.dtype)
    if dim is None:
        return (tensor * mask).sum(), mask.sum()
    return (tensor * mask).sum(dim=dim), mask.sum(dim=dim)


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``tensor`` over entries where ``mask`` is true, along ``dim`` (all entries when None).

    The seed's contract: a slice with no true entry is 0/0 = NaN. Losses and metrics that may meet an
    empty row (a zero-length completion) use ``masked_mean_or_zero`` instead.
    """
    total, count = _masked_sum_and_count(tensor, mask, dim)
    return total / count


def masked_mean_or_zero(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``masked_mean``, except that a slice with no true entry has mean 0 (never NaN, zero gradient)."""
    total, count = _masked_sum_and_count(tensor, mask, dim)
    return total / count.clamp(min=1.0)


def masked_normalize(
    tensor: torch.Tensor,
    mask: torch.Tensor,
    normalize_constant: float = 1.0,
    dim: int | None = None,
) -> torch.Tensor:
    """Sum of ``tensor`` over entries where ``mask`` is true, divided by ``normalize_constant``."""
    masked = tensor * mask.to(tensor.dtype)
    total = masked.sum() if dim is None else masked.sum(dim=dim)
    return total / normalize_constant


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution, (..., V) -> (...), in float32.

    H = logsumexp(z) - sum_v softmax(z)_v z_v, which never exponentiates an unshifted logit.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return lse - (probs * logits).sum(dim=-1)


def _label_logprobs_and_entropy(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits_NV = logits_NV.float()
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    label_logit_N = logits_NV.gather(-1, labels_N.unsqueeze(-1)).squeeze(-1)
    entropy_N = None
    if with_entropy:
        with torch.no_grad():
            entropy_N = compute_entropy(logits_NV)
    return label_logit_N - lse_N, entropy_N


def log_probs_from_logits(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    return_token_entropy: bool = False,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, torch.Tensor]:
    """Per-token log p(label) from logits that already exist, reduced ``chunk_tokens`` tokens at a time.

    Labels outside [0, V) (e.g. -100 padding) get log-prob 0; mask them out downstream.
    """
    B, T, V = logits_BTV.shape
    logits_NV = logits_BTV.reshape(B * T, V)  # (B*T, V)
    labels_N = labels_BT.reshape(B * T)
    valid_N = (labels_N >= 0) & (labels_N < V)
    safe_labels_N = torch.where(valid_N, labels_N, torch.zeros_like(labels_N))
    logps, entropies = [], []
    for start in range(0, B * T, chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        lp, ent = _label_logprobs_and_entropy(
            logits_NV[sl], safe_labels_N[sl], temperature, return_token_entropy
        )
        logps.append(lp)
        entropies.append(ent)
    logps_N = torch.cat(logps) if logps else logits_NV.new_zeros(0, dtype=torch.float32)
    out = {"log_probs": (logps_N * valid_N).reshape(B, T)}
    if return_token_entropy:
        out["token_entropy"] = torch.cat(entropies).reshape(B, T) if entropies else out["log_probs"].detach()
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed (``.module``) and PEFT (``get_base_model``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    inner = _unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is inner:
        return None
    return decoder, head


def _head_chunk(
    head: torch.nn.Module,
    hidden_NH: torch.Tensor,
    labels_N: torch.Tensor,
    temperature: float,
    entropy_out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Log-probs of one chunk; its entropy is appended to ``entropy_out`` if that list is still empty (so the
    recomputation in a checkpointed backward pass does not compute it again)."""
    with_entropy = entropy_out is not None and not entropy_out
    logp, entropy = _label_logprobs_and_entropy(head(hidden_NH), labels_N, temperature, with_entropy)
    if with_entropy:
        entropy_out.append(entropy)
    return logp


class _LinearHeadLogprob(torch.autograd.Function):
    """log p(label) of one chunk through a bias-free linear output layer (and its detached entropy).

    Saves only the chunk's hidden states and per-token logsumexp; the backward pass recomputes the chunk's
    logits and turns them into their own gradient in place (softmax, minus one-hot, times the incoming
    gradient), so one (chunk x V) float32 buffer is alive at a time instead of the ~4 that autograd through a
    checkpointed log-softmax + gather holds. Autocast state is replayed in the backward matmuls. With ``keep``
    (the last chunk: its backward runs first, when recomputing would allocate the same buffer) the softmax is
    kept from the forward pass instead, which saves one matmul at no extra peak memory.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, labels_N, temperature: float, with_entropy: bool, keep: bool):
        logits_NV = (hidden_NH @ weight_VH.t()).float()
        if temperature != 1.0:
            logits_NV = logits_NV / temperature
        lse_N = torch.logsumexp(logits_NV, dim=-1)
        logp_N = logits_NV.gather(-1, labels_N.unsqueeze(-1)).squeeze(-1) - lse_N
        entropy_N = logp_N.new_zeros(0)
        ctx.probs = None
        if keep:  # softmax kept for the backward pass, which then needs no recomputation
            probs_NV = logits_NV.sub(lse_N.unsqueeze(-1)).exp_()
            if with_entropy:  # H = lse - sum p * logits (a batched dot product: no second buffer)
                entropy_N = lse_N - (probs_NV.unsqueeze(1) @ logits_NV.unsqueeze(2)).reshape(-1)
            ctx.probs = probs_NV
        elif with_entropy:  # H = lse - sum p * logits, with p = exp(logits - lse) built in place
            entropy_N = lse_N - logits_NV.sub(lse_N.unsqueeze(-1)).exp_().mul_(logits_NV).sum(-1)
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


def _run_capturing_hidden(model, decoder: torch.nn.Module, **kwargs):
    """Run ``model(**kwargs, logits_to_keep=1)``; return (its output, the decoder's final hidden states), or
    None when the forward does not take ``logits_to_keep``."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    handle = decoder.register_forward_hook(hook)
    try:
        out = model(logits_to_keep=1, **kwargs)
    except TypeError:
        return None
    finally:
        handle.remove()
    return (out, captured["hidden"]) if "hidden" in captured else None


def _can_share_prompts(model: torch.nn.Module) -> bool:
    """Whether the two-pass shared-prompt forward is known to be exact for this model: a plain (or DDP /
    PEFT wrapped) decoder with sdpa or eager attention, unsharded weights, and no gradient checkpointing
    (transformers' checkpointed layers drop the cache in training; in eval the one-pass path is kept as well, so
    a ratio loss compares log-probs computed the same way)."""
    from torch.nn.parallel import DistributedDataParallel

    if hasattr(model, "module") and not isinstance(model, DistributedDataParallel):
        return False  # DeepSpeed / FSDP1 engines: their forward does more than the module's
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    checkpointing = getattr(inner, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(inner, "is_gradient_checkpointing", False)
    if checkpointing:  # in eval too, so old log-probs and the training pass take the same path
        return False
    weight = next(inner.parameters(), None)
    return weight is not None and type(weight.data) is torch.Tensor and not hasattr(weight, "ds_id")


def _shared_prompt_hidden(
    model: torch.nn.Module,
    decoder: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    valid_BT: torch.Tensor,
) -> torch.Tensor | None:
    """Final hidden states at the scored positions (K, H), in row-major order, running each distinct prompt
    through the decoder once.

    GRPO scores ``group_size`` completions of the same prompt. Causal attention means a prompt's hidden
    states and keys / values do not depend on what follows it, so the prompt is run once per distinct prompt
    (``use_cache=True``), its cache is indexed out to every row that shares it (an ``index_select``, so the
    backward pass sums the rows' gradients into the one prompt pass), and the completions run on top of it
    with explicit positions. Same numbers as the one-pass forward up to float rounding; ``1 - 1/group_size`` of
    the prompt tokens' decoder work (forward and backward) is saved.

    Needs each row's scored positions to be one run ``[p - 1, p - 1 + c)`` right after a prompt of ``p``
    tokens (the layout of ``build_shifted_sequences``) with attention on every token up to it. Returns None
    (caller uses the one-pass forward) when the layout is different, no prompt is shared, or the model's cache
    is not a plain full-attention cache.
    """
    from transformers.cache_utils import DynamicLayer

    B, T = input_ids.shape
    n_B = valid_BT.sum(1)  # completion tokens scored per row (c)
    first_B = valid_BT.int().argmax(1)  # p - 1: the last prompt position predicts the first completion token
    if bool((n_B == 0).any()) or bool((first_B == 0).any()):
        return None
    positions_T = torch.arange(T, device=input_ids.device)
    run_BT = (positions_T >= first_B[:, None]) & (positions_T < (first_B + n_B)[:, None])
    if not torch.equal(run_BT, valid_BT):
        return None
    if attention_mask is not None and not bool(
        ((attention_mask != 0) | (positions_T >= (first_B + n_B)[:, None])).all()
    ):
        return None  # padding inside a prompt or a completion: not this layout
    prompt_len = (first_B + 1).tolist()
    ids = input_ids.tolist()
    rows = [tuple(ids[b][: prompt_len[b]]) for b in range(B)]
    distinct: dict[tuple, int] = {}
    index_B = torch.tensor([distinct.setdefault(r, len(distinct)) for r in rows], device=input_ids.device)
    if len(distinct) == B:
        return None
    U, P = len(distinct), max(prompt_len)
    prompt_UP = input_ids.new_zeros(U, P)
    prompt_mask_UP = input_ids.new_zeros(U, P)
    for r, u in distinct.items():
        prompt_UP[u, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        prompt_mask_UP[u, : len(r)] = 1
    inner = model.module if hasattr(model, "module") else model  # DDP: one wrapped forward per step
    ran = _run_capturing_hidden(
        inner, decoder, input_ids=prompt_UP, attention_mask=prompt_mask_UP, use_cache=True
    )
    if ran is None:
        return None
    out, hidden_UPH = ran
    cache = getattr(out, "past_key_values", None)
    if cache is None or any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None  # sliding-window, linear-attention, ... caches: not known to continue exactly
    last_BH = hidden_UPH[index_B, first_B]  # hidden state of each row's last prompt token
    C = int(n_B.max())
    pieces = [last_BH.unsqueeze(1)]
    if C > 1:
        cache.reorder_cache(index_B)  # (U, ...) -> (B, ...), differentiable
        offsets_C = torch.arange(C - 1, device=input_ids.device)
        take_BC = (first_B[:, None] + 1 + offsets_C).clamp(max=T - 1)
        completion_mask_BC = (offsets_C < (n_B - 1)[:, None]).long()
        ran = _run_capturing_hidden(
            model,
            decoder,
            input_ids=input_ids.gather(1, take_BC),
            attention_mask=torch.cat([prompt_mask_UP.index_select(0, index_B), completion_mask_BC], 1),
            position_ids=first_B[:, None] + 1 + offsets_C,
            past_key_values=cache,
            use_cache=True,
        )
        if ran is None:
            return None
        pieces.append(ran[1])
    hidden_BCH = torch.cat(pieces, 1)
    keep_BC = torch.arange(C, device=input_ids.device) < n_B[:, None]
    return hidden_BCH[keep_BC]


def _score(
    head: torch.nn.Module,
    hidden_NH: torch.Tensor,
    labels_N: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (N,) of ``labels_N`` under ``head(hidden_NH)``, chunk by chunk, and entropies if asked."""
    logps, entropies = [], []
    use_ckpt = torch.is_grad_enabled() and hidden_NH.requires_grad
    fused = use_ckpt and _plain_linear(head)
    for start in range(0, hidden_NH.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        ent: list[torch.Tensor] | None = [] if with_entropy else None
        if fused:
            # The last chunk's backward runs first, at the memory peak, where recomputing would allocate the
            # same buffer anyway: keep its softmax instead and save that matmul. Earlier chunks recompute.
            last = start + chunk_tokens >= hidden_NH.shape[0]
            lp, entropy = _LinearHeadLogprob.apply(
                hidden_NH[sl], head.weight, labels_N[sl], temperature, with_entropy, last
            )
            ent = [entropy] if with_entropy else None
        elif use_ckpt:
            # Recompute this chunk's logits in backward instead of storing them: memory stays O(chunk x V).
            lp = checkpoint(
                _head_chunk, head, hidden_NH[sl], labels_N[sl], temperature, ent, use_reentrant=False
            )
        else:
            lp = _head_chunk(head, hidden_NH[sl], labels_N[sl], temperature, ent)
        logps.append(lp)
        if ent is not None:
            entropies.append(ent[0])
    logps_N = torch.cat(logps) if logps else hidden_NH.new_zeros(0, dtype=torch.float32)
    if not with_entropy:
        return logps_N, None
    return logps_N, torch.cat(entropies) if entropies else logps_N.detach()


def get_response_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    return_token_entropy: bool = False,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logprob_mask: torch.Tensor | None = None,
    share_prompts: bool = False,
    **model_kwargs,
) -> dict[str, torch.Tensor]:
    """Per-token ``log p(labels | input_ids)`` (B, T) under ``model``, plus token entropy (B, T) if asked.

    ``labels`` are already aligned with ``input_ids`` (labels[:, t] is the token predicted at position t),
    as produced by ``tokenize_prompt_and_output``. ``temperature`` divides the logits first, matching a
    sampler that used the same temperature. ``logprob_mask`` (B, T), optional: only these positions are
    scored (e.g. the response mask); the others, like labels outside [0, V), get log-prob 0 and entropy 0
    without running the output layer on them. ``share_prompts``: rows whose prompts (the tokens before their
    ``logprob_mask`` run) are identical run that prompt through the decoder once (see
    ``_shared_prompt_hidden``; it falls back to one pass where that is not known to be exact). Extra
    ``model_kwargs`` (e.g. ``position_ids`` for packed sequences) go to the model forward.
    """

    def full_logits() -> dict[str, torch.Tensor]:  # models without a separable decoder / logits_to_keep
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
        ).logits
        return log_probs_from_logits(logits, labels, return_token_entropy, temperature, chunk_tokens)

    found = _decoder_and_head(model)
    if found is None:
        return full_logits()
    decoder, head = found
    B, T = input_ids.shape
    labels_N = labels.reshape(B * T)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else None
    valid_N = labels_N >= 0 if vocab is None else (labels_N >= 0) & (labels_N < vocab)
    if logprob_mask is not None:
        valid_N = valid_N & logprob_mask.reshape(B * T).to(valid_N.device, torch.bool)
    labels_N = torch.where(valid_N, labels_N, torch.zeros_like(labels_N))
    # (K,) positions to score; None: all of them (a fully masked batch too, so the graph stays connected)
    keep_K = None
    if bool(valid_N.any()) and not bool(valid_N.all()):
        keep_K = valid_N.nonzero().squeeze(1)
        labels_N = labels_N.index_select(0, keep_K)  # (K,)
    hidden_KH = None  # (K, H): the final hidden states at the scored positions, in row-major order
    if share_prompts and logprob_mask is not None and not model_kwargs and _can_share_prompts(model):
        hidden_KH = _shared_prompt_hidden(model, decoder, input_ids, attention_mask, valid_N.reshape(B, T))
    if hidden_KH is None:
        ran = _run_capturing_hidden(
            model,
            decoder,
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **model_kwargs,
        )
        if ran is None:  # the model's forward does not take logits_to_keep
            return full_logits()
        hidden_NH = ran[1].reshape(B * T, -1)
        hidden_KH = hidden_NH if keep_K is None else hidden_NH.index_select(0, keep_K)
    logps_K, ent_K = _score(head, hidden_KH, labels_N, temperature, chunk_tokens, return_token_entropy)
    out = {"log_probs": _scatter(logps_K, keep_K, valid_N).reshape(B, T)}
    if return_token_entropy:
        out["token_entropy"] = _scatter(ent_K, keep_K, valid_N).reshape(B, T)
    return out


def _scatter(values_K: torch.Tensor, keep_K: torch.Tensor | None, valid_N: torch.Tensor) -> torch.Tensor:
    """Values at the scored positions -> (N,) with 0 elsewhere (index_copy is differentiable in its source)."""
    if keep_K is None:
        return values_K * valid_N
    return values_K.new_zeros(valid_N.shape[0]).index_copy(0, keep_K, values_K)
