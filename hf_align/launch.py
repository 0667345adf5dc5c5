"""FSDP2 on a machine without CUDA (tests, laptops): accelerate drops an FSDP plugin there without a word.

accelerate's ``AcceleratorState`` turns a launch into FSDP only from a GPU-like distributed type; on CPU the state
stays ``MULTI_CPU`` and ``accelerate launch --config_file accelerate_configs/fsdp2.yaml`` silently trains plain
DDP. With ``HF_ALIGN_FSDP_ON_CPU=1`` in the environment, every hf_align trainer calls `fsdp_on_cpu_if_asked` right
after Trainer built its ``Accelerator`` (before any model is prepared): the (process-wide, shared) accelerator state
becomes FSDP with the plugin the launcher described (``ACCELERATE_FSDP_*`` variables), so Trainer and accelerate
prepare the model with ``fully_shard`` over gloo. Launch (accelerate_configs/fsdp2_cpu.yaml says the same)::

    HF_ALIGN_FSDP_ON_CPU=1 accelerate launch --config_file accelerate_configs/fsdp2_cpu.yaml recipes/sft.py --config ...

Without the flag a CPU launch of an FSDP config is refused (hf_align/trainers/safety.py), never run as DDP.
"""

from __future__ import annotations

import os

FLAG = "HF_ALIGN_FSDP_ON_CPU"


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1 / true / yes (how accelerate's launcher writes flags)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def fsdp_on_cpu_if_asked(accelerator) -> bool:
    """Make ``accelerator``'s state FSDP on CPU when ``HF_ALIGN_FSDP_ON_CPU`` and the launcher ask for it; returns
    whether it did. Call before anything is prepared (our trainers do, in ``create_accelerator_and_postprocess``)."""
    import torch

    fsdp2 = env_flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") == "2"
    if not (env_flag(FLAG) and fsdp2) or torch.cuda.is_available():  # FSDP1: refused by safety.py
        return False
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:  # what accelerate made of the FSDP launch on CPU
        state.fsdp_plugin = (
            FullyShardedDataParallelPlugin()
        )  # reads the launcher's ACCELERATE_FSDP_* settings
        state.distributed_type = DistributedType.FSDP
        # Every later AcceleratorState() re-reads the process state's type (MULTI_CPU) over its own: set both.
        from accelerate.state import PartialState

        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return state.distributed_type == DistributedType.FSDP
