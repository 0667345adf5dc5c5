"""Session fixtures for the TRL drop-in tests: tiny model folders saved once, and the TRL runs cached per example."""

from __future__ import annotations

import pytest
import torch

from tests.compat.harness import Env, Run, Spec, check_finite, run_example
from tests.conftest import build_model


def untie(model, seed: int):
    """Give the tiny model its own random output layer (std 0.2) instead of the tied embeddings.

    Tied to its embeddings, a random model predicts the token it just read: greedy decoding repeats one token
    ("????????"), which every text reward scores alike, and next-token distributions are near uniform (per-token NLL
    6.27 +- 0.16 nats), on which one token more or less in a loss barely moves the mean. Untied, greedy completions
    vary with the prompt and the per-token NLL is about 7 +- 1.3 nats, so an extra EOS, template token or truncation
    shows far beyond the 1e-5 tolerance; sampling at temperature 1 still varies (entropy about 5 nats).
    """
    model.config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(1000 + seed)
    weight = torch.randn(model.lm_head.weight.shape, generator=generator) * 0.2
    model.lm_head.weight = torch.nn.Parameter(weight)
    return model


@pytest.fixture(scope="session")
def compat_env(tmp_path_factory, tokenizer) -> Env:
    """Three saved folders, each loadable by path with its tokenizer: policy, reference, 1-label reward model."""
    from transformers import Qwen2ForSequenceClassification

    root = tmp_path_factory.mktemp("compat_models")
    paths = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        path = root / name
        untie(build_model(tokenizer, seed=seed), seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)

    # The reward model shares the policy's backbone and gets a seeded score head, saved with the folder so that
    # loading it by path involves no random initialisation (both libraries then see the same weights).
    policy = untie(build_model(tokenizer, seed=0), 0)
    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    config.architectures = ["Qwen2ForSequenceClassification"]
    torch.manual_seed(2)
    reward_model = Qwen2ForSequenceClassification(config).float().eval()
    reward_model.model.load_state_dict(policy.model.state_dict())
    with (
        torch.no_grad()
    ):  # rewards of a few units instead of ~0.01: margins and the loss then depend on every token
        reward_model.score.weight.mul_(50.0)
    path = root / "reward"
    reward_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    paths["reward"] = str(path)

    # The pitfall of ../shared/ENVIRONMENT.md: a reloaded tokenizer must give the same ids as the in-memory one.
    from transformers import AutoTokenizer

    text = "What is 12 + 7? <think> reasoning </think>"
    assert AutoTokenizer.from_pretrained(paths["policy"])(text)["input_ids"] == tokenizer(text)["input_ids"]
    # ... and the untied output layer must survive the reload.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(paths["policy"])
    assert not torch.equal(reloaded.lm_head.weight, reloaded.get_input_embeddings().weight)
    return Env(
        model_path=paths["policy"], ref_model_path=paths["reference"], reward_model_path=paths["reward"]
    )


@pytest.fixture(scope="session")
def trl_runs(compat_env, tmp_path_factory):
    """TRL's run of each example, computed at most once per session."""
    cache: dict[str, Run] = {}
    out = tmp_path_factory.mktemp("trl_runs")

    def get(spec: Spec) -> Run:
        if spec.name not in cache:
            run = run_example(spec, "trl", compat_env, out)
            check_finite(run)
            cache[spec.name] = run
        return cache[spec.name]

    return get
