"""What every hf_align trainer does before training, in one place: TRL's constructor conventions.

A TRL user passes ``model`` as a loaded model or a Hub id / local path, may leave ``args`` and
``processing_class`` out, and may pass ``peft_config``. ``prepare_trainer_inputs`` turns those into what
``transformers.Trainer`` takes, the way TRL 1.16 does:

- ``args=None`` gives the trainer's config with ``output_dir = "<model name>-<SUFFIX>"``; a plain
  ``TrainingArguments`` is converted into the trainer's config (its fields kept, ours at their defaults).
- A string ``model`` is loaded with ``from_pretrained(model, **args.model_init_kwargs)``; as in TRL, the dtype
  defaults to float32 and ``trust_remote_code`` comes from the config.
- ``processing_class=None`` loads the tokenizer from the model's own folder / id; a tokenizer without a pad
  token gets its EOS token as pad token (batching needs one).
- ``peft_config`` wraps the model with LoRA (peft), after the seed is set so adapters start the same way.
- ``args.eos_token`` (SFT, reward) replaces the tokenizer's EOS token; ``args.disable_dropout`` zeroes dropout.

``prepare_datasets`` runs a trainer's dataset preparation (``hf_align.formats``) on the train set and every eval
set.

``MetricsMixin`` keeps per-step metric buffers for train and eval and merges them into ``log`` (averaged over
micro-batches, then over processes), so every trainer logs ``<name>`` in training and ``eval_<name>`` in
evaluation.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import TrainingArguments, set_seed

from hf_align.trainers.metrics import merge_metrics

logger = logging.getLogger(__name__)


def _model_name(model) -> str:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
    return str(name).rstrip("/").split("/")[-1] or "model"


def resolve_args(args, config_cls, model, suffix: str):
    """``args`` as an instance of ``config_cls`` (TRL: ``None`` -> ``config_cls("<model>-<suffix>")``)."""
    if args is None:
        return config_cls(output_dir=f"{_model_name(model)}-{suffix}")
    if isinstance(args, config_cls):
        return args
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        known = set(config_cls.__dataclass_fields__)
        return config_cls(**{k: v for k, v in values.items() if k in known})
    raise TypeError(f"args must be a {config_cls.__name__} or TrainingArguments, got {type(args).__name__}")


def load_model(model, args, auto_class=None, **overrides):
    """A loaded model as is; a string as ``auto_class.from_pretrained(model, **model_init_kwargs)``."""
    init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    if not isinstance(model, str):
        if init_kwargs:
            logger.warning("model_init_kwargs is ignored: the model is already loaded")
        return model
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    dtype = init_kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"model_init_kwargs dtype must be auto, float32, bfloat16 or float16; got {dtype!r}"
            )
        dtype = getattr(torch, dtype)
    init_kwargs["dtype"] = dtype
    init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    init_kwargs.update(overrides)
    return auto_class.from_pretrained(model, **init_kwargs)


def load_processing_class(model, processing_class, args=None):
    """The tokenizer given, or the one stored with the model; a pad token is ensured either way."""
    if processing_class is None:
        from transformers import AutoTokenizer

        source = getattr(model.config, "_name_or_path", None)
        if not source:
            raise ValueError("processing_class is None and the model does not say where it was loaded from")
        revision = (getattr(args, "model_init_kwargs", None) or {}).get("revision")
        processing_class = AutoTokenizer.from_pretrained(
            source, revision=revision, trust_remote_code=getattr(args, "trust_remote_code", False)
        )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor wraps one
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processing_class


def prepare_trainer_inputs(
    model, args, processing_class, peft_config, config_cls, suffix, auto_class=None, quantization_config=None
):
    """``(model, args, processing_class)`` ready for ``Trainer.__init__`` (see the module docstring)."""
    args = resolve_args(args, config_cls, model, suffix)
    set_seed(args.seed)  # LoRA adapters are initialised at random
    quantized = {"quantization_config": quantization_config} if quantization_config is not None else {}
    if quantized and not isinstance(model, str):
        logger.warning("quantization_config is ignored: the model is already loaded")
    model = load_model(model, args, auto_class, **quantized)
    processing_class = load_processing_class(model, processing_class, args)
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if getattr(args, "eos_token", None) is not None:  # SFT / reward: the end-of-turn token to train on
        if args.eos_token not in tokenizer.get_vocab():
            raise ValueError(f"eos_token {args.eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = args.eos_token
        model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if peft_config is not None:
        from hf_align.modeling import wrap_lora

        model = wrap_lora(model, peft_config)
    if getattr(args, "disable_dropout", False):  # after LoRA, as TRL: its dropout goes too
        disable_dropout(model)
    return model, args, processing_class


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def prepare_datasets(train_dataset, eval_dataset, args, prepare):
    """``prepare(dataset, name)`` on the train set and every eval set (one, or a dict of named ones).

    An ``IterableDataset`` cannot be dispatched from the main process (accelerate concatenates its batches), so
    ``dispatch_batches`` is turned off for it, as TRL does.
    """
    import datasets

    if train_dataset is None:
        raise ValueError("train_dataset is required")
    if isinstance(train_dataset, datasets.IterableDataset):
        args.accelerator_config.dispatch_batches = False
    train = prepare(train_dataset, "train")
    if isinstance(eval_dataset, dict):
        return train, {name: prepare(ds, name) for name, ds in eval_dataset.items()}
    return train, None if eval_dataset is None else prepare(eval_dataset, "eval")


class MetricsMixin:
    """Per-step metric buffers (``record``) merged into every ``log`` call, ``eval_`` prefixed in evaluation."""

    def _init_metrics(self) -> None:
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def record(self, metrics: dict, training: bool) -> None:
        """Append detached scalar metrics of one micro-batch (tensors or floats)."""
        buffer = self._metrics["train" if training else "eval"]
        for key, value in metrics.items():
            buffer[key].append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        logs.update(merge_metrics(self.accelerator, self._metrics[mode], "eval_" if mode == "eval" else ""))
        super().log(logs, start_time)
