"""Glue shared by the trainers: per-step metric buffers merged across processes, and global counts.

Metrics are recorded per micro-batch on each process; at logging time each key is averaged over its calls
(``time/*`` keys are summed: seconds spent in the step), then averaged over processes with one collective.
Every process records the same keys (same code path), which keeps that collective aligned.
"""

from __future__ import annotations

import torch


def merge_metrics(accelerator, buffer: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    keys = sorted(k for k, v in buffer.items() if v)
    device = accelerator.device
    # Values may be detached tensors still on the device: one stack here instead of a sync per micro-batch.
    stacked = [
        torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in buffer[k]]) for k in keys
    ]
    local = [x.sum() if k.startswith("time/") else x.mean() for k, x in zip(keys, stacked)]
    values = torch.stack(local) if local else torch.zeros(0, dtype=torch.float64, device=device)
    if accelerator.num_processes > 1 and keys:
        values = accelerator.reduce(values, reduction="mean")
    buffer.clear()
    return {prefix + k: v for k, v in zip(keys, values.tolist())}


def global_sum(accelerator, count, device) -> torch.Tensor:
    """A count summed over processes (e.g. response tokens or pairs in an optimizer step)."""
    count = torch.as_tensor(count, device=device)
    if accelerator.num_processes > 1:
        count = accelerator.gather(count.reshape(1)).sum()
    return count


def weighted_mean(accelerator, values: list[float], count: int) -> list[float]:
    """Means computed on each process over ``count`` items, combined into the mean over all items."""
    totals = torch.tensor(
        [*(v * count for v in values), float(count)], dtype=torch.float64, device=accelerator.device
    )
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return (totals[:-1] / totals[-1].clamp(min=1)).tolist()
