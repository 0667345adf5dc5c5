import math

import pytest
import torch

from hf_align.logprobs import (
    compute_entropy,
    get_response_log_probs,
    log_probs_from_logits,
    masked_mean,
    masked_mean_or_zero,
    masked_normalize,
)

# ---------------------------------------------------------------- masked_mean / masked_normalize

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M_BOOL = torch.tensor([[True, False, True], [False, False, False]])
M_INT = M_BOOL.long()


@pytest.mark.parametrize("mask", [M_BOOL, M_INT, M_BOOL.float()], ids=["bool", "int", "float"])
def test_masked_mean_by_hand(mask):
    assert masked_mean(X, mask).item() == pytest.approx((1 + 3) / 2)
    # dim=1 (== -1): row 0 -> (1+3)/2; row 1 is fully masked -> 0/0 = NaN (the seed's contract)
    nan = float("nan")
    torch.testing.assert_close(masked_mean(X, mask, dim=1), torch.tensor([2.0, nan]), equal_nan=True)
    torch.testing.assert_close(masked_mean(X, mask, dim=-1), torch.tensor([2.0, nan]), equal_nan=True)
    # dim=0: column 0 -> 1, column 1 -> nothing -> NaN, column 2 -> 3
    torch.testing.assert_close(masked_mean(X, mask, dim=0), torch.tensor([1.0, nan, 3.0]), equal_nan=True)
    # the losses' reduction: the same means, 0 where nothing is unmasked
    torch.testing.assert_close(masked_mean_or_zero(X, mask, dim=1), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(masked_mean_or_zero(X, mask, dim=0), torch.tensor([1.0, 0.0, 3.0]))
    assert masked_mean_or_zero(X, mask).item() == pytest.approx(2.0)


def test_masked_mean_all_masked_is_nan_and_or_zero_is_zero():
    assert torch.isnan(masked_mean(X, torch.zeros_like(M_BOOL))).item()
    x = X.clone().requires_grad_()
    out = masked_mean_or_zero(x, torch.zeros_like(M_BOOL))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(X))


def test_masked_mean_matches_naive_reference():
    torch.manual_seed(0)
    t = torch.randn(5, 7)
    m = torch.rand(5, 7) > 0.4
    m[2] = False
    for dim in (None, 0, 1, -1):
        got = masked_mean(t, m, dim=dim)
        if dim is None:
            want = t[m].mean()
        else:
            rows = t.transpose(0, 1) if dim == 0 else t
            rmask = m.transpose(0, 1) if dim == 0 else m
            want = torch.stack([r[k].mean() for r, k in zip(rows, rmask)])  # empty row: mean of nothing, NaN
        torch.testing.assert_close(got, want, equal_nan=True)
        torch.testing.assert_close(masked_mean_or_zero(t, m, dim=dim), torch.nan_to_num(want, nan=0.0))


