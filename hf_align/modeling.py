"""Load the policy and tokenizer (Hub id, local folder, or GGUF file), wrap LoRA, build a reference model.

Choices:
- dtype "auto" means bfloat16 on a CUDA device that supports it and float32 elsewhere: these CPUs have no
  bf16 instructions, where bf16 is both slower and less exact.
- A GGUF file is dequantized by transformers at load time (``gguf_file=``). ``convert_gguf`` saves that model
  with ``save_pretrained`` once the quantizer's marker, which only refuses saving, is removed: an ordinary
  safetensors folder that loads in 0.5 s and that vLLM can serve (reading GGUF needs the ``gguf`` package).
- ``trust_remote_code`` is off unless asked for: it runs code from the model repository.
- The tokenizer gets a pad token (EOS when it has none) so batching never fails, and right padding for
  training (generation engines left-pad on their own).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(
    name_or_path: str,
    gguf_file: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, gguf_file=gguf_file, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(
    model_name_or_path: str,
    gguf_file: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    tokenizer_name_or_path: str | None = None,
):
    """Return ``(model, tokenizer)``; the model is in train mode only if the caller sets it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_name_or_path, dtype=resolve_dtype(dtype), gguf_file=gguf_file, revision=revision,
        trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
    )  # fmt: skip
    if device is not None:
        model.to(device)
    tokenizer = load_tokenizer(
        tokenizer_name_or_path or model_name_or_path,
        gguf_file=None if tokenizer_name_or_path else gguf_file,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_from_args(model_args, device: str | torch.device | None = None, trust_remote_code: bool = False):
    """``load_model_and_tokenizer`` driven by a ``ModelArguments``, then LoRA if ``use_peft``;
    ``trust_remote_code`` is the trainer config's (TRL 1.16 moved it there from ``ModelConfig``)."""
    names = ("gguf_file", "dtype", "attn_implementation", "revision", "tokenizer_name_or_path")
    options = {name: getattr(model_args, name) for name in names}
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path, device=device, trust_remote_code=trust_remote_code, **options
    )
    return (wrap_lora(model, model_args) if model_args.use_peft else model), tokenizer


def lora_config_from_args(model_args):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


def wrap_lora(model, model_args_or_config):
    """``model`` with LoRA adapters, from a ``peft.LoraConfig`` or a ``ModelArguments``."""
    from peft import LoraConfig, get_peft_model

    config = model_args_or_config
    if not isinstance(config, LoraConfig):
        config = lora_config_from_args(model_args_or_config)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def create_reference_model(model):
    """A frozen copy of ``model`` in eval mode (for DPO / KL penalties without LoRA)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def convert_gguf(
    gguf_dir: str | Path, gguf_file: str, output_dir: str | Path, dtype: str = "float32"
) -> Path:
    """Dequantize a GGUF model into a plain ``save_pretrained`` folder (safetensors + tokenizer)."""
    model, tokenizer = load_model_and_tokenizer(str(gguf_dir), gguf_file=gguf_file, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if any(not p.is_floating_point() for p in model.state_dict().values()):
        raise RuntimeError(f"{gguf_file}: transformers kept packed GGUF blocks; nothing plain to save")
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    logger.info("wrote %s (%s)", output_dir, dtype)
    return Path(output_dir)


def convert_gguf_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Turn a GGUF model into a normal safetensors model folder.")
    parser.add_argument("gguf_path", help="path to the .gguf file")
    parser.add_argument("output_dir", help="folder to write (config, safetensors, tokenizer)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    path = Path(args.gguf_path)
    if not path.is_file():
        raise SystemExit(f"no such GGUF file: {path}")
    logging.basicConfig(level=logging.INFO)
    convert_gguf(path.parent, path.name, args.output_dir, dtype=args.dtype)


if __name__ == "__main__":
    convert_gguf_main()
