"""Devices, links and clusters: the hardware a plan runs on.

A cluster is a list of nodes; each node holds ``num_devices`` identical devices joined by an
intra-node link (NVLink, PCIe, shared memory), and nodes are joined by one inter-node link
(InfiniBand, Ethernet). Devices get global ids 0..D-1 in node order, so node i's devices are a
contiguous id range. Links follow the alpha-beta model: ``t = latency_s + bytes / bandwidth``.

Clusters are described in YAML (``conf/cluster/<name>.yaml``, which is also the Hydra ``cluster``
config group) and read with ``load_cluster``::

    name: mixed-small
    nodes:                          # in device-id order
      - {name: h100, device: H100-SXM, count: 1, devices_per_node: 4, intra_link: nvlink4}
      - {name: t4, device: T4, devices_per_node: 4, intra_link: pcie3}
    inter_link: ib-hdr              # a catalogue name, or {kind, latency_s, bandwidth_bytes_per_s}
    devices:                        # optional: new devices, or changes to catalogue entries
      T4: {peak_flops_per_s: {bf16: 8.1e12}}   # e.g. a rate you measured

``count: k`` expands to k nodes named ``<name>-0 .. <name>-{k-1}`` (``name`` defaults to the
lower-cased device name). A link mapping whose ``kind`` is a catalogue link inherits the fields it
leaves out; an entry under ``devices:`` named like a catalogue device changes only the fields it
gives (its ``peak_flops_per_s`` entries are added to / replace the catalogue's dtypes), and any
other name must give all three fields. Numbers must be positive (a link's ``latency_s`` may be
0). Device and link figures live in ``dartspar.catalogue``.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DeviceSpec",
    "Link",
    "Node",
    "Cluster",
    "ClusterConfigError",
    "CLUSTER_DIR",
    "load_cluster",
    "list_clusters",
]

DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")

# Order in which a default dtype is chosen when a caller does not name one: the training dtypes,
# lowest precision first; fp8 is left out because nothing here trains in it.
PREFERRED_DTYPES = ("bf16", "fp16", "tf32", "fp32")

CLUSTER_DIR = Path(__file__).resolve().parents[1] / "conf" / "cluster"


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
    # Fitted by dartspar.calibrate from measured runs: "stage_overhead_s", "step_overhead_s"
    # (read by CostModel) plus fit metadata; empty for a cluster described by datasheets alone.
    calibration: dict = field(default_factory=dict, hash=False)

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

    # ----- helpers for the search and the reports (pure; cached where it pays) -----

    def node_devices(self, node_index: int) -> range:
        """Device ids of node ``node_index`` (a contiguous range)."""
        start = self.node_first_device[node_index]
        return range(start, start + self.nodes[node_index].num_devices)

    @cached_property
    def common_dtypes(self) -> tuple[str, ...]:
        """Dtypes (in ``DTYPES`` order) that every device of the cluster has a peak for."""
        return tuple(
            d for d in DTYPES if all(d in spec.peak_flops_per_s for spec in self.device_types)
        )

    def preferred_dtype(self, candidates: Sequence[str] = PREFERRED_DTYPES) -> str:
        """The first of ``candidates`` that every device supports.

        E.g. ``("bf16", "fp16")`` gives "fp16" on a cluster with V100s or T4s (no bf16 units).
        """
        for dtype in candidates:
            if dtype in self.common_dtypes:
                return dtype
        raise ValueError(
            f"cluster {self.name!r}: no dtype among {list(candidates)} is supported by every "
            f"device (common to all: {list(self.common_dtypes)}). Pick one of those, or add the "
            "missing peaks under `devices:` in the cluster YAML."
        )

    @cached_property
    def _node_peaks(self) -> dict:
        return {}  # dtype -> tuple of each node's device peak FLOP/s, filled on demand

    def node_peaks(self, dtype: str | None = None) -> tuple[float, ...]:
        """Peak FLOP/s in ``dtype`` of each node's device model (``None``: preferred_dtype())."""
        dtype = self.preferred_dtype() if dtype is None else dtype
        if dtype not in self._node_peaks:
            self._node_peaks[dtype] = tuple(node.device.peak(dtype) for node in self.nodes)
        return self._node_peaks[dtype]

    def node_order_by_speed(
        self, dtype: str | None = None, fastest_first: bool = True
    ) -> tuple[int, ...]:
        """Node indices sorted by their devices' peak FLOP/s in ``dtype``; ties keep index order.

        ``cluster.reordered(cluster.node_order_by_speed())`` is the fast-first device order,
        ``fastest_first=False`` the slow-first one. Raises ValueError when a device lacks ``dtype``.
        """
        peaks = self.node_peaks(dtype)
        sign = -1.0 if fastest_first else 1.0
        return tuple(sorted(range(len(self.nodes)), key=lambda i: sign * peaks[i]))

    def devices_by_speed(self, dtype: str | None = None) -> tuple[int, ...]:
        """Device ids, fastest peak FLOP/s in ``dtype`` first; ties keep id order.

        ``dtype=None`` uses ``preferred_dtype()``. Raises ValueError when a device lacks ``dtype``.
        """
        return tuple(d for i in self.node_order_by_speed(dtype) for d in self.node_devices(i))

    def _check_node_order(self, node_order: Sequence[int]) -> tuple[int, ...]:
        try:
            order = tuple(operator.index(i) for i in node_order)
        except TypeError:
            raise ValueError(
                f"node_order={list(node_order)!r} must be a sequence of node indices (ints)"
            ) from None
        if sorted(order) != list(range(len(self.nodes))):
            raise ValueError(
                f"node_order={list(order)} must be a permutation of 0..{len(self.nodes) - 1} "
                f"(cluster {self.name!r} has {len(self.nodes)} nodes)"
            )
        return order

    def reordered(self, node_order: Sequence[int]) -> "Cluster":
        """The same cluster with its nodes in ``node_order`` (device ids renumbered to match).

        New node ``j`` is old node ``node_order[j]``; ``reorder_device_map`` gives the device ids.
        """
        order = self._check_node_order(node_order)
        return dataclasses.replace(self, nodes=tuple(self.nodes[i] for i in order))

    def reorder_device_map(self, node_order: Sequence[int]) -> tuple[int, ...]:
        """For ``reordered(node_order)``: entry ``d`` is the old id of new device ``d``."""
        order = self._check_node_order(node_order)
        return tuple(d for i in order for d in self.node_devices(i))

    def node_types(self) -> dict[str, tuple[int, ...]]:
        """Node indices grouped by device model name, models in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            groups.setdefault(node.device.name, []).append(i)
        return {name: tuple(ids) for name, ids in groups.items()}

    def summary(self) -> str:
        """A short table: runs of alike consecutive nodes, their device, count and link."""
        rows = [("nodes", "device", "devices", "intra-node link")]
        i = 0
        while i < len(self.nodes):
            j = i
            first = self.nodes[i]
            while j + 1 < len(self.nodes) and _alike(self.nodes[j + 1], first):
                j += 1
            names = first.name if i == j else f"{first.name}..{self.nodes[j].name}"
            rows.append((names, first.device.name, f"{j - i + 1} x {first.num_devices}",
                         _describe_link(first.intra_link)))
            i = j + 1
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [
            f"cluster {self.name!r}: {self.num_devices} devices on {len(self.nodes)} "
            f"node{'' if len(self.nodes) == 1 else 's'}; "
            f"between nodes: {_describe_link(self.inter_link)}"
        ]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A mapping ``load_cluster`` reads back into an equal Cluster (one entry per node).

        Device specs are written in full under ``devices:``; a spec that carries a catalogue name
        but lacks some of that entry's dtypes would gain them on the way back (merge semantics).
        """
        return {
            "name": self.name,
            "devices": {
                spec.name: {
                    "peak_flops_per_s": dict(spec.peak_flops_per_s),
                    "memory_bytes": spec.memory_bytes,
                    "memory_bandwidth_bytes_per_s": spec.memory_bandwidth_bytes_per_s,
                }
                for spec in self.device_types
            },
            "nodes": [
                {"name": n.name, "device": n.device.name, "count": 1,
                 "devices_per_node": n.num_devices, "intra_link": _link_dict(n.intra_link)}
                for n in self.nodes
            ],
            "inter_link": _link_dict(self.inter_link),
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
        }


