"""The shared-prompt forward (``get_response_log_probs(..., share_prompts=True)``) gives the same log-probs,
entropies and gradients as the one-pass forward, and falls back to it wherever it cannot be exact."""

import pytest
import torch

from hf_align.data import build_shifted_sequences
from hf_align.logprobs import _can_share_prompts, _shared_prompt_hidden, _unwrap, get_response_log_probs
from tests.conftest import build_model


def _rollout_batch(V: int, groups: list[tuple[int, list[int]]], seed: int = 0):
    """Rows in GRPO's layout: for each (prompt length, completion lengths) one random prompt shared by its
    completions, right-padded and shifted (``build_shifted_sequences``)."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for prompt_len, lengths in groups:
        prompt = torch.randint(3, V, (prompt_len,), generator=g).tolist()
        for n in lengths:
            prompts.append(prompt)
            completions.append(torch.randint(3, V, (n,), generator=g).tolist())
    return build_shifted_sequences(prompts, completions, pad_token_id=0)


def _run(model, b, share: bool, weights=None, **kw):
    model.zero_grad()
    out = get_response_log_probs(
        model,
        b["input_ids"],
        b["labels"],
        return_token_entropy=True,
        attention_mask=b["attention_mask"],
        logprob_mask=b["response_mask"],
        share_prompts=share,
        **kw,
    )
    if torch.is_grad_enabled():
        w = weights if weights is not None else torch.linspace(0.2, 1.0, out["log_probs"].shape[1])
        (out["log_probs"] * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


# two groups with different prompt lengths and ragged completions (including a 1-token completion), one group
# of a single row (nothing to share for it), interleaved order is not needed: rows of a group are adjacent
SHAPES = [(7, [5, 3, 1, 5]), (4, [6, 2]), (9, [4])]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompts_match_one_pass(tokenizer, attn, temperature):
    model = build_model(tokenizer, num_layers=3)
    model.config._attn_implementation = attn
    model.train()
    b = _rollout_batch(model.config.vocab_size, SHAPES)
    want, want_grads = _run(model, b, share=False, temperature=temperature)
    got, got_grads = _run(model, b, share=True, temperature=temperature)
    mask = b["response_mask"]
    assert mask.sum() == sum(sum(lengths) for _, lengths in SHAPES)
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["token_entropy"], want["token_entropy"], atol=2e-5, rtol=1e-5)
    assert (got["log_probs"][~mask] == 0).all() and (got["log_probs"][mask] != 0).all()
    assert got_grads.keys() == want_grads.keys()
    for n, grad in want_grads.items():
        torch.testing.assert_close(got_grads[n], grad, atol=2e-5, rtol=1e-4, msg=n)


def test_shared_prompts_no_grad_and_prompt_run_once(tokenizer):
    """Under no_grad (old / reference log-probs) too; the decoder sees each distinct prompt once."""
    model = build_model(tokenizer)
    b = _rollout_batch(model.config.vocab_size, SHAPES, seed=1)
    seen: list[tuple[int, ...]] = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        want, _ = _run(model, b, share=False)
        got, _ = _run(model, b, share=True)
    handle.remove()
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=2e-5, rtol=1e-5)
    B, T = b["input_ids"].shape
    # one-pass: (B, T); shared: 3 distinct prompts of up to 9 tokens, then B completions of up to 6 - 1 tokens
    assert seen == [(B, T), (3, 9), (B, 5)]


def test_hidden_is_none_where_sharing_cannot_apply(tokenizer):
    model = build_model(tokenizer)
    decoder = model.get_decoder()
    V = model.config.vocab_size
    distinct = _rollout_batch(V, [(5, [3]), (6, [2]), (4, [4])])  # no prompt shared
    assert _shared_prompt_hidden(model, decoder, distinct["input_ids"], distinct["attention_mask"],
                                 distinct["response_mask"]) is None  # fmt: skip
    b = _rollout_batch(V, SHAPES)
    holes = b["response_mask"].clone()
    holes[0, 7] = False  # scored positions not one run after the prompt
    assert _shared_prompt_hidden(model, decoder, b["input_ids"], b["attention_mask"], holes) is None
    left_padded = b["attention_mask"].clone()
    left_padded[0, 0] = 0  # padding inside a prompt
    assert _shared_prompt_hidden(model, decoder, b["input_ids"], left_padded, b["response_mask"]) is None
    no_prompt = b["response_mask"].clone()
    no_prompt[:, 0] = True  # a row scored from position 0 has no prompt to share
    no_prompt[0, 1:] = False
    assert _shared_prompt_hidden(model, decoder, b["input_ids"], b["attention_mask"], no_prompt) is None


def _enable_checkpointing(model, reentrant: bool, api: str = "activation") -> None:
    kwargs = {"use_reentrant": reentrant}
    if api == "activation":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _decoder_calls(model) -> tuple[list, object]:
    """The input shapes of every decoder forward (how many passes ran, over what), and the hook's handle."""
    seen: list[tuple[int, ...]] = []
    handle = (
        _unwrap(model)
        .get_decoder()
        .register_forward_pre_hook(
            lambda _m, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )
    )
    return seen, handle


