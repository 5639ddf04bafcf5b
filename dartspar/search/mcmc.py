"""FlexFlow-style Markov chain Monte Carlo over the points of the search space.

Metropolis-Hastings with local moves (move a cut, change a stage's shape, split or merge a stage,
change the micro-batch count, the schedule, the node order, a recompute flag or a precision),
mixed with an occasional independent random point (``jump``), and a restart from a random
point when the chain stops reaching unvisited points;
a proposal is accepted with probability ``min(1, exp(-beta * (E_new - E_old) / E_old))``, where
the energy E is the step time, inflated by ``penalty`` times the worst memory overflow relative
to the smallest device memory so that the chain can cross infeasible plans but not settle there
(FlexFlow's acceptance rule, with the cost difference taken relative so one beta fits every
model size; like FlexFlow it omits the Hastings correction, the chain is an optimiser, not a
sampler). Later stages whose device group a move invalidates get a random allowed shape.
Defaults (beta 10, jump 0.1, patience 200) were tuned on GPT-24 on h100x8 and the 36-device
mixed cluster (experiments/bench_search.py cases), 4 seeds, 2000 evaluations.
"""

from __future__ import annotations

import math
import random
import time

from ..space import Choice, SearchSpace
from .bruteforce import Scorer, make_result
from .random_search import DEFAULT_BUDGET, allowed_shapes, random_choice

__all__ = ["mcmc_search", "propose", "MOVES"]

MOVES = ("cut", "shape", "split", "merge", "microbatches", "schedule", "order", "recompute", "precision")


def _stage_flags(space: SearchSpace, choice: Choice) -> list[bool]:
    bounds = (0, *choice.cuts, space.num_layers)
    return [choice.recompute[bounds[k]] for k in range(len(bounds) - 1)]


def _expand(space: SearchSpace, cuts: tuple, stage_flags: list[bool]) -> tuple[bool, ...]:
    bounds = (0, *cuts, space.num_layers)
    return tuple(stage_flags[k] for k in range(len(bounds) - 1) for _ in range(bounds[k + 1] - bounds[k]))


def _repair(space: SearchSpace, order: int, m: int, shapes: list[int], rng: random.Random) -> list[int] | None:
    """Keep every stage's shape that is still allowed at its offset, resample the others."""
    out, offset, p = [], 0, len(shapes)
    for k, s in enumerate(shapes):
        options = allowed_shapes(space, order, m, offset, p - 1 - k)
        if not options:
            return None
        if s not in options:
            s = rng.choice(options)
        out.append(s)
        offset += space.shapes[s][0] * space.shapes[s][1]
    return out


def propose(space: SearchSpace, choice: Choice, rng: random.Random, jump: float = 0.0) -> Choice | None:
    """A random neighbour of ``choice`` (None when the drawn move does not apply); with
    probability ``jump`` an independent random point instead (a mixture kernel that lets the
    chain leave a basin the local moves cannot)."""
    if jump and rng.random() < jump:
        return random_choice(space, rng)
    o, L = space.options, space.num_layers
    p = choice.num_stages
    cuts, shapes = list(choice.cuts), list(choice.shapes)
    order, m = choice.order, choice.microbatches
    per_stage = o.recompute == "stage"
    flags = _stage_flags(space, choice) if per_stage else list(choice.recompute)
    move = rng.choice(MOVES)
    fields: dict = {}

    if move == "cut":
        if p == 1:
            return None
        k = rng.randrange(p - 1)
        lo = cuts[k - 1] + 1 if k > 0 else 1
        hi = cuts[k + 1] - 1 if k + 1 < p - 1 else L - 1
        step = rng.randint(1, max(1, math.ceil(L / (2 * p))))
        cuts[k] = min(hi, max(lo, cuts[k] + rng.choice((-1, 1)) * step))
        if cuts[k] == choice.cuts[k]:
            return None
    elif move == "shape":
        k = rng.randrange(p)
        offset = sum(space.shapes[s][0] * space.shapes[s][1] for s in shapes[:k])
        options = [s for s in allowed_shapes(space, order, m, offset, p - 1 - k) if s != shapes[k]]
        if not options:
            return None
        shapes[k] = rng.choice(options)
    elif move == "split":
        if p + 1 not in space.stage_counts:
            return None
        wide = [k for k in range(p) if ((0, *cuts, L)[k + 1] - (0, *cuts, L)[k]) >= 2]
        if not wide:
            return None
        k = rng.choice(wide)
        bounds = (0, *cuts, L)
        cut = rng.randint(bounds[k] + 1, bounds[k + 1] - 1)
        cuts = sorted([*cuts, cut])
        shapes.insert(k + 1, shapes[k])
        if per_stage:
            flags.insert(k + 1, flags[k])
    elif move == "merge":
        if p - 1 not in space.stage_counts or p == 1:
            return None
        k = rng.randrange(p - 1)
        del cuts[k]
        del shapes[k + rng.randint(0, 1)]
        if per_stage:
            del flags[k + 1]
    elif move == "microbatches":
        others = [x for x in space.microbatch_counts if x != m]
        if not others:
            return None
        m = rng.choice(others)
    elif move == "schedule":
        others = [x for x in o.schedules if x != choice.schedule]
        if not others:
            return None
        fields["schedule"] = rng.choice(others)
    elif move == "order":
        if len(space.orders) == 1:
            return None
        order = rng.choice([x for x in range(len(space.orders)) if x != order])
    elif move == "recompute":
        if o.recompute == "off":
            return None
        i = rng.randrange(len(flags))
        flags[i] = not flags[i]
    else:  # precision
        name = rng.choice(("activation_precision", "gradient_precision"))
        allowed = o.activation_precisions if name == "activation_precision" else o.gradient_precisions
        others = [x for x in allowed if x != getattr(choice, name)]
        if not others:
            return None
        fields[name] = rng.choice(others)

    repaired = _repair(space, order, m, shapes, rng)
    if repaired is None:
        return None
    if per_stage:
        recompute = _expand(space, tuple(cuts), flags)
    elif o.recompute == "layer":
        recompute = tuple(flags)
    else:
        recompute = (False,) * L
    base = dict(order=order, cuts=tuple(cuts), shapes=tuple(repaired), microbatches=m,
                schedule=choice.schedule, recompute=recompute,
                activation_precision=choice.activation_precision,
                gradient_precision=choice.gradient_precision)
    base.update(fields)
    return Choice(**base)


