"""Timers for the kernel profiler: best-of-repeats on CPU, ``triton.testing.do_bench`` on GPU."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["cpu_time_s", "gpu_time_s"]


def cpu_time_s(fn: Callable[[], object], min_repeat_s: float = 0.01, repeats: int = 5) -> float:
    """Seconds per call of ``fn`` on the CPU.

    Each of ``repeats`` rounds calls ``fn`` enough times to last ``min_repeat_s`` (so timer
    resolution and Python overhead of the loop do not matter), and the fastest round's mean is
    returned: other processes sharing the cores can only add time, so the minimum is the least
    disturbed estimate (the advice of Python's ``timeit``).
    """
    if repeats < 1 or min_repeat_s <= 0:
        raise ValueError(f"cpu_time_s needs repeats >= 1 and min_repeat_s > 0, got {repeats}, {min_repeat_s}")
    fn()  # first call: allocations, lazy initialisation, caches
    start = time.perf_counter()
    fn()
    once_s = time.perf_counter() - start
    inner = max(1, int(min_repeat_s / max(once_s, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def gpu_time_s(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median seconds per call of ``fn`` on the GPU, by ``triton.testing.do_bench`` (which
    flushes the L2 cache between calls, so GEMMs do not run on warm operands)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e-3
