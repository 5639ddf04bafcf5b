"""Per-device memory of a stage: training state plus the activations its schedule keeps alive.

Per layer and config (per device):
- training state: (params + grads + optimizer) / tp, and with FSDP the grads and optimizer state
  and the sharded params divided by dp as well, plus the unsharded params that stay gathered
  from forward to backward (``reshard_after_forward=False`` under pipelining);
- activations of one micro-batch: the layer's saved tensors at ``micro_batch_size / dp``
  samples, divided by tp for layers that split (Megatron without sequence parallelism splits most
  of them); with recomputation only the layer's input is kept.
A stage holds ``inflight`` micro-batches of activations (GPipe m, 1F1B p - s).
Not modelled: the transient buffer of the one layer being recomputed, allocator fragmentation
and communication buffers; calibration against measured peaks absorbs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..profile import ModelProfile
from .groups import StageConfig

__all__ = ["MemoryTables", "memory_tables", "stage_memory_bytes"]


@dataclass(frozen=True)
class MemoryTables:
    """(L, C) per-device bytes; see the module doc."""

    state_bytes: torch.Tensor
    saved_bytes: torch.Tensor
    input_bytes: torch.Tensor


def memory_tables(
    profile: ModelProfile, configs: Sequence[StageConfig], micro_batch_size: int, data_parallel: str
) -> MemoryTables:
    if data_parallel not in ("replicate", "fsdp"):
        raise ValueError(f"data_parallel={data_parallel!r} is not one of replicate, fsdp")

    def column(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)[:, None]

    layers = profile.layers
    splits = column([layer.tp_max_degree > 1 for layer in layers])
    state_bytes = column([layer.state_bytes for layer in layers])
    param_bytes = column([layer.param_bytes for layer in layers])
    dp = torch.tensor([c.dp for c in configs], dtype=torch.float64)[None, :]
    tp = torch.tensor([c.tp for c in configs], dtype=torch.float64)[None, :]
    tp_eff = torch.where(splits > 0, tp, torch.ones_like(tp))
    if data_parallel == "fsdp":
        state = (state_bytes / dp + param_bytes) / tp_eff
    else:
        state = state_bytes / tp_eff
    samples = (micro_batch_size / dp) / profile.batch_size
    saved = column([layer.saved_bytes for layer in layers]) * samples / tp_eff
    inputs = column([layer.input_bytes for layer in layers]) * samples
    return MemoryTables(state, saved, inputs)


def stage_memory_bytes(
    membership: torch.Tensor, recompute: torch.Tensor, inflight: torch.Tensor, tables: MemoryTables
) -> torch.Tensor:
    """(p, C) expected per-device bytes of each stage under each config.

    Args:
        membership: (p, L) probability that layer l is in stage k (one-hot for a plan).
        recompute: (L,) probability that layer l recomputes.
        inflight: (p,) micro-batches of activations stage k keeps at its peak.
        tables: per-layer per-config bytes.
    """
    per_mb = (1 - recompute)[:, None] * tables.saved_bytes + recompute[:, None] * tables.input_bytes
    state = membership @ tables.state_bytes
    return state + inflight[:, None] * (membership @ per_mb)
