"""Measurement on one rank: phase timers, a Chrome-trace (Perfetto) timeline, memory accounting.

On CPU, phases are timed with ``time.perf_counter`` around the pipeline stage's forward /
backward calls. On GPU the host runs ahead of the device, so phases are timed with CUDA events
recorded around the same calls (no synchronization inside the step); the caller synchronizes at
step boundaries (``sync_now``) and then resolves the events (``flush``).
"""

from __future__ import annotations

import json
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

__all__ = [
    "PhaseClock",
    "write_chrome_trace",
    "merge_chrome_traces",
    "peak_rss_bytes",
    "tensor_state_bytes",
    "peak_flops_per_s_for",
]

PHASES = ("forward", "backward", "loss", "dp_sync", "optimizer", "schedule", "step")


class PhaseClock:
    """Accumulates seconds per phase for the current step and records trace events while
    ``tracing`` is on. One instance per rank; not thread-safe (the schedule is single-threaded).

    ``device``: on a CUDA device phases are measured with CUDA events (see the module doc).
    """

    def __init__(self, rank: int, device: torch.device | None = None) -> None:
        self.rank = rank
        self.cuda = device is not None and device.type == "cuda"
        self.tracing = False
        self.events: list[dict] = []
        self.totals: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._pending: list[tuple] = []
        # Wall-clock offset so timestamps of processes on different nodes line up (up to NTP).
        self._wall_offset_ns = time.time_ns() - time.perf_counter_ns()

    def reset(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)

    def sync_now(self) -> float:
        """Host time after the device has finished all queued work (step boundaries)."""
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def flush(self) -> None:
        """Resolve CUDA-event phases of the step (after ``sync_now``)."""
        for phase, start_s, begin, end, name, tid, args in self._pending:
            self.add(phase, start_s, start_s + begin.elapsed_time(end) / 1e3, name, tid, args)
        self._pending.clear()

    def add(self, phase: str, start_s: float, end_s: float, name: str, tid: int, args: dict) -> None:
        self.totals[phase] += end_s - start_s
        if self.tracing:
            self.events.append({
                "name": name, "cat": phase, "ph": "X", "pid": self.rank, "tid": tid,
                "ts": (start_s * 1e9 + self._wall_offset_ns) / 1e3,
                "dur": (end_s - start_s) * 1e6, "args": args,
            })

    def _begin(self):
        start = time.perf_counter()
        if not self.cuda:
            return start, None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return start, event

    def _end(self, phase: str, begun, name: str, tid: int, args: dict) -> None:
        start, event = begun
        if event is None:
            self.add(phase, start, time.perf_counter(), name, tid, args)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((phase, start, event, end, name, tid, args))

    @contextmanager
    def span(self, phase: str, name: str, tid: int = 0, **args):
        begun = self._begin()
        try:
            yield
        finally:
            self._end(phase, begun, name, tid, args)

    def wrap(self, fn: Callable, phase: str, tid: int, label: Callable[[tuple], str]) -> Callable:
        """``fn`` timed into ``phase``; ``label(args)`` names the trace event."""

        def timed(*args, **kwargs):
            begun = self._begin()
            try:
                return fn(*args, **kwargs)
            finally:
                self._end(phase, begun, label(args), tid, {})

        return timed


def write_chrome_trace(path: str | Path, events: list[dict], rank: int, stage_names: dict[int, str]) -> None:
    """Chrome trace JSON (opens in Perfetto / chrome://tracing): one process per rank, one
    thread per stage it holds."""
    meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}}]
    meta += [
        {"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}}
        for tid, name in stage_names.items()
    ]
    Path(path).write_text(json.dumps({"traceEvents": meta + events, "displayTimeUnit": "ms"}))


def merge_chrome_traces(paths: list[Path], out: str | Path) -> None:
    """One trace with every rank's events (the whole pipeline on one timeline)."""
    events: list[dict] = []
    for p in paths:
        events.extend(json.loads(Path(p).read_text())["traceEvents"])
    Path(out).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM; getrusage's maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def tensor_state_bytes(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards)."""
    params = [p for m in modules for p in m.parameters()]
    seen: set[int] = set()
    param_bytes = grad_bytes = 0
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        param_bytes += _local_bytes(p)
        if p.grad is not None:
            grad_bytes += _local_bytes(p.grad)
    opt_bytes = sum(
        _local_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": opt_bytes,
            "total": param_bytes + grad_bytes + opt_bytes}


# Dense bf16 peaks from FACTS.md (device catalogue); matched on torch.cuda.get_device_name().
_PEAK_BF16_FLOPS = (
    ("H100", 989e12), ("A100", 312e12), ("V100", 125e12), ("L4", 121e12), ("T4", 65e12),
)


def peak_flops_per_s_for(device: torch.device, override: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from); None on CPU or unknown GPUs."""
    if override:
        return float(override), "RunOptions.peak_flops_per_s"
    if device.type != "cuda":
        return None, "no peak figure for CPU devices: MFU is reported on GPU only"
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16_FLOPS:
        if key in name:
            return peak, f"bf16 dense peak of {key} (FACTS.md)"
    return None, f"device {name!r} is not in the peak table: pass --peak-flops-per-s"

