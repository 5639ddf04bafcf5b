"""DARTS over the strategy matrix A: relaxed search, then decode, repair and refine.

Objective of A (a *branch* is a node order and a stage count; see ``strategy.py``)::

    J(A) = [L_val(theta, A)] + lam * sum_{order, p, m, schedule} P(order, p, m, schedule)
           * ( step_time(order, p, m, schedule) / Cost_ref + memory term + kappa * P(infeasible group) )

P(order, p, m, schedule) is the joint global row (or the product of four rows with
``global_rows="factorized"``). ``step_time`` is the expected relaxed step time of the branch's
rows at (m, schedule), from the shared cost model's formulas (``fastcost.batched_relaxed_cost``
mirrors ``relaxed_cost``), with the slowest-stage max replaced by a log-sum-exp whose
temperature is ``smooth_rel`` times the mean stage time (detached). The stage shapes' configs
are taken conditional on forming an allowed device group, and the mass that does not is
penalised (``infeasible_weight``). Memory: a hinge ``mu * sum_k overflow_k / capacity_k`` or a
Lagrangian with per-stage multipliers updated by dual ascent on ``(memory_k - capacity_k) /
capacity_k``. ``Cost_ref`` is the smallest relaxed step time over all branches at
initialisation. ``lam`` only matters in bilevel mode.

Speed: all node orders of one stage count are evaluated in one batched pass; a stage count
whose P(order, p) is below ``prune_eps`` for every order keeps its last cost (detached) and is
not re-evaluated, so the global row still sees it but its rows stop moving. The global rows are
frozen for the first ``warmup`` fraction of steps so that every branch's own rows are optimised
before branches compete.

Bilevel: when a precision choice has more than one option (``numerics="auto"``), the proxy
model of ``bilevel.py`` trains on the relaxed numerics (one weights step per A step, DARTS'
alternation) and ``L_val`` joins A's objective (first order, or the unrolled second-order
step). Otherwise A steps on the cost alone (cost-only mode).

Then ``decode.py``: the ``top_k`` most probable global settings, the ``top_k`` with the lowest
relaxed cost and the best setting of every stage count are decoded and repaired to fit memory;
the best of them are refined by local search on the exact cost, each to a local optimum,
while ``refine_budget`` evaluations last; the best becomes the plan. ``SearchResult.info``:

- ``relaxed_cost_s``: relaxed step time of the most probable setting (softmax rows at the
  final temperature, smooth max), ``relaxed_expected_cost_s``: the full expectation;
- ``decoded_cost_s``: exact step time of that setting's decode (inf if it overflows memory),
  ``decoded_repaired_cost_s`` after repair, ``gap`` = (repaired decoded - relaxed) / relaxed;
- ``best_decoded_cost_s`` over all decoded candidates, ``refined_cost_s`` (= ``cost``);
- ``numerics``: mode, which choices change numerics, notes; plus the candidates, the
  refinement log, the final global rows, ``stage_snapshots`` of the layer-stage matrix (for
  heatmaps) and per-phase times. ``history`` has one entry per step (temperature, expected
  cost, decoded cost every ``decode_every`` steps, entropies, global rows, L_train / L_val).
"""


from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch

from ..cost.model import ACT_BYTES, GRAD_BYTES
from ..plan import PlanError
from ..space import NUMERICS_CHOICES, SearchSpace
from .bilevel import ProxyConfig, ProxyTask
from .decode import candidate_branches, decode_branch, decode_candidates, refine
from .fastcost import ExactEvaluator, StackedTables, batched_relaxed_cost, batched_soft_configs
from .relax import RELAXATIONS, TemperatureSchedule
from .result import SearchResult
from .strategy import StrategyMatrix, entropy_summary

__all__ = ["darts_search", "GroupCost"]


