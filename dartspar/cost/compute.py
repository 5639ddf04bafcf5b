"""Per-layer compute and tensor-parallel communication times for a set of stage configs.

For each layer and each ``StageConfig`` the layer's forward and backward time per micro-batch on
one replica (``micro_batch_size / dp`` samples) comes from the latency estimator: GEMMs split by
the tensor-parallel degree along the dimension the layer's tp plan divides, the backward as the
two transposed GEMMs (dX, dW), FLOPs the GEMM list does not cover at the estimator's large-GEMM
rate, and memory-bound work at the device bandwidth. Layers that do not split (tp_max_degree 1,
e.g. embeddings) run replicated on the tp ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from ..cluster import DeviceSpec
from ..profile import LayerProfile, ModelProfile
from .comm import ring_allreduce_time_s
from .groups import StageConfig
from .latency import LatencyEstimator

__all__ = ["ComputeTables", "compute_tables", "tp_degree"]


@dataclass(frozen=True)
class ComputeTables:
    """(L, C) float64 seconds per micro-batch on one replica of each config."""

    fwd_compute_s: torch.Tensor
    bwd_compute_s: torch.Tensor
    tp_fwd_comm_s: torch.Tensor  # the forward pass's tensor-parallel all-reduces
    tp_bwd_comm_s: torch.Tensor  # the backward pass's
    # Recomputing the layer's forward inside its backward: the forward and its collectives
    # (plus the cost model's per-layer recompute overhead, added by ``CostModel``).
    recompute_s: torch.Tensor


def tp_degree(layer: LayerProfile, tp: int) -> int:
    """The degree that actually divides ``layer``'s work: ``tp`` if it splits, else 1."""
    return tp if layer.tp_max_degree > 1 else 1


def _split(gemm, tp: int):
    if tp == 1 or gemm.tp_split == "none":
        return gemm.m, gemm.n, gemm.k, gemm.batch
    if gemm.tp_split == "n":
        return gemm.m, gemm.n / tp, gemm.k, gemm.batch
    if gemm.tp_split == "k":
        return gemm.m, gemm.n, gemm.k / tp, gemm.batch
    if gemm.tp_split == "batch":
        return gemm.m, gemm.n, gemm.k, gemm.batch / tp
    raise ValueError(f"GemmShape.tp_split={gemm.tp_split!r} is not one of n, k, batch, none")


def _layer_key(layer: LayerProfile) -> LayerProfile:
    return replace(layer, name="")


