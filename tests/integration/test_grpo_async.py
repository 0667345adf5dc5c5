"""Async rollouts (``async_rollouts``, ``max_staleness``): batches generated on a thread while training runs.

Staleness 0 is the synchronous run exactly; staleness 1 learns, logs its staleness, samples each batch (and its
log-probs) from the weights of one batch back, and resumes exactly from a checkpoint holding the queued batch. The
vLLM server test runs in .venv-vllm (`.venv-vllm/bin/python -m pytest tests/integration/test_grpo_async.py`).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import TrainerCallback

from hf_align.config import GRPOConfig
from hf_align.trainers.grpo import GRPOTrainer
from tests.conftest import build_model
from tests.integration.test_grpo_trainer import ROWS, _config, _rewards, letter_e_reward, target_word_reward
from tests.integration.test_vllm_cpu import _reference_logprobs, _served, vllm_test

VOLATILE = ("time/", "generation_tokens_per_s", "train_runtime", "train_samples_per_second",
            "train_steps_per_second", "total_flos")  # fmt: skip


def _trainer(tmp_path, tokenizer, model=None, reward=target_word_reward, **kw) -> GRPOTrainer:
    return GRPOTrainer(
        model or build_model(tokenizer), args=_config(tmp_path, plot_curves=False, **kw), train_dataset=ROWS,
        processing_class=tokenizer, reward_funcs=[reward],
    )  # fmt: skip


def _history(trainer) -> list[dict]:
    return [{k: v for k, v in h.items() if not k.startswith(VOLATILE)} for h in trainer.state.log_history]


def _staleness(trainer) -> dict[int, float]:
    return {
        h["step"]: h["sample/staleness_mean"]
        for h in trainer.state.log_history
        if "sample/staleness_mean" in h
    }


def test_staleness_zero_is_the_synchronous_run(tmp_path, tokenizer):
    """Same rollouts (hence rewards), same losses, same weights: the thread changes nothing but where it runs."""
    sync = _trainer(tmp_path / "sync", tokenizer, max_steps=3)
    sync.train()
    queued = _trainer(tmp_path / "async", tokenizer, max_steps=3, async_rollouts=True, max_staleness=0)
    queued.train()
    assert _history(queued) == _history(sync)
    assert set(_staleness(queued).values()) == {0.0}
    for (n, p), q in zip(sync.model.named_parameters(), queued.model.parameters()):
        assert torch.equal(p, q), n


def _train_recording(trainer) -> tuple[list, list]:
    """Train; return the weights after every optimizer step (0: initial) and every generate call's rollouts."""
    snapshots, calls = [copy.deepcopy(trainer.model)], []
    generate = trainer.engine.generate

    def recording(prompts, sampling):
        calls.append(generate(prompts, sampling))
        return calls[-1]

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(copy.deepcopy(model))

    trainer.engine.generate = recording
    trainer.add_callback(Snapshot())
    trainer.train()
    return snapshots, calls


def _assert_sampled_by(snapshots, calls, versions) -> None:
    """Batch i's rollouts carry the log-probs of the weights after step ``versions[i]``, which really moved."""
    for batch, version in enumerate(versions):
        for rollout in calls[batch][0]:
            want = _reference_logprobs(snapshots[version].eval(), rollout, 1.0)
            torch.testing.assert_close(torch.tensor(rollout.logprobs), want, atol=1e-4, rtol=0)
    before = _reference_logprobs(snapshots[versions[-1] - 1].eval(), rollout, 1.0)
    assert not torch.allclose(before, _reference_logprobs(snapshots[versions[-1]].eval(), rollout, 1.0))


def test_stale_batches_carry_the_sampling_weights_logprobs(tmp_path, tokenizer):
    """With staleness 1, batches 0 and 1 come from the initial weights, batch 2 from those after step 1; the log
    records the staleness."""
    trainer = _trainer(
        tmp_path, tokenizer, max_steps=3, async_rollouts=True, max_staleness=1, reward=letter_e_reward
    )
    _assert_sampled_by(*_train_recording(trainer), versions=[0, 0, 1])
    assert _staleness(trainer) == {1: 0.0, 2: 1.0, 3: 1.0}


