"""Both ends of a weight sync to vLLM: the policy's weights in Hugging Face checkpoint format (trainer side) and
`WeightSyncExtension`, the methods vLLM adds to each of its workers to load them in place (worker side).

Choices:
- A PEFT LoRA model goes out merged, W + the active adapters' `get_delta_weight` (peft's own delta, the one its
  `merge` adds), as new tensors: peft's in-place `merge_adapter` / `unmerge_adapter` would leave the trained
  base weights off by float rounding. Plain LoRA only; trained `modules_to_save` copies replace the originals.
- A tied `lm_head.weight` is not sent: vLLM ties it itself. But on vLLM's CPU backend the tied head keeps a
  GEMM handle packed from the old embedding, so the worker points it back at the new one and re-packs it.
- The worker loads through `model_runner.reload_weights(..., is_checkpoint_format=True)`: the model's own
  `load_weights` maps checkpoint names onto vLLM's fused layers (qkv, gate_up), then each layer's post-load
  processing runs again. On CPU that is the only route that works: the processing repacks every linear layer
  and drops its parameter, so a plain `model.load_weights` fails ("'Parameter' object has no attribute
  'weight_loader'"). The "Failed to load weights" vLLM logs for RotaryEmbedding / ParallelLMHead is expected.
- Weights travel as `(name, tensor)` pairs in process (no copy, no pickling), as the path of one safetensors
  file (all that a multiprocess engine or the server's string-only RPC endpoint can carry: same machine), or,
  to a server on another node, over `weight_group`: a torch.distributed group of the trainer's main process
  (rank 0, hosting the TCPStore) and the server's workers (ranks 1..), NCCL between GPUs, gloo otherwise, made
  from torch's own store and backend classes so it leaves both sides' default groups alone (vLLM's
  `stateless_init_torch_distributed_process_group` does the same but would make the trainer import vllm).
  Each tensor is broadcast from rank 0 (TRL's `update_named_param`, one tensor per broadcast: no bucketing) as
  soon as it is whole, after the list of names and full shapes (`checkpoint_specs`, read without gathering);
  the worker feeds them to `reload_weights` as they arrive, so it never holds a second copy of the model.
- Sharded policies (FSDP2, DeepSpeed ZeRO-3): each tensor is made whole when its turn comes, FSDP2's by
  `DTensor.full_tensor()`, ZeRO-3's by `deepspeed.zero.GatheredParameters` (one all-gather per parameter: simple,
  more collectives than per module); a LoRA delta is peft's `get_delta_weight` on the gathered adapters (ZeRO-3) or
  on the DTensor shards, its product gathered (FSDP2). These are collectives: every rank runs `checkpoint_weights`
  to its end, in the same order, also a rank that throws the tensors away (the server's non-main ranks). The
  file route still holds the whole model on rank 0 (one safetensors file).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from hf_align.rollout.base import unwrap

logger = logging.getLogger(__name__)

# vLLM's `worker_extension_cls` takes a dotted path, which it imports inside each worker: the class below.
WORKER_EXTENSION = "hf_align.rollout.weights.WeightSyncExtension"
# called by name through `collective_rpc`
LOAD_METHOD, INFO_METHOD = "hf_align_load_weights", "hf_align_server_info"
JOIN_METHOD, RECEIVE_METHOD = "hf_align_join_weight_group", "hf_align_receive_weights"


def _tied(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


@contextmanager
def _zero3_gathered(params: Iterable[torch.nn.Parameter]):
    """DeepSpeed ZeRO-3 partitions among `params` gathered whole for the block (a collective of every rank)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole, as a new tensor when it was an FSDP2 shard or ZeRO-3 partition (a collective), else a
    detached view."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        return tensor.detach().full_tensor()
    if hasattr(tensor, "ds_id"):
        with _zero3_gathered([tensor]):
            return tensor.detach().clone()  # the gathered storage is freed when the block ends
    return tensor.detach()


def _adapters(module: torch.nn.Module) -> list[str]:
    """The LoRA layer's active adapters not yet merged into its weight."""
    return [a for a in module.active_adapters if a not in module.merged_adapters and a in module.scaling]


def _lora_layers(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name -> LoRA layer with active, not yet merged adapters (plain LoRA only)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters:
            continue
        adapters = _adapters(module)
        if any(module.use_dora.get(a) or module.lora_bias.get(a) for a in adapters):
            raise NotImplementedError(
                f"sync_weights merges plain LoRA only; {name} uses DoRA or lora_bias: give the engine a merged "
                "copy (peft's merge_and_unload on a deepcopy) instead"
            )
        if adapters:
            layers[name] = module
    return layers


def _lora_delta(module: torch.nn.Module) -> torch.Tensor:
    """The summed `get_delta_weight` of `module`'s active adapters, whole (see the module docstring)."""
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    with torch.no_grad(), _zero3_gathered(lora):
        return _whole(sum(module.get_delta_weight(a) for a in _adapters(module)))


def _entries(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.nn.Module | None]]:
    """`(checkpoint name, live tensor or its shard, LoRA layer whose delta it gets or None)`, a tied `lm_head`
    left out; peft's names mapped back to the plain transformers ones."""
    model = unwrap(model)
    peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    base = model.get_base_model() if peft else model
    tied, layers = _tied(base), _lora_layers(base) if peft else {}
    for key, tensor in base.state_dict(keep_vars=True).items():  # keep_vars: ZeRO-3's partition attributes
        if peft:
            # the adapters themselves; a module that `modules_to_save` replaces by its trained copy
            if "lora_" in key or ".original_module." in key:
                continue
            if "trainable_tokens_" in key or "token_adapter" in key:
                raise NotImplementedError(f"sync_weights does not merge peft trainable tokens ({key})")
            if ".modules_to_save." in key:
                prefix, rest = key.split(".modules_to_save.", 1)
                adapter, param = rest.split(".", 1)
                if adapter not in model.active_adapters:
                    continue
                key = f"{prefix}.{param}"
            key = key.replace(".base_layer.", ".")
        if tied and key == "lm_head.weight":
            continue
        module_name, _, param_name = key.rpartition(".")
        yield key, tensor, layers.get(module_name) if param_name == "weight" else None


