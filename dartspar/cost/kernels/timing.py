"""Timers for the kernel profiler: interleaved best-of-rounds on CPU, ``do_bench`` on GPU.

CPU timings on a shared machine are disturbed by other processes in two ways, and the CPU timer
answers both:

- preemption: another process takes the core for milliseconds at a time. With one torch thread
  the ops run on the calling thread, so its CPU time (``time.thread_time``) excludes the time it
  was descheduled; that is the ``clock="thread"`` default. With more threads only wall time
  (``clock="wall"``) measures the op.
- cache and memory-bandwidth contention, which slows the op itself. Timing every function in
  turn, round after round, and keeping each one's fastest round gives every function several
  chances, spread over the whole run, to meet a quiet moment; disturbances only add time, so the
  minimum is the least disturbed estimate (the advice of Python's ``timeit``).

The CPU tables therefore describe a core that the measured process has to itself.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Sequence

__all__ = ["cpu_time_s", "cpu_times_s", "gpu_time_s", "CLOCKS"]

CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _round(fn: Callable[[], object], calls: int, clock) -> float:
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def cpu_times_s(
    fns: Sequence[Callable[[], object]], rounds: int = 7, min_round_s: float = 0.01,
    clock: str = "thread", progress: str | None = None,
) -> list[float]:
    """Seconds per call of each of ``fns``: the fastest of ``rounds`` interleaved rounds, each
    round calling a function enough times to last ``min_round_s`` (so timer resolution and the
    loop's own overhead do not matter). ``clock``: "thread" (CPU time of the calling thread; use
    with ``torch.get_num_threads() == 1``) or "wall". ``progress``: a tqdm label, or None."""
    if rounds < 1 or min_round_s <= 0:
        raise ValueError(f"cpu_times_s needs rounds >= 1 and min_round_s > 0, got {rounds}, {min_round_s}")
    if clock not in CLOCKS:
        raise ValueError(f"cpu_times_s clock={clock!r} must be one of {sorted(CLOCKS)}")
    from tqdm import tqdm

    timer = CLOCKS[clock]
    bar = tqdm(total=len(fns) * (rounds + 1), desc=progress, disable=progress is None, file=sys.stderr)
    calls = []
    for fn in fns:
        fn()  # first call: allocations, lazy initialisation, caches
        calls.append(max(1, int(min_round_s / max(_round(fn, 1, timer), 1e-9))))
        bar.update()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _round(fn, calls[i], timer))
            bar.update()
    bar.close()
    return best


def cpu_time_s(fn: Callable[[], object], rounds: int = 7, min_round_s: float = 0.01, clock: str = "thread") -> float:
    """Seconds per call of ``fn``: ``cpu_times_s`` for one function."""
    return cpu_times_s([fn], rounds, min_round_s, clock)[0]


def gpu_time_s(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median seconds per call of ``fn`` on the GPU, by ``triton.testing.do_bench`` (which
    flushes the L2 cache between calls, so GEMMs do not run on warm operands)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e-3