def mcmc_search(space: SearchSpace, *, seed: int = 0, progress: bool = False, callback=None,
                budget: int = DEFAULT_BUDGET, time_budget_s: float | None = None,
                beta: float = 10.0, penalty: float = 10.0, init: Choice | None = None,
                evaluator: str = "fast", patience: int = 200, jump: float = 0.1):
    """Best fitting plan visited by a Metropolis-Hastings chain (see module doc).

    Args:
        space: the search space.
        seed: RNG seed.
        progress: print a line every 500 evaluations.
        callback: called with each history entry (one per improvement of the best plan).
        budget: number of cost-model evaluations (distinct points; revisits are free).
        time_budget_s: also stop after this many seconds.
        beta: inverse temperature on the relative energy change (a 1/beta worse plan is
            accepted with probability 1/e).
        penalty: energy factor per unit of memory overflow (relative to the smallest device).
        init: starting point (default: a random valid point).
        evaluator: "fast" (numpy mirror of the cost model) or "reference" (``bruteforce.Scorer``).
        jump: probability of proposing an independent random point instead of a local move.
        patience: restart the chain from a new random point after this many proposals in a
            row that reach no unvisited point (the chain is stuck in a visited basin).
    If the chain visits no plan that fits, the least-overflowing plan is returned and
    ``info["found_fitting"]`` is False.
    """
    if budget < 1:
        raise ValueError(f"mcmc.budget={budget} must be >= 1")
    if beta <= 0 or penalty < 0:
        raise ValueError(f"mcmc.beta={beta} must be > 0 and mcmc.penalty={penalty} >= 0")
    start = time.perf_counter()
    rng = random.Random(seed)
    scorer = Scorer(space, evaluator)
    min_capacity = min(d.memory_bytes for d in space.cluster.device_types)
    cache: dict = {}

    def energy(choice: Choice) -> tuple[float, bool, float, float]:
        if choice not in cache:
            step, fits, overflow = scorer(choice)
            cache[choice] = (step * (1 + penalty * max(overflow, 0.0) / min_capacity), fits, overflow, step)
        return cache[choice]

    current = init if init is not None else random_choice(space, rng)
    e_cur = energy(current)
    best_choice, best_key = current, ((0, 0.0, e_cur[3]) if e_cur[1] else (1, e_cur[2], e_cur[3]))
    history, proposals, accepted, printed, restarts, stale = [], 0, 0, 0, 0, 0
    while len(cache) < budget and proposals < 50 * budget:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        proposals += 1
        stale += 1
        if stale > patience:
            current = random_choice(space, rng)
            e_cur, stale, restarts = energy(current), 0, restarts + 1
        cand = propose(space, current, rng, jump)
        if cand is None:
            continue
        if cand not in cache:
            stale = 0
        e_new = energy(cand)
        if e_new[0] <= e_cur[0] or rng.random() < math.exp(-beta * (e_new[0] - e_cur[0]) / e_cur[0]):
            current, e_cur = cand, e_new
            accepted += 1
        key = (0, 0.0, e_new[3]) if e_new[1] else (1, e_new[2], e_new[3])
        if key < best_key:
            best_key, best_choice = key, cand
            entry = {"step": len(cache), "best_step_time_s": e_new[3] if e_new[1] else float("inf"),
                     "fits": e_new[1], "current_energy_s": e_cur[0]}
            history.append(entry)
            if callback is not None:
                callback(entry)
        if progress and len(cache) // 500 > printed:
            printed = len(cache) // 500
            print(f"[mcmc] {len(cache)}/{budget}: best {1e3 * best_key[2]:.4f} ms")
    return make_result(
        space, "mcmc", best_choice, start, history=history, evaluations=len(cache),
        info={"found_fitting": best_key[0] == 0, "proposals": proposals,
              "acceptance_rate": accepted / max(1, proposals), "beta": beta, "penalty": penalty,
              "restarts": restarts, "jump": jump,
              "evaluator": scorer.evaluator,
              "evaluator_fallback": scorer.fallback},
    )
