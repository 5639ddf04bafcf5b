"""Alpha-beta collective and point-to-point times (nccl-tests bus-bandwidth conventions).

Every function is a pure function of tensors (bytes may carry gradients) and returns seconds.
``p`` is the number of ranks taking part; ``latency_s``/``bandwidth_bytes_per_s`` describe the
slowest link on the ring.
"""

from __future__ import annotations

import torch

__all__ = [
    "p2p_time_s", "ring_allreduce_time_s", "allgather_time_s", "reduce_scatter_time_s",
    "hierarchical_allreduce_time_s",
]


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def p2p_time_s(num_bytes, latency_s, bandwidth_bytes_per_s) -> torch.Tensor:
    """One send: ``alpha + n / B``."""
    return _f64(latency_s) + _f64(num_bytes) / _f64(bandwidth_bytes_per_s)


def ring_allreduce_time_s(num_bytes, p, latency_s, bandwidth_bytes_per_s) -> torch.Tensor:
    """Ring all-reduce of ``num_bytes`` over ``p`` ranks: ``2(p-1)a + 2(p-1)/p * n/B``; 0 for p=1."""
    p = _f64(p)
    return 2 * (p - 1) * _f64(latency_s) + 2 * (p - 1) / p * _f64(num_bytes) / _f64(bandwidth_bytes_per_s)


def allgather_time_s(num_bytes, p, latency_s, bandwidth_bytes_per_s) -> torch.Tensor:
    """Ring all-gather producing ``num_bytes`` on every rank: ``(p-1)a + (p-1)/p * n/B``."""
    p = _f64(p)
    return (p - 1) * _f64(latency_s) + (p - 1) / p * _f64(num_bytes) / _f64(bandwidth_bytes_per_s)


def reduce_scatter_time_s(num_bytes, p, latency_s, bandwidth_bytes_per_s) -> torch.Tensor:
    """Ring reduce-scatter of ``num_bytes`` per rank: same cost as an all-gather of them."""
    return allgather_time_s(num_bytes, p, latency_s, bandwidth_bytes_per_s)


def hierarchical_allreduce_time_s(
    num_bytes, ranks_per_node, num_nodes, intra_latency_s, intra_bandwidth, inter_latency_s,
    inter_bandwidth,
) -> torch.Tensor:
    """Two-level all-reduce: reduce-scatter inside each node, ring all-reduce of each rank's
    1/ranks_per_node shard across nodes (all shards in parallel on their own NICs), all-gather
    inside the node. Reduces to a ring all-reduce when one of the levels has a single rank."""
    q = _f64(ranks_per_node)
    intra = reduce_scatter_time_s(num_bytes, q, intra_latency_s, intra_bandwidth)
    inter = ring_allreduce_time_s(_f64(num_bytes) / q, num_nodes, inter_latency_s, inter_bandwidth)
    return 2 * intra + inter
