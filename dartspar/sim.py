"""Discrete-event simulation of one pipeline-parallel training step.

An independent check of the closed forms in ``dartspar.cost.schedule``: instead of a formula,
every micro-batch's forward and backward on every stage, and every stage-to-stage transfer, is
an operation on a resource, and time advances from one completion to the next.

Resources:
- stage s (0-based, p of them): one compute resource running the schedule's fixed operation
  order (``stage_op_order``); an operation starts when the stage is free and its input is there.
- link s -> s+1 for activations and link s -> s-1 for gradients: one transfer at a time per
  direction, first come first served. A transfer starts when its producer has finished and the
  link is free, so sends are asynchronous for the sender (the stage goes on computing).

Operation orders follow torch.distributed.pipelining (torch 2.13, ``schedules.py``):
- ``ScheduleGPipe._step_microbatches``: F0..F(m-1), then B0..B(m-1) (backwards in ascending
  order, not reversed).
- ``Schedule1F1B._step_microbatches``: min(m, p - s) warm-up forwards, then alternately one
  backward and one forward, then the remaining backwards. That is the same sequence as
  "p - s - 1 warm-up forwards, then 1F1B pairs, then cool-down backwards".

What it found (tests/test_sim.py, experiments/sim_vs_closed_form.py): the GPipe closed form is
exact, equal or unequal stages, with or without p2p (each phase is a flow shop of identical
jobs). The 1F1B closed form is exact on equal stages without p2p only: with p2p it leaves out
that stage s's p - s micro-batches cannot cover its round trip, and on unequal stages it charges
the slowest stage for warm-up forwards that overlap the first round trip.

Not modelled: torch's fused, blocking p2p in 1F1B (``_wait_batch_p2p(fwd_sends + bwd_recvs)``
makes the stage wait for its own sends), the loss computation as a separate step, gradient
reduction after the last backward, and kernel launch jitter.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from .cost.schedule import SCHEDULES

__all__ = ["SimEvent", "SimResult", "simulate", "stage_op_order"]

_COMPUTE_KINDS = ("F", "B")


class SimEvent(NamedTuple):
    """One operation as it ran.

    ``stage`` is the stage that computed (F, B) or that sends (send_F goes stage -> stage + 1,
    send_B goes stage -> stage - 1).
    """

    stage: int
    microbatch: int
    kind: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class SimResult:
    """Outcome of ``simulate``.

    Attributes:
        makespan_s: time from the first forward's start (t = 0) to the last operation's end.
        events: every compute and transfer operation, sorted by (start_s, end_s, stage).
        busy_s: (p,) seconds each stage spent computing.
        idle_s: (p,) makespan_s - busy_s.
        bubble_fraction: idle share of all stage-seconds, sum(idle_s) / (p * makespan_s).
        peak_inflight: (p,) most micro-batches a stage held at once (forward finished,
            backward not yet finished); activation memory scales with it.
    """

    makespan_s: float
    events: tuple[SimEvent, ...]
    busy_s: tuple[float, ...]
    idle_s: tuple[float, ...]
    bubble_fraction: float
    peak_inflight: tuple[int, ...]


def stage_op_order(num_stages: int, num_microbatches: int, schedule: str) -> list[list[tuple[str, int]]]:
    """Per stage, the (kind, micro-batch) compute operations in the order torch runs them.

    m < p is allowed for 1F1B (warm-up capped at m) although torch's Schedule1F1B refuses it.

    Returns:
        p lists of ("F" | "B", micro-batch index), each of length 2 m.
    """
    _check_count("num_stages", num_stages)
    _check_count("num_microbatches", num_microbatches)
    _check_schedule(schedule)
    m = num_microbatches
    orders = []
    for s in range(num_stages):
        if schedule == "gpipe":
            order = [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        else:
            warmup = min(m, num_stages - s)
            order = [("F", i) for i in range(warmup)]
            next_f = warmup
            for next_b in range(m):
                order.append(("B", next_b))
                if next_f < m:
                    order.append(("F", next_f))
                    next_f += 1
        orders.append(order)
    return orders


def simulate(
    fwd_s: Sequence[float],
    bwd_s: Sequence[float],
    p2p_s: Sequence[float],
    num_microbatches: int,
    schedule: str,
) -> SimResult:
    """Simulate one training step of a p-stage pipeline.

    Args:
        fwd_s, bwd_s: (p,) seconds of one micro-batch's forward / backward on each stage
            (recomputation included in backward).
        p2p_s: (p - 1,) or (p,) one-way seconds to move one micro-batch's activation from
            stage s to s + 1 (the gradient back from s + 1 to s takes the same); with p entries
            the last is ignored, matching ``pipeline_makespan_s``.
        num_microbatches: m >= 1.
        schedule: "gpipe" or "1f1b".
    Returns:
        SimResult with times in seconds, the step starting at t = 0.
    """
    fwd = _check_times("fwd_s", fwd_s)
    bwd = _check_times("bwd_s", bwd_s)
    p = len(fwd)
    if p == 0:
        raise ValueError("fwd_s is empty: give one forward time per pipeline stage")
    if len(bwd) != p:
        raise ValueError(f"bwd_s has {len(bwd)} entries but fwd_s has {p}: give one per stage")
    p2p = _check_times("p2p_s", p2p_s)
    if len(p2p) not in (p - 1, p):
        raise ValueError(
            f"p2p_s has {len(p2p)} entries for {p} stages: give p - 1 = {p - 1} "
            f"(one per link s -> s+1) or p (the last is ignored)"
        )
    p2p = p2p[: p - 1]
    _check_count("num_microbatches", num_microbatches)
    _check_schedule(schedule)
    return _Engine(fwd, bwd, p2p, num_microbatches, schedule).run()


class _Engine:
    """Event loop: a heap of completions; after each, idle resources start what is ready."""

    def __init__(self, fwd, bwd, p2p, m, schedule):
        self.p, self.m = len(fwd), m
        self.duration = {"F": fwd, "B": bwd, "send_F": p2p, "send_B": [0.0] + p2p}
        self.orders = stage_op_order(self.p, m, schedule)
        self.next_index = [0] * self.p  # position in each stage's order
        self.stage_busy = [False] * self.p
        # Links: key ("send_F", s) is s -> s+1, ("send_B", s) is s -> s-1.
        self.link_queue = {}
        self.link_busy = {}
        for s in range(self.p - 1):
            for key in (("send_F", s), ("send_B", s + 1)):
                self.link_queue[key] = deque()
                self.link_busy[key] = False
        self.done: dict[tuple[str, int, int], float] = {}
        self.events: list[SimEvent] = []
        self.heap: list[tuple[float, int, str, int, int, float]] = []
        self.seq = 0

    def run(self) -> SimResult:
        for key in self.link_queue:
            self._try_link(0.0, key)
        for s in range(self.p):
            self._try_stage(0.0, s)
        while self.heap:
            end, _, kind, s, i, start = heapq.heappop(self.heap)
            self.done[(kind, s, i)] = end
            self.events.append(SimEvent(s, i, kind, start, end))
            # Only the resources this completion frees or feeds can change state.
            if kind in _COMPUTE_KINDS:
                self.stage_busy[s] = False
                link = self._enqueue_send(kind, s, i)
                if link is not None:
                    self._try_link(end, link)
                self._try_stage(end, s)
            else:
                self.link_busy[(kind, s)] = False
                self._try_link(end, (kind, s))
                self._try_stage(end, s + 1 if kind == "send_F" else s - 1)
        expected = 2 * self.p * self.m + 2 * (self.p - 1) * self.m
        if len(self.events) != expected:
            # Unreachable with the orders above; guards future schedules against silent deadlock.
            raise RuntimeError(
                f"simulation deadlocked after {len(self.events)} of {expected} operations: "
                f"the stage operation orders are inconsistent"
            )
        return self._result()

    def _enqueue_send(self, kind, s, i):
        """Queue the output of F/B(s, i) on its outgoing link; returns the link, if any."""
        if kind == "F" and s < self.p - 1:
            key = ("send_F", s)
        elif kind == "B" and s > 0:
            key = ("send_B", s)
        else:
            return None
        self.link_queue[key].append(i)
        return key

    def _ready(self, kind, s, i) -> bool:
        if kind == "F":
            return s == 0 or ("send_F", s - 1, i) in self.done
        if s == self.p - 1:
            return ("F", s, i) in self.done
        return ("send_B", s + 1, i) in self.done and ("F", s, i) in self.done

    def _start(self, now, kind, s, i):
        end = now + self.duration[kind][s]
        heapq.heappush(self.heap, (end, self.seq, kind, s, i, now))
        self.seq += 1

    def _try_link(self, now, key):
        queue = self.link_queue[key]
        if queue and not self.link_busy[key]:
            self.link_busy[key] = True
            self._start(now, key[0], key[1], queue.popleft())

    def _try_stage(self, now, s):
        k = self.next_index[s]
        if self.stage_busy[s] or k == len(self.orders[s]):
            return
        kind, i = self.orders[s][k]
        if self._ready(kind, s, i):
            self.stage_busy[s] = True
            self.next_index[s] = k + 1
            self._start(now, kind, s, i)

    def _result(self) -> SimResult:
        events = tuple(sorted(self.events, key=lambda e: (e.start_s, e.end_s, e.stage, e.kind)))
        makespan = max(e.end_s for e in events)
        busy = [0.0] * self.p
        for e in events:
            if e.kind in _COMPUTE_KINDS:
                busy[e.stage] += e.end_s - e.start_s
        idle = [makespan - b for b in busy]
        bubble = sum(idle) / (self.p * makespan) if makespan > 0 else 0.0
        peak = [0] * self.p
        held = [0] * self.p
        for e in self.events:  # completion order, ties in start order
            if e.kind in _COMPUTE_KINDS:
                held[e.stage] += 1 if e.kind == "F" else -1
                peak[e.stage] = max(peak[e.stage], held[e.stage])
        return SimResult(makespan, events, tuple(busy), tuple(idle), bubble, tuple(peak))


def _check_times(name: str, values: Sequence[float]) -> list[float]:
    try:
        out = [float(v) for v in values]
    except TypeError as err:
        raise TypeError(f"{name} must be a sequence of seconds, one per stage; got {values!r}") from err
    for k, v in enumerate(out):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name}[{k}]={v} must be a finite number of seconds >= 0")
    return out


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