@pytest.mark.parametrize("mask", [M_BOOL, M_INT], ids=["bool", "int"])
def test_masked_normalize_by_hand(mask):
    assert masked_normalize(X, mask).item() == pytest.approx(4.0)
    assert masked_normalize(X, mask, normalize_constant=2.0).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_normalize(X, mask, 4.0, dim=1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_normalize(X, mask, 4.0, dim=-1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked_normalize(X, mask, 0.5, dim=0), torch.tensor([2.0, 0.0, 6.0]))


def test_masked_normalize_padding_does_not_change_result():
    padded_x = torch.cat([X, torch.full((2, 3), 1e6)], dim=1)
    padded_m = torch.cat([M_BOOL, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(
        masked_normalize(padded_x, padded_m, 3.0, dim=1), masked_normalize(X, M_BOOL, 3.0, dim=1)
    )


# ---------------------------------------------------------------- entropy


def test_entropy_uniform_and_one_hot():
    uniform = torch.zeros(2, 3, 8)
    torch.testing.assert_close(compute_entropy(uniform), torch.full((2, 3), math.log(8)))
    peaked = torch.full((1, 1, 4), -1e4)
    peaked[..., 2] = 1e4
    assert compute_entropy(peaked).abs().max().item() < 1e-4


def test_entropy_matches_naive_and_is_stable_for_huge_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    p = torch.softmax(logits, -1)
    naive = -(p * torch.log(p)).sum(-1)
    torch.testing.assert_close(compute_entropy(logits), naive)
    # shifting logits by a huge constant must not overflow
    torch.testing.assert_close(compute_entropy(logits + 1e4), naive, atol=1e-3, rtol=1e-3)
    assert torch.isfinite(compute_entropy(logits * 1e4)).all()


# ---------------------------------------------------------------- log-probs


def _naive_logprobs(model, input_ids, labels, temperature=1.0, attention_mask=None):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1), logits


def test_log_probs_from_logits_chunks_match_naive():
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 13)
    labels = torch.randint(0, 13, (2, 9))
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    for chunk in (1, 4, 100):
        out = log_probs_from_logits(logits, labels, True, temperature=0.7, chunk_tokens=chunk)
        torch.testing.assert_close(out["log_probs"], want)
        torch.testing.assert_close(out["token_entropy"], compute_entropy(logits / 0.7))


def test_ignore_index_labels_give_zero_not_error():
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, -100, 4]])
    out = log_probs_from_logits(logits, labels)["log_probs"]
    assert out[0, 1].item() == 0.0 and torch.isfinite(out).all()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_get_response_log_probs_matches_naive(tiny_model, temperature, chunk):
    torch.manual_seed(1)
    V = tiny_model.config.vocab_size
    input_ids = torch.randint(0, V, (3, 10))
    labels = torch.randint(0, V, (3, 10))
    out = get_response_log_probs(
        tiny_model, input_ids, labels, True, temperature=temperature, chunk_tokens=chunk
    )
    want, logits = _naive_logprobs(tiny_model, input_ids, labels, temperature)
    assert out["log_probs"].shape == (3, 10) and out["token_entropy"].shape == (3, 10)
    torch.testing.assert_close(out["log_probs"], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["token_entropy"], compute_entropy(logits), atol=1e-5, rtol=1e-5)


def test_get_response_log_probs_gradients_match_naive(tiny_model):
    tiny_model.train()
    torch.manual_seed(2)
    V = tiny_model.config.vocab_size
    input_ids = torch.randint(0, V, (2, 12))
    labels = torch.randint(0, V, (2, 12))
    weights = torch.randn(2, 12)
    (
        get_response_log_probs(tiny_model, input_ids, labels, chunk_tokens=5)["log_probs"] * weights
    ).sum().backward()
    ours = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    (_naive_logprobs(tiny_model, input_ids, labels)[0] * weights).sum().backward()
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("chunk", [5, 64])
def test_entropy_with_gradient_matches_naive(tiny_model, chunk):
    # return_token_entropy="grad" (an entropy bonus): values and gradients of sum(H) + sum(log p) over the masked
    # positions equal autograd through full logits, at a temperature; "True" keeps the entropy detached.
    tiny_model.train()
    torch.manual_seed(3)
    V = tiny_model.config.vocab_size
    input_ids, labels = torch.randint(0, V, (2, 10)), torch.randint(0, V, (2, 10))
    mask = torch.ones(2, 10)
    mask[:, :3] = 0
    out = get_response_log_probs(
        tiny_model, input_ids, labels, "grad", temperature=0.7, logprob_mask=mask, chunk_tokens=chunk
    )
    (out["token_entropy"].sum() + out["log_probs"].sum()).backward()
    ours = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logits = tiny_model(input_ids).logits.float() / 0.7
    log_probs = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    entropy = compute_entropy(logits)
    ((entropy + log_probs) * mask).sum().backward()
    torch.testing.assert_close(out["token_entropy"], (entropy * mask).detach(), atol=1e-5, rtol=1e-5)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    detached = get_response_log_probs(tiny_model, input_ids, labels, True, logprob_mask=mask)
    assert not detached["token_entropy"].requires_grad