def _alike(a: Node, b: Node) -> bool:
    return (a.device.name, a.num_devices, a.intra_link) == (b.device.name, b.num_devices, b.intra_link)


def _describe_link(link: Link) -> str:
    return f"{link.kind} {link.bandwidth_bytes_per_s / 1e9:g} GB/s, {link.latency_s * 1e6:g} us"


def _link_dict(link: Link) -> dict:
    return {"kind": link.kind, "latency_s": link.latency_s,
            "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s}


# ---------------------------------------------------------------------------------------------
# Loading YAML / mappings
# ---------------------------------------------------------------------------------------------


class ClusterConfigError(ValueError):
    """A cluster description that is malformed; the message names the source, field and fix."""


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``450e9`` as a float (YAML 1.2, as OmegaConf/Hydra do; PyYAML's
    YAML 1.1 rules would give the string "450e9") and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key_node.value!r}", key_node.start_mark,
                )
            seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)

_TOP_KEYS = {"name": True, "nodes": True, "inter_link": True, "devices": False, "description": False,
             "calibration": False}
# Calibration figures the cost model reads; other calibration keys are fit metadata, kept as is.
_CALIBRATION_NUMBERS = ("stage_overhead_s", "step_overhead_s", "recompute_overhead_s", "memory_baseline_bytes")
_NODE_KEYS = {"device": True, "devices_per_node": True, "intra_link": True, "count": False, "name": False}
_LINK_KEYS = ("kind", "latency_s", "bandwidth_bytes_per_s")
_DEVICE_KEYS = ("peak_flops_per_s", "memory_bytes", "memory_bandwidth_bytes_per_s")


