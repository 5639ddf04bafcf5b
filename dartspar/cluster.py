"""Devices, links and clusters: the hardware a plan runs on.

A cluster is a list of nodes; each node holds ``num_devices`` identical devices joined by an
intra-node link (NVLink, PCIe, shared memory), and nodes are joined by one inter-node link
(InfiniBand, Ethernet). Devices get global ids 0..D-1 in node order, so node i's devices are a
contiguous id range. Links follow the alpha-beta model: ``t = latency_s + bytes / bandwidth``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = ["DeviceSpec", "Link", "Node", "Cluster"]

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")


@dataclass(frozen=True)
class DeviceSpec:
    """Published specifications of one accelerator model.

    Attributes:
        name: catalogue key, e.g. "H100-SXM".
        peak_flops_per_s: dense peak FLOP/s per dtype name ("fp32", "bf16", ...); dtypes the
            device lacks are absent.
        memory_bytes: device memory capacity.
        memory_bandwidth_bytes_per_s: device memory (HBM/GDDR/DRAM) bandwidth.
    """

    name: str
    peak_flops_per_s: dict
    memory_bytes: float
    memory_bandwidth_bytes_per_s: float

    def __hash__(self) -> int:  # dict field: hash on the identifying fields
        return hash((self.name, self.memory_bytes, self.memory_bandwidth_bytes_per_s))

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; a clear error when the device has no such unit."""
        try:
            return float(self.peak_flops_per_s[dtype])
        except KeyError:
            raise ValueError(
                f"device {self.name!r} has no peak for dtype {dtype!r}; known: "
                f"{sorted(self.peak_flops_per_s)}. Add it to the catalogue or pick another dtype."
            ) from None


@dataclass(frozen=True)
class Link:
    """A communication link under the alpha-beta model (one direction)."""

    kind: str
    latency_s: float
    bandwidth_bytes_per_s: float

    def time_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Node:
    """``num_devices`` identical devices joined by ``intra_link``."""

    name: str
    device: DeviceSpec
    num_devices: int
    intra_link: Link


@dataclass(frozen=True)
class Cluster:
    """Nodes joined by ``inter_link``; device ids run 0..D-1 in node order."""

    name: str
    nodes: tuple[Node, ...]
    inter_link: Link

    @cached_property
    def num_devices(self) -> int:
        return sum(node.num_devices for node in self.nodes)

    @cached_property
    def node_of_device(self) -> tuple[int, ...]:
        """Node index of every device id."""
        return tuple(i for i, node in enumerate(self.nodes) for _ in range(node.num_devices))

    @cached_property
    def node_first_device(self) -> tuple[int, ...]:
        """First device id of every node."""
        starts, total = [], 0
        for node in self.nodes:
            starts.append(total)
            total += node.num_devices
        return tuple(starts)

    def device(self, device_id: int) -> DeviceSpec:
        return self.nodes[self.node_of_device[device_id]].device

    def link_between(self, a: int, b: int) -> Link:
        """The link that joins devices ``a`` and ``b`` (intra-node when they share a node)."""
        na, nb = self.node_of_device[a], self.node_of_device[b]
        return self.nodes[na].intra_link if na == nb else self.inter_link

    @cached_property
    def device_types(self) -> tuple[DeviceSpec, ...]:
        """Distinct device models, in order of first appearance."""
        seen: dict[str, DeviceSpec] = {}
        for node in self.nodes:
            seen.setdefault(node.device.name, node.device)
        return tuple(seen.values())
