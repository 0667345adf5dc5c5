"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny Qwen2, both built in code (no network).

The tokenizer is a `PreTrainedTokenizerFast` saved with an explicit `tokenizer_class`, so reloading a saved
model folder gives back the same class and the same ids (see ../shared/ENVIRONMENT.md for the pitfall).
Attention head size is 32, the smallest vLLM's CPU backend accepts.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Assistant turns are wrapped in {% generation %} so assistant-only masks can be derived from the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 12 + 7? The answer is 19.",
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it.",
    "The Assistant first thinks about the reasoning process in the mind and then provides the answer.",
    "<think> Let me add the numbers. </think> <answer> 42 </answer>",
    "<think> reasoning </think> <answer> \\frac{1}{2} </answer> \\boxed{3}",
    "User: Solve for x: 2x + 3 = 11. Assistant: x = 4.",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
    "chosen rejected good bad yes no true false cat dog red blue green",
    "Question: Answer: Instruction: Response: Below is an instruction that describes a task.",
    "+ - * / = ( ) [ ] { } < > ^ _ . , ; : ! ? ' \" # $ % & @ ~ ` |",
]


def free_port() -> int:
    """A TCP port free on localhost now (for a launcher's rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Same normalizer and pre-tokenizer as transformers' Qwen2Tokenizer, which is what AutoTokenizer rebuilds
    # from a folder whose config says qwen2: ids must survive a save / reload.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
    fast.padding_side = "right"
    return fast


def build_model(
    tokenizer, seed: int = 0, num_layers: int = 2, hidden: int = 64, attention_dropout: float = 0.0
):
    """``attention_dropout > 0`` makes training draw from the global RNG (resume tests need it to matter)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=attention_dropout,
    )
    return Qwen2ForCausalLM(config).float().eval()


def grad_capture():
    """A TrainerCallback that copies the gradients right before the first optimizer step (split-invariance tests)."""
    from transformers import TrainerCallback

    class GradCapture(TrainerCallback):
        def __init__(self):
            self.grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.grads is None:
                self.grads = {
                    n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
                }

    return GradCapture()


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    return build_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model + tokenizer folder, loadable with `from_pretrained(path)`."""
    path = tmp_path_factory.mktemp("tiny_qwen2")
    build_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
