"""Brute force: score every point of a (small) search space with the shared cost model.

Also home of the helpers the sampling baselines share: walking the valid choices of a space,
scoring one choice (step time and whether it fits), and packing a best choice into a
``SearchResult``.
"""

from __future__ import annotations

import itertools
import time
from typing import Iterator

from ..space import Choice, SearchSpace
from .result import SearchResult

__all__ = [
    "bruteforce_search", "iter_choices", "count_choices", "score_choice", "Scorer",
    "shape_sequences", "recompute_patterns", "make_result",
]


def score_choice(space: SearchSpace, choice: Choice) -> tuple[float, bool, float]:
    """(step time in s, fits in memory and uses only allowed groups, worst overflow in bytes)
    by the reference path ``SearchSpace.evaluate``."""
    cost, infeasible = space.evaluate(choice)
    overflow = float(cost.overflow_bytes.max())
    fits = overflow <= 0 and float(infeasible.sum()) == 0
    return float(cost.step_time_s), fits, overflow


class Scorer:
    """Scores points of a space as ``(step_s, fits, overflow_bytes)``; ``count`` counts calls.

    ``evaluator="reference"`` calls ``SearchSpace.evaluate`` (milliseconds per point);
    ``"fast"`` calls ``fastcost.ExactEvaluator``, the same formulas in numpy (tens of
    microseconds). The fast mirror is checked against the reference on ``self_check`` random
    points first; if they disagree by more than 1e-9 relative (the mirror lags a cost-model
    change) the scorer warns, switches to the reference and says why in ``fallback``.
    An invalid point scores ``(inf, False, inf)``.
    """

    def __init__(self, space: SearchSpace, evaluator: str = "fast", self_check: int = 32) -> None:
        if evaluator not in ("fast", "reference"):
            raise ValueError(f"evaluator={evaluator!r} is not one of 'fast', 'reference'")
        self.space, self.evaluator, self.count = space, evaluator, 0
        self.fallback: str | None = None
        self._fast = None
        if evaluator == "fast":
            from .fastcost import ExactEvaluator

            self._fast = ExactEvaluator(space)
            self._check(self_check)

    def _check(self, samples: int) -> None:
        import random
        import warnings

        from .random_search import random_choice

        rng = random.Random(0)
        for _ in range(samples):
            choice = random_choice(self.space, rng)
            fast = self._fast(choice)
            ref_step, ref_fits, _ = score_choice(self.space, choice)
            if abs(fast.step_time_s - ref_step) > 1e-9 * ref_step or fast.fits != ref_fits:
                self.fallback = (
                    f"fastcost.ExactEvaluator scores {choice} at {fast.step_time_s!r} s "
                    f"(fits={fast.fits}), SearchSpace.evaluate at {ref_step!r} s (fits={ref_fits})"
                )
                warnings.warn(f"{self.fallback}; using the reference evaluator", RuntimeWarning)
                self._fast, self.evaluator = None, "reference"
                return

    def __call__(self, choice: Choice) -> tuple[float, bool, float]:
        self.count += 1
        if self._fast is None:
            return score_choice(self.space, choice)
        cost = self._fast(choice)
        if not cost.valid:
            return float("inf"), False, float("inf")
        return cost.step_time_s, cost.fits, float(cost.overflow_bytes.max())


def shape_sequences(space: SearchSpace, order: int, microbatches: int, num_stages: int) -> Iterator[tuple]:
    """Every tuple of ``num_stages`` shape indices whose device groups are allowed, in order."""
    allowed = space.orders[order].config_index >= 0
    feasible = space.feasible_shapes(microbatches)
    sizes = [dp * tp for dp, tp in space.shapes]
    D = space.num_devices

    def walk(offset: int, left: int):
        if left == 0:
            yield ()
            return
        for s, n in enumerate(sizes):
            # Every later stage needs at least one device.
            if feasible[s] and offset + n + (left - 1) <= D and allowed[offset, s]:
                for rest in walk(offset + n, left - 1):
                    yield (s, *rest)

    yield from walk(0, num_stages)


def recompute_patterns(space: SearchSpace, cuts: tuple) -> Iterator[tuple]:
    """Every recompute flag vector the space's granularity allows for these cuts."""
    L = space.num_layers
    mode = space.options.recompute
    if mode == "off":
        yield (False,) * L
    elif mode == "layer":
        yield from itertools.product((False, True), repeat=L)
    else:
        bounds = (0, *cuts, L)
        for flags in itertools.product((False, True), repeat=len(bounds) - 1):
            yield tuple(f for k, f in enumerate(flags) for _ in range(bounds[k + 1] - bounds[k]))


