"""What every hf_align trainer shares: TRL's constructor conventions, and metrics merged at logging time.

``AlignTrainer._trl_inputs`` turns what a TRL user passes into what ``transformers.Trainer`` takes, as TRL 1.16
does: ``args=None`` gives the trainer's config with ``output_dir = "<model name>-<SUFFIX>"`` (a plain
``TrainingArguments`` is converted, its fields kept); a string ``model`` is loaded with
``from_pretrained(model, **args.model_init_kwargs)`` (float32 unless ``dtype`` says otherwise) right after
``set_seed(args.seed)``, so a fresh score head and LoRA adapters start the same way every run;
``processing_class=None`` loads the model's own tokenizer, and a tokenizer without a pad token pads with EOS;
``args.eos_token`` (SFT, reward) replaces the EOS token; ``peft_config`` wraps the model with LoRA;
``disable_dropout`` zeroes every dropout, LoRA's too. ``DatasetTrainer`` is the constructor SFT, DPO and reward
models share: each prepares the train set and every eval set with its ``prepare_dataset`` and batches them with
its ``default_collator``. With ``sync_ref_model`` (DPO, GRPO), ``ReferenceSync`` mixes the policy into the
reference model every ``ref_model_sync_steps`` optimizer steps (TR-DPO), and the reference goes into checkpoints.

Metrics are recorded per micro-batch as detached device tensors (no sync) and merged in ``log``: averaged over
the calls (``time/*`` keys summed: seconds spent in the step), then over processes in one collective, NaN ("no
value") left out and a key without any value not logged; ``<name>`` in training, ``eval_<name>`` in evaluation.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, set_seed

from hf_align.modeling import wrap_lora
from hf_align.trainers.safety import SafeTrainingMixin
from hf_align.trainers.sharding import prepare_reference

logger = logging.getLogger(__name__)

REFERENCE_STATE = "reference_model.pt"


def model_name(model, fallback: str = "model") -> str:
    """The last part of a model's id or path (a string, or ``config._name_or_path`` of a loaded model)."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or fallback
    return str(name).rstrip("/").split("/")[-1] or fallback


def resolve_args(args, config_cls, model, suffix: str):
    """``args`` as an instance of ``config_cls`` (TRL: ``None`` -> ``config_cls("<model>-<suffix>")``)."""
    if args is None:
        return config_cls(output_dir=f"{model_name(model)}-{suffix}")
    if isinstance(args, config_cls):
        return args
    if isinstance(args, TrainingArguments):
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        known = set(config_cls.__dataclass_fields__)
        return config_cls(**{k: v for k, v in values.items() if k in known})
    raise TypeError(f"args must be a {config_cls.__name__} or TrainingArguments, got {type(args).__name__}")


def load_model(model, args, auto_class=AutoModelForCausalLM, quantization_config=None, **overrides):
    """A loaded model as is; a string as ``auto_class.from_pretrained(model, **model_init_kwargs, **overrides)``."""
    init_kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    if not isinstance(model, str):
        if init_kwargs:
            logger.warning("%s ignored: the model is already loaded", " and ".join(sorted(init_kwargs)))
        return model
    dtype = init_kwargs.get("dtype", "float32")  # TRL's default
    if isinstance(dtype, str) and dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"model_init_kwargs dtype must be auto, float32, bfloat16 or float16; got {dtype!r}")
    init_kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    init_kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    return auto_class.from_pretrained(model, **init_kwargs, **overrides)


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


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def global_sum(accelerator, count, device) -> torch.Tensor:
    """A count summed over processes (e.g. response tokens or pairs in an optimizer step)."""
    count = torch.as_tensor(count, device=device)
    if accelerator.num_processes > 1:
        count = accelerator.gather(count.reshape(1)).sum()
    return count


