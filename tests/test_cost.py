"""The cost model: closed forms, one code path for discrete and relaxed plans, gradients."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from dartspar.cost.comm import hierarchical_allreduce_time_s, ring_allreduce_time_s
from dartspar.cost.model import CostModel, relaxed_cost
from dartspar.cost.schedule import inflight_microbatches, pipeline_makespan_s
from dartspar.plan import PlanError
from dartspar.space import Choice, SearchSpace, SpaceOptions

from synthetic import FAST, IB, NVLINK, gpt_like_profile, mixed_cluster


@pytest.fixture(scope="module")
def case():
    profile = gpt_like_profile(num_blocks=6, heavy={1: 2})
    cluster = mixed_cluster()
    cm = CostModel(profile, cluster)
    space = SearchSpace(profile, cluster, SpaceOptions(
        global_batch_size=32, activation_precisions=("fp32", "bf16", "fp8"),
        gradient_precisions=("fp32", "bf16", "int8")), cm)
    return profile, cluster, cm, space


def random_choice(space: SearchSpace, rng: random.Random) -> Choice:
    while True:
        p = rng.choice(space.stage_counts)
        m = rng.choice(space.microbatch_counts)
        feasible = [s for s, ok in enumerate(space.feasible_shapes(m)) if ok]
        cuts = tuple(sorted(rng.sample(range(1, space.num_layers), p - 1)))
        choice = Choice(
            order=rng.randrange(len(space.orders)), cuts=cuts,
            shapes=tuple(rng.choice(feasible) for _ in range(p)), microbatches=m,
            schedule=rng.choice(space.options.schedules),
            recompute=tuple(rng.random() < 0.5 for _ in range(space.num_layers)),
            activation_precision=rng.choice(space.options.activation_precisions),
            gradient_precision=rng.choice(space.options.gradient_precisions),
        )
        try:
            space.make_plan(choice)
        except ValueError:
            continue
        return choice


def test_ring_and_hierarchical_allreduce_closed_forms():
    # 8 ranks, 1 GB, alpha 5 us, 100 GB/s: 14 alpha + 1.75 * 10 ms.
    t = ring_allreduce_time_s(1e9, 8, 5e-6, 100e9)
    assert float(t) == pytest.approx(14 * 5e-6 + 1.75 * 1e9 / 100e9, rel=1e-12)
    assert float(ring_allreduce_time_s(1e9, 1, 5e-6, 100e9)) == 0.0
    # Two nodes of 8: the inter-node ring carries 1/8 of the bytes, so hierarchical beats a flat
    # ring on the slow link by ~ the intra/inter ratio.
    flat = ring_allreduce_time_s(1e9, 16, 5e-6, 25e9)
    hier = hierarchical_allreduce_time_s(1e9, 8, 2, 3e-6, 300e9, 5e-6, 25e9)
    assert float(hier) < 0.2 * float(flat)
    # A single node degenerates to reduce-scatter + all-gather = one ring all-reduce.
    single = hierarchical_allreduce_time_s(1e9, 8, 1, 3e-6, 300e9, 5e-6, 25e9)
    assert float(single) == pytest.approx(float(ring_allreduce_time_s(1e9, 8, 3e-6, 300e9)), rel=1e-12)


def test_makespan_textbook_and_inflight():
    f = torch.full((4,), 1.0, dtype=torch.float64)
    for schedule in ("gpipe", "1f1b"):
        t = pipeline_makespan_s(f, 2 * f, 0 * f, 8, schedule)
        assert float(t) == pytest.approx((8 + 4 - 1) * 3.0)
    assert inflight_microbatches(4, 8, "1f1b").tolist() == [4, 3, 2, 1]
    assert inflight_microbatches(4, 2, "1f1b").tolist() == [2, 2, 2, 1]
    assert inflight_microbatches(4, 8, "gpipe").tolist() == [8, 8, 8, 8]


def test_one_hot_relaxed_equals_evaluate(case):
    _, _, cm, space = case
    rng = random.Random(0)
    for _ in range(25):
        choice = random_choice(space, rng)
        plan = space.make_plan(choice)
        relaxed, infeasible = space.evaluate(choice)
        breakdown = cm.evaluate(plan)
        assert float(infeasible.abs().max()) < 1e-12
        assert float(relaxed.step_time_s) == pytest.approx(breakdown.step_time_s, rel=1e-12)
        peak = max(breakdown.peak_bytes_per_device.values())
        assert float(relaxed.expected_memory_bytes.max()) == pytest.approx(peak, rel=1e-12)


def _relaxed_rows(space, seed):
    gen = torch.Generator().manual_seed(seed)
    p, L, S = 3, space.num_layers, len(space.shapes)
    mask = space.feasible_shapes(8).double()
    def probs(*shape, mask=None):
        logits = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if mask is not None:
            logits = logits.masked_fill(mask == 0, -torch.inf)
        return logits.softmax(-1).requires_grad_()
    return dict(
        order=0, num_microbatches=8, schedule="1f1b", stage_probs=probs(L, p),
        shape_probs=probs(p, S, mask=mask), recompute_probs=torch.rand(L, generator=gen, dtype=torch.float64).requires_grad_(),
        act_probs=probs(3), grad_probs=probs(3),
    )


@pytest.mark.parametrize("smooth", [None, 1e-4])
def test_relaxed_gradients_match_finite_differences(case, smooth):
    _, _, _, space = case
    rows = _relaxed_rows(space, seed=1)
    tables = space.tables(8)

    def objective(r):
        soft, infeasible = space.soft_plan(**r)
        cost = relaxed_cost(soft, tables, smooth_s=smooth)
        return cost.step_time_s + 1e-12 * cost.overflow_bytes.sum() + 0.01 * infeasible.sum()

    value = objective(rows)
    names = ["stage_probs", "shape_probs", "recompute_probs", "act_probs", "grad_probs"]
    grads = torch.autograd.grad(value, [rows[n] for n in names])
    gen = torch.Generator().manual_seed(2)
    checked = 0
    for name, grad in zip(names, grads):
        base = rows[name].detach()
        for _ in range(6):
            idx = tuple(int(torch.randint(0, d, (1,), generator=gen)) for d in base.shape)
            if name == "shape_probs" and base[idx] == 0:
                continue  # masked (infeasible) entries: the max/relu kinks are not there
            eps = 1e-6
            plus, minus = base.clone(), base.clone()
            plus[idx] += eps
            minus[idx] -= eps
            with torch.no_grad():
                fd = (objective({**rows, name: plus}) - objective({**rows, name: minus})) / (2 * eps)
            assert float(grad[idx].detach()) == pytest.approx(float(fd), rel=1e-4, abs=1e-9), (name, idx)
            checked += 1
    assert checked >= 25


def test_relaxed_cost_interpolates_between_two_plans(case):
    """A 50/50 mixture of two recompute settings costs the average of the two plans' stage times
    (the cost is linear in each row), and its memory lies between theirs."""
    _, _, _, space = case
    choice = random_choice(space, random.Random(3))
    on = replace(choice, recompute=(True,) * space.num_layers)
    off = replace(choice, recompute=(False,) * space.num_layers)
    rows = space.one_hot_rows(on)
    rows["recompute_probs"] = torch.full((space.num_layers,), 0.5, dtype=torch.float64)
    soft, _ = space.soft_plan(**rows)
    mid = relaxed_cost(soft, space.tables(choice.microbatches))
    c_on, _ = space.evaluate(on)
    c_off, _ = space.evaluate(off)
    torch.testing.assert_close(mid.bwd_s, 0.5 * (c_on.bwd_s + c_off.bwd_s))
    assert bool((c_on.expected_memory_bytes < c_off.expected_memory_bytes).all())
    assert bool((mid.expected_memory_bytes < c_off.expected_memory_bytes).all())


def one_stage_plan(space, shape, m=8, schedule="1f1b", recompute=False, order=0):
    return space.make_plan(Choice(order=order, cuts=(), shapes=(space.shapes.index(shape),), microbatches=m,
                                  schedule=schedule, recompute=(recompute,) * space.num_layers))


def test_memory_terms(case):
    profile, cluster, cm, space = case
    plan = space.make_plan(Choice(0, (4,), (space.shapes.index((1, 1)), space.shapes.index((1, 1))), 8, "1f1b", (False,) * 8))
    one_f1b = cm.evaluate(plan)
    gpipe = cm.evaluate(replace(plan, schedule="gpipe"))
    # 1F1B keeps 2 and 1 micro-batches in flight on the two stages, GPipe keeps all 8.
    assert [s.inflight_microbatches for s in one_f1b.stages] == [2, 1]
    assert [s.inflight_microbatches for s in gpipe.stages] == [8, 8]
    assert gpipe.stages[1].memory_bytes > one_f1b.stages[1].memory_bytes
    # Hand-computed stage 1 (blocks 3..5 + head on one fast device, replicate): state + 1 * saved.
    layers = profile.layers[4:]
    scale = 4 / profile.batch_size  # micro-batch 32/8 = 4 samples
    expected = sum(l.state_bytes for l in layers) + sum(l.saved_bytes for l in layers) * scale
    assert one_f1b.stages[1].memory_bytes == pytest.approx(expected, rel=1e-12)
    # Recompute keeps only inputs: less memory, more backward time.
    rec = cm.evaluate(replace(plan, stages=tuple(replace(s, recompute=(True,) * s.num_layers) for s in plan.stages)))
    assert rec.stages[1].memory_bytes < one_f1b.stages[1].memory_bytes
    assert rec.stages[1].bwd_s > one_f1b.stages[1].bwd_s
    # FSDP divides grads + optimizer + the param shard by dp, keeps the gathered params.
    rep = cm.evaluate(one_stage_plan(space, (4, 1)))
    fsdp = cm.evaluate(replace(one_stage_plan(space, (4, 1)), data_parallel="fsdp"))
    state = sum(l.state_bytes for l in profile.layers)
    params = sum(l.param_bytes for l in profile.layers)
    assert rep.stages[0].memory_bytes - fsdp.stages[0].memory_bytes == pytest.approx(state - (state / 4 + params), rel=1e-9)


def test_tensor_parallel_and_links(case):
    profile, cluster, cm, space = case
    tp1 = cm.evaluate(one_stage_plan(space, (1, 1)))
    tp4 = cm.evaluate(one_stage_plan(space, (1, 4)))
    # Splitting four ways cuts compute but adds the Megatron all-reduces on NVLink.
    assert tp4.stages[0].tp_comm_s > 0 and tp1.stages[0].tp_comm_s == 0
    assert tp4.stages[0].fwd_s < tp1.stages[0].fwd_s
    block = profile.layers[1]
    # Two all-reduces per pass, each of half the block's bytes (and its own latency).
    assert block.tp_allreduce_count == block.tp_bwd_allreduce_count == 2
    one = ring_allreduce_time_s(block.tp_allreduce_bytes / 2 * 4 / profile.batch_size, 4, NVLINK.latency_s,
                                NVLINK.bandwidth_bytes_per_s)
    # 6 blocks (the heavy one counts the same bytes) x 2 passes x 2 collectives.
    assert tp4.stages[0].tp_comm_s == pytest.approx(6 * 2 * 2 * float(one), rel=1e-9)
    # Two stages inside one fast node talk over NVLink; across nodes over IB: IB is slower.
    same_node = space.make_plan(Choice(0, (4,), (space.shapes.index((1, 1)),) * 2, 8, "1f1b", (False,) * 8))
    cross = space.make_plan(Choice(0, (4,), (space.shapes.index((4, 1)), space.shapes.index((4, 1))), 8, "1f1b", (False,) * 8))
    assert cluster.link_between(*same_node.stages[0].device_ids[-1:], same_node.stages[1].device_ids[0]) == NVLINK
    assert cluster.link_between(cross.stages[0].device_ids[-1], cross.stages[1].device_ids[0]) == IB
    # fp32 activations (the plan's default) are twice the profile's bf16 bytes.
    out = 2 * profile.layers[3].output_bytes * 4 / profile.batch_size
    assert cm.evaluate(same_node).stages[0].p2p_s == pytest.approx(NVLINK.latency_s + out / NVLINK.bandwidth_bytes_per_s)
    assert cm.evaluate(cross).stages[0].p2p_s == pytest.approx(IB.latency_s + out / 4 / IB.bandwidth_bytes_per_s)


def test_heavy_stage_belongs_on_fast_node(case):
    """The same split is faster with the fast node first when the first half is heavier."""
    _, _, cm, space = case
    shapes = (space.shapes.index((4, 1)),) * 2
    fast_first = cm.evaluate(space.make_plan(Choice(0, (4,), shapes, 8, "1f1b", (False,) * 8)))
    slow_first = cm.evaluate(space.make_plan(Choice(1, (4,), shapes, 8, "1f1b", (False,) * 8)))
    assert space.orders[0].label.startswith(FAST.name)
    assert fast_first.step_time_s < 0.8 * slow_first.step_time_s


def test_check_fits_names_stage_and_gib():
    profile = gpt_like_profile(num_blocks=4, hidden=8192, batch=8, seq=2048)
    cluster = mixed_cluster()
    cm = CostModel(profile, cluster)
    space = SearchSpace(profile, cluster, SpaceOptions(global_batch_size=8), cm)
    plan = one_stage_plan(space, (1, 1), m=1, schedule="gpipe")
    assert not cm.evaluate(plan).fits
    with pytest.raises(PlanError, match=r"stage 0 .* needs [0-9.]+ GiB per device but a device holds 37.25 GiB"):
        cm.check_fits(plan)


def test_gradient_precision_scales_sync(case):
    _, _, cm, space = case
    base = one_stage_plan(space, (4, 1))
    fp32 = cm.evaluate(base).dp_sync_s
    int8 = cm.evaluate(replace(base, gradient_precision="int8")).dp_sync_s
    alpha = 2 * 3 * NVLINK.latency_s
    assert int8 - alpha == pytest.approx((fp32 - alpha) / 4, rel=1e-9)


def test_overheads_add_per_microbatch_pass_and_per_step(case):
    profile, cluster, cm, space = case
    plan = space.make_plan(Choice(0, (4,), (space.shapes.index((2, 1)),) * 2, 8, "1f1b", (False,) * 8))
    base = cm.evaluate(plan).step_time_s
    with_overhead = CostModel(profile, cluster, stage_overhead_s=1e-3, step_overhead_s=5e-3).evaluate(plan)
    # 1F1B: (m + p - 1) forward and backward passes on the critical path, each 1 ms longer.
    assert with_overhead.step_time_s - base == pytest.approx((8 + 2 - 1) * 2 * 1e-3 + 5e-3, rel=1e-9)
    with pytest.raises(ValueError, match="stage_overhead_s=-1"):
        CostModel(profile, cluster, stage_overhead_s=-1)


def test_memory_baseline_takes_capacity_and_is_reported(case):
    profile, cluster, cm, space = case
    plan = one_stage_plan(space, (1, 1))
    base = cm.evaluate(plan)
    cluster_b = replace(cluster, calibration={"memory_baseline_bytes": 2.0**30})
    with_base = CostModel(profile, cluster_b).evaluate(plan)
    assert with_base.stages[0].memory_bytes - base.stages[0].memory_bytes == pytest.approx(2.0**30)
    assert with_base.stages[0].capacity_bytes == base.stages[0].capacity_bytes
    assert with_base.step_time_s == pytest.approx(base.step_time_s, rel=1e-12)


def test_optimizer_update_is_memory_bound_and_fsdp_shards_it(case):
    profile, cluster, cm, space = case
    plan = one_stage_plan(space, (4, 1))
    device = cluster.nodes[0].device
    moved = sum(2 * (lay.optimizer_bytes + lay.param_bytes) + lay.grad_bytes for lay in profile.layers)
    replicate = cm.evaluate(plan)
    # Every replica updates all parameters: Adam reads+writes state and params, reads grads.
    assert replicate.stages[0].update_s == pytest.approx(moved / device.memory_bandwidth_bytes_per_s, rel=1e-9)
    assert replicate.step_time_s == pytest.approx(
        replicate.makespan_s + replicate.dp_sync_s + replicate.stages[0].update_s, rel=1e-12)
    fsdp = cm.evaluate(replace(plan, data_parallel="fsdp"))
    # FSDP: a quarter of the bytes per device, plus one all-gather + reduce-scatter latency per
    # layer unit (= one ring all-reduce's latency, 2 (dp - 1) alpha).
    per_unit = 2 * 3 * NVLINK.latency_s
    units = sum(lay.num_params > 0 for lay in profile.layers)
    assert fsdp.stages[0].update_s == pytest.approx(
        moved / 4 / device.memory_bandwidth_bytes_per_s + units * per_unit, rel=1e-9)


def test_recompute_overhead_is_paid_per_recomputed_layer_and_micro_batch(case):
    profile, cluster, cm, space = case
    with_overhead = CostModel(profile, cluster, recompute_overhead_s=1e-3)
    for recompute in (False, True):
        plan = one_stage_plan(space, (1, 1), recompute=recompute)
        base, more = cm.evaluate(plan).stages[0], with_overhead.evaluate(plan).stages[0]
        assert more.bwd_s - base.bwd_s == pytest.approx(1e-3 * profile.num_layers if recompute else 0.0, abs=1e-12)
        assert more.fwd_s == base.fwd_s
