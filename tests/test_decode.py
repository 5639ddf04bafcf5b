"""Decoding A into plans: monotone stages, allowed shapes, repair to fit, refinement, errors."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from dartspar.cost.model import CostModel
from dartspar.plan import PlanError
from dartspar.search.decode import (
    balance_cuts, candidate_branches, decode_branch, map_shapes, refine, repair, viterbi_cuts,
)
from dartspar.search.fastcost import ExactEvaluator
from dartspar.search.strategy import StrategyMatrix
from dartspar.space import Choice, SearchSpace, SpaceOptions

from synthetic import gpt_like_profile, mixed_cluster


def _space(num_blocks=6, batch=32, **options) -> SearchSpace:
    profile = gpt_like_profile(num_blocks=num_blocks, heavy={1: 2})
    cluster = mixed_cluster()
    return SearchSpace(profile, cluster, SpaceOptions(global_batch_size=batch, **options), CostModel(profile, cluster))


def test_viterbi_cuts_is_the_best_monotone_assignment():
    rng = np.random.default_rng(0)
    for L, p in ((5, 1), (5, 2), (6, 3), (7, 4), (4, 4)):
        for _ in range(20):
            s = np.log(rng.dirichlet(np.ones(p), size=L))
            cuts = viterbi_cuts(s)
            assert len(cuts) == p - 1 and all(0 < c < L for c in cuts)
            assert list(cuts) == sorted(set(cuts))
            best = max(
                itertools.combinations(range(1, L), p - 1),
                key=lambda cs: sum(s[l, sum(l >= c for c in cs)] for l in range(L)),
            )
            score = lambda cs: sum(s[l, sum(l >= c for c in cs)] for l in range(L))  # noqa: E731
            assert score(cuts) == pytest.approx(score(best), abs=1e-12)


def test_map_shapes_is_the_best_allowed_sequence():
    space = _space()
    rng = np.random.default_rng(1)
    sizes = [dp * tp for dp, tp in space.shapes]
    allowed = space.feasible_shapes(4).numpy()
    S, D = len(space.shapes), space.num_devices
    for order in range(len(space.orders)):
        ci = space.orders[order].config_index.numpy()
        for p in (1, 2, 3):
            q = np.log(rng.dirichlet(np.ones(S), size=p))
            shapes = map_shapes(space, order, q, allowed)
            best, best_score = None, -np.inf
            for seq in itertools.product(range(S), repeat=p):
                off, ok = 0, True
                for k, s in enumerate(seq):
                    if not allowed[s] or off + sizes[s] > D - (p - 1 - k) or ci[off, s] < 0:
                        ok = False
                        break
                    off += sizes[s]
                score = sum(q[k, s] for k, s in enumerate(seq))
                if ok and score > best_score:
                    best, best_score = seq, score
            assert shapes == best


@pytest.mark.parametrize("recompute", ["layer", "stage"])
def test_decoding_random_A_always_gives_a_valid_fitting_plan(recompute):
    # A large batch on 16 GiB devices: many decoded points overflow and need repair.
    space = _space(num_blocks=6, batch=512, recompute=recompute, stage_counts=(1, 2, 3, 4),
                   microbatch_counts=(1, 2, 4))
    ev = ExactEvaluator(space)
    A = StrategyMatrix(space)
    repaired = 0
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in A.parameters():
                param.copy_(3 * torch.randn(param.shape, generator=gen, dtype=torch.float64))
        for _, order, p, m, schedule in candidate_branches(A, 1.0, 3):
            choice = decode_branch(A, A.branch(order, p), m, schedule)
            assert choice is not None
            plan = space.make_plan(choice)  # raises on invalid groups
            plan.validate(space.profile, space.cluster)
            if not ev(choice).fits:
                repaired += 1
            fixed = repair(space, choice, ev)
            plan = space.make_plan(fixed)
            plan.validate(space.profile, space.cluster)
            breakdown = space.cost_model.check_fits(plan)  # raises PlanError on overflow
            assert breakdown.fits
            if recompute == "stage":
                bounds = (0, *fixed.cuts, space.num_layers)
                for a, b in zip(bounds, bounds[1:]):
                    assert len(set(fixed.recompute[a:b])) == 1
    assert repaired > 0  # the case exercises repair


def test_repair_raises_with_gib_figures_when_nothing_fits():
    # ~330 GB of training state (24 blocks of 805M parameters at 16 bytes each) on a cluster
    # holding 224 GB in all: no split fits.
    profile = gpt_like_profile(num_blocks=24, hidden=8192, vocab=65536, seq=2048)
    cluster = mixed_cluster()
    space = SearchSpace(profile, cluster, SpaceOptions(global_batch_size=8), CostModel(profile, cluster))
    shape = space.shapes.index((1, 1))
    choice = Choice(0, (3,), (shape, shape), 1, "1f1b", (False,) * space.num_layers)
    with pytest.raises(PlanError, match=r"over by \d+\.\d+ GiB") as err:
        repair(space, choice, budget=400)
    assert "does not fit" in str(err.value) and "stage" in str(err.value)


def test_balance_cuts_minimises_the_slowest_stage():
    space = _space(num_blocks=10, batch=32)
    ev = ExactEvaluator(space)
    shape = space.shapes.index((1, 1))
    choice = Choice(0, (1, 2), (shape, shape, shape), 4, "1f1b", (False,) * space.num_layers)
    balanced = balance_cuts(ev, choice)

    def slowest(c: Choice) -> float:
        starts, ends, cfg, mi = ev.stage_layout(c)
        C = ev.C
        P = ev.prefix[mi]
        t = [P[e, k] + P[e, C + k] + 2 * P[e, 2 * C + k] - P[s, k] - P[s, C + k] - 2 * P[s, 2 * C + k]
             for s, e, k in zip(starts, ends, cfg)]
        return max(t)

    best = min(slowest(Choice(0, cs, choice.shapes, 4, "1f1b", choice.recompute))
               for cs in itertools.combinations(range(1, space.num_layers), 2))
    assert slowest(balanced) == pytest.approx(best, rel=1e-9)


def test_refine_never_worse_and_reaches_a_local_optimum():
    space = _space(num_blocks=6, batch=32, stage_counts=(1, 2, 3))
    ev = ExactEvaluator(space)
    rng = random.Random(0)
    for _ in range(3):
        shape = rng.choice([s for s, (dp, tp) in enumerate(space.shapes) if dp * tp <= 2])
        choice = Choice(rng.randrange(2), (3,), (shape, shape), 4, "gpipe", (False,) * space.num_layers)
        if ev.placement(choice) is None:
            continue
        start = ev(repair(space, choice, ev)).step_time_s
        refined, cost = refine(space, choice, budget=400, evaluator=ev)
        assert float(cost.step_time_s) <= start + 1e-15
        # The returned cost is the reference path's figure for the returned point.
        assert float(cost.step_time_s) == pytest.approx(float(space.evaluate(refined)[0].step_time_s), rel=1e-12)
        assert float(cost.step_time_s) < start  # the starting point was far from good
