"""Closed forms of pipeline schedules: makespan and in-flight micro-batches.

All functions take per-stage tensors with any leading batch dimensions (..., p) and are
differentiable; ``smooth`` replaces the slowest-stage max with a log-sum-exp for relaxed plans.

Makespan with ``m`` micro-batches over ``p`` stages with per-micro-batch forward ``f_s``,
backward ``b_s`` and stage-to-stage transfer ``c_s`` (s -> s+1, each way), treating every link
as a resource of its own (sends are asynchronous):

- GPipe (all forwards, then all backwards; a flow shop of identical jobs per phase):
  ``sum(f) + sum(b) + 2 sum(c) + (m - 1) * (max(f ∪ c) + max(b ∪ c))``
- 1F1B (steady state alternates one forward and one backward per stage):
  ``sum(f + b) + 2 sum(c) * (1 + floor((m - 1)(p - 1) / p) / (p - 1)) + (m - 1) * max(f + b)``.
  Stage s keeps only p - s micro-batches in flight, too few to hide the round trip to the last
  stage, so the links' time is exposed in the steady state too: on equal stages this is exact
  (fitted to and checked against ``dartspar.sim``, links no slower than a stage), and for slow
  links it follows the simulated steady period ``(f + b) + 2c(p - 1)/p``. It stays additive in
  the link times, so the exact DP needs only the slowest-stage bound. On unequal stages it is an
  approximation whose error ``experiments/sim_vs_closed_form.py`` measures.

Both reduce to the textbook ``(m + p - 1) * t`` on equal stages with free links.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEDULES", "pipeline_makespan_s", "inflight_microbatches", "smooth_max"]

SCHEDULES = ("gpipe", "1f1b")


def smooth_max(x: torch.Tensor, temperature: float | None, dim: int = -1) -> torch.Tensor:
    """max over ``dim``; with a temperature (seconds), ``T * logsumexp(x / T)`` (an upper
    bound of the max that is tight as T -> 0 and has gradients for every entry)."""
    if temperature is None or temperature <= 0:
        return x.max(dim=dim).values
    return temperature * torch.logsumexp(x / temperature, dim=dim)


def pipeline_makespan_s(
    fwd_s: torch.Tensor,
    bwd_s: torch.Tensor,
    p2p_s: torch.Tensor,
    num_microbatches: torch.Tensor | int,
    schedule: str,
    smooth: float | None = None,
) -> torch.Tensor:
    """Time from the first forward to the last backward of one step, in seconds.

    Args:
        fwd_s, bwd_s: (..., p) per-micro-batch forward / backward time of each stage
            (recomputation included in backward).
        p2p_s: (..., p) one-way transfer time from stage s to s+1 per micro-batch; the last
            entry is ignored (there is no stage after the last).
        num_microbatches: m, an int or a tensor broadcasting against the leading dims.
        schedule: "gpipe" or "1f1b".
        smooth: log-sum-exp temperature in seconds for the max terms (None = exact max).
    Returns:
        (...,) makespan in seconds.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    comm = p2p_s[..., :-1]
    m_minus_1 = torch.as_tensor(num_microbatches, dtype=fwd_s.dtype) - 1
    base = fwd_s.sum(-1) + bwd_s.sum(-1) + 2 * comm.sum(-1)
    if schedule == "gpipe":
        slow_f = smooth_max(torch.cat([fwd_s, comm], dim=-1), smooth)
        slow_b = smooth_max(torch.cat([bwd_s, comm], dim=-1), smooth)
        return base + m_minus_1 * (slow_f + slow_b)
    p = fwd_s.shape[-1]
    if p > 1:
        exposed = torch.floor(m_minus_1 * (p - 1) / p) / (p - 1)
        base = base + 2 * comm.sum(-1) * exposed
    return base + m_minus_1 * smooth_max(fwd_s + bwd_s, smooth)


def inflight_microbatches(num_stages: int, num_microbatches: int, schedule: str) -> torch.Tensor:
    """(p,) micro-batches whose activations stage s holds at its peak.

    GPipe keeps all m; 1F1B keeps min(p - s, m) on stage s (0-based).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not one of {SCHEDULES}")
    stages = torch.arange(num_stages, dtype=torch.float64)
    m = torch.full_like(stages, float(num_microbatches))
    if schedule == "gpipe":
        return m
    return torch.minimum(num_stages - stages, m)
