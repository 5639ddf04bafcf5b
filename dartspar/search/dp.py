"""Exact inter-operator dynamic program (PipeDream / Alpa) over the shared search space.

Step time = pipeline makespan + the slowest stage's gradient synchronisation and optimizer
update ("sync" below) + a fixed per-step overhead. With the closed forms of ``cost/schedule.py`` (``makespan_terms`` restates them) a plan
of p stages costs an *additive* part, a sum of per-stage terms,

    A = sum_k (f_k + b_k) + kappa * sum_{k<p-1} c_k          (c_k = p2p from stage k to k+1)

(kappa = 2 for GPipe, 2 (1 + floor((m-1)(p-1)/p)/(p-1)) for 1F1B) plus weighted *max* terms,
each the maximum over stages of a per-stage quantity:

    1F1B:  (m-1) max_k (f_k + b_k)                              + max_k sync_k
    GPipe: (m-1) [max_k max(f_k, c_k) + max_k max(b_k, c_k)]   + max_k sync_k

Alpa's trick: for fixed upper bounds on the max terms, minimising A is a shortest-path DP over
(first layer not yet placed, first device offset not yet used, stages left) whose transitions
are (end layer, shape, recompute on/off); a stage is allowed when its max-term quantities are
under the bounds and it fits its devices' memory (1F1B keeps min(k, m) micro-batches in flight
on the stage k-th from the end, which is why the DP counts stages from the back). Alpa
enumerates the slowest-stage bound over its sorted candidate values with an early stop. With two
or three max terms that enumeration is a grid, so this module searches the bounds best-first: a
solve under bounds ``ub`` returns the plan P minimising A there; any plan that could beat P has
some max term strictly below P's, which splits the region into disjoint sub-regions
(``M_d < M_d(P)`` and ``M_e >= M_e(P)`` for e < d). A region's lower bound is its parent's A
plus the weighted lower bounds of its max terms, the slowest-stage ones at least the
bottleneck optimum (a min-max DP solved once per branch, Alpa's early-stop bound), and never
below the branch's averaged bound (every max is at least the mean over stages, which makes the
whole step time additive: one more DP). Branches, the discrete globals (node order, micro-batch
count, schedule, precisions) times the stage count p, are screened with two DP passes that cover
every p at once; then the regions of all branches are expanded best-first from one heap until
no open bound beats the incumbent, so a time-limited run still certifies a lower bound.

Without a cap the result is the exact optimum over the space. Recompute granularity "layer" is
restricted to one flag per stage (said in ``info["notes"]``); "stage" and "off" are exact.
Per-range stage terms are differences of prefix sums of the per-layer tables, vectorised over
(layer range, device group, recompute) in numpy; the minimum over the transitions leaving a state
is a segment reduction, so one solve costs O(p * ranges * groups).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..space import Choice, SearchSpace
from .bruteforce import make_result

__all__ = ["dp_search", "makespan_terms"]

INF = float("inf")


def makespan_terms(schedule: str, num_microbatches: int, num_stages: int) -> tuple[float, tuple]:
    """The decomposition of ``cost.schedule.pipeline_makespan_s`` the DP relies on.

    Returns ``(kappa, weights)``: makespan = sum(f + b) + kappa * sum(c[:-1]) + sum_d w_d M_d,
    with M = (max(f + b),) for 1F1B and (max(f ∪ c[:-1]), max(b ∪ c[:-1])) for GPipe.
    ``tests/test_baselines.py`` checks it against ``pipeline_makespan_s``.
    """
    m, p = num_microbatches, num_stages
    if schedule == "gpipe":
        return 2.0, (m - 1.0, m - 1.0)
    if schedule == "1f1b":
        exposed = ((m - 1) * (p - 1) // p) / (p - 1) if p > 1 else 0.0
        return 2.0 * (1.0 + exposed), (m - 1.0,)
    raise ValueError(f"schedule={schedule!r} is not one of ('1f1b', 'gpipe')")


@dataclass
class _OrderTensors:
    """Range x group sums for one (node order, micro-batch count), shared by its branches.

    Ranges are sorted by first layer and groups by start offset, so that minima over the
    transitions leaving a state are segment reductions (``np.minimum.reduceat``)."""

    order: int
    microbatches: int
    i_idx: np.ndarray  # (R,) first layer of each range
    j_idx: np.ndarray  # (R,) one past its last layer
    row_starts: np.ndarray  # segment starts of the ranges sharing a first layer
    row_keys: np.ndarray  # that first layer, per segment
    range_rows: dict  # first layer -> (lo, hi) range rows
    pa: np.ndarray  # (Q,) group start offset
    pend: np.ndarray  # (Q,) group end offset
    pshape: np.ndarray  # (Q,) shape index
    pconf: np.ndarray  # (Q,) config index
    col_starts: np.ndarray  # segment starts of the groups sharing a start offset
    col_keys: np.ndarray  # that offset, per segment
    pairs_at: dict  # start offset -> (lo, hi) group columns
    sums: dict  # name -> (R, Q) range sums
    tables: object


@dataclass
class _Branch:
    """One setting of the discrete globals: per-stage terms as (NR or 1, R, Q) arrays."""

    base: _OrderTensors
    schedule: str
    act: str
    grad: str
    recompute: tuple  # the recompute flags a stage may take (NR of them)
    f: np.ndarray  # forward per micro-batch
    b: np.ndarray  # backward per micro-batch (recompute included)
    c: np.ndarray  # p2p to the next stage (inf where no next stage can follow)
    sync: np.ndarray  # gradient synchronisation per step
    kcap: np.ndarray  # largest stages-from-end index whose in-flight activations fit
    kmin: int  # kcap.min(): up to this k no memory mask is needed

    @property
    def label(self) -> str:
        return (f"order={self.base.order} m={self.base.microbatches} {self.schedule} "
                f"act={self.act} grad={self.grad}")

    def terms(self, p: int, kappa: float | None = None) -> tuple[float, tuple, list, list]:
        """(kappa, weights, [add_last, add_mid], [dims_last, dims_mid]) for p stages (or with
        the given link factor ``kappa``); dims are lists of the per-stage max-term quantities
        (sync last), broadcastable to (NR, R, Q)."""
        kappa_p, t_weights = makespan_terms(self.schedule, self.base.microbatches, p)
        kappa = kappa_p if kappa is None else kappa
        fb = self.f + self.b
        add = [fb, fb + kappa * self.c]
        if self.schedule == "1f1b":
            dims = [[fb, self.sync], [fb, self.sync]]
        else:
            dims = [[self.f, self.b, self.sync],
                    [np.maximum(self.f, self.c), np.maximum(self.b, self.c), self.sync]]
        return kappa, (*t_weights, 1.0), add, dims


def dp_search(
    space: SearchSpace,
    *,
    seed: int = 0,
    progress: bool = False,
    callback=None,
    time_limit_s: float | None = None,
    max_solves: int | None = None,
    layer_group: int = 1,
    max_elements: float = 2e7,
    check: bool = True,
    num_threads: int | None = 1,
):
    """The best plan of ``space`` by the inter-op DP with a best-first bound search (module doc).

    Args:
        space: the search space (its cost model scores everything).
        seed: unused (the DP is deterministic); accepted for a uniform method signature.
        progress: print a line per screened branch and every 200 solves.
        callback: called with each history entry (a dict) as it is recorded.
        time_limit_s: stop expanding bound regions after this many seconds (then
            ``info["exact"]`` is False and ``info["gap_bound"]`` bounds the loss).
        max_solves: stop after this many DP solves (same consequence). Either cap is checked
            once at least one plan was found, so a capped search still returns one.
        layer_group: allow cuts only every ``layer_group`` layers (plus right after the first
            and before the last layer); 1 = every layer (exact). Larger values make big models
            tractable and are reported as not exact.
        max_elements: refuse (clear error) when one branch's (ranges x groups x recompute)
            arrays would exceed this many elements (a branch holds ~8 such float64 arrays, so
            2e7 is ~1.3 GB); raise ``layer_group`` then.
        check: compare the DP's own step time of the returned plan with ``space.evaluate``
            and raise if they differ by more than 1e-9 relative.
        num_threads: torch intra-op threads while the cost tables are built (None: leave as
            is); the DP itself is single-threaded numpy. One is the default, as for darts:
            small torch ops lose more to thread hand-offs than they gain on a busy machine.
    Returns:
        SearchResult; ``info`` has exact, solves, branches, lower_bound_s, gap_bound, notes.
    """
    del seed
    if layer_group < 1:
        raise ValueError(f"dp.layer_group={layer_group} must be >= 1")
    before = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _dp(space, progress, callback, time_limit_s, max_solves, layer_group, max_elements, check)
    finally:
        torch.set_num_threads(before)


def _dp(space, progress, callback, time_limit_s, max_solves, layer_group, max_elements, check):
    start = time.perf_counter()
    notes = []
    if space.options.recompute == "layer":
        notes.append("recompute granularity 'layer' searched as one flag per stage (stage-uniform)")
    if layer_group > 1:
        notes.append(f"cuts restricted to every {layer_group} layers (layer_group)")
    rec = (False,) if space.options.recompute == "off" else (False, True)
    specs = list(itertools.product(
        range(len(space.orders)), space.microbatch_counts, space.options.schedules,
        space.options.activation_precisions, space.options.gradient_precisions,
    ))
    step_overhead = space.cost_model.step_overhead_s
    history: list[dict] = []
    state = {"best": INF, "choice": None, "solves": 0, "roots": 0}

    def record(entry: dict) -> None:
        history.append(entry)
        if callback is not None:
            callback(entry)

    def out_of_budget() -> bool:
        if max_solves is not None and state["solves"] >= max_solves:
            return True
        return time_limit_s is not None and time.perf_counter() - start > time_limit_s

    orders_cache: dict = {}
    branches_cache: dict = {}

    def branch_for(spec) -> _Branch:
        """The branch's tensors, rebuilt on demand; a bounded number stay cached."""
        if spec in branches_cache:
            branches_cache[spec] = branches_cache.pop(spec)  # most recently used last
            return branches_cache[spec]
        order, m, schedule, act, grad = spec
        if (order, m) not in orders_cache:
            if len(orders_cache) >= 4:
                orders_cache.pop(next(iter(orders_cache)))
            orders_cache[(order, m)] = _order_tensors(space, order, m, layer_group, len(rec), max_elements)
        base = orders_cache[(order, m)]
        branch = _make_branch(space, base, schedule, act, grad, rec)
        # ~8 arrays of (NR, R, Q) per branch; keep about 1e8 elements (0.8 GB) cached.
        keep = max(2, int(1e8 // (8 * len(rec) * base.i_idx.size * base.pa.size)))
        while len(branches_cache) >= keep:
            branches_cache.pop(next(iter(branches_cache)))
        branches_cache[spec] = branch
        return branch

    def consider(branch: _Branch, p: int, sol: dict, extra: dict) -> None:
        cost = sol["A"] + sum(w * x for w, x in zip(sol["weights"], sol["maxima"])) + step_overhead
        if cost < state["best"]:
            state["best"], state["choice"] = cost, sol["choice"]
        record({"step": state["solves"], "best_step_time_s": state["best"], "branch": branch.label,
                "stages": p, "solve_cost_s": cost, **extra})

    # Phase 1 (screen): per branch, two DP passes over all stage counts at once give lower
    # bounds per p: the bottleneck optimum of the slowest stage, and the minimum additive part
    # with the smallest link factor (kappa = 2; 1F1B's kappa_p is at least that).
    candidates = []
    stopped, screened = False, True
    for spec in specs:
        if candidates and out_of_budget():  # a capped search still returns a plan
            stopped, screened = True, False
            break
        branch = branch_for(spec)
        t_low, a_low = _screen(space, branch)
        state["solves"] += 2
        weights = branch.terms(1)[1]
        for p in space.stage_counts:
            if p in t_low:
                candidates.append((_region_lb(a_low[p], weights, (0.0,) * len(weights), t_low[p],
                                              branch.schedule), spec, p, t_low[p]))
        if progress:
            print(f"[dp] screened {branch.label}")

    # Phase 2: best-first over every branch's bound regions at once. A screened (branch, p)
    # first gets its averaged bound (one more DP) as a floor for all its regions; its root
    # region is the unbounded solve; each solve splits its region (module doc). It ends when
    # the smallest open bound cannot beat the best plan found: then that plan is optimal.
    counter = itertools.count()
    heap = [(bound, next(counter), "screen", spec, p, t_low, bound, None, None)
            for bound, spec, p, t_low in candidates]
    heapq.heapify(heap)
    open_bounds: list[float] = []
    while heap:
        bound, _, kind, spec, p, t_low, floor, ub, lb = heapq.heappop(heap)
        if bound + step_overhead >= state["best"]:
            break
        if state["choice"] is not None and out_of_budget():
            stopped = True
            open_bounds.append(bound + step_overhead)
            break
        branch = branch_for(spec)
        kappa, weights, add, dims = branch.terms(p)
        state["solves"] += 1
        if kind == "screen":
            floor = max(bound, _mean_bound(space, branch, p))
            heapq.heappush(heap, (floor, next(counter), "region", spec, p, t_low, floor,
                                  (INF,) * len(weights), (0.0,) * len(weights)))
            continue
        sol = _solve(space, branch, p, add, dims, ub)
        if sol is None:
            continue
        sol["weights"] = weights
        if all(u == INF for u in ub):
            state["roots"] += 1
        consider(branch, p, sol, {"region_lower_bound_s": bound + step_overhead})
        fixed = list(lb)
        for d in range(len(weights)):
            if weights[d] == 0:
                continue
            child_ub = tuple(sol["maxima"][d] if e == d else ub[e] for e in range(len(weights)))
            child_lb = tuple(fixed)
            fixed[d] = max(fixed[d], sol["maxima"][d])
            if any(child_lb[e] >= child_ub[e] for e in range(len(weights))):
                continue
            child = max(floor, _region_lb(sol["A"], weights, child_lb, t_low, branch.schedule))
            if child + step_overhead < state["best"]:
                heapq.heappush(heap, (child, next(counter), "region", spec, p, t_low, floor,
                                      child_ub, child_lb))
        if progress and state["solves"] % 200 == 0:
            print(f"[dp] {state['solves']} solves: best {1e3 * state['best']:.4f} ms, "
                  f"lower bound {1e3 * (bound + step_overhead):.4f} ms, {len(heap)} open regions")

    if state["choice"] is None:
        raise ValueError(
            f"dp: no plan of {space.profile.name} fits in the memory of {space.cluster.name}"
            + (" (the time limit ran out first)" if stopped else "")
            + ": allow recompute, more stages, larger tensor-parallel degrees or more micro-batches"
        )
    choice = state["choice"]
    if check:
        evaluated, infeasible = space.evaluate(choice)
        step = float(evaluated.step_time_s)
        if (abs(step - state["best"]) > 1e-9 * step or float(infeasible.sum()) > 0
                or float(evaluated.overflow_bytes.max()) > 0):
            raise RuntimeError(
                f"dp internal check failed: the DP scored {choice} at {state['best']!r} s, the "
                f"cost model at {step!r} s (overflow {float(evaluated.overflow_bytes.max())} "
                f"bytes, infeasible mass {float(infeasible.sum())}); this is a bug in "
                "dartspar/search/dp.py or a cost-model change it does not mirror"
            )
    if not screened:
        open_bounds.append(0.0)  # branches never solved: nothing is known about them
    lower = min([state["best"], *open_bounds])
    exact = not stopped and layer_group == 1 and space.options.recompute != "layer"
    return make_result(space, "dp", choice, start, history=history, evaluations=int(check), info={
        "exact": exact,
        "solves": state["solves"],
        "branches": len(specs) * len(space.stage_counts),
        "branches_solved": state["roots"],
        "lower_bound_s": lower,
        "gap_bound": (state["best"] - lower) / state["best"],
        "stopped_early": stopped,
        "layer_group": layer_group,
        "notes": notes,
    })


# ------------------------------------------------------------------------------- tensors
def _cut_positions(num_layers: int, layer_group: int) -> list[int]:
    """Layer indices where a stage may start or end."""
    if layer_group == 1:
        return list(range(num_layers + 1))
    allowed = {0, 1, num_layers - 1, num_layers} | set(range(0, num_layers, layer_group))
    return sorted(x for x in allowed if 0 <= x <= num_layers)


def _segments(sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(segment starts, segment keys, key -> (lo, hi)) of a sorted key array."""
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(sorted_keys)]
    keys = sorted_keys[starts]
    return starts, keys, {int(k): (int(lo), int(hi)) for k, lo, hi in zip(keys, starts, ends)}


def _order_tensors(space: SearchSpace, order: int, m: int, layer_group: int, nr: int,
                   max_elements: float) -> _OrderTensors:
    L, D = space.num_layers, space.num_devices
    cfg = space.orders[order].config_index.numpy()
    valid = (cfg >= 0) & space.feasible_shapes(m).numpy()[None, :]
    pa, ps = np.nonzero(valid)  # row-major: sorted by start offset
    sizes = np.array([dp * tp for dp, tp in space.shapes])
    pend = pa + sizes[ps]
    pconf = cfg[pa, ps]

    positions = _cut_positions(L, layer_group)
    ranges = [(i, j) for i in positions for j in positions if j > i]  # sorted by i
    R, Q = len(ranges), len(pa)
    if R * Q * nr > max_elements:
        raise ValueError(
            f"dp: {R} layer ranges x {Q} device groups x {nr} recompute options = "
            f"{R * Q * nr:.3g} elements per branch exceeds dp.max_elements={max_elements:.3g} "
            f"({L} layers, {D} devices): raise dp.layer_group (now {layer_group}) or max_elements"
        )
    i_idx = np.array([i for i, _ in ranges])
    j_idx = np.array([j for _, j in ranges])
    row_starts, row_keys, range_rows = _segments(i_idx)
    col_starts, col_keys, pairs_at = _segments(pa)

    t = space.tables(m)
    ct, mt = t.compute, t.memory
    per_layer = {
        "fwd": ct.fwd_compute_s + ct.tp_fwd_comm_s,
        "bwd": ct.bwd_compute_s + ct.tp_bwd_comm_s,
        "update": t.step_layer_s,
        "recompute": ct.recompute_s,
        "grad": t.grad_bytes,
        "param": t.param_bytes,
        "state": mt.state_bytes,
        "saved": mt.saved_bytes,
        "input": mt.input_bytes,
    }
    sums = {}
    for name, table in per_layer.items():
        table = table.numpy()
        prefix = np.concatenate([np.zeros((1, table.shape[1])), np.cumsum(table, axis=0)])
        cols = prefix[:, pconf]  # (L+1, Q)
        sums[name] = cols[j_idx] - cols[i_idx]
    return _OrderTensors(order, m, i_idx, j_idx, row_starts, row_keys, range_rows, pa, pend, ps,
                         pconf, col_starts, col_keys, pairs_at, sums, t)


def _make_branch(space: SearchSpace, base: _OrderTensors, schedule: str, act: str, grad: str,
                 rec: tuple) -> _Branch:
    from ..cost.model import ACT_BYTES, GRAD_BYTES

    t, s = base.tables, base.sums
    m = base.microbatches
    dtype_bytes = space.profile.dtype_bytes
    overhead = space.cost_model.stage_overhead_s
    conf = base.pconf
    dp = t.dp.numpy()[conf]  # (Q,)
    r = np.array([float(x) for x in rec])[:, None, None]  # (NR, 1, 1)

    f = s["fwd"][None] + overhead  # (1, R, Q)
    b = s["bwd"][None] + r * s["recompute"][None] + overhead  # (NR, R, Q)

    # p2p to the next stage: this stage's last layer's output over the link at its end offset.
    links = space.orders[base.order].link_index.numpy()[base.pend]  # (Q,)
    lat = np.array([lk.latency_s for lk in space.links] or [0.0])
    inv_bw = np.array([1.0 / lk.bandwidth_bytes_per_s for lk in space.links] or [0.0])
    li = np.maximum(links, 0)
    sent = t.output_bytes.numpy()[base.j_idx - 1] * (ACT_BYTES[act] / dtype_bytes)  # (R,)
    c = lat[li][None, :] + sent[:, None] * inv_bw[li][None, :] * (1.0 / dp)[None, :]
    c = np.where((links >= 0)[None, :], c, INF)[None]

    payload = s["grad"] * (GRAD_BYTES[grad] / dtype_bytes)
    if space.options.data_parallel == "fsdp":
        payload = 0.5 * (payload + s["param"])
    sync = t.sync_alpha_s.numpy()[conf][None, :] + payload * t.sync_beta_s_per_byte.numpy()[conf][None, :]
    sync = (np.where((dp > 1)[None, :], sync, 0.0) + s["update"])[None]

    # Memory: state + inflight * activations must fit; inflight depends on stages-from-end k.
    acts = np.stack([s["input"] if x else s["saved"] for x in rec])  # (NR, R, Q)
    state = s["state"][None]
    cap = t.capacity_bytes.numpy()[conf][None, None, :]
    pmax = max(space.stage_counts)
    if schedule == "gpipe":
        kcap = np.where(state + m * acts <= cap, pmax, 0).astype(np.int16)
    else:
        kcap = np.zeros(acts.shape, dtype=np.int16)
        for inflight in range(1, min(pmax, m) + 1):
            kcap += state + inflight * acts <= cap
        kcap[kcap >= min(pmax, m)] = pmax
    return _Branch(base, schedule, act, grad, rec, f, b, c, sync, kcap, int(kcap.min()))


# ---------------------------------------------------------------------------------- solve
def _masked(branch: _Branch, add: list, dims: list, ub: tuple, value: str = "additive") -> list:
    """Per variant (last, mid) the (NR, R, Q) transition value, inf where a bound is violated
    or no stage can follow. ``value``: "additive" (A's terms) or "bottleneck" (f + b)."""
    out = []
    for var in (0, 1):
        if value == "bottleneck":
            x = np.where(np.isfinite(add[var]), branch.f + branch.b, INF)
        else:
            x = add[var]
        for d, bound in enumerate(ub):
            if bound < INF:
                x = np.where(dims[var][d] < bound, x, INF)
        out.append(np.broadcast_to(x, add[var].shape))
    return out


def _own(branch: _Branch, masked: np.ndarray, k: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
    """``masked`` restricted to stages that fit in memory as the k-th from the end."""
    x = masked[:, rows, cols]
    if k > branch.kmin:
        x = np.where(branch.kcap[:, rows, cols] >= k, x, INF)
    return x


def _values(space: SearchSpace, branch: _Branch, masked: list, kmax: int, bottleneck: bool) -> list:
    """values[k][i, a]: best cost of placing layers [i, L) on devices from offset a in k stages
    (sum of transition values, or with ``bottleneck`` their max), for k = 0..kmax."""
    base = branch.base
    L, D = space.num_layers, space.num_devices
    values = [np.full((L + 1, D + 1), INF)]
    values[0][L, :] = 0.0
    rows, cols = np.ix_(base.row_keys, base.col_keys)
    for k in range(1, kmax + 1):
        own = _own(branch, masked[0 if k == 1 else 1], k).min(axis=0)  # (R, Q)
        tail = values[k - 1][base.j_idx[:, None], base.pend[None, :]]
        best = np.maximum(own, tail) if bottleneck else own + tail
        per_offset = np.minimum.reduceat(best, base.col_starts, axis=1)
        nxt = np.full((L + 1, D + 1), INF)
        nxt[rows, cols] = np.minimum.reduceat(per_offset, base.row_starts, axis=0)
        values.append(nxt)
    return values


def _screen(space: SearchSpace, branch: _Branch) -> tuple[dict, dict]:
    """Per stage count p with a plan that fits: (bottleneck optimum of max(f + b), minimum of
    the additive part with kappa = 2), each a lower bound for every p-stage plan of the branch
    (1F1B's kappa_p is at least 2); two passes cover every p."""
    pmax = max(space.stage_counts)
    kappa, weights, add, dims = branch.terms(pmax, kappa=2.0)
    free = (INF,) * len(weights)
    t_values = _values(space, branch, _masked(branch, add, dims, free, "bottleneck"), pmax, True)
    a_values = _values(space, branch, _masked(branch, add, dims, free), pmax, False)
    t_low, a_low = {}, {}
    for p in space.stage_counts:
        t, a = float(t_values[p][0, 0]), float(a_values[p][0, 0])
        if t < INF:
            t_low[p], a_low[p] = t, a
    return t_low, a_low


def _mean_bound(space: SearchSpace, branch: _Branch, p: int) -> float:
    """A lower bound of every p-stage plan's step time (without the step overhead): each max
    term is at least the mean of its per-stage quantities, so step >= min over plans of
    sum_k [add_k + w/p (f_k + b_k) + sync_k / p], an additive DP (for GPipe max(f ∪ c) +
    max(b ∪ c) >= mean f + mean b)."""
    kappa, weights, add, dims = branch.terms(p)
    fb = branch.f + branch.b
    averaged = [a + (weights[0] / p) * fb + branch.sync / p for a in add]
    values = _values(space, branch, averaged, p, False)
    return float(values[p][0, 0])


def _solve(space: SearchSpace, branch: _Branch, p: int, add: list, dims: list, ub: tuple):
    """The p-stage plan minimising the additive part under strict upper bounds ``ub`` on the
    max terms, as a dict (A, maxima, choice), or None if no plan qualifies."""
    masked = _masked(branch, add, dims, ub)
    values = _values(space, branch, masked, p, False)
    A = float(values[p][0, 0])
    if A == INF:
        return None
    return _reconstruct(branch, masked, dims, values, p, A)


def _reconstruct(branch: _Branch, masked: list, dims: list, values: list, p: int, A: float) -> dict:
    base = branch.base
    i, a = 0, 0
    cuts, shapes, flags, terms = [], [], [], []
    for k in range(p, 0, -1):
        var = 0 if k == 1 else 1
        lo, hi = base.range_rows[i]
        qlo, qhi = base.pairs_at[a]
        own = _own(branch, masked[var], k, slice(lo, hi), slice(qlo, qhi))
        tail = values[k - 1][base.j_idx[lo:hi, None], base.pend[None, qlo:qhi]]
        rr, ri, qi = np.unravel_index(int(np.argmin(own + tail[None])), own.shape)
        row, col = lo + ri, qlo + qi
        terms.append([float(np.broadcast_to(d, masked[var].shape)[rr, row, col]) for d in dims[var]])
        j = int(base.j_idx[row])
        shapes.append(int(base.pshape[col]))
        flags.extend([branch.recompute[rr]] * (j - i))
        if k > 1:
            cuts.append(j)
        i, a = j, int(base.pend[col])
    maxima = tuple(max(t[d] for t in terms) for d in range(len(terms[0])))
    choice = Choice(
        order=base.order, cuts=tuple(cuts), shapes=tuple(shapes), microbatches=base.microbatches,
        schedule=branch.schedule, recompute=tuple(flags), activation_precision=branch.act,
        gradient_precision=branch.grad,
    )
    return {"A": A, "maxima": maxima, "choice": choice}


def _region_lb(parent_A: float, weights: tuple, lb: tuple, t_low: float, schedule: str) -> float:
    """Lower bound (without the step overhead) of every plan of a region whose A is at least
    ``parent_A`` and whose max terms are at least ``lb``.

    The slowest-stage terms also sum to at least ``t_low``, the bottleneck optimum: for 1F1B
    max(f + b) >= t_low, for GPipe max(f ∪ c) + max(b ∪ c) >= max(f + b) >= t_low."""
    if schedule == "1f1b":
        t_part = weights[0] * max(lb[0], t_low)
    else:
        t_part = weights[0] * max(lb[0] + lb[1], t_low)
    return parent_A + t_part + weights[-1] * lb[-1]
