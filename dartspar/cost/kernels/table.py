"""Kernel profile tables: what the profiler writes and the fitted estimator reads (JSON).

A table holds the timings of one device model with one backend and thread count:

- ``gemm_rows``: (m, n, k, batch, dtype, time_s) for ``batch`` products (m x k) @ (k x n);
- ``memory_rows``: (kernel, rows, cols, dtype, num_bytes, time_s) for memory-bound kernels;
- ``probe_rows``: forward and forward + backward seconds of whole GPT blocks: a tiny one, whose
  kernels take almost no time (what remains is the framework's per-layer host work: dispatch,
  autograd, allocation), and one of a preset size, whose kernels dominate (how much slower they
  run in a layer than alone: cold caches, fused attention);
- ``spec``: the peak FLOP/s per dtype and the memory bandwidth the efficiencies are relative
  to, with where they come from (datasheet or, on a CPU, measured on the machine).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...cluster import DeviceSpec

__all__ = ["GemmRow", "MemoryRow", "ProbeRow", "ProfileTable", "TABLE_FORMAT", "TABLES_DIR", "shipped_tables"]

TABLE_FORMAT = "dartspar-kernel-table/1"
TABLES_DIR = Path(__file__).parent / "tables"


@dataclass(frozen=True)
class GemmRow:
    m: int
    n: int
    k: int
    batch: int
    dtype: str
    time_s: float


@dataclass(frozen=True)
class MemoryRow:
    kernel: str
    rows: int
    cols: int
    dtype: str
    num_bytes: int
    time_s: float


@dataclass(frozen=True)
class ProbeRow:
    """A ``dartspar.models.gpt.Block`` timed whole: forward, and forward + backward."""

    hidden: int
    num_heads: int
    seq_len: int
    micro_batch: int
    dtype: str
    fwd_s: float
    fwd_bwd_s: float


@dataclass(frozen=True)
class ProfileTable:
    """Timings of one device model. ``device`` is the catalogue name the estimator matches
    against ``DeviceSpec.name``; ``threads`` the torch CPU threads (0 for a GPU); ``meta`` holds descriptive facts (CPU/GPU model, versions,
    date, timer, models and grids the shapes came from)."""

    device: str
    backend: str
    threads: int
    spec: DeviceSpec
    spec_source: str
    gemm_rows: tuple[GemmRow, ...]
    memory_rows: tuple[MemoryRow, ...]
    probe_rows: tuple[ProbeRow, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spec.name != self.device:
            raise ValueError(f"table of device {self.device!r} carries a spec named {self.spec.name!r}: they must agree")
        for i, r in enumerate(self.gemm_rows):
            if min(r.m, r.n, r.k, r.batch) < 1 or not r.time_s > 0:
                raise ValueError(f"table {self.device!r}: gemm_rows[{i}]={r} needs positive dims and time_s")
            self.spec.peak(r.dtype)  # a dtype without a peak cannot be turned into an efficiency
        for i, r in enumerate(self.memory_rows):
            if r.num_bytes < 1 or not r.time_s > 0:
                raise ValueError(f"table {self.device!r}: memory_rows[{i}]={r} needs positive num_bytes and time_s")
        for i, r in enumerate(self.probe_rows):
            if not (r.fwd_s > 0 and r.fwd_bwd_s > 0):
                raise ValueError(f"table {self.device!r}: probe_rows[{i}]={r} needs positive times")

    @property
    def on_cpu(self) -> bool:
        """CPU tables record their thread count; GPU tables record threads = 0."""
        return self.threads > 0

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(sorted({r.dtype for r in self.gemm_rows}))

    def to_dict(self) -> dict:
        return {
            "format": TABLE_FORMAT,
            "device": self.device,
            "backend": self.backend,
            "threads": self.threads,
            "spec": {
                "name": self.spec.name,
                "peak_flops_per_s": dict(self.spec.peak_flops_per_s),
                "memory_bytes": self.spec.memory_bytes,
                "memory_bandwidth_bytes_per_s": self.spec.memory_bandwidth_bytes_per_s,
                "source": self.spec_source,
            },
            "meta": self.meta,
            "gemm_rows": [asdict(r) for r in self.gemm_rows],
            "memory_rows": [asdict(r) for r in self.memory_rows],
            "probe_rows": [asdict(r) for r in self.probe_rows],
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict, origin: str = "<dict>") -> "ProfileTable":
        if data.get("format") != TABLE_FORMAT:
            raise ValueError(
                f"kernel table {origin} has format={data.get('format')!r}, expected {TABLE_FORMAT!r}: "
                "re-run dartspar-profile-kernels to regenerate it"
            )
        spec = dict(data["spec"])
        source = spec.pop("source")
        return cls(
            device=data["device"],
            backend=data["backend"],
            threads=int(data["threads"]),
            spec=DeviceSpec(**spec),
            spec_source=source,
            gemm_rows=tuple(GemmRow(**r) for r in data["gemm_rows"]),
            memory_rows=tuple(MemoryRow(**r) for r in data["memory_rows"]),
            probe_rows=tuple(ProbeRow(**r) for r in data.get("probe_rows", ())),
            meta=data.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "ProfileTable":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"kernel table {path} does not exist: run dartspar-profile-kernels --out {path}")
        return cls.from_dict(json.loads(path.read_text()), origin=str(path))


def shipped_tables() -> list[Path]:
    """The tables committed with the package (one per profiled device model)."""
    return sorted(TABLES_DIR.glob("*.json"))
