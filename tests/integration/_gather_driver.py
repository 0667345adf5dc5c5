"""Shard a tiny Qwen2 (and a LoRA one) over the processes and check that `checkpoint_weights` yields exactly the
unsharded model's tensors, in the same order, on every process; print GATHER OK.

    python -m torch.distributed.run --nproc_per_node 2 tests/integration/_gather_driver.py fsdp2|zero3

fsdp2: torch's `fully_shard` per decoder layer and on the root, over gloo. zero3: `deepspeed.initialize` with ZeRO
stage 3 (no optimizer: parameters partitioned only). The reference is `checkpoint_weights` of the same model before
sharding, checked itself against peft's `merge_and_unload` (tests/integration/test_vllm_cpu.py does the same).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_align.rollout.weights import checkpoint_specs, checkpoint_weights  # noqa: E402
from tests.conftest import build_model, build_tokenizer  # noqa: E402


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def shard(model, engine: str):
    if engine == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (
            model.get_base_model().model.layers if hasattr(model, "peft_config") else model.model.layers
        ):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    engine_, *_ = deepspeed.initialize(model=model, config=config)
    return engine_


def check(name: str, model, engine: str) -> None:
    expected = [(n, t.clone()) for n, t in checkpoint_weights(model)]
    sharded = shard(model, engine)
    specs = checkpoint_specs(sharded)
    got = list(checkpoint_weights(sharded))
    assert [n for n, _ in got] == [n for n, _ in expected], (name, [n for n, _ in got])
    assert [(n, t.dtype, list(t.shape)) for n, t in got] == specs, name
    for (n, t), (_, want) in zip(got, expected, strict=True):
        assert type(t) is torch.Tensor, (name, n, type(t))
        tol = 0 if name == "plain" else 1e-6  # merged: a sharded GEMM may round differently
        torch.testing.assert_close(t, want, rtol=0, atol=tol, msg=f"{name}: {n}")
    inner = sharded.module if engine == "zero3" else sharded
    sharded_params = [
        p for p in inner.parameters() if hasattr(p, "ds_id") or type(p) is not torch.nn.Parameter
    ]
    assert sharded_params, f"{name}: nothing was sharded"
    print(f"rank {dist.get_rank()} {name}: {len(got)} tensors equal", flush=True)


def main(engine: str) -> None:
    if engine == "zero3":
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: (
            None
        )  # no C++ build: plain gloo
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    base = build_model(tokenizer)
    with torch.no_grad():  # trained-looking weights: not the initialisation, different per tensor
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    peft_model = lora(copy.deepcopy(base))
    merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    for n, t in checkpoint_weights(peft_model):  # the reference itself, against peft's own merge
        torch.testing.assert_close(t, merged[n], rtol=0, atol=1e-6)
    check("plain", base, engine)
    check("lora", peft_model, engine)
    dist.barrier()
    if dist.get_rank() == 0:
        print("GATHER OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
