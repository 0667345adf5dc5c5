"""HFEngine against naive references: a manual greedy loop, a forward pass for sampling log-probs, and a
decode-and-find reference for stop strings.

The conftest tiny model ties its embeddings, and at random init its greedy continuation repeats the last
token ("HelloHelloHello..."). Most tests use `varied_model`, the same config with an untied random output
layer, whose greedy text varies; `eos_model` adds a bias on the EOS logit so that sequences end early.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2ForCausalLM

from hf_align.logprobs import get_response_log_probs
from hf_align.rollout import HFEngine, Rollout, RolloutEngine, SamplingConfig, make_engine
from hf_align.rollout.base import find_stop

PROMPTS = ["What is 12 + 7?", "cat dog red", "A conversation between User and Assistant.", "Hello"]


def _untied_model(tiny_model, seed: int = 0) -> Qwen2ForCausalLM:
    config = copy.deepcopy(tiny_model.config)
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).float().eval()


@pytest.fixture()
def varied_model(tiny_model):
    return _untied_model(tiny_model)


def _with_eos_bias(model, eos_id: int, bias: float):
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[eos_id] = bias
    model.lm_head = biased
    return model


def _manual_greedy(model, prompt_ids: list[int], steps: int, eos_id: int) -> tuple[list[int], list[float]]:
    ids, log_probs = [], []
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(steps):
            logits = model(x).logits[0, -1].float()
            token = int(logits.argmax())
            ids.append(token)
            log_probs.append(float(torch.log_softmax(logits, -1)[token]))
            if token == eos_id:
                break
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
    return ids, log_probs


def _forward_log_probs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    full = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        out = get_response_log_probs(model, full[:, :-1], full[:, 1:], temperature=temperature)
    return out["log_probs"][0, len(rollout.prompt_ids) - 1 :]


def _spy_generate(model) -> list[dict]:
    """Record, for each `model.generate` call, the model's train flag and the output's shape."""
    calls: list[dict] = []
    real = model.generate

    def spy(*args, **kwargs):
        training = model.training
        out = real(*args, **kwargs)
        calls.append({"training": training, "shape": tuple(out.sequences.shape)})
        return out

    model.generate = spy
    return calls


@pytest.mark.parametrize("which", ["tiny", "varied"])
def test_greedy_equals_manual_loop(which, tiny_model, varied_model, tokenizer):
    model = tiny_model if which == "tiny" else varied_model
    engine = HFEngine(model, tokenizer, batch_size=8)  # one left-padded batch of prompts of different lengths
    out = engine.generate(PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0))
    assert len(out) == len(PROMPTS)
    for i, (prompt, group) in enumerate(zip(PROMPTS, out)):
        (r,) = group
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids, log_probs = _manual_greedy(model, prompt_ids, 12, tokenizer.eos_token_id)
        assert r.prompt_index == i and r.prompt_ids == prompt_ids
        assert r.completion_ids == ids
        assert r.finish_reason == "length"
        assert r.text == tokenizer.decode(ids)
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(log_probs), atol=1e-4, rtol=0)


def test_n_samples_shapes_and_prompt_order(varied_model, tokenizer):
    # batch_size 5 with n = 4: one prompt per micro-batch, so order must survive several generate calls.
    engine = HFEngine(varied_model, tokenizer, batch_size=5)
    prompts = PROMPTS[:3]
    out = engine.generate(prompts, SamplingConfig(n=4, max_new_tokens=6, temperature=1.0, seed=0))
    assert [len(group) for group in out] == [4, 4, 4]
    for i, group in enumerate(out):
        for r in group:
            assert r.prompt_index == i
            assert r.prompt_ids == tokenizer(prompts[i])["input_ids"]
            assert len(r.completion_ids) == len(r.logprobs) == 6
        assert len({tuple(r.completion_ids) for r in group}) > 1  # the n samples are not copies


def test_stop_string_ends_inside_a_token(varied_model, tokenizer):
    engine = HFEngine(varied_model, tokenizer)
    prompt = "cat dog red"
    ((r0,),) = engine.generate([prompt], SamplingConfig(max_new_tokens=16, temperature=0))
    ids, text = r0.completion_ids, r0.text
    lengths = [len(tokenizer.decode(ids[:k])) for k in range(len(ids) + 1)]
    # From the last char of token 3 to the first char of token 5: the stop string ends inside token 5.
    k = next(k for k in range(5, len(ids)) if lengths[k] - lengths[k - 1] >= 2)
    stop = text[lengths[k - 2] - 1 : lengths[k - 1] + 1]
    end = text.find(stop) + len(stop)
    expected_k = next(j for j in range(len(ids) + 1) if lengths[j] >= end)

    calls = _spy_generate(varied_model)
    ((r,),) = engine.generate([prompt], SamplingConfig(max_new_tokens=16, temperature=0, stop=[stop]))
    assert r.finish_reason == "stop"
    assert r.text == text[:end] and r.text.endswith(stop)
    assert r.completion_ids == ids[:expected_k]
    assert r.logprobs == pytest.approx(r0.logprobs[:expected_k], abs=1e-5)
    # generate() itself stopped there (StopStringCriteria), it did not run to max_new_tokens.
    assert calls[-1]["shape"][1] == len(tokenizer(prompt)["input_ids"]) + expected_k


def test_stop_string_min_new_tokens_and_prompt_boundary(tiny_model, tokenizer):
    # Tied tiny model: "Hello" continues "HelloHelloHello...", one token per "Hello".
    engine = HFEngine(tiny_model, tokenizer)
    ((r0,),) = engine.generate(["Hello"], SamplingConfig(max_new_tokens=6, temperature=0))
    assert r0.text == "Hello" * 6 and len(r0.completion_ids) == 6
    # "lloHe" also spans prompt + first token; only the completion counts, so it stops inside token 2.
    ((r,),) = engine.generate(["Hello"], SamplingConfig(max_new_tokens=6, temperature=0, stop=["lloHe"]))
    assert (r.text, r.completion_ids, r.finish_reason) == ("HelloHe", r0.completion_ids[:2], "stop")
    # With min_new_tokens=3 the occurrence ending in token 2 is too early; the one ending in token 3 counts.
    sampling = SamplingConfig(max_new_tokens=6, temperature=0, stop=["lloHe"], min_new_tokens=3)
    ((r,),) = engine.generate(["Hello"], sampling)
    assert (r.text, r.completion_ids, r.finish_reason) == ("HelloHelloHe", r0.completion_ids[:3], "stop")


def test_find_stop_hand_derived():
    vocab = ["ab", "c</", "ans", "wer>x", "yz", "</answer>"]

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    assert find_stop([0, 1, 2, 3, 4], ["</answer>"], 0, decode) == (4, "abc</answer>")
    assert find_stop([0, 1, 2, 3, 4], ["wer>xy", "c</a"], 0, decode) == (3, "abc</a")
    assert find_stop([0, 1, 2, 3, 4], ["nope"], 0, decode) is None
    # min_new_tokens=5: the first occurrence ends in token 4, too early; the second ends in token 6.
    assert find_stop([0, 1, 2, 3, 4, 5], ["</answer>"], 5, decode) == (6, "abc</answer>xyz</answer>")
    assert find_stop([0, 1, 2, 3], ["</answer>"], 5, decode) is None


def test_eos_finish_and_min_new_tokens(varied_model, tokenizer):
    eos = tokenizer.eos_token_id
    engine = HFEngine(_with_eos_bias(varied_model, eos, 100.0), tokenizer)
    ((r,),) = engine.generate(["Hello"], SamplingConfig(max_new_tokens=8, temperature=0))
    assert (r.completion_ids, r.text, r.finish_reason) == ([eos], "", "eos")
    ((r,),) = engine.generate(["Hello"], SamplingConfig(max_new_tokens=8, temperature=0, min_new_tokens=3))
    assert len(r.completion_ids) == 4 and r.completion_ids[-1] == eos and eos not in r.completion_ids[:3]
    assert r.finish_reason == "eos" and r.text == tokenizer.decode(r.completion_ids[:3])


def test_sampling_logprobs_equal_forward_pass(varied_model, tokenizer):
    # EOS bias 3.5 (5 after temperature 0.7): p(eos) ~ 0.2 a step, so some rows end early (and are padded) while others run to the limit.
    model = _with_eos_bias(varied_model, tokenizer.eos_token_id, 3.5)
    engine = HFEngine(model, tokenizer, batch_size=8)
    temperature = 0.7
    out = engine.generate(
        PROMPTS[:2], SamplingConfig(n=4, max_new_tokens=10, temperature=temperature, seed=0)
    )
    rollouts = [r for group in out for r in group]
    assert {r.finish_reason for r in rollouts} == {"eos", "length"}
    for r in rollouts:
        expected = _forward_log_probs(model, r, temperature)
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)


def test_truncated_sampling_logprobs(varied_model, tokenizer):
    engine = HFEngine(varied_model, tokenizer)
    # top_k = 1 keeps one token: sampling is greedy and every token has probability 1.
    ((g,),) = engine.generate(["cat dog red"], SamplingConfig(max_new_tokens=8, temperature=0))
    ((r,),) = engine.generate(
        ["cat dog red"], SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=0)
    )
    assert r.completion_ids == g.completion_ids
    assert r.logprobs == pytest.approx([0.0] * 8, abs=1e-6)
    # top_p renormalises over the kept tokens: never below the untruncated log-prob.
    ((r,),) = engine.generate(
        ["cat dog red"], SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.3, seed=0)
    )
    full = _forward_log_probs(varied_model, r, 1.0)
    assert (torch.tensor(r.logprobs) >= full - 1e-5).all()
    assert (torch.tensor(r.logprobs) > full + 1e-3).any()


def _step_logits(model, rollout: Rollout) -> torch.Tensor:
    """(T, V) logits of the distributions each completion token was drawn from, at temperature 1."""
    full = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(full).logits[0].float()
    return logits[len(rollout.prompt_ids) - 1 : -1]


def test_min_p_logprobs_are_the_truncated_distribution(varied_model, tokenizer):
    # min_p keeps the tokens with p >= min_p * max p and renormalises over them: the recorded log-prob is
    # log(p_token / sum of kept p), computed here from the model's own logits.
    engine = HFEngine(varied_model, tokenizer)
    min_p, temperature = 0.5, 0.05  # a random model is nearly uniform: sharpen it so min_p cuts
    sampling = SamplingConfig(max_new_tokens=8, temperature=temperature, min_p=min_p, seed=0)
    ((r,),) = engine.generate(["cat dog red"], sampling)
    probs = torch.softmax(_step_logits(varied_model, r) / temperature, -1)
    kept = probs >= min_p * probs.max(-1, keepdim=True).values
    token = torch.tensor(r.completion_ids)
    assert kept.gather(1, token[:, None]).all()  # every sampled token was allowed
    expected = (probs.gather(1, token[:, None])[:, 0] / (probs * kept).sum(-1)).log()
    torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-5, rtol=0)
    assert (kept.sum(-1) < probs.shape[-1]).all() and (kept.sum(-1) > 1).any()  # min_p cut, not to greedy


def test_generation_kwargs_reach_generate(varied_model, tokenizer):
    # suppress_tokens (a GenerationConfig field, given through `extra`) removes the greedy tokens; the recorded
    # log-probs are those of the distribution without them.
    engine = HFEngine(varied_model, tokenizer)
    ((greedy,),) = engine.generate(["cat dog red"], SamplingConfig(max_new_tokens=8, temperature=0))
    banned = sorted(set(greedy.completion_ids))
    sampling = SamplingConfig(max_new_tokens=8, seed=0, extra={"suppress_tokens": banned})
    ((r,),) = engine.generate(["cat dog red"], sampling)
    assert not set(r.completion_ids) & set(banned)
    logits = _step_logits(varied_model, r)
    logits[:, banned] = float("-inf")
    expected = logits.log_softmax(-1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-5, rtol=0)


def test_generation_kwargs_refused_when_unusable(varied_model, tokenizer):
    engine = HFEngine(varied_model, tokenizer)
    with pytest.raises(ValueError, match="typical_p"):  # applied after the log-prob recorder
        engine.generate(["Hello"], SamplingConfig(max_new_tokens=2, extra={"typical_p": 0.5}))
    with pytest.raises(ValueError, match="not_a_field"):
        engine.generate(["Hello"], SamplingConfig(max_new_tokens=2, extra={"not_a_field": 1}))
    with pytest.raises(ValueError, match="sampling fields"):  # the engine sets these itself
        SamplingConfig(extra={"num_return_sequences": 2})


def test_seed_reproducible_and_global_rng_untouched(varied_model, tokenizer):
    engine = HFEngine(varied_model, tokenizer)

    def run(seed):
        out = engine.generate(PROMPTS[:2], SamplingConfig(n=2, max_new_tokens=8, seed=seed))
        return [(r.completion_ids, r.logprobs) for group in out for r in group]

    state = torch.get_rng_state()
    first = run(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert run(7) == first
    assert run(8) != first


def test_eval_during_generation_and_train_mode_restored(varied_model, tokenizer):
    varied_model.train()
    varied_model.model.layers[0].eval()  # a deliberately frozen submodule stays in eval mode
    calls = _spy_generate(varied_model)
    HFEngine(varied_model, tokenizer).generate(["Hello"], SamplingConfig(max_new_tokens=3, temperature=0))
    assert calls[0]["training"] is False
    assert varied_model.training and varied_model.model.layers[1].training
    assert not varied_model.model.layers[0].training


def test_prompt_too_long_names_its_index(tiny_model, tokenizer):
    engine = HFEngine(tiny_model, tokenizer)
    long_prompt = "Hello world! The quick brown fox jumps over the lazy dog. " * 60
    assert len(tokenizer(long_prompt)["input_ids"]) > 512
    with pytest.raises(ValueError, match="prompt 1 has"):
        engine.generate(["Hello", long_prompt], SamplingConfig(max_new_tokens=4, temperature=0))


def test_sync_weights(tiny_model, tokenizer):
    policy, other = _untied_model(tiny_model, seed=0), _untied_model(tiny_model, seed=1)
    engine = HFEngine(policy, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)

    def no_copy(*args, **kwargs):
        raise AssertionError("sync_weights with the engine's own model must not copy weights")

    policy.load_state_dict = no_copy
    engine.sync_weights(policy)
    del policy.load_state_dict
    expected = HFEngine(other, tokenizer).generate(PROMPTS, sampling)
    assert [g[0].completion_ids for g in engine.generate(PROMPTS, sampling)] != [
        g[0].completion_ids for g in expected
    ]
    engine.sync_weights(other)
    assert [g[0].completion_ids for g in engine.generate(PROMPTS, sampling)] == [
        g[0].completion_ids for g in expected
    ]


def test_make_engine_and_protocol(tiny_model, tokenizer):
    engine = make_engine("hf", tiny_model, tokenizer, batch_size=4)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine) and engine.batch_size == 4
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("nope", tiny_model, tokenizer)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(["Hello"], SamplingConfig(max_new_tokens=2))


def test_make_engine_vllm_without_vllm(tokenizer):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ImportError, match="vllm"):
        make_engine("vllm", "some/model", tokenizer)


def test_sampling_config_validation():
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig().greedy
    assert SamplingConfig(stop="</answer>").stop == ["</answer>"]
    for bad in (
        {"n": 0},
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_k": -1},
        {"min_new_tokens": 999},
        {"min_p": 1.5},
    ):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