def compute_tables(
    profile: ModelProfile,
    configs: Sequence[StageConfig],
    micro_batch_size: int,
    estimator: LatencyEstimator,
    compute_dtype: str | Callable[[DeviceSpec], str],
) -> ComputeTables:
    """Forward/backward compute and tp all-reduce seconds of every layer under every config.

    ``compute_dtype`` is the GEMM dtype or a function of the device giving it. Identical layers
    (same figures, different names) are costed once.
    """
    dtype_of = compute_dtype if callable(compute_dtype) else (lambda _device: compute_dtype)
    unique: dict[LayerProfile, int] = {}
    layer_index = [unique.setdefault(_layer_key(layer), len(unique)) for layer in profile.layers]
    uniq_layers = list(unique)
    num_u, num_c = len(uniq_layers), len(configs)
    gemm_calls = [sum(g.count for g in layer.gemms) for layer in uniq_layers]
    calibrated = getattr(estimator, "layer_time_s", None)
    fwd = torch.zeros(num_u, num_c, dtype=torch.float64)
    bwd = torch.zeros(num_u, num_c, dtype=torch.float64)
    tp_fwd = torch.zeros(num_u, num_c, dtype=torch.float64)
    tp_bwd = torch.zeros(num_u, num_c, dtype=torch.float64)

    for c, config in enumerate(configs):
        if micro_batch_size % config.dp:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} is not divisible by dp={config.dp}"
            )
        factor = (micro_batch_size // config.dp) / profile.batch_size
        device = config.group.device
        dtype = dtype_of(device)
        peak_s = 1.0 / device.peak(dtype)
        rows_f, rows_b, owner_f, owner_b = [], [], [], []
        for u, layer in enumerate(uniq_layers):
            tp = tp_degree(layer, config.tp)
            scaled = layer.scaled(factor)
            gemm_flops = 0.0
            for gemm in scaled.gemms:
                m, n, k, batch = _split(gemm, tp)
                gemm_flops += 2.0 * batch * m * n * k * gemm.count
                rows_f.append((m, n, k, batch, gemm.count))
                owner_f.append(u)
                # dX = dY @ W^T is (m x n)@(n x k); dW = X^T @ dY is (k x m)@(m x n).
                rows_b.append((m, k, n, batch, gemm.count))
                rows_b.append((k, n, m, batch, gemm.count))
                owner_b += [u, u]
            # FLOPs outside the GEMM list (custom ops) at the rate of a large GEMM.
            rest_f = max(0.0, scaled.fwd_flops / tp - gemm_flops)
            rest_b = max(0.0, scaled.bwd_flops / tp - 2 * gemm_flops)
            big = estimator.gemm_time_s(4096.0, 4096.0, 4096.0, 1.0, dtype, device)
            rate_s_per_flop = (big / (2.0 * 4096.0**3)).item() if rest_f or rest_b else peak_s
            mem_s = estimator.memory_time_s(scaled.other_bytes_moved / tp, device)
            fwd[u, c] += rest_f * rate_s_per_flop + mem_s
            bwd[u, c] += rest_b * rate_s_per_flop + 2 * mem_s  # grads of elementwise ops read+write twice
            if tp > 1:
                link = config.tp_link
                # Every collective pays the link latency: count x (one of the mean size).
                for out, volume, count in ((tp_fwd, scaled.tp_allreduce_bytes, scaled.tp_allreduce_count),
                                           (tp_bwd, scaled.tp_bwd_allreduce_bytes, scaled.tp_bwd_allreduce_count)):
                    if count:
                        out[u, c] = count * ring_allreduce_time_s(
                            volume / count, tp, link.latency_s, link.bandwidth_bytes_per_s)
        for rows, owner, out in ((rows_f, owner_f, fwd), (rows_b, owner_b, bwd)):
            if not rows:
                continue
            shapes = torch.tensor(rows, dtype=torch.float64)
            times = estimator.gemm_time_s(
                shapes[:, 0], shapes[:, 1], shapes[:, 2], shapes[:, 3], dtype, device
            ) * shapes[:, 4]
            out[:, c] += torch.zeros(num_u, dtype=torch.float64).index_add_(
                0, torch.tensor(owner), times
            )
        if calibrated is not None:
            # A fitted estimator knows how kernels slow down inside a real layer and what the
            # framework costs per GEMM call (dominant on CPU); apply it to whole layers.
            for u in range(num_u):
                kernels_f, kernels_b = fwd[u, c].clone(), bwd[u, c].clone()
                layer_f = calibrated(kernels_f, gemm_calls[u], device, backward=False)
                layer_fb = calibrated(kernels_f + kernels_b, gemm_calls[u], device, backward=True)
                fwd[u, c], bwd[u, c] = layer_f, layer_fb - layer_f
    index = torch.tensor(layer_index)
    fwd, tp_fwd = fwd[index], tp_fwd[index]
    return ComputeTables(fwd, bwd[index], tp_fwd, tp_bwd[index], fwd + tp_fwd)


def optimizer_tables(
    profile: ModelProfile, configs: Sequence[StageConfig], data_parallel: str, estimator: LatencyEstimator
) -> torch.Tensor:
    """(L, C) float64 seconds of the optimizer step on each layer's parameters on one device.

    The update is memory-bound: it reads and writes the optimizer state and the parameters and
    reads the gradients (Adam with fp32 state: 28-30 bytes per parameter), once per step, on
    the device's shard: split by the layer's tensor-parallel degree and, under FSDP, by dp.
    """
    out = torch.zeros(profile.num_layers, len(configs), dtype=torch.float64)
    for c, config in enumerate(configs):
        device = config.group.device
        for i, layer in enumerate(profile.layers):
            if not layer.num_params:
                continue
            moved = 2 * (layer.optimizer_bytes + layer.param_bytes) + layer.grad_bytes
            shard = tp_degree(layer, config.tp) * (config.dp if data_parallel == "fsdp" else 1)
            out[i, c] = estimator.memory_time_s(moved / shard, device)
    return out
