"""The run report: what a run measured, next to what the plan predicted.

Definitions (all times in seconds, medians over the steps after warm-up):

- ``step_time_s``: wall time of a whole training step (zero grads, pipeline schedule, gradient
  sync, optimizer step), the slowest rank's per step, median over steps.
- per rank and per stage: ``forward_s`` / ``backward_s``: time inside the stage's forward and
  backward of all micro-batches (tensor-parallel collectives and FSDP all-gathers included;
  ``loss_s``, the last stage's loss, apart); ``pipeline_wait_s``: the rest of the schedule step,
  i.e. stage-to-stage transfers and waiting for the neighbours (the bubble); ``dp_sync_s``:
  data-parallel gradient reduction; ``comm_s`` = ``pipeline_wait_s + dp_sync_s``;
  ``optimizer_s``: the optimizer step.
- memory: ``peak_rss_bytes`` (CPU: the process's peak resident set, VmHWM — includes the Python
  interpreter and torch itself), ``model_state_bytes`` (parameters, gradients, optimizer state
  actually held: the model-state accounting), and on GPU ``cuda_max_allocated_bytes`` /
  ``cuda_max_reserved_bytes`` (allocator statistics). ``peak_memory_bytes`` is the CUDA peak
  allocation on GPU and the peak RSS on CPU.
- ``step_times_s``: every step's time (slowest rank); ``loop_time_per_step_s``: wall time of the
  steps after warm-up divided by their number (includes logging and checkpoint saves).
- ``cpu_time_s`` (per rank) / ``cpu_time_per_step_s`` (summed over ranks): CPU seconds the
  processes consumed per step (``time.process_time``, all threads). Unlike wall time it barely
  moves when other jobs share the machine, so it is the robust figure for overhead comparisons.
- ``tokens_per_s``: tokens (GPT) or samples (dense models) per global step / ``step_time_s``.
- ``mfu``: model FLOPs (forward + backward, no recomputation) per second over the devices'
  summed dense bf16 peak; None on CPU.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["RankStats", "StageStats", "RunReport", "median_after_warmup"]


def median_after_warmup(values: list[float], warmup: int) -> float:
    """Median of ``values[warmup:]`` (all values when there are no more than ``warmup``)."""
    kept = values[warmup:] if len(values) > warmup else values
    return float(statistics.median(kept)) if kept else float("nan")


@dataclass(frozen=True)
class RankStats:
    rank: int
    stages: tuple[int, ...]
    pp: int
    dp: int
    tp: int
    forward_s: float
    backward_s: float
    loss_s: float
    pipeline_wait_s: float
    dp_sync_s: float
    optimizer_s: float
    comm_s: float
    step_time_s: float
    cpu_time_s: float
    peak_rss_bytes: int
    model_state_bytes: dict
    cuda_max_allocated_bytes: int | None
    cuda_max_reserved_bytes: int | None

    @property
    def peak_memory_bytes(self) -> int:
        return self.cuda_max_allocated_bytes if self.cuda_max_allocated_bytes is not None else self.peak_rss_bytes


@dataclass(frozen=True)
class StageStats:
    """A stage's figures: the maximum over the ranks that run it (replicas and tp shards)."""

    stage: int
    layers: tuple[int, int]
    ranks: tuple[int, ...]
    forward_s: float
    backward_s: float
    comm_s: float
    peak_memory_bytes: int
    model_state_bytes: int


@dataclass(frozen=True)
class RunReport:
    plan_path: str
    model: dict
    world_size: int
    backend: str
    device: str
    schedule: str
    num_stages: int
    mesh_shape: dict
    num_microbatches: int
    micro_batch_size: int
    global_batch_size: int
    tokens_per_step: int
    start_step: int
    end_step: int
    warmup_steps: int
    step_time_s: float
    step_times_s: list
    loop_time_per_step_s: float
    cpu_time_per_step_s: float
    tokens_per_s: float
    model_flops_per_step: float
    achieved_flops_per_s: float
    mfu: float | None
    mfu_note: str
    losses: list
    ranks: list
    stages: list
    peak_memory_bytes_max: int
    predicted: dict
    predicted_vs_measured: dict
    trace_files: list
    merged_trace: str | None
    checkpoint: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "RunReport":
        return cls(**json.loads(Path(path).read_text()))


def stage_stats(ranks: list[RankStats], stage_layers: list[tuple[int, int]]) -> list[StageStats]:
    """Per-stage figures from per-rank ones (a rank holding several stages — interleaved — has
    its times split evenly between them, since the timers are per rank)."""
    out = []
    for s, layers in enumerate(stage_layers):
        holders = [r for r in ranks if s in r.stages]
        share = [1.0 / len(r.stages) for r in holders]
        out.append(StageStats(
            stage=s,
            layers=layers,
            ranks=tuple(r.rank for r in holders),
            forward_s=max(r.forward_s * f for r, f in zip(holders, share)),
            backward_s=max(r.backward_s * f for r, f in zip(holders, share)),
            comm_s=max(r.comm_s * f for r, f in zip(holders, share)),
            peak_memory_bytes=max(r.peak_memory_bytes for r in holders),
            model_state_bytes=max(int(r.model_state_bytes["total"]) for r in holders),
        ))
    return out


def compare_with_predicted(predicted: dict, measured: dict) -> dict:
    """For every figure the plan predicted that was also measured: predicted, measured and
    measured / predicted."""
    out = {}
    for key, pred in predicted.items():
        if key in measured and isinstance(pred, (int, float)) and pred:
            out[key] = {"predicted": pred, "measured": measured[key], "ratio": measured[key] / pred}
    return out