def checkpoint_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs of `model` in Hugging Face checkpoint format, as vLLM's `load_weights` wants, one at a
    time: detached views of the live parameters (no copy) except merged LoRA weights (new tensors: the policy is
    untouched); a tied `lm_head` left out. Sharded, at most one parameter (one LoRA layer) is held whole at a time;
    every rank must run the stream to its end (module docstring)."""
    for name, tensor, lora in _entries(model):
        tensor = _whole(tensor)
        yield name, tensor if lora is None else tensor + _lora_delta(lora).to(tensor.dtype)


def checkpoint_specs(model: torch.nn.Module) -> list[tuple[str, torch.dtype, list[int]]]:
    """`(name, dtype, full shape)` of each tensor `checkpoint_weights` yields, in order, without gathering any."""
    return [(n, t.dtype, list(getattr(t, "ds_shape", t.shape))) for n, t, _ in _entries(model)]


def write_safetensors(model: torch.nn.Module, directory: str | None = None) -> str:
    """Write `checkpoint_weights(model)` to one safetensors file in `directory` (default /dev/shm when writable:
    RAM that every process on the machine sees); return its path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in checkpoint_weights(model):
        tensor = tensor.contiguous().cpu()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    directory = directory or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    path = os.path.join(directory, f"hf_align_weights_{os.getpid()}_{uuid.uuid4().hex}.safetensors")
    save_file(tensors, path)
    return path


def _read(weights: str | Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    if not isinstance(weights, str):
        yield from weights
        return
    from safetensors import safe_open

    with safe_open(weights, framework="pt", device="cpu") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not _tied(model):
        return
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or not hasattr(embed, "weight"):
        logger.warning(
            "tied embeddings but no model.lm_head / model.model.embed_tokens: lm_head not re-packed"
        )
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    lm_head.weight = embed.weight
    dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def weight_group(
    address: str, port: int, rank: int, world_size: int, backend: str, timeout: float, local: str
):
    """Rank `rank` of a `backend` ("gloo" or "nccl") process group over a TCPStore that rank 0 serves at
    `address:port`; `local` is this process's own address, the one gloo listens on."""
    wait = timedelta(seconds=timeout)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=wait)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = wait
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = wait
    # gloo would pick the address this host's name resolves to, often 127.0.1.1: unreachable from another node
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=local)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def broadcast(group, tensor: torch.Tensor) -> None:
    """Rank 0's `tensor` into every other rank's `tensor` (of the same shape and dtype)."""
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def tensor_specs(specs: list[tuple[str, torch.dtype, list[int]]]) -> str:
    """What a receiver allocates, in the order of the broadcasts (`checkpoint_specs`): JSON `[[name, dtype, shape],
    ...]`."""
    return json.dumps([[name, str(dtype).removeprefix("torch."), shape] for name, dtype, shape in specs])


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`self` is the worker); method names are prefixed so they cannot clash
    with the worker's own."""

    def hf_align_load_weights(self, weights: str | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load checkpoint-format weights in place: a safetensors file path, or `(name, tensor)` pairs."""
        self.model_runner.reload_weights(weights_iterator=_read(weights), is_checkpoint_format=True)
        _repack_tied_lm_head(self.model_runner.get_model())

    def hf_align_server_info(self) -> dict:
        """The served model's generation-config EOS ids (read on the server's filesystem) and this worker's rank."""
        eos = self.model_config.try_get_generation_config().get("eos_token_id")
        return {"eos_token_ids": eos if isinstance(eos, list) else [eos], "rank": self.rank}

    def hf_align_join_weight_group(self, spec: str) -> None:
        """Join the trainer's weight group; `spec` is JSON {address, port, world_size, backend, timeout}."""
        s = json.loads(spec)
        group = weight_group(**s, rank=1 + self.rank, local=_route_address(s["address"], s["port"]))
        self.hf_align_weight_group = (group, s["backend"])

    def hf_align_receive_weights(self, specs: str) -> None:
        """Receive the tensors `specs` (`tensor_specs`) lists, broadcast by the trainer, and load them."""
        group, backend = self.hf_align_weight_group
        device = self.device if backend == "nccl" else "cpu"

        def received() -> Iterator[tuple[str, torch.Tensor]]:
            for name, dtype, shape in json.loads(specs):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                broadcast(group, tensor)
                yield name, tensor

        weights = received()
        self.hf_align_load_weights(weights)
        for _ in weights:  # had the loader stopped early, the trainer would wait on its remaining broadcasts
            pass


def _route_address(host: str, port: int) -> str:
    """This machine's address on the route to `host` (a UDP "connect" sends nothing)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        return s.getsockname()[0]
