"""What the cost model needs to know about the device group a stage runs on.

A stage's devices are summarised by a ``DeviceGroupClass``: data-parallel replicas run in
lock-step, so the group computes at the pace of its slowest device and must fit in its smallest
memory; the links its collectives use follow from how many nodes it spans. A ``StageConfig`` is a
group class plus the stage's (dp, tp) split: everything the per-layer cost tables depend on
besides the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from ..cluster import Cluster, DeviceSpec, Link

__all__ = ["DeviceGroupClass", "StageConfig", "group_class"]


@dataclass(frozen=True)
class DeviceGroupClass:
    """Cost-relevant summary of a device group.

    Attributes:
        device: the group's slowest device (lowest peak FLOP/s in the compute dtype).
        memory_bytes: the smallest device memory in the group.
        num_devices: group size.
        num_nodes: nodes the group touches.
        min_devices_per_node: fewest of the group's devices on one of its nodes (the
            hierarchical all-reduce's per-node rank count, and the largest tensor-parallel degree
            that stays inside a node).
        intra_link: the slowest intra-node link among its nodes.
        inter_link: the cluster's inter-node link.
    """

    device: DeviceSpec
    memory_bytes: float
    num_devices: int
    num_nodes: int
    min_devices_per_node: int
    intra_link: Link
    inter_link: Link

    @property
    def label(self) -> str:
        where = "1 node" if self.num_nodes == 1 else f"{self.num_nodes} nodes"
        return f"{self.num_devices}x{self.device.name} ({where})"


@dataclass(frozen=True)
class StageConfig:
    """A stage's device group class and (dp, tp) split; ``dp * tp == group.num_devices``."""

    group: DeviceGroupClass
    dp: int
    tp: int

    def __post_init__(self) -> None:
        if self.dp * self.tp != self.group.num_devices:
            raise ValueError(
                f"StageConfig dp={self.dp} x tp={self.tp} != group size {self.group.num_devices}"
            )

    @property
    def tp_link(self) -> Link:
        """Tensor-parallel ranks are consecutive ids: inside a node unless tp exceeds it."""
        return self.group.intra_link if self.tp <= self.group.min_devices_per_node else self.group.inter_link


def group_class(
    cluster: Cluster, device_ids: Sequence[int], compute_dtype: str | Callable[[DeviceSpec], str]
) -> DeviceGroupClass:
    """Summarise ``device_ids`` of ``cluster`` (see ``DeviceGroupClass``).

    ``compute_dtype``: the GEMM dtype, or a function giving it per device (mixed clusters train
    in bf16 where the hardware has it and fp16 where it does not).
    """
    dtype_of = compute_dtype if callable(compute_dtype) else (lambda _device: compute_dtype)
    if not device_ids:
        raise ValueError("a device group needs at least one device")
    per_node: dict[int, int] = {}
    for device_id in device_ids:
        node = cluster.node_of_device[device_id]
        per_node[node] = per_node.get(node, 0) + 1
    nodes = [cluster.nodes[i] for i in per_node]
    slowest = min((n.device for n in nodes), key=lambda d: d.peak(dtype_of(d)))
    intra = min((n.intra_link for n in nodes), key=lambda link: link.bandwidth_bytes_per_s)
    return DeviceGroupClass(
        device=slowest,
        memory_bytes=min(n.device.memory_bytes for n in nodes),
        num_devices=len(device_ids),
        num_nodes=len(per_node),
        min_devices_per_node=min(per_node.values()),
        intra_link=intra,
        inter_link=cluster.inter_link,
    )
