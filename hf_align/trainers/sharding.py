"""What the trainers do differently when the accelerator shards parameters (FSDP2, DeepSpeed ZeRO-3).

- **References are sharded like the policy** (`prepare_reference`): a frozen copy is wrapped by the same engine, on
  first use (the policy is prepared by then, so the engine's settings are final): ZeRO-3 through
  ``deepspeed.initialize`` with the training config minus its optimizer, FSDP2 through accelerate's
  ``fsdp2_prepare_model``. Every process runs the same reference forwards (one per micro-batch), as the engines'
  collectives require.
- **HF rollouts generate from whole weights** (`full_weights`): every parameter is gathered once per generation
  batch, at a point every process reaches together; the forwards inside then need no collective, so processes
  may call ``generate`` different numbers of times (dynamic sampling, an eval set that does not split evenly).
  ZeRO-3: ``deepspeed.zero.GatheredParameters``; FSDP2: ``unshard()`` with resharding after forward off.
- The log-prob code steps aside from its fused output layer by itself (hf_align/logprobs.py ``_sharded``).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


def prepare_reference(ref_model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """``ref_model`` frozen, in eval mode, placed and sharded as the accelerator shards the policy."""
    from accelerate.utils import DistributedType

    ref_model = ref_model.eval().requires_grad_(False)
    state = accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        import deepspeed

        config = {k: v for k, v in plugin.deepspeed_config.items() if k not in ("optimizer", "scheduler")}
        engine, *_ = deepspeed.initialize(model=ref_model, config=copy.deepcopy(config))
        engine.eval()  # returns None, unlike Module.eval
        return engine
    if state.distributed_type == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, ref_model).eval()
    return ref_model.to(accelerator.device)


_HELD = -1  # a submodule id no DeepSpeed module has: marks a parameter as in use while generating


@contextmanager
def full_weights(model: torch.nn.Module):
    """Every parameter of ``model`` whole on this process inside the block (a collective on entry and exit: every
    process must enter together), so forwards inside run no collective. A no-op for unsharded models."""
    from torch.distributed.fsdp import FSDPModule

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            # ZeRO-3's post-forward hook re-partitions a parameter that no active submodule holds (and the next
            # forward would all-gather it again): hold them all while generating.
            for p in partitioned:
                p.ds_active_sub_modules.add(_HELD)
            try:
                yield
            finally:
                for p in partitioned:
                    p.ds_active_sub_modules.discard(_HELD)
    elif fsdp:
        # FSDP2 has no summon_full_params: unshard each module and switch off its post-forward reshard (the
        # parameter groups' post_forward_mesh_info, what set_reshard_after_forward sets), restored afterwards.
        groups = [g for m in fsdp for g in m._get_fsdp_state()._fsdp_param_groups]
        saved = [g.post_forward_mesh_info for g in groups]
        for m in fsdp:
            m.unshard()
        for g in groups:
            g.post_forward_mesh_info = None
        try:
            yield
        finally:
            for g, info in zip(groups, saved):
                g.post_forward_mesh_info = info
            for m in fsdp:
                m.reshard()
    else:
        yield