def test_padding_and_attention_mask(tiny_model):
    """Right padding with an attention mask leaves the real tokens' log-probs unchanged."""
    torch.manual_seed(3)
    V = tiny_model.config.vocab_size
    ids = torch.randint(1, V, (1, 6))
    labels = torch.randint(1, V, (1, 6))
    alone = get_response_log_probs(tiny_model, ids, labels)["log_probs"]
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    padded_labels = torch.cat([labels, torch.full((1, 4), -100)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], 1).long()
    padded = get_response_log_probs(tiny_model, padded_ids, padded_labels, attention_mask=mask)["log_probs"]
    torch.testing.assert_close(padded[:, :6], alone, atol=1e-5, rtol=1e-5)
    assert (padded[:, 6:] == 0).all()


def test_peft_wrapped_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    V = tiny_model.config.vocab_size
    ids = torch.randint(0, V, (2, 5))
    labels = torch.randint(0, V, (2, 5))
    want, _ = _naive_logprobs(peft_model, ids, labels)
    torch.testing.assert_close(
        get_response_log_probs(peft_model, ids, labels)["log_probs"], want, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_head_equals_checkpointed_head(tiny_model, autocast):
    """The fused output-layer function (plain nn.Linear head) and the checkpointed path it replaces give the
    same log-probs, entropies and gradients, with a temperature, a logprob_mask and ignored labels. A forward
    hook on the head (as FSDP / ZeRO-3 / adapters add) sends the computation down the checkpointed path."""
    from hf_align.logprobs import _plain_linear

    tiny_model.train()
    torch.manual_seed(4)
    V = tiny_model.config.vocab_size
    ids, labels = torch.randint(0, V, (3, 16)), torch.randint(0, V, (3, 16))
    labels[0, :4] = -100
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, :6] = False
    weights = torch.linspace(0.1, 1.0, 16)
    head = tiny_model.get_output_embeddings()

    def run():
        tiny_model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = get_response_log_probs(
                tiny_model, ids, labels, True, temperature=0.7, chunk_tokens=5, logprob_mask=mask
            )
        (out["log_probs"] * weights).sum().backward()
        return out, {n: p.grad.clone() for n, p in tiny_model.named_parameters()}

    assert _plain_linear(head)
    fused, fused_grads = run()
    handle = head.register_forward_hook(lambda *args: None)
    try:
        assert not _plain_linear(head)
        ckpt, ckpt_grads = run()
    finally:
        handle.remove()
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused["log_probs"], ckpt["log_probs"], **tol)
    torch.testing.assert_close(fused["token_entropy"], ckpt["token_entropy"], **tol)
    assert (fused["log_probs"][~mask] == 0).all() and (fused["log_probs"][0, :4] == 0).all()
    for n, g in ckpt_grads.items():
        torch.testing.assert_close(fused_grads[n], g, **tol, msg=n)


def test_fused_head_backward_twice_with_retain_graph(tiny_model):
    """The last chunk keeps its softmax for the backward pass and uses it up in place; a second backward
    (retain_graph) recomputes it and gives the same gradients again."""
    tiny_model.train()
    torch.manual_seed(5)
    V = tiny_model.config.vocab_size
    ids, labels = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 9))
    head = tiny_model.get_output_embeddings()
    out = get_response_log_probs(tiny_model, ids, labels, chunk_tokens=4, temperature=0.9)
    out["log_probs"].sum().backward(retain_graph=True)
    first = head.weight.grad.clone()
    head.weight.grad = None
    out["log_probs"].sum().backward()
    torch.testing.assert_close(head.weight.grad, first, atol=1e-6, rtol=1e-5)
