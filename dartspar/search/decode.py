"""From a relaxed strategy matrix A to a plan that fits: decode, repair, refine.

- **Decode** a branch (node order, p, m, schedule): the best *monotone* layer-to-stage
  assignment under the per-layer rows (Viterbi over ``sum_l log W[l, k(l)]`` with
  ``k`` non-decreasing by steps of 0 or 1 from stage 0 to stage p-1, so stages are contiguous
  and non-empty), the most probable sequence of stage shapes whose device groups are allowed
  (a DP over device offsets), recomputation where P > 1/2, and the most probable precisions.
- **Repair**: a decoded point that overflows memory gets the cheapest recomputation that fits
  (``ExactEvaluator.minimal_recompute``); if that is not enough, a local search minimises the
  total overflow (shapes, cuts, m, schedule, node order, stage count); if nothing fits, a
  ``PlanError`` names the stage, its need and its capacity in GiB.
- **Refine**: first-improvement local search on the exact discrete cost with a bounded number of
  evaluations: re-balance the cuts for the stages' device groups, move each cut by 1..13 layers,
  change one stage's shape, change m / schedule / node order, merge or split stages. Every
  candidate gets its cheapest fitting recomputation first. ``refine`` is also the MCMC
  baseline's polishing step.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch

from ..cost.model import RelaxedCost
from ..plan import PlanError
from ..space import Choice, SearchSpace
from .fastcost import BWD, FWD, TP_BWD, TP_FWD, ExactEvaluator
from .strategy import Branch, StrategyMatrix

__all__ = [
    "viterbi_cuts", "map_shapes", "decode_branch", "candidate_branches", "repair", "refine",
    "balance_cuts", "Candidate", "decode_candidates", "GIB",
]

GIB = 2.0**30
CUT_DELTAS = (1, 2, 3, 5, 8, 13)


# ---------------------------------------------------------------------------------- decode
def viterbi_cuts(log_w: torch.Tensor | np.ndarray) -> tuple[int, ...]:
    """Cuts of the best monotone assignment of L layers to p contiguous non-empty stages.

    Args:
        log_w: (L, p) log P(layer l in stage k) (any scores; -inf forbids).
    Returns:
        the p - 1 layer indices where stages 1..p-1 start.
    """
    s = np.asarray(log_w.detach() if isinstance(log_w, torch.Tensor) else log_w, dtype=np.float64)
    L, p = s.shape
    if p > L:
        raise ValueError(f"viterbi_cuts: {p} stages need at least {p} layers, got {L}")
    score = np.full(p, -np.inf)
    score[0] = s[0, 0]
    came_from_prev = np.zeros((L, p), dtype=bool)  # True: stage k starts at layer l
    for l in range(1, L):
        stay = score
        move = np.concatenate([[-np.inf], score[:-1]])
        came_from_prev[l] = move > stay
        score = np.maximum(stay, move) + s[l]
    if not np.isfinite(score[p - 1]):
        raise ValueError("viterbi_cuts: every monotone assignment has probability 0")
    cuts, k = [], p - 1
    for l in range(L - 1, 0, -1):
        if k > 0 and came_from_prev[l, k]:
            cuts.append(l)
            k -= 1
    return tuple(reversed(cuts))


def map_shapes(
    space: SearchSpace, order: int, log_q: torch.Tensor | np.ndarray, allowed: np.ndarray
) -> tuple[int, ...] | None:
    """Most probable shape sequence whose device groups are all allowed (DP over offsets).

    Args:
        log_q: (p, S) log P(stage k has shape s).
        allowed: (S,) bool, shapes usable at this m.
    Returns:
        p shape indices, or None if no sequence of allowed groups exists.
    """
    q = np.asarray(log_q.detach() if isinstance(log_q, torch.Tensor) else log_q, dtype=np.float64)
    p, S = q.shape
    D = space.num_devices
    sizes = np.array([dp * tp for dp, tp in space.shapes])
    config_index = space.orders[order].config_index.numpy()
    value = np.full(D + 1, -np.inf)
    value[0] = 0.0
    back = np.full((p, D + 1, 2), -1, dtype=np.int64)  # (previous offset, shape)
    for k in range(p):
        nxt = np.full(D + 1, -np.inf)
        limit = D - (p - 1 - k)  # leave one device for each later stage
        for a in np.flatnonzero(np.isfinite(value)):
            ok = allowed & (config_index[a] >= 0) & (a + sizes <= limit) & np.isfinite(q[k])
            for s in np.flatnonzero(ok):
                v = value[a] + q[k, s]
                end = a + sizes[s]
                if v > nxt[end]:
                    nxt[end] = v
                    back[k, end] = (a, s)
        value = nxt
    if not np.isfinite(value).any():
        return None
    end = int(np.argmax(value))
    shapes = []
    for k in range(p - 1, -1, -1):
        a, s = back[k, end]
        shapes.append(int(s))
        end = int(a)
    return tuple(reversed(shapes))


def decode_branch(
    A: StrategyMatrix, branch: Branch, microbatches: int, schedule: str, temperature: float = 1.0,
    activation_precision: str | None = None, gradient_precision: str | None = None,
) -> Choice | None:
    """The discrete point A's rows give in ``branch`` at (m, schedule); None if no allowed
    shape sequence exists. Precisions default to the argmax of their global rows."""
    space = A.space
    with torch.no_grad():
        g = A.global_probs(temperature)
        m_index = space.microbatch_counts.index(microbatches)
        rows = A.branch_rows(branch, temperature)
        cuts = viterbi_cuts(torch.log(rows.membership.t()))
        allowed = A.shape_mask(branch.num_stages)[m_index].numpy()
        shapes = map_shapes(space, branch.order, torch.log(rows.shape_probs[m_index]), allowed)
        if shapes is None:
            return None
        if space.options.recompute == "stage":
            flags = torch.sigmoid(A.stage_recompute_logits[branch.group][branch.order] / temperature) > 0.5
            bounds = (0, *cuts, space.num_layers)
            recompute = tuple(bool(flags[k]) for k in range(branch.num_stages) for _ in range(bounds[k], bounds[k + 1]))
        else:
            recompute = tuple(bool(r) for r in (rows.recompute > 0.5))
        act = activation_precision or A.row_values["activation_precision"][int(g["activation_precision"].argmax())]
        grad = gradient_precision or A.row_values["gradient_precision"][int(g["gradient_precision"].argmax())]
    return Choice(
        order=branch.order, cuts=cuts, shapes=shapes, microbatches=microbatches, schedule=schedule,
        recompute=recompute, activation_precision=act, gradient_precision=grad,
    )


def candidate_branches(A: StrategyMatrix, temperature: float, top_k: int) -> list[tuple[float, int, int, int, str]]:
    """The ``top_k`` most probable (P, order, p, m, schedule) settings of the global rows."""
    with torch.no_grad():
        joint = A.global_probs(temperature)["branch"]
    rv = A.row_values
    flat = joint.reshape(-1)
    top = torch.argsort(flat, descending=True, stable=True)[:top_k]
    out = []
    for index in top.tolist():
        o, i, j, k = torch.unravel_index(torch.tensor(index), joint.shape)
        out.append((float(flat[index]), rv["order"][int(o)], rv["stages"][int(i)], rv["microbatches"][int(j)],
                    rv["schedule"][int(k)]))
    return out


@dataclass
class Candidate:
    """A decoded point: where it came from, and its exact cost before / after repair."""

    choice: Choice
    probability: float
    decoded_cost_s: float  # exact step time as decoded (inf when it overflows or is invalid)
    repaired: bool = False
    cost_s: float = math.inf  # exact step time after repair (inf if repair failed)
    note: str = ""


def decode_candidates(
    A: StrategyMatrix, ev: ExactEvaluator, temperature: float, top_k: int = 8,
    extra: list[tuple[float, int, int, int, str]] | None = None,
) -> list[Candidate]:
    """Decode the ``top_k`` most probable global settings (then the ``extra`` settings not
    among them), repair each; in that order."""
    settings = candidate_branches(A, temperature, top_k)
    seen = {tuple(s[1:]) for s in settings}
    for setting in extra or []:
        if tuple(setting[1:]) not in seen:
            seen.add(tuple(setting[1:]))
            settings.append(setting)
    out = []
    for prob, order, p, m, schedule in settings:
        choice = decode_branch(A, A.branch(order, p), m, schedule, temperature)
        if choice is None:
            continue
        exact = ev(choice)
        cand = Candidate(choice, prob, exact.objective_s)
        if exact.fits:
            cand.cost_s = exact.step_time_s
        else:
            try:
                fixed = repair(A.space, choice, ev, budget=400)
                cand.choice, cand.repaired, cand.cost_s = fixed, True, ev(fixed).step_time_s
            except PlanError as err:
                cand.note = str(err)
        out.append(cand)
    return out


# ---------------------------------------------------------------------------------- repair
def _overflow_key(ev: ExactEvaluator, choice: Choice) -> tuple[float, float]:
    """(total overflow bytes, step time): what repair minimises lexicographically."""
    e = ev(choice)
    if not e.valid:
        return (math.inf, math.inf)
    return (float(e.overflow_bytes.sum()), e.step_time_s)


def _overflow_message(space: SearchSpace, ev: ExactEvaluator, choice: Choice) -> str:
    e = ev(choice)
    over = e.overflow_bytes
    k = int(np.argmax(over))
    layout = ev.stage_layout(choice)
    starts, ends, cfg, _ = layout
    group = space.configs[int(cfg[k])]
    return (
        f"the model does not fit this cluster: the least-overflowing plan found ({choice.num_stages} "
        f"stages, m={choice.microbatches}, {choice.schedule}, node order "
        f"'{space.orders[choice.order].label}', recompute where it helps) still needs "
        f"{e.memory_bytes[k] / GIB:.2f} GiB per device on stage {k} (layers [{starts[k]}, {ends[k]}) "
        f"on {group.group.label}, dp={group.dp} tp={group.tp}), which holds "
        f"{e.capacity_bytes[k] / GIB:.2f} GiB: over by {over[k] / GIB:.2f} GiB "
        f"({over.sum() / GIB:.2f} GiB summed over stages). Add devices or larger-memory devices, use "
        "data_parallel=fsdp, or allow more stages or tensor parallelism"
        + (" or recomputation (space.recompute='layer')." if space.options.recompute != "layer" else ".")
    )


def _fallback_starts(space: SearchSpace, ev: ExactEvaluator, like: Choice) -> Iterator[Choice]:
    """Memory-first constructions: equal groups with the most tensor parallelism, layers split
    evenly by training-state bytes, most micro-batches, 1F1B first, fewest recomputation;
    precisions as in ``like``."""
    L, D = space.num_layers, space.num_devices
    state = np.array([lay.state_bytes for lay in space.profile.layers], dtype=np.float64)
    centre = (np.cumsum(state) - 0.5 * state) / max(state.sum(), 1.0)
    schedules = sorted(space.options.schedules, key=lambda s: s != "1f1b")
    for p in sorted(space.stage_counts, reverse=True):
        k0 = np.minimum((centre * p).astype(int), p - 1)
        cuts = tuple(sorted({int(np.searchsorted(k0, k)) for k in range(1, p)}))
        if len(cuts) != p - 1 or (cuts and (cuts[0] < 1 or cuts[-1] > L - 1)):
            cuts = tuple(round(k * L / p) for k in range(1, p))
        for m in sorted(space.microbatch_counts, reverse=True):
            allowed = space.feasible_shapes(m).numpy()
            for order in range(len(space.orders)):
                sizes = sorted({dp * tp for dp, tp in space.shapes if dp * tp * p <= D}, reverse=True)
                for n in sizes[:2]:
                    ranked = sorted((s for s, (dp, tp) in enumerate(space.shapes) if dp * tp == n and allowed[s]),
                                    key=lambda s: -space.shapes[s][1])
                    for s in ranked[:1]:
                        for schedule in schedules:
                            choice = Choice(order, cuts, (s,) * p, m, schedule, (False,) * L,
                                            like.activation_precision, like.gradient_precision)
                            if ev.placement(choice) is not None:
                                yield ev.minimal_recompute(choice)


def repair(space: SearchSpace, choice: Choice, ev: ExactEvaluator | None = None, budget: int = 2000) -> Choice:
    """A point near ``choice`` that fits memory (see module doc); ``choice`` itself if it fits.

    Raises:
        PlanError: no fitting point was found; the message gives the least-overflowing plan's
            worst stage, its need and capacity in GiB, and how much it is over.
    """
    ev = ev or ExactEvaluator(space)
    if ev(choice).fits:
        return choice
    if space.options.recompute != "off":
        needed = ev.minimal_recompute(choice)
        merged = replace(choice, recompute=tuple(a or b for a, b in zip(choice.recompute, needed.recompute)))
        if ev(merged).fits:
            return merged
        choice = merged
    start_key = _overflow_key(ev, choice)
    best, best_key = choice, start_key
    if math.isinf(best_key[0]):
        best, best_key = None, (math.inf, math.inf)
    starts = ([choice] if best is not None else []) + list(itertools.islice(_fallback_starts(space, ev, choice), 8))
    for start in starts:
        found = _local_search(space, ev, start, lambda c: _overflow_key(ev, c), budget=max(50, budget // len(starts)),
                              stop=lambda key: key[0] <= 0)
        key = _overflow_key(ev, found)
        if key < best_key:
            best, best_key = found, key
        if best_key[0] <= 0:
            return best
    if best is None:
        raise PlanError(
            f"no allowed placement of {space.profile.name} on cluster {space.cluster.name!r} was found "
            "(every decoded device group is invalid): check the space's stage counts and shapes"
        )
    raise PlanError(_overflow_message(space, ev, best))


# ------------------------------------------------------------------------------ refinement
def balance_cuts(ev: ExactEvaluator, choice: Choice) -> Choice:
    """Cuts that minimise the slowest stage's per-micro-batch time (fwd + bwd + tp comm +
    recompute) for the stages' device groups: a binary search on the bound with a greedy
    fill, as in the linear-partition problem. Returns ``choice`` if its placement is invalid."""
    layout = ev.stage_layout(choice)
    if layout is None or choice.num_stages == 1:
        return choice
    _, _, cfg, mi = layout
    L, C, p = ev.space.num_layers, ev.C, choice.num_stages
    P = ev.prefix[mi]
    RP = ev.recompute_prefix(mi, choice.recompute)
    # (L+1, p) prefix of each stage's per-layer time under that stage's config.
    prefix = sum(P[:, col * C + cfg] for col in (FWD, BWD, TP_FWD, TP_BWD)) + RP[:, cfg]
    lo, hi = 0.0, float((prefix[-1] - prefix[0]).max())

    def fill(bound: float) -> tuple[int, ...] | None:
        pos, cuts = 0, []
        for k in range(p - 1):
            limit = prefix[pos, k] + bound
            end = int(np.searchsorted(prefix[:, k], limit, side="right")) - 1
            end = min(end, L - (p - 1 - k))
            if end <= pos:
                return None
            cuts.append(end)
            pos = end
        if prefix[L, p - 1] - prefix[pos, p - 1] > bound:
            return None
        return tuple(cuts)

    best = fill(hi)
    if best is None:
        return choice
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        cuts = fill(mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
        if hi - lo <= 1e-9 * hi:
            break
    return replace(choice, cuts=best)


def _fix_shapes_for_m(space: SearchSpace, shapes: tuple[int, ...], m: int) -> tuple[int, ...] | None:
    """Shapes usable at m: each infeasible (dp, tp) becomes the same-size shape with the largest
    feasible dp; None if a size has none."""
    allowed = space.feasible_shapes(m).numpy()
    out = []
    for s in shapes:
        if allowed[s]:
            out.append(s)
            continue
        n = space.shapes[s][0] * space.shapes[s][1]
        alts = [t for t, (dp, tp) in enumerate(space.shapes) if dp * tp == n and allowed[t]]
        if not alts:
            return None
        out.append(max(alts, key=lambda t: space.shapes[t][0]))
    return tuple(out)


def _neighbours(space: SearchSpace, ev: ExactEvaluator, x: Choice, rng: random.Random) -> Iterator[Choice]:
    """Candidate moves from ``x`` (see module doc); structural moves also come re-balanced."""
    L, p = space.num_layers, x.num_stages
    yield balance_cuts(ev, x)
    cut_moves = [(j, s * d) for j in range(p - 1) for d in CUT_DELTAS for s in (1, -1) if d <= max(1, L // p)]
    rng.shuffle(cut_moves)
    for j, delta in cut_moves:
        cuts = list(x.cuts)
        cuts[j] += delta
        bounds = [0, *cuts, L]
        if all(b > a for a, b in zip(bounds, bounds[1:])):
            yield replace(x, cuts=tuple(cuts))
    allowed = space.feasible_shapes(x.microbatches).numpy()
    shape_moves = [(k, s) for k in range(p) for s in np.flatnonzero(allowed) if s != x.shapes[k]]
    rng.shuffle(shape_moves)
    for k, s in shape_moves:
        shapes = list(x.shapes)
        shapes[k] = int(s)
        y = replace(x, shapes=tuple(shapes))
        if ev.placement(y) is not None:
            yield y
            yield balance_cuts(ev, y)
    for schedule in space.options.schedules:
        if schedule != x.schedule:
            yield replace(x, schedule=schedule)
    for m in space.microbatch_counts:
        if m != x.microbatches:
            shapes = _fix_shapes_for_m(space, x.shapes, m)
            if shapes is not None:
                y = replace(x, microbatches=m, shapes=shapes)
                yield y
                yield balance_cuts(ev, y)
    for order in range(len(space.orders)):
        if order != x.order:
            y = replace(x, order=order)
            yield y
            yield balance_cuts(ev, y)
    sizes = {dp * tp: [] for dp, tp in space.shapes}
    for s, (dp, tp) in enumerate(space.shapes):
        if allowed[s]:
            sizes[dp * tp].append(s)
    if p - 1 in space.stage_counts:  # merge stages k and k+1
        for k in range(p - 1):
            n = sum(space.shapes[x.shapes[i]][0] * space.shapes[x.shapes[i]][1] for i in (k, k + 1))
            for s in sizes.get(n, []) + [x.shapes[k], x.shapes[k + 1]]:
                cuts = x.cuts[:k] + x.cuts[k + 1:]
                y = replace(x, cuts=cuts, shapes=x.shapes[:k] + (s,) + x.shapes[k + 2:])
                if ev.placement(y) is not None:
                    yield balance_cuts(ev, y)
    if p + 1 in space.stage_counts:  # split stage k in two halves (layers and devices)
        bounds = (0, *x.cuts, L)
        for k in range(p):
            a, b = bounds[k], bounds[k + 1]
            if b - a < 2:
                continue
            dp, tp = space.shapes[x.shapes[k]]
            halves = sizes.get(dp * tp // 2, []) if dp * tp > 1 else []
            for s in halves + [x.shapes[k]]:
                cuts = tuple(sorted(x.cuts + ((a + b) // 2,)))
                y = replace(x, cuts=cuts, shapes=x.shapes[:k] + (s, s) + x.shapes[k + 1:],
                            recompute=x.recompute)
                if ev.placement(y) is not None:
                    yield balance_cuts(ev, y)


def _local_search(
    space: SearchSpace, ev: ExactEvaluator, start: Choice, key: Callable[[Choice], tuple | float],
    budget: int, deadline: float | None = None, seed: int = 0, stop: Callable | None = None,
    trace: list | None = None,
) -> Choice:
    """First-improvement descent on ``key`` over ``_neighbours``; every candidate gets its
    cheapest fitting recomputation. Stops at a local optimum, after ``budget`` evaluations,
    at ``deadline`` (time.perf_counter) or when ``stop(best_key)``. ``trace``, if given,
    receives one dict per improvement and a final one with the evaluations used and whether
    a local optimum was reached."""
    rng = random.Random(seed)
    normal = ev.minimal_recompute if space.options.recompute != "off" else (lambda c: c)
    x = start
    x_key = key(x)
    y0 = normal(x)
    if key(y0) < x_key:
        x, x_key = y0, key(y0)
    used = 0
    seen: set = set()

    def done(converged: bool) -> Choice:
        if trace is not None:
            trace.append({"evaluations": used, "local_optimum": converged})
        return x

    improved = True
    while improved:
        improved = False
        for y in _neighbours(space, ev, x, rng):
            if used >= budget or (deadline is not None and time.perf_counter() > deadline):
                return done(False)
            y = normal(y)
            sig = (y.order, y.cuts, y.shapes, y.microbatches, y.schedule, y.recompute)
            if sig in seen:
                continue
            seen.add(sig)
            used += 1
            k = key(y)
            if k < x_key:
                x, x_key, improved = y, k, True
                if trace is not None:
                    trace.append({"evaluations": used, "key": x_key})
                if stop is not None and stop(x_key):
                    return done(False)
                break
    return done(True)


def refine(
    space: SearchSpace, choice: Choice, budget: int = 3000, *, evaluator: ExactEvaluator | None = None,
    seed: int = 0, time_limit_s: float | None = None, trace: list | None = None,
) -> tuple[Choice, RelaxedCost]:
    """Local refinement of ``choice`` on the exact discrete cost (see module doc).

    Args:
        space: the search space.
        choice: the starting point (repaired first if it does not fit).
        budget: most exact evaluations to spend.
        evaluator: a shared ``ExactEvaluator`` (built if None).
        seed: order of the moves.
        time_limit_s: optional wall-clock limit.
        trace: optional list that receives the improvements and the evaluations used.
    Returns:
        the best point found (never worse than the start) and its ``space.evaluate`` cost.
    """
    ev = evaluator or ExactEvaluator(space)
    start = repair(space, choice, ev)
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
    best = _local_search(space, ev, start, lambda c: ev(c).objective_s, budget, deadline, seed, trace=trace)
    cost, _ = space.evaluate(best)
    return best, cost