@contextmanager
def _threads(n: int | None):
    """Run with ``n`` intra-op threads (restored afterwards). The relaxed cost is hundreds of
    tiny tensor ops; on 2 cores, thread hand-offs cost more than they save."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GroupCost:
    """Relaxed cost and penalties of every node order at one stage count, for every
    (schedule, m).

    Calling it with A, a stage-count index, the temperature and relaxation, the expected
    act/grad bytes factors and ``Cost_ref`` returns a dict of tensors: "objective" and "step"
    (O, Sc, M) (the step time in seconds; the objective normalised by ``ref_s`` plus the
    memory and infeasibility terms), "overflow" (O, Sc, M, p) relative to capacity, "slack"
    (Lagrangian mode) and "infeasible" (O, M, p). ``smooth_rel=None`` gives exact maxima.
    """

    def __init__(self, space: SearchSpace, tables: StackedTables, smooth_rel: float | None, memory: str,
                 mu: float, infeasible_weight: float) -> None:
        self.space, self.tables = space, tables
        links = tuple(space.links) or (space.cluster.inter_link,)
        self.lat = torch.tensor([link.latency_s for link in links], dtype=torch.float64)
        self.inv_bw = torch.tensor([1.0 / link.bandwidth_bytes_per_s for link in links], dtype=torch.float64)
        self.smooth_rel, self.memory, self.mu, self.kappa = smooth_rel, memory, mu, infeasible_weight
        self.schedules = tuple(space.options.schedules)
        self.orders = tuple(range(len(space.orders)))
        self.stage_overhead_s = float(getattr(space.cost_model, "stage_overhead_s", 0.0))
        self.step_overhead_s = float(getattr(space.cost_model, "step_overhead_s", 0.0))
        self.cache: dict = {}
        self.duals: dict[int, torch.Tensor] = {}

    def __call__(self, A: StrategyMatrix, group: int, temperature: float, relaxation: str,
                 generator: torch.Generator, act_factor: torch.Tensor, grad_factor: torch.Tensor,
                 ref_s: float) -> dict:
        rows = A.group_rows(group, temperature, relaxation, generator)
        Q, infeasible, links = batched_soft_configs(self.space, self.orders, rows.shape_probs, self.cache)
        # Expected cost given that the stage's group is allowed; the rest is penalised below.
        Qc = Q / (1.0 - infeasible).clamp(min=1e-6)[..., None]
        cost = batched_relaxed_cost(
            rows.membership, Qc, rows.recompute, links, act_factor, grad_factor, self.tables,
            self.lat, self.inv_bw, self.schedules, self.space.options.data_parallel, self.smooth_rel,
            self.stage_overhead_s, self.step_overhead_s)
        step = cost.step_time_s  # (O, Sc, M)
        capacity = cost.expected_capacity_bytes.clamp(min=1.0)[:, None]  # (O, 1, M, p)
        overflow = cost.overflow_bytes / capacity  # (O, Sc, M, p)
        slack = None
        if self.memory == "hinge":
            mem_term = self.mu * overflow.sum(-1)
        else:
            slack = (cost.expected_memory_bytes - capacity) / capacity
            nu = self.duals.setdefault(group, torch.zeros_like(slack.detach()))
            mem_term = (nu * slack).sum(-1)
        inf_term = self.kappa * infeasible.sum(-1)[:, None, :]  # (O, 1, M)
        objective = step / ref_s + mem_term + inf_term
        return {"objective": objective, "step": step, "overflow": overflow, "slack": slack,
                "infeasible": infeasible}

    def dual_step(self, group: int, slack: torch.Tensor, dual_lr: float) -> None:
        self.duals[group] = (self.duals[group] + dual_lr * slack.detach()).clamp(min=0.0)


def _as_schedule(temperature, kind: str, steps: int) -> TemperatureSchedule:
    if isinstance(temperature, TemperatureSchedule):
        return temperature
    if isinstance(temperature, (int, float)):
        return TemperatureSchedule(float(temperature), float(temperature), steps, "constant")
    start, end = temperature
    return TemperatureSchedule(float(start), float(end), steps, kind)


def darts_search(
    space: SearchSpace,
    *,
    seed: int = 0,
    steps: int = 120,
    lr: float = 0.1,
    global_lr: float | None = None,
    lam: float = 1.0,
    temperature=(1.0, 0.1),
    temperature_schedule: str = "exponential",
    relaxation: str = "softmax",
    memory: str = "hinge",
    mu: float = 5.0,
    dual_lr: float = 1.0,
    infeasible_weight: float = 2.0,
    order: str = "first",
    numerics: str = "auto",
    warmup: float = 0.3,
    global_rows: str = "joint",
    smooth_rel: float = 0.05,
    prune_eps: float = 1e-3,
    top_k: int = 8,
    refine_budget: int = 3000,
    refine_top: int = 16,
    decode_every: int = 10,
    max_snapshots: int = 60,
    proxy: ProxyConfig | dict | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
    callback=None,
) -> SearchResult:
    """Differentiable search over ``space`` (see module doc).

    Args:
        space: the search space (model, cluster, options, cost model).
        seed: seeds Gumbel noise, the proxy model and the refinement's move order.
        steps: A steps of the relaxed phase.
        lr / global_lr: Adam learning rates of the per-branch rows / the global rows
            (default: ``lr``).
        lam: weight of the normalised cost against L_val (bilevel mode).
        temperature: (start, end) of the softmax temperature, a constant, or a
            ``TemperatureSchedule``; ``temperature_schedule``: "exponential" or "linear".
        relaxation: "softmax", "gumbel" or "gumbel_hard" (straight-through).
        memory: "hinge" (penalty ``mu``) or "lagrangian" (dual ascent with ``dual_lr``).
        infeasible_weight: penalty per unit of probability on disallowed device groups.
        order: "first" (first-order DARTS) or "second" (unrolled step; bilevel only).
        numerics: "auto" (bilevel iff a precision row has several options), "on", "off"
            (precision rows chosen on cost alone).
        warmup: fraction of steps with the global rows frozen.
        global_rows: "joint" (one row over (order, p, m, schedule)) or "factorized" (one row
            each); see ``strategy.py``.
        smooth_rel: log-sum-exp temperature relative to the mean stage time.
        prune_eps: branches with P(order) P(p) below this keep their last cost.
        top_k: global settings decoded at the end, by probability and by relaxed cost (plus
            the best setting of every stage count); up to ``refine_top`` of them, best first,
            are refined to a local optimum while ``refine_budget`` exact evaluations last.
        decode_every: steps between decodes of the most probable branch (trajectory).
        max_snapshots: most layer-stage probability snapshots kept (for heatmaps).
        proxy: ``ProxyConfig`` (or its fields) of the bilevel proxy model.
        num_threads: torch intra-op threads during the search (None: leave as is).
        progress: print a line every ~10% of the steps.
        callback: called with each history entry.
    Returns:
        SearchResult with the refined plan; ``info`` holds relaxed_cost_s, decoded_cost_s, gap,
        refined_cost_s, numerics and the trajectory extras (see module doc).
    """
    _check_options(relaxation, memory, order, numerics, steps, top_k, refine_top, lr)
    start = time.perf_counter()
    options = dict(
        seed=seed, steps=steps, lr=lr, global_lr=global_lr, lam=lam, temperature=temperature,
        temperature_schedule=temperature_schedule, relaxation=relaxation, memory=memory, mu=mu,
        dual_lr=dual_lr, infeasible_weight=infeasible_weight, order=order, numerics=numerics,
        warmup=warmup, global_rows=global_rows, smooth_rel=smooth_rel, prune_eps=prune_eps, top_k=top_k,
        refine_budget=refine_budget, refine_top=refine_top, decode_every=decode_every,
        max_snapshots=max_snapshots, proxy=proxy, progress=progress, callback=callback,
    )
    with _threads(num_threads):
        return _run(space, start=start, **options)


def _check_options(relaxation, memory, order, numerics, steps, top_k, refine_top, lr) -> None:
    if relaxation not in RELAXATIONS:
        raise ValueError(f"darts.relaxation={relaxation!r} is not one of {RELAXATIONS}")
    if memory not in ("hinge", "lagrangian"):
        raise ValueError(f"darts.memory={memory!r} is not one of hinge, lagrangian")
    if order not in ("first", "second"):
        raise ValueError(f"darts.order={order!r} is not one of first, second")
    if numerics not in ("auto", "on", "off"):
        raise ValueError(f"darts.numerics={numerics!r} is not one of auto, on, off")
    for name, value in (("steps", steps), ("top_k", top_k), ("refine_top", refine_top)):
        if value < 1:
            raise ValueError(f"darts.{name}={value} must be >= 1")
    if lr <= 0:
        raise ValueError(f"darts.lr={lr} must be > 0")


def _run(space, seed, steps, lr, global_lr, lam, temperature, temperature_schedule, relaxation, memory,
         mu, dual_lr, infeasible_weight, order, numerics, warmup, global_rows, smooth_rel, prune_eps, top_k,
         refine_budget, refine_top, decode_every, max_snapshots, proxy, progress, callback,
         start) -> SearchResult:
    phase = {}
    t0 = time.perf_counter()
    tables = StackedTables.build(space)
    ev = ExactEvaluator(space, tables)
    A = StrategyMatrix(space, global_rows=global_rows)
    coster = GroupCost(space, tables, smooth_rel, memory, mu, infeasible_weight)
    schedule_T = _as_schedule(temperature, temperature_schedule, steps)
    gen = torch.Generator().manual_seed(seed)
    phase["setup_s"] = time.perf_counter() - t0

    # ---- numerics: bilevel or cost-only
    rows_with_options = A.numerics_rows()
    if numerics == "on" and not rows_with_options:
        raise ValueError(
            "darts.numerics='on' needs a choice that changes numerics: give the space more than one "
            "activation_precisions or gradient_precisions, or use numerics='auto'/'off'"
        )
    bilevel = numerics == "on" or (numerics == "auto" and bool(rows_with_options))
    if order == "second" and not bilevel:
        raise ValueError("darts.order='second' needs the bilevel mode (a numerics choice with several options)")
    notes = []
    task = None
    if bilevel:
        cfg = proxy if isinstance(proxy, ProxyConfig) else ProxyConfig(**(proxy or {}))
        task = ProxyTask(space.num_layers, space.options.activation_precisions,
                         space.options.gradient_precisions, cfg, seed)
        notes.append(task.layer_note)
        if order == "first" and "gradient_precision" in rows_with_options:
            notes.append(
                "first-order: the gradient-precision row gets no signal from L_val (theta does not "
                "depend on A at first order), only from the cost; use order='second' for the unrolled term"
            )
    elif rows_with_options:
        notes.append("numerics='off': precision rows are chosen on cost alone (accuracy is ignored)")
    act_bytes = torch.tensor([ACT_BYTES[a] / space.profile.dtype_bytes for a in space.options.activation_precisions],
                             dtype=torch.float64)
    grad_bytes = torch.tensor([GRAD_BYTES[g] / space.profile.dtype_bytes for g in space.options.gradient_precisions],
                              dtype=torch.float64)

    opt_branch = torch.optim.Adam(A.branch_params(), lr=lr)
    opt_global = torch.optim.Adam(A.global_params(), lr=global_lr or lr)
    warmup_steps = int(round(warmup * steps))

    # ---- initial pass: reference cost and every branch's starting cost
    t0 = time.perf_counter()
    stale: dict[int, dict] = {}
    with torch.no_grad():
        g0 = A.global_probs(schedule_T(0))
        act_f, grad_f = g0["activation_precision"] @ act_bytes, g0["gradient_precision"] @ grad_bytes
        groups = range(len(A.stage_counts))
        first = {gi: coster(A, gi, schedule_T(0), "softmax", gen, act_f, grad_f, 1.0) for gi in groups}
        ref_s = min(float(out["step"].min()) for out in first.values())
        for gi in groups:
            out = coster(A, gi, schedule_T(0), "softmax", gen, act_f, grad_f, ref_s)
            stale[gi] = {"objective": out["objective"], "step": out["step"]}
    phase["init_s"] = time.perf_counter() - t0

    history: list[dict] = []
    snapshots: list[dict] = []
    snapshot_every = max(1, math.ceil(steps / max(1, max_snapshots)))
    best_decoded = math.inf
    evaluated_counts = []
    t0 = time.perf_counter()
    for step in range(steps):
        T = schedule_T(step)
        g = A.global_probs(T, relaxation, gen)
        with torch.no_grad():
            plain = A.global_probs(T)
        act_f = g["activation_precision"] @ act_bytes
        grad_f = g["gradient_precision"] @ grad_bytes
        branch_plain = plain["branch"].sum((2, 3)).t()  # (G, O) P(order, p)
        top_group = int(branch_plain.max(-1).values.argmax())
        top_order = int(branch_plain[top_group].argmax())
        joint = g["branch"]
        joint_plain = plain["branch"]
        cost_obj = torch.zeros((), dtype=torch.float64)
        expected_step = torch.zeros((), dtype=torch.float64)
        mem_pen, inf_mass = 0.0, 0.0
        evaluated = []
        for gi in range(len(A.stage_counts)):
            weight = joint[:, gi].transpose(1, 2)  # (O, Sc, M)
            if float(branch_plain[gi].max()) >= prune_eps or gi == top_group:
                out = coster(A, gi, T, relaxation, gen, act_f, grad_f, ref_s)
                stale[gi] = {"objective": out["objective"].detach(), "step": out["step"].detach()}
                evaluated.append((gi, out))
                obj, st = out["objective"], out["step"].detach()
                bw = joint_plain[:, gi].transpose(1, 2)  # (O, Sc, M)
                mem_pen += float((bw * out["overflow"].detach().sum(-1)).sum())
                inf_mass += float((bw.sum(1) * out["infeasible"].detach().sum(-1)).sum())
            else:
                obj, st = stale[gi]["objective"], stale[gi]["step"]
            cost_obj = cost_obj + (weight * obj).sum()
            expected_step = expected_step + (weight.detach() * st).sum()
        evaluated_counts.append(len(evaluated))

        opt_branch.zero_grad(set_to_none=True)
        opt_global.zero_grad(set_to_none=True)
        entry_losses = {}
        if task is None:
            cost_obj.backward()
        else:
            (lam * cost_obj).backward(retain_graph=False)
            g_soft = A.global_probs(T, relaxation, gen) if relaxation != "softmax" else A.global_probs(T)
            cut = A.cut_probs(T, g_soft)
            act_p, grad_p = g_soft["activation_precision"], g_soft["gradient_precision"]
            arch = task.arch_grads(cut, act_p, grad_p, order)
            torch.autograd.backward([cut, act_p, grad_p], [arch.cut, arch.act, arch.grad])
            entry_losses["L_val"] = arch.val_loss
            entry_losses["act_precision_grad_from_L_val"] = arch.act.tolist()
        opt_branch.step()
        if step >= warmup_steps:
            opt_global.step()
        if memory == "lagrangian":
            for gi, out in evaluated:
                coster.dual_step(gi, out["slack"], dual_lr)
        if task is not None:
            with torch.no_grad():
                gp = A.global_probs(T)
                cut_now = A.cut_probs(T, gp)
            entry_losses["L_train"] = task.train_step(cut_now, gp["activation_precision"], gp["gradient_precision"])

        entry = {
            "step": step, "temperature": T, "expected_step_time_s": float(expected_step),
            "objective": float(cost_obj.detach()), "memory_penalty": mem_pen, "infeasible_mass": inf_mass,
            "active_branches": len(evaluated),
            "stage_count_best_relaxed_s": {str(p): float(stale[gi]["step"].min())
                                           for gi, p in enumerate(A.stage_counts)},
            "globals": {k: v.tolist() for k, v in plain.items() if k != "branch"},
            "entropy": entropy_summary({**{k: v for k, v in plain.items() if k != "branch"},
                                        "branch": plain["branch"].reshape(-1),
                                        "layer_stage": torch.softmax(A.stage_logits[top_group][top_order] / T, -1)}),
            **entry_losses,
        }
        if step % decode_every == 0 or step == steps - 1:
            decoded = _decode_top(A, ev, T)
            entry["decoded_step_time_s"] = decoded
            best_decoded = min(best_decoded, decoded)
        entry["best_step_time_s"] = best_decoded
        if step % snapshot_every == 0 or step == steps - 1:
            with torch.no_grad():
                probs = torch.softmax(A.stage_logits[top_group][top_order] / T, -1)
            snapshots.append({"step": step, "order": top_order, "num_stages": A.stage_counts[top_group],
                              "layer_stage_probs": [[round(float(v), 5) for v in row] for row in probs]})
        history.append(entry)
        if callback is not None:
            callback(entry)
        if progress and (step % max(1, steps // 10) == 0 or step == steps - 1):
            print(f"[darts] step {step:4d}/{steps} T={T:.3f} E[step]={1e3 * entry['expected_step_time_s']:.3f} ms "
                  f"decoded best={1e3 * best_decoded:.3f} ms active={len(evaluated)}"
                  + (f" L_val={entry_losses['L_val']:.3f}" if "L_val" in entry_losses else ""))
    phase["relaxed_s"] = time.perf_counter() - t0

    # ---- relaxed figures at the end
    T_end = schedule_T(steps - 1)
    with torch.no_grad():
        plain = A.global_probs(T_end)
        act_f, grad_f = plain["activation_precision"] @ act_bytes, plain["gradient_precision"] @ grad_bytes
        relaxed_expected = 0.0
        for gi in range(len(A.stage_counts)):
            weight = plain["branch"][:, gi].transpose(1, 2)
            if float(weight.sum((1, 2)).max()) >= prune_eps:
                out = coster(A, gi, T_end, "softmax", gen, act_f, grad_f, ref_s)
                stale[gi] = {"objective": out["objective"], "step": out["step"]}
            relaxed_expected += float((weight * stale[gi]["step"]).sum())

    # ---- decode, repair, refine
    t0 = time.perf_counter()
    # Also decode the settings whose relaxed cost is lowest: a branch the global rows gave
    # up on early keeps its last relaxed cost, and the decode is cheap.
    by_cost = []
    for gi, p in enumerate(A.stage_counts):
        step_table = stale[gi]["step"]  # (O, Sc, M)
        for o, si, mi in itertools.product(*(range(n) for n in step_table.shape)):
            prob = float(plain["branch"][o, gi, mi, si])
            by_cost.append((float(step_table[o, si, mi]), (prob, o, p, A.row_values["microbatches"][mi],
                                                           A.row_values["schedule"][si])))
    by_cost.sort(key=lambda item: item[0])
    extra = [setting for _, setting in by_cost[:top_k]]
    # And the best setting of every stage count, so that refinement starts from every p.
    for p in A.stage_counts:
        extra += [setting for _, setting in by_cost if setting[2] == p][:1]
    candidates = decode_candidates(A, ev, T_end, top_k, extra)
    phase["decode_s"] = time.perf_counter() - t0
    if not candidates:
        raise PlanError("darts decoded no allowed placement: check the space's stage counts and shapes")
    top = candidates[0]
    _, o_top, p_top, m_top, s_top = (top.probability, top.choice.order, top.choice.num_stages,
                                     top.choice.microbatches, top.choice.schedule)
    b_top = A.branch(o_top, p_top)
    relaxed_top = float(stale[b_top.group]["step"][o_top, A.row_values["schedule"].index(s_top),
                                                   A.row_values["microbatches"].index(m_top)])
    fitting = [c for c in candidates if math.isfinite(c.cost_s)]
    if not fitting:
        raise PlanError(candidates[0].note or "darts: no decoded candidate could be repaired to fit memory")
    t0 = time.perf_counter()
    unique: dict = {}
    for c in sorted(fitting, key=lambda c: c.cost_s):
        unique.setdefault(c.choice, c)
    # Refine the best decoded points first, each to its local optimum, while budget remains.
    to_refine = list(unique.values())[:refine_top]
    best_choice, best_cost = None, math.inf
    remaining = refine_budget
    refine_log = []
    for i, cand in enumerate(to_refine):
        if remaining <= 0:
            break
        trace: list = []
        choice, cost = refine(space, cand.choice, remaining, evaluator=ev, seed=seed + i, trace=trace)
        remaining -= trace[-1]["evaluations"]
        refine_log.append({"start_s": cand.cost_s, "refined_s": float(cost.step_time_s),
                           "num_stages": cand.choice.num_stages, "improvements": len(trace) - 1, **trace[-1]})
        if float(cost.step_time_s) < best_cost:
            best_choice, best_cost = choice, float(cost.step_time_s)
    phase["refine_s"] = time.perf_counter() - t0

    plan = space.make_plan(best_choice)
    space.cost_model.check_fits(plan)
    plan = space.cost_model.with_prediction(plan)
    breakdown = space.cost_model.evaluate(plan)
    decoded_cost = top.decoded_cost_s
    info = {
        "choice": best_choice,
        "relaxed_cost_s": relaxed_top,
        "relaxed_expected_cost_s": relaxed_expected,
        "decoded_cost_s": decoded_cost,
        "decoded_fits": math.isfinite(decoded_cost),
        "decoded_repaired_cost_s": top.cost_s,
        "gap": (top.cost_s - relaxed_top) / relaxed_top if math.isfinite(top.cost_s) else math.inf,
        "best_decoded_cost_s": min(c.cost_s for c in fitting),
        "refined_cost_s": breakdown.step_time_s,
        "refine_gain": (min(c.cost_s for c in fitting) - breakdown.step_time_s) / min(c.cost_s for c in fitting),
        "numerics": {
            "mode": "bilevel" if bilevel else "cost-only",
            "order": order if bilevel else None,
            "choices_changing_numerics": list(NUMERICS_CHOICES),
            "searched_numerics_choices": list(rows_with_options),
            "cost_only_choices": ["order", "stages", "microbatches", "schedule", "layer_stage", "shapes", "recompute"],
            "notes": notes,
        },
        "candidates": [
            {"probability": c.probability, "order": c.choice.order, "num_stages": c.choice.num_stages,
             "microbatches": c.choice.microbatches, "schedule": c.choice.schedule,
             "decoded_cost_s": c.decoded_cost_s, "repaired": c.repaired, "cost_s": c.cost_s, "note": c.note}
            for c in candidates
        ],
        "refine": refine_log,
        "cost_ref_s": ref_s,
        "final_globals": {k: dict(zip(map(str, A.row_values[k]), v.tolist()))
                          for k, v in plain.items() if k != "branch"},
        "stage_snapshots": snapshots,
        "mean_active_branches": sum(evaluated_counts) / max(1, len(evaluated_counts)),
        "num_branches": len(A.branches),
        "phase_s": phase,
        "options": {"steps": steps, "lr": lr, "temperature": asdict(schedule_T), "relaxation": relaxation,
                    "memory": memory, "warmup": warmup, "smooth_rel": smooth_rel, "lam": lam},
    }
    if task is not None:
        info["proxy"] = {"layers": task.num_proxy_layers, "note": task.layer_note}
    if progress:
        print(f"[darts] relaxed {1e3 * relaxed_top:.3f} ms, decoded {1e3 * decoded_cost:.3f} ms, "
              f"refined {1e3 * breakdown.step_time_s:.3f} ms ({time.perf_counter() - start:.1f} s)")
    return SearchResult(
        method="darts", plan=plan, cost=breakdown, history=history,
        wall_time_s=time.perf_counter() - start, evaluations=ev.count, info=info,
    )


def _decode_top(A: StrategyMatrix, ev: ExactEvaluator, temperature: float) -> float:
    """Exact step time of the most probable setting's decode (inf if invalid or overflowing)."""
    (_, o, p, m, s), = candidate_branches(A, temperature, 1)
    choice = decode_branch(A, A.branch(o, p), m, s, temperature)
    if choice is None:
        return math.inf
    return ev(choice).objective_s

