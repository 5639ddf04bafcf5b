"""Random search: score random valid points of the space under an evaluation budget.

Sampling is hierarchical (not uniform over the space, whose size is dominated by many-stage
plans): node order, micro-batch count, schedule, precisions and stage count uniformly; the p-1
cuts uniformly among the C(L-1, p-1) cut sets; each stage's shape uniformly among the shapes
allowed at its device offset that leave a device for every later stage; recompute flags
uniformly at the space's granularity.
"""

from __future__ import annotations

import random
import time

from ..space import Choice, SearchSpace
from .bruteforce import Scorer, make_result

__all__ = ["random_search", "random_choice", "allowed_shapes", "is_valid_choice"]

DEFAULT_BUDGET = 2000


def allowed_shapes(space: SearchSpace, order: int, microbatches: int, offset: int, later_stages: int) -> list[int]:
    """Shape indices a stage may take at ``offset`` leaving >= 1 device per later stage."""
    D = space.num_devices
    if not 0 <= offset < D:
        return []
    allowed = space.orders[order].config_index[offset].tolist()
    feasible = space.feasible_shapes(microbatches).tolist()
    out = []
    for s, (dp, tp) in enumerate(space.shapes):
        n = dp * tp
        if feasible[s] and offset + n + later_stages <= D and allowed[s] >= 0:
            out.append(s)
    return out


def is_valid_choice(space: SearchSpace, choice: Choice) -> bool:
    """Whether ``choice`` is a point of the space (every field in range, every group allowed)."""
    o = space.options
    L, p = space.num_layers, choice.num_stages
    if (p not in space.stage_counts or choice.microbatches not in space.microbatch_counts
            or choice.schedule not in o.schedules or not 0 <= choice.order < len(space.orders)
            or choice.activation_precision not in o.activation_precisions
            or choice.gradient_precision not in o.gradient_precisions
            or len(choice.cuts) != p - 1 or len(choice.recompute) != L):
        return False
    bounds = (0, *choice.cuts, L)
    if any(b <= a for a, b in zip(bounds, bounds[1:])):
        return False
    if o.recompute == "off" and any(choice.recompute):
        return False
    if o.recompute == "stage" and any(
        len(set(choice.recompute[bounds[k]:bounds[k + 1]])) > 1 for k in range(p)
    ):
        return False
    offset = 0
    for k, s in enumerate(choice.shapes):
        if not 0 <= s < len(space.shapes) or s not in allowed_shapes(
            space, choice.order, choice.microbatches, offset, p - 1 - k
        ):
            return False
        offset += space.shapes[s][0] * space.shapes[s][1]
    return True


def random_recompute(space: SearchSpace, cuts: tuple, rng: random.Random) -> tuple[bool, ...]:
    L, mode = space.num_layers, space.options.recompute
    if mode == "off":
        return (False,) * L
    if mode == "layer":
        return tuple(rng.random() < 0.5 for _ in range(L))
    bounds = (0, *cuts, L)
    flags = [rng.random() < 0.5 for _ in range(len(bounds) - 1)]
    return tuple(flags[k] for k in range(len(flags)) for _ in range(bounds[k + 1] - bounds[k]))


def random_choice(space: SearchSpace, rng: random.Random) -> Choice:
    """One random valid point (see module doc for the distribution)."""
    o = space.options
    order = rng.randrange(len(space.orders))
    m = rng.choice(space.microbatch_counts)
    p = rng.choice(space.stage_counts)
    cuts = tuple(sorted(rng.sample(range(1, space.num_layers), p - 1)))
    shapes, offset = [], 0
    for k in range(p):
        options = allowed_shapes(space, order, m, offset, p - 1 - k)
        # A single device is always an allowed group, so options is never empty.
        s = rng.choice(options)
        shapes.append(s)
        offset += space.shapes[s][0] * space.shapes[s][1]
    return Choice(
        order=order, cuts=cuts, shapes=tuple(shapes), microbatches=m,
        schedule=rng.choice(o.schedules), recompute=random_recompute(space, cuts, rng),
        activation_precision=rng.choice(o.activation_precisions),
        gradient_precision=rng.choice(o.gradient_precisions),
    )


def random_search(space: SearchSpace, *, seed: int = 0, progress: bool = False, callback=None,
                  budget: int = DEFAULT_BUDGET, time_budget_s: float | None = None,
                  evaluator: str = "fast"):
    """Best fitting plan among ``budget`` random valid points (see module doc).

    Args:
        space: the search space.
        seed: RNG seed.
        progress: print a line every 500 evaluations.
        callback: called with each history entry (one per improvement).
        budget: number of cost-model evaluations (distinct points; repeats are free).
        time_budget_s: also stop after this many seconds.
        evaluator: "fast" (numpy mirror of the cost model) or "reference" (``bruteforce.Scorer``).
    If no sampled point fits in memory, the one with the smallest overflow is returned and
    ``info["found_fitting"]`` is False (``result.cost.fits`` says so too).
    """
    if budget < 1:
        raise ValueError(f"random.budget={budget} must be >= 1")
    start = time.perf_counter()
    rng = random.Random(seed)
    scorer = Scorer(space, evaluator)
    seen: set = set()
    best = (False, float("inf"), float("inf"))  # (fits, overflow if not, step)
    best_key = (1, float("inf"), float("inf"))
    best_choice, history, draws = None, [], 0
    while len(seen) < budget and draws < 50 * budget:
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
        draws += 1
        choice = random_choice(space, rng)
        if choice in seen:
            continue
        seen.add(choice)
        step, fits, overflow = scorer(choice)
        key = (0, 0.0, step) if fits else (1, overflow, step)
        if key < best_key:
            best_key, best, best_choice = key, (fits, overflow, step), choice
            entry = {"step": len(seen), "best_step_time_s": step if fits else float("inf"),
                     "fits": fits}
            history.append(entry)
            if callback is not None:
                callback(entry)
        if progress and len(seen) % 500 == 0:
            print(f"[random] {len(seen)}/{budget}: best {1e3 * best[2]:.4f} ms (fits={best[0]})")
    return make_result(space, "random", best_choice, start, history=history, evaluations=len(seen),
                       info={"found_fitting": best[0], "draws": draws, "evaluator": scorer.evaluator,
                             "evaluator_fallback": scorer.fallback})