def _assert_same(got, want, got_grads, want_grads):
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["token_entropy"], want["token_entropy"], atol=2e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for n, grad in want_grads.items():
        torch.testing.assert_close(got_grads[n], grad, atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize(
    ("reentrant", "api"), [(False, "activation"), (True, "activation"), (True, "gradient")]
)
def test_gradient_checkpointing_shares_prompts_exactly(tokenizer, reentrant, api):
    """Under activation checkpointing (non-reentrant and reentrant, by either transformers entry point) the
    shared-prompt forward runs (each distinct prompt once) and gives the one-pass forward's log-probs, entropies
    and gradients: a cache written twice by the backward replay, or completions' gradient through the cached
    keys / values not reaching the prompt (what a reentrant checkpoint does), would break the equality."""
    model = build_model(tokenizer, num_layers=3)
    _enable_checkpointing(model, reentrant, api)
    model.train()
    b = _rollout_batch(model.config.vocab_size, SHAPES, seed=2)
    B, T = b["input_ids"].shape
    seen, handle = _decoder_calls(model)
    want, want_grads = _run(model, b, share=False)
    got, got_grads = _run(model, b, share=True)
    with torch.no_grad():  # old / reference log-probs: no checkpointing runs, same path
        got_no_grad, _ = _run(model, b, share=True)
    handle.remove()
    assert seen == [(B, T), (3, 9), (B, 5), (3, 9), (B, 5)]
    _assert_same(got, want, got_grads, want_grads)
    torch.testing.assert_close(got_no_grad["log_probs"], want["log_probs"], atol=2e-5, rtol=1e-5)
    # the layers' checkpointing is the user's again (reentrant stays reentrant), and cache-free
    for layer in model.model.layers:
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": reentrant}
        assert "_can_checkpoint_with_cache" not in vars(layer) and not layer._can_checkpoint_with_cache


def test_foreign_checkpoint_function_falls_back_to_one_pass(tokenizer):
    """A checkpoint function that is not torch's (nor a partial of it) cannot be made non-reentrant: sharing
    steps aside with a warning and the one pass runs (same numbers, each row through the decoder whole)."""
    from torch.utils.checkpoint import checkpoint

    model = build_model(tokenizer)
    _enable_checkpointing(model, reentrant=False)
    for layer in model.model.layers:
        layer._gradient_checkpointing_func = lambda fn, *args: checkpoint(fn, *args, use_reentrant=False)
    model.train()
    b = _rollout_batch(model.config.vocab_size, SHAPES, seed=4)
    seen, handle = _decoder_calls(model)
    want, want_grads = _run(model, b, share=False)
    with pytest.warns(UserWarning, match="one pass instead"):
        got, got_grads = _run(model, b, share=True)
    handle.remove()
    assert seen == [tuple(b["input_ids"].shape)] * 2
    _assert_same(got, want, got_grads, want_grads)


@pytest.mark.parametrize("checkpointing", [None, False, True])  # off, non-reentrant, reentrant
def test_peft_model_shares_prompts(tokenizer, checkpointing):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    if checkpointing is not None:
        _enable_checkpointing(model, reentrant=checkpointing, api="gradient")
    model.train()
    assert _can_share_prompts(model)  # so the comparison below really runs the shared path
    b = _rollout_batch(model.config.vocab_size, SHAPES, seed=3)
    seen, handle = _decoder_calls(model)
    want, want_grads = _run(model, b, share=False)
    got, got_grads = _run(model, b, share=True)
    handle.remove()
    assert len(seen) == 3  # one pass, then a prompt pass and a completion pass
    assert want_grads and all("lora" in n for n in want_grads)
    _assert_same(got, want, got_grads, want_grads)