@pytest.mark.slow
def test_staleness_one_learns(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer, max_steps=20, async_rollouts=True, max_staleness=1)
    trainer.train()
    rewards = _rewards(trainer)
    assert len(rewards) == 20
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards
    assert set(_staleness(trainer).values()) == {0.0, 1.0}


@pytest.mark.parametrize("generation_batch_size, save_at", [(32, 2), (64, 1)])
def test_async_resume_is_exact(tmp_path, tokenizer, generation_batch_size, save_at):
    """The checkpoint holds the queued batch (generated from weights the resumed run never has) and, when a batch
    lasts two steps (64 rows), the half-used one; the resumed run reproduces the rest of the uninterrupted one."""
    kw = dict(max_steps=4, save_strategy="steps", save_steps=save_at, async_rollouts=True, max_staleness=1,
              generation_batch_size=generation_batch_size)  # fmt: skip
    full = _trainer(tmp_path / "a", tokenizer, **kw)
    full.train()
    checkpoint = tmp_path / "a" / "out" / f"checkpoint-{save_at}"
    assert len(torch.load(checkpoint / "rollout_state_rank0.pt", weights_only=False)["queued"]) == 1
    resumed = _trainer(tmp_path / "a", tokenizer, model=build_model(tokenizer, seed=123), **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = {h["step"]: h for h in _history(resumed) if h["step"] > save_at and "loss" in h}
    want = {h["step"]: h for h in _history(full) if "loss" in h}
    assert set(got) == set(range(save_at + 1, 5))
    for step in got:
        assert got[step].keys() == want[step].keys()
        for key in {"loss", "reward", "sample/staleness_mean"} & want[step].keys():
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_async_defaults_to_token_truncation_and_warns_of_a_sequence_level_mode(tmp_path, caplog):
    def mode(**kw):
        return GRPOConfig(output_dir=str(tmp_path), **kw).vllm_importance_sampling_mode

    with caplog.at_level(logging.WARNING, logger="hf_align.config"):
        assert mode() == mode(async_rollouts=True, max_staleness=0) == "sequence_mask"  # TRL's default
        assert mode(async_rollouts=True) == "token_truncate"
        assert (
            mode(vllm_importance_sampling_mode="sequence_truncate") == "sequence_truncate"
        )  # not stale: quiet
        assert mode(async_rollouts=True, vllm_importance_sampling_mode="sequence_mask") == "sequence_mask"
    warned = [r.getMessage() for r in caplog.records if "stalled learning in 1 of 3 seeds" in r.getMessage()]
    assert len(warned) == 1 and "'sequence_mask'" in warned[0], warned


def test_async_config_refusals_and_is_correction(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="async_rollouts needs a rollout engine apart from training"):
        GRPOConfig(output_dir=str(tmp_path), async_rollouts=True, use_vllm=True, vllm_mode="colocate")
    with pytest.raises(ValueError, match="max_staleness"):
        GRPOConfig(output_dir=str(tmp_path), max_staleness=-1)
    stale = GRPOConfig(output_dir=str(tmp_path), async_rollouts=True)  # hf engine, plain sampling
    assert (
        stale.corrects_sampling
        and not GRPOConfig(output_dir=str(tmp_path), max_staleness=0).corrects_sampling
    )
    with pytest.raises(ValueError, match="disable_dropout"):
        _trainer(
            tmp_path, tokenizer, model=build_model(tokenizer, attention_dropout=0.1), async_rollouts=True
        )


@vllm_test
def test_async_with_a_vllm_server(tiny_model_dir, tmp_path, tokenizer):
    """Staleness 1 against a real server: weight pushes and generations are ordered, so each batch is sampled by
    the weights it is tagged with (log-probs recomputed from them), and the run learns nothing amiss."""
    from transformers import AutoModelForCausalLM

    with _served(tiny_model_dir, tmp_path) as (_, url):
        kw = dict(max_steps=3, use_vllm=True, vllm_mode="server", vllm_server_base_url=url)
        trainer = _trainer(tmp_path, tokenizer, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           async_rollouts=True, max_staleness=1, reward=letter_e_reward, **kw)  # fmt: skip
        _assert_sampled_by(*_train_recording(trainer), versions=[0, 0, 1])
    assert _staleness(trainer) == {1: 0.0, 2: 1.0, 3: 1.0}
    assert all(r == r for r in _rewards(trainer)) and len(_rewards(trainer)) == 3