@torch.no_grad()
def mix_into_reference(ref_model: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (Gorbatovski et al. 2024, eq. 5): ``ref <- alpha * policy + (1 - alpha) * ref``,
    parameter by parameter (the two must have the same parameters, in the same order)."""
    for (name, ref), (other, p) in zip(ref_model.named_parameters(), policy.named_parameters(), strict=True):
        if name != other or ref.shape != p.shape or hasattr(ref, "ds_id"):  # ds_id: a ZeRO-3 partition
            raise ValueError(
                f"sync_ref_model: reference parameter {name} does not match the policy's {other}"
            )
        ref.lerp_(p.to(ref.dtype), alpha)


class ReferenceSync(TrainerCallback):
    """``sync_ref_model``: after every ``ref_model_sync_steps``-th optimizer step (as TRL's SyncRefModelCallback)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            t = self.trainer
            mix_into_reference(t.ref_model, t.accelerator.unwrap_model(t.model), args.ref_model_mixup_alpha)


class AlignTrainer(SafeTrainingMixin, Trainer):
    """What the four trainers share: TRL's constructor conventions and per-step metrics merged at logging time.
    A subclass names its config (``config_class``, ``suffix``) and what a string ``model`` loads as
    (``load_kwargs`` for `load_model`)."""

    config_class: type[TrainingArguments] = TrainingArguments
    suffix = ""
    load_kwargs: dict = {}
    # compute_loss already normalizes by the optimizer step's counts: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def _trl_inputs(self, model, args, processing_class, peft_config, quantization_config):
        """``(model, args, processing_class)`` ready for ``Trainer.__init__`` (see the module docstring)."""
        args = resolve_args(args, self.config_class, model, self.suffix)
        set_seed(args.seed)  # a fresh head and LoRA adapters are initialised at random
        model = load_model(model, args, quantization_config=quantization_config, **self.load_kwargs)
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
            model = wrap_lora(model, peft_config)
        if getattr(args, "disable_dropout", False):  # after LoRA, as TRL: its dropout goes too
            disable_dropout(model)
        return model, args, processing_class

    ref_model = None

    def _reference(self):
        """``ref_model`` placed, and sharded like the policy, on first use (trainers/sharding.py)."""
        if self.ref_model is not None and not getattr(self.ref_model, "_hf_align_prepared", False):
            self.ref_model = prepare_reference(self.ref_model, self.accelerator)
            self.ref_model._hf_align_prepared = True
        return self.ref_model

    def _add_reference_sync(self) -> None:
        """With ``sync_ref_model``: refuse a policy without a separate reference to update (LoRA, as TRL), else
        update it every ``ref_model_sync_steps`` optimizer steps; it is then checkpointed (training state)."""
        if not getattr(self.args, "sync_ref_model", False):
            return
        if self.ref_model is None or hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
            raise ValueError(
                "sync_ref_model needs a full-weight policy and its frozen reference copy: under LoRA the reference "
                "is the policy with adapters off (as in TRL, not supported); train without LoRA or set "
                "sync_ref_model: false"
            )
        if self.is_fsdp_enabled or getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3:
            raise ValueError(
                "sync_ref_model is not supported under FSDP or DeepSpeed ZeRO-3 yet (the reference is sharded by the "
                "engine and the mix is not verified there): train with DDP or set sync_ref_model: false"
            )
        self.add_callback(ReferenceSync(self))

    def _save_extra_state(self, folder: str) -> None:
        if getattr(self.args, "sync_ref_model", False) and self.args.should_save:
            torch.save(self.ref_model.state_dict(), Path(folder) / REFERENCE_STATE)

    def _load_extra_state(self, folder: str) -> None:
        if getattr(self.args, "sync_ref_model", False):
            path = Path(folder) / REFERENCE_STATE
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: this checkpoint was saved without sync_ref_model"
                )
            self.ref_model.load_state_dict(torch.load(path, map_location=self.accelerator.device))

    def _init_metrics(self) -> None:
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def record(self, metrics: dict, training: bool) -> None:
        """Append detached scalar metrics of one micro-batch (tensors or floats)."""
        buffer = self._metrics["train" if training else "eval"]
        for key, value in metrics.items():
            buffer[key].append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = "eval_" if any(k.startswith("eval_") for k in logs) else ""
        buffer, acc = self._metrics["eval" if prefix else "train"], self.accelerator
        keys = sorted(k for k, v in buffer.items() if v)
        if acc.num_processes > 1:  # every key any process has: one that lacks it joins with "no value"
            keys = sorted(set(gather_object(keys)))
        # One value per key and process (time/* keys summed, others averaged over the calls), NaN (a call with
        # nothing to measure, e.g. a reward function that scored no completion) left out; then the mean over the
        # processes that have one, in one collective. A key with no value anywhere is not logged: never a NaN.
        values = torch.full((len(keys),), math.nan, dtype=torch.float64, device=acc.device)
        for i, k in enumerate(keys):
            if not buffer.get(k):
                continue  # this process has no value (NaN)
            x = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=acc.device) for v in buffer[k]])
            seen = ~x.isnan()
            total = torch.where(seen, x, 0.0).sum()
            values[i] = total if k.startswith("time/") else total / seen.sum()
        seen = ~values.isnan()
        sums_counts = torch.cat([torch.where(seen, values, 0.0), seen.double()])
        if acc.num_processes > 1 and keys:
            sums_counts = acc.reduce(sums_counts, reduction="sum")
        sums, counts = sums_counts.tolist()[: len(keys)], sums_counts.tolist()[len(keys) :]
        buffer.clear()
        logs.update({prefix + k: s / c for k, s, c in zip(keys, sums, counts) if c > 0})
        super().log(logs, start_time)


class DatasetTrainer(AlignTrainer):
    """TRL 1.16's constructor for the trainers fed by a dataset: a subclass implements ``prepare_dataset`` and
    ``default_collator``; ``prepare_model`` sees the model before Trainer does."""

    def __init__(
        self,
        model,
        args=None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
    ):
        import datasets

        model, args, processing_class = self._trl_inputs(
            model, args, processing_class, peft_config, quantization_config
        )
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        model = self.prepare_model(model, args, tokenizer)
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if isinstance(train_dataset, datasets.IterableDataset):
            # accelerate would concatenate an iterable's batches when dispatching them (TRL turns it off too)
            args.accelerator_config.dispatch_batches = False
        train_dataset = self.prepare_dataset(train_dataset, "train", args, tokenizer)
        named = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
        evals = {k: self.prepare_dataset(ds, k, args, tokenizer) for k, ds in named.items() if ds is not None}
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or self.default_collator(args, tokenizer),
            train_dataset=train_dataset,
            eval_dataset=evals if isinstance(eval_dataset, dict) else evals.get("eval"),
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._init_metrics()

    def prepare_model(self, model, args, tokenizer):
        """Hook: the loaded (and LoRA-wrapped) model, before Trainer takes it."""
        return model

    def prepare_dataset(self, dataset, name: str, args, tokenizer):
        """The rows of ``dataset`` (train, eval or a named eval set) as the collator takes them."""
        raise NotImplementedError

    def default_collator(self, args, tokenizer):
        raise NotImplementedError