def iter_choices(space: SearchSpace) -> Iterator[Choice]:
    """Every valid point of the space (node order, m, schedule, precisions, p, cuts, shapes,
    recompute)."""
    o = space.options
    for order, m, schedule, act, grad in itertools.product(
        range(len(space.orders)), space.microbatch_counts, o.schedules,
        o.activation_precisions, o.gradient_precisions,
    ):
        for p in space.stage_counts:
            shape_list = list(shape_sequences(space, order, m, p))
            if not shape_list:
                continue
            for cuts in itertools.combinations(range(1, space.num_layers), p - 1):
                for shapes in shape_list:
                    for flags in recompute_patterns(space, cuts):
                        yield Choice(order, cuts, shapes, m, schedule, flags, act, grad)


def count_choices(space: SearchSpace) -> int:
    """Exact number of valid points (what ``iter_choices`` yields), without enumerating them."""
    from math import comb

    o = space.options
    L = space.num_layers
    total = 0
    for order, m in itertools.product(range(len(space.orders)), space.microbatch_counts):
        for p in space.stage_counts:
            shapes = sum(1 for _ in shape_sequences(space, order, m, p))
            rec = {"off": 1, "stage": 2**p, "layer": 2**L}[o.recompute]
            total += comb(L - 1, p - 1) * shapes * rec
    return total * len(o.schedules) * len(o.activation_precisions) * len(o.gradient_precisions)


def make_result(space: SearchSpace, method: str, choice: Choice, start: float, *,
                history: list, evaluations: int, info: dict) -> SearchResult:
    """A SearchResult for ``choice`` (plan built by the space, scored by the cost model)."""
    plan = space.make_plan(choice)
    return SearchResult(
        method=method, plan=plan, cost=space.cost_model.evaluate(plan), history=history,
        wall_time_s=time.perf_counter() - start, evaluations=evaluations,
        info={"choice": choice, **info},
    )


def bruteforce_search(space: SearchSpace, *, seed: int = 0, progress: bool = False, callback=None,
                      max_choices: int = 200_000, evaluator: str = "fast") -> SearchResult:
    """The best plan that fits, by scoring every point of the space.

    Args:
        space: the search space.
        seed: unused (deterministic); accepted for a uniform method signature.
        progress: print a line every 10000 evaluations.
        callback: called with each history entry (one per improvement).
        max_choices: refuse spaces with more points than this.
        evaluator: "fast" scores every point with the numpy mirror and then re-scores every
            point within 1e-6 relative of the best with ``SearchSpace.evaluate`` (so the answer
            is the reference's best unless the mirror errs by more than that); "reference"
            scores every point with ``SearchSpace.evaluate`` (about 3 ms per point).
    """
    del seed
    start = time.perf_counter()
    total = count_choices(space)
    if total > max_choices:
        raise ValueError(
            f"bruteforce: the space has {total} points, more than bruteforce.max_choices="
            f"{max_choices}; shrink it (space.stage_counts, microbatch_counts, tp_degrees, "
            "recompute='stage'/'off', fewer layers) or use method='dp'"
        )
    scorer = Scorer(space, evaluator)
    best, history, near = float("inf"), [], []
    for choice in iter_choices(space):
        step, fits, _ = scorer(choice)
        if not fits:
            continue
        if step <= best * (1 + 1e-6):
            near.append((step, choice))
        if step < best:
            best = step
            near = [(s, c) for s, c in near if s <= best * (1 + 1e-6)]
            entry = {"step": scorer.count, "best_step_time_s": best}
            history.append(entry)
            if callback is not None:
                callback(entry)
        if progress and scorer.count % 10000 == 0:
            print(f"[bruteforce] {scorer.count}/{total}: best {1e3 * best:.4f} ms")
    if not near:
        raise ValueError(
            f"bruteforce: none of the {total} plans of {space.profile.name} fits in the memory "
            f"of {space.cluster.name}: allow recompute, more stages or more devices"
        )
    confirmed = []
    for near_step, choice in near:
        if scorer.evaluator == "fast":
            step, fits, _ = score_choice(space, choice)
        else:
            step, fits = near_step, True
        if fits:
            confirmed.append((step, choice))
    if not confirmed:
        raise RuntimeError(
            "bruteforce: the fast evaluator's best plans do not fit by SearchSpace.evaluate; "
            "fastcost and the reference cost model disagree (rerun with evaluator='reference')"
        )
    best_step, best_choice = min(confirmed, key=lambda x: x[0])
    return make_result(space, "bruteforce", best_choice, start, history=history,
                       evaluations=scorer.count, info={
                           "space_points": total, "evaluator": scorer.evaluator,
                           "evaluator_fallback": scorer.fallback,
                           "confirmed_by_reference": len(near) if scorer.evaluator == "fast" else 0})