def list_clusters(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the cluster YAML files in ``directory`` (default: ``conf/cluster``), sorted."""
    folder = CLUSTER_DIR if directory is None else Path(directory)
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_cluster(source: Any) -> Cluster:
    """Build a Cluster from a shipped name, a YAML path, or a mapping.

    Args:
        source: a name in ``list_clusters()`` (read from ``conf/cluster/<name>.yaml``); a path
            (str or PathLike) to a YAML file; a Mapping with the YAML schema (module docstring);
            an OmegaConf DictConfig (e.g. Hydra's ``cfg.cluster``); or a Cluster (returned as is).

    Raises:
        ClusterConfigError (a ValueError) naming the file, the field path (``nodes[2].device``),
        the bad value and the fix.
    """
    if isinstance(source, Cluster):
        return source
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a declared dependency
        DictConfig = ()
    if DictConfig and isinstance(source, DictConfig):
        return _build(OmegaConf.to_container(source, resolve=True), "<config>")
    if isinstance(source, Mapping):
        return _build(source, "<mapping>")
    if isinstance(source, (str, os.PathLike)):
        path = _resolve_path(source)
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.load(f, Loader=_YamlLoader)
        except yaml.YAMLError as err:
            raise ClusterConfigError(f"{path}: not valid YAML: {err}") from None
        return _build(data, str(path))
    raise ClusterConfigError(
        f"load_cluster got {type(source).__name__} {source!r}; give a cluster name "
        f"({', '.join(list_clusters())}), a path to a YAML file, or a mapping"
    )


def _resolve_path(source: str | os.PathLike) -> Path:
    text = os.fspath(source)
    looks_like_path = (
        isinstance(source, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text
        or "/" in text
    )
    path = Path(text) if looks_like_path else CLUSTER_DIR / f"{text}.yaml"
    if not path.is_file():
        what = f"cluster file {str(path)!r}" if looks_like_path else f"cluster {text!r}"
        raise ClusterConfigError(
            f"{what} not found; shipped clusters ({CLUSTER_DIR}): {list_clusters()}. "
            "Give one of those names or a path to a YAML file."
        )
    return path


def _fail(where: str, field: str, value: Any, problem: str) -> ClusterConfigError:
    return ClusterConfigError(f"{where}: {field} = {value!r}: {problem}")


def _check_keys(data: Any, spec: Mapping[str, bool], where: str, field: str) -> None:
    if not isinstance(data, Mapping):
        raise _fail(where, field or "<top level>", data,
                    f"must be a mapping with keys {sorted(spec)}")
    prefix = f"{field}." if field else ""
    for key in data:
        if key not in spec:
            raise _fail(where, f"{prefix}{key}", data[key],
                        f"unknown key; allowed keys here: {sorted(spec)}")
    for key, required in spec.items():
        if required and key not in data:
            raise ClusterConfigError(
                f"{where}: {prefix}{key} is missing; it is required (keys here: "
                f"{', '.join(f'{k}' + ('' if r else ' (optional)') for k, r in spec.items())})"
            )


def _number(value: Any, where: str, field: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "a number >= 0" if allow_zero else "a positive number"
        hint = " (write floats as 1.5e9 or 1500000000, unquoted)" if isinstance(value, str) else ""
        raise _fail(where, field, value, f"must be {bound}{hint}")
    return float(value)


def _count(value: Any, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(where, field, value, "must be a positive integer")
    return value


def _name(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, field, value, "must be a non-empty string")
    return value


def _build(data: Any, where: str) -> Cluster:
    from . import catalogue

    _check_keys(data, _TOP_KEYS, where, "")
    name = _name(data["name"], where, "name")
    if "description" in data:
        _name(data["description"], where, "description")
    devices = _device_table(data.get("devices") or {}, where, catalogue)
    inter_link = _link(data["inter_link"], where, "inter_link", catalogue)

    entries = data["nodes"]
    if not isinstance(entries, Sequence) or isinstance(entries, str) or not entries:
        raise _fail(where, "nodes", entries, "must be a non-empty list of node entries")
    nodes: list[Node] = []
    used: dict[str, str] = {}  # node name -> field path of the entry that made it
    next_index: dict[str, int] = {}
    for i, entry in enumerate(entries):
        field = f"nodes[{i}]"
        _check_keys(entry, _NODE_KEYS, where, field)
        device_name = entry["device"]
        if device_name not in devices:
            raise _fail(where, f"{field}.device", device_name,
                        f"unknown device; known devices: {sorted(devices)} (add new ones under "
                        "`devices:`)")
        per_node = _count(entry["devices_per_node"], where, f"{field}.devices_per_node")
        count = _count(entry.get("count", 1), where, f"{field}.count")
        intra = _link(entry["intra_link"], where, f"{field}.intra_link", catalogue)
        if "name" in entry:
            base = _name(entry["name"], where, f"{field}.name")
            names = [base] if count == 1 else [f"{base}-{k}" for k in range(count)]
        else:
            base = device_name.lower()
            start = next_index.get(base, 0)
            names = [f"{base}-{k}" for k in range(start, start + count)]
            next_index[base] = start + count
        for node_name in names:
            if node_name in used:
                raise _fail(where, f"{field}.name", entry.get("name", node_name),
                            f"gives node name {node_name!r}, already used by {used[node_name]}; "
                            "node names must be unique: set a different `name`")
            used[node_name] = field
            nodes.append(Node(node_name, devices[device_name], per_node, intra))
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, Mapping):
        raise _fail(where, "calibration", calibration, "must be a mapping of fitted figures")
    calibration = dict(calibration)
    for key in _CALIBRATION_NUMBERS:
        if key in calibration:
            value = calibration[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise _fail(where, f"calibration.{key}", value, "must be a number >= 0")
            calibration[key] = float(value)
    return Cluster(name=name, nodes=tuple(nodes), inter_link=inter_link, calibration=calibration)


def _link(value: Any, where: str, field: str, catalogue) -> Link:
    if isinstance(value, str):
        if value not in catalogue.LINKS:
            raise _fail(where, field, value,
                        f"unknown link; known links: {sorted(catalogue.LINKS)}, or a mapping "
                        f"{{{', '.join(_LINK_KEYS)}}}")
        return catalogue.LINKS[value]
    _check_keys(value, {"kind": True, "latency_s": False, "bandwidth_bytes_per_s": False},
                where, field)
    kind = _name(value["kind"], where, f"{field}.kind")
    base = catalogue.LINKS.get(kind)
    if base is None:
        for key in ("latency_s", "bandwidth_bytes_per_s"):
            if key not in value:
                raise ClusterConfigError(
                    f"{where}: {field}.{key} is missing; link kind {kind!r} is not in the "
                    f"catalogue ({sorted(catalogue.LINKS)}), so both latency_s and "
                    "bandwidth_bytes_per_s are required"
                )
    latency = value.get("latency_s", base.latency_s if base else None)
    bandwidth = value.get("bandwidth_bytes_per_s", base.bandwidth_bytes_per_s if base else None)
    return Link(
        kind,
        _number(latency, where, f"{field}.latency_s", allow_zero=True),
        _number(bandwidth, where, f"{field}.bandwidth_bytes_per_s"),
    )


def _device_table(inline: Any, where: str, catalogue) -> dict[str, DeviceSpec]:
    if not isinstance(inline, Mapping):
        raise _fail(where, "devices", inline,
                    "must be a mapping {device name: {peak_flops_per_s, memory_bytes, "
                    "memory_bandwidth_bytes_per_s}}")
    table = dict(catalogue.DEVICES)
    for name, spec in inline.items():
        field = f"devices.{name}"
        _name(name, where, "devices.<key>")
        base = catalogue.DEVICES.get(name)
        _check_keys(spec, {k: base is None for k in _DEVICE_KEYS}, where, field)
        peaks_in = spec.get("peak_flops_per_s", {})
        if not isinstance(peaks_in, Mapping) or (base is None and not peaks_in):
            raise _fail(where, f"{field}.peak_flops_per_s", peaks_in,
                        f"must be a non-empty mapping {{dtype: FLOP/s}} with dtypes from {DTYPES}")
        peaks = dict(base.peak_flops_per_s) if base else {}
        for dtype, rate in peaks_in.items():
            if dtype not in DTYPES:
                raise _fail(where, f"{field}.peak_flops_per_s.{dtype}", rate,
                            f"unknown dtype; known dtypes: {list(DTYPES)}")
            peaks[dtype] = _number(rate, where, f"{field}.peak_flops_per_s.{dtype}")
        memory = spec.get("memory_bytes", base.memory_bytes if base else None)
        bandwidth = spec.get("memory_bandwidth_bytes_per_s",
                             base.memory_bandwidth_bytes_per_s if base else None)
        table[name] = DeviceSpec(
            name=name,
            peak_flops_per_s=peaks,
            memory_bytes=_number(memory, where, f"{field}.memory_bytes"),
            memory_bandwidth_bytes_per_s=_number(
                bandwidth, where, f"{field}.memory_bandwidth_bytes_per_s"),
        )
    # Copy the catalogue specs that are used as is, so that a caller mutating a loaded spec's
    # peak dict cannot change the catalogue for everyone else.
    return {
        name: spec if name in inline else dataclasses.replace(
            spec, peak_flops_per_s=dict(spec.peak_flops_per_s))
        for name, spec in table.items()
    }
