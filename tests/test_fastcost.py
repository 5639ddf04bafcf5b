"""The search's fast paths equal the reference cost model (relaxed_cost, SearchSpace.evaluate)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from dartspar.cost.model import ACT_BYTES, GRAD_BYTES, CostModel
from dartspar.search.fastcost import (
    ExactEvaluator, StackedTables, batched_relaxed_cost, batched_soft_configs,
)
from dartspar.space import Choice, SearchSpace, SpaceOptions

from synthetic import gpt_like_profile, mixed_cluster
from test_cost import random_choice


@pytest.fixture(scope="module", params=[("replicate", 0.0, 0.0), ("fsdp", 2e-5, 1e-4)])
def space(request):
    data_parallel, stage_overhead_s, step_overhead_s = request.param
    profile = gpt_like_profile(num_blocks=6, heavy={1: 2})
    cluster = mixed_cluster()
    cost_model = CostModel(profile, cluster, stage_overhead_s=stage_overhead_s, step_overhead_s=step_overhead_s)
    return SearchSpace(profile, cluster, SpaceOptions(
        global_batch_size=32, activation_precisions=("fp32", "bf16", "fp8"),
        gradient_precisions=("fp32", "bf16", "int8"), data_parallel=data_parallel), cost_model)


def test_exact_evaluator_matches_space_evaluate(space):
    ev = ExactEvaluator(space)
    rng = random.Random(0)
    worst = 0.0
    for _ in range(150):
        choice = random_choice(space, rng)
        ref, infeasible = space.evaluate(choice)
        fast = ev(choice)
        assert fast.valid and float(infeasible.sum()) == 0
        worst = max(worst, abs(fast.step_time_s - float(ref.step_time_s)) / float(ref.step_time_s))
        mem = ref.expected_memory_bytes.numpy()
        assert fast.memory_bytes == pytest.approx(mem, rel=1e-9)
        assert fast.fits == bool(float(ref.overflow_bytes.max()) <= 0)
    assert worst < 1e-9


def test_exact_evaluator_flags_invalid_points(space):
    ev = ExactEvaluator(space)
    choice = random_choice(space, random.Random(1))
    # A dp that does not divide the micro-batch size is invalid, not silently costed.
    m = max(space.microbatch_counts)
    bad = [s for s, ok in enumerate(space.feasible_shapes(m)) if not ok]
    assert bad
    point = replace(choice, microbatches=m, shapes=(bad[0],) * choice.num_stages)
    assert not ev(point).valid and ev(point).objective_s == float("inf")


def test_batched_relaxed_cost_matches_relaxed_cost(space):
    tables = StackedTables.build(space)
    links = tuple(space.links) or (space.cluster.inter_link,)
    lat = torch.tensor([link.latency_s for link in links], dtype=torch.float64)
    inv_bw = torch.tensor([1.0 / link.bandwidth_bytes_per_s for link in links], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    L, S, O = space.num_layers, len(space.shapes), len(space.orders)
    masks = torch.stack([space.feasible_shapes(m) for m in space.microbatch_counts])
    act = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    grad = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    dtype_bytes = space.profile.dtype_bytes
    act_f = act @ torch.tensor([ACT_BYTES[a] / dtype_bytes for a in space.options.activation_precisions],
                               dtype=torch.float64)
    grad_f = grad @ torch.tensor([GRAD_BYTES[g] / dtype_bytes for g in space.options.gradient_precisions],
                                 dtype=torch.float64)
    worst = 0.0
    for p in (1, 2, 4):
        W = torch.randn(O, L, p, generator=gen, dtype=torch.float64).softmax(-1)
        logits = torch.randn(O, p, S, generator=gen, dtype=torch.float64)
        shapes = (logits[:, None] + torch.log(masks.double())[None, :, None, :]).softmax(-1)  # (O, M, p, S)
        R = torch.rand(O, L, generator=gen, dtype=torch.float64)
        Q, infeasible, link_probs = batched_soft_configs(space, tuple(range(O)), shapes)
        for smooth in (None, 0.05):
            out = batched_relaxed_cost(W.transpose(1, 2), Q, R, link_probs, act_f, grad_f, tables, lat, inv_bw,
                                       ("1f1b", "gpipe"), space.options.data_parallel, smooth,
                                       space.cost_model.stage_overhead_s, space.cost_model.step_overhead_s)
            for o in range(O):
                for mi, m in enumerate(space.microbatch_counts):
                    for si, schedule in enumerate(("1f1b", "gpipe")):
                        soft, inf_ref = space.soft_plan(o, m, schedule, W[o], shapes[o, mi], R[o], act, grad)
                        assert torch.allclose(soft.config_probs, Q[o, mi], rtol=1e-12, atol=1e-15)
                        assert torch.allclose(inf_ref, infeasible[o, mi], rtol=1e-12, atol=1e-12)
                        exact = space.cost_model.relaxed(soft, space.tables(m))
                        T = None if smooth is None else smooth * float((exact.fwd_s + exact.bwd_s).mean())
                        ref = space.cost_model.relaxed(soft, space.tables(m), T)
                        worst = max(worst, abs(float(ref.step_time_s) - float(out.step_time_s[o, si, mi]))
                                    / float(ref.step_time_s))
                        scale = float(ref.expected_memory_bytes.max())
                        for a, b in ((ref.overflow_bytes, out.overflow_bytes[o, si, mi]),
                                     (ref.expected_memory_bytes, out.expected_memory_bytes[o, si, mi])):
                            worst = max(worst, float((a - b).abs().max()) / scale)
    assert worst < 1e-9


def test_minimal_recompute_fits_with_fewest_layers():
    profile = gpt_like_profile(num_blocks=6)
    cluster = mixed_cluster()
    space = SearchSpace(profile, cluster, SpaceOptions(global_batch_size=256, microbatch_counts=(1,)),
                        CostModel(profile, cluster))
    ev = ExactEvaluator(space)
    # Two stages of one slow device each, the whole batch in one micro-batch: activations overflow.
    shape = space.shapes.index((1, 1))
    choice = Choice(1, (4,), (shape, shape), 1, "gpipe", (False,) * space.num_layers)
    assert not ev(choice).fits
    fixed = ev.minimal_recompute(choice)
    e = ev(fixed)
    assert e.fits
    # Dropping any one recomputed layer overflows again (minimality of the greedy set).
    for layer in [i for i, f in enumerate(fixed.recompute) if f]:
        flags = list(fixed.recompute)
        flags[layer] = False
        assert not ev(replace(fixed, recompute=tuple(flags))).fits
