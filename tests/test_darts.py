"""DARTS search: reaches the exhaustive optimum on tiny spaces; bilevel numerics; one-hot A."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dartspar.cost.model import ACT_BYTES, GRAD_BYTES, CostModel
from dartspar.search.bilevel import ProxyConfig, ProxyTask, mix_activation, quantize_gradient
from dartspar.search.darts import GroupCost, darts_search
from dartspar.search.fastcost import ExactEvaluator, StackedTables
from dartspar.search.strategy import StrategyMatrix
from dartspar.space import Choice, SearchSpace, SpaceOptions

from synthetic import gpt_like_profile, mixed_cluster

FAST_DARTS = dict(steps=40, top_k=6, refine_budget=600, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add hand-off cost (darts_search does the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def exhaustive_optimum(space: SearchSpace) -> tuple[float, Choice, int]:
    """Best fitting point of ``space`` by enumerating every point (scored by the numpy mirror
    of the cost model, which tests/test_fastcost.py holds to the reference path)."""
    ev = ExactEvaluator(space)
    L, D = space.num_layers, space.num_devices
    sizes = [dp * tp for dp, tp in space.shapes]
    best, best_choice, count = math.inf, None, 0
    o = space.options
    for order, m, schedule, act, grad in itertools.product(
            range(len(space.orders)), space.microbatch_counts, o.schedules,
            o.activation_precisions, o.gradient_precisions):
        allowed = space.feasible_shapes(m)
        config_index = space.orders[order].config_index
        for p in space.stage_counts:
            shape_seqs = []
            for seq in itertools.product(range(len(sizes)), repeat=p):
                offset, ok = 0, True
                for s in seq:
                    if not allowed[s] or offset + sizes[s] > D or config_index[offset, s] < 0:
                        ok = False
                        break
                    offset += sizes[s]
                if ok:
                    shape_seqs.append(seq)
            for cuts in itertools.combinations(range(1, L), p - 1):
                bounds = (0, *cuts, L)
                if o.recompute == "off":
                    patterns = [(False,) * L]
                elif o.recompute == "stage":
                    patterns = [tuple(f for k, f in enumerate(flags) for _ in range(bounds[k], bounds[k + 1]))
                                for flags in itertools.product((False, True), repeat=p)]
                else:
                    patterns = list(itertools.product((False, True), repeat=L))
                for shapes in shape_seqs:
                    for flags in patterns:
                        choice = Choice(order, cuts, shapes, m, schedule, flags, act, grad)
                        count += 1
                        cost = ev(choice).objective_s
                        if cost < best:
                            best, best_choice = cost, choice
    return best, best_choice, count


def _space(profile, cluster, **options) -> SearchSpace:
    return SearchSpace(profile, cluster, SpaceOptions(**options), CostModel(profile, cluster))


@pytest.fixture(scope="module")
def heavy_last_case():
    """5 layers whose last block is 3x wider (9x the FLOPs) on 2 fast + 2 slow devices."""
    profile = gpt_like_profile(num_blocks=3, heavy={2: 3}, batch=8, seq=256, hidden=512, vocab=4096)
    cluster = mixed_cluster(fast_nodes=1, slow_nodes=1, per_node=2)
    space = _space(profile, cluster, global_batch_size=8, stage_counts=(1, 2, 3), tp_degrees=(1, 2),
                   recompute="off", microbatch_counts=(1, 2, 4))
    return space, exhaustive_optimum(space)


@pytest.fixture(scope="module")
def memory_case():
    """Activations overflow the slow devices unless stages recompute."""
    profile = gpt_like_profile(num_blocks=4, batch=8)
    cluster = mixed_cluster(fast_nodes=1, slow_nodes=1, per_node=2)
    space = _space(profile, cluster, global_batch_size=2048, stage_counts=(1, 2, 3), tp_degrees=(1, 2),
                   recompute="stage", microbatch_counts=(1, 2), schedules=("1f1b",))
    return space, exhaustive_optimum(space)


def test_heavy_stage_goes_to_the_fast_node(heavy_last_case):
    space, (best, choice, count) = heavy_last_case
    assert count > 500 and math.isfinite(best)
    plan = space.make_plan(choice)
    heavy_layer = space.num_layers - 2
    stage = plan.stages[plan.stage_of_layer(heavy_layer)]
    assert all(space.cluster.device(d).name == "fast" for d in stage.device_ids)
    # The exhaustive optimum is the reference path's figure too.
    assert float(space.evaluate(choice)[0].step_time_s) == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_darts_reaches_the_exhaustive_optimum_on_a_mixed_cluster(heavy_last_case, seed):
    space, (best, _, _) = heavy_last_case
    result = darts_search(space, seed=seed, **FAST_DARTS)
    assert result.cost.step_time_s == pytest.approx(best, rel=1e-9)
    result.plan.validate(space.profile, space.cluster)
    assert result.cost.fits


def test_darts_reaches_the_exhaustive_optimum_when_memory_binds(memory_case):
    space, (best, choice, _) = memory_case
    assert any(choice.recompute)  # recomputation is needed at the optimum
    result = darts_search(space, seed=0, memory="lagrangian", **FAST_DARTS)
    assert result.cost.step_time_s == pytest.approx(best, rel=1e-9)
    assert result.cost.fits


def test_darts_gumbel_relaxations_and_factorized_rows_return_valid_plans(heavy_last_case):
    space, (best, _, _) = heavy_last_case
    for relaxation, global_rows in (("gumbel", "joint"), ("gumbel_hard", "joint"), ("softmax", "factorized")):
        result = darts_search(space, seed=3, relaxation=relaxation, global_rows=global_rows,
                              **{**FAST_DARTS, "steps": 25})
        result.plan.validate(space.profile, space.cluster)
        assert result.cost.fits and result.cost.step_time_s >= best * (1 - 1e-12)


def test_result_info_and_trajectory(heavy_last_case):
    space, _ = heavy_last_case
    seen = []
    result = darts_search(space, seed=0, callback=seen.append, max_snapshots=5, **FAST_DARTS)
    info = result.info
    for key in ("relaxed_cost_s", "decoded_cost_s", "gap", "refined_cost_s", "numerics"):
        assert key in info
    assert info["numerics"]["mode"] == "cost-only"
    assert info["numerics"]["choices_changing_numerics"] == ["activation_precision", "gradient_precision"]
    assert info["refined_cost_s"] == pytest.approx(result.cost.step_time_s, rel=1e-12)
    assert info["refined_cost_s"] <= info["best_decoded_cost_s"] * (1 + 1e-12)
    if math.isfinite(info["decoded_cost_s"]):
        assert info["gap"] == pytest.approx(
            (info["decoded_repaired_cost_s"] - info["relaxed_cost_s"]) / info["relaxed_cost_s"])
    assert len(result.history) == FAST_DARTS["steps"] and seen == result.history
    entry = result.history[-1]
    for key in ("step", "best_step_time_s", "temperature", "expected_step_time_s", "entropy", "globals"):
        assert key in entry
    assert entry["temperature"] == pytest.approx(0.1)
    assert sum(entry["globals"]["stages"]) == pytest.approx(1.0)
    assert len(info["stage_snapshots"]) <= 6  # max_snapshots plus the final one
    probs = info["stage_snapshots"][-1]["layer_stage_probs"]
    assert len(probs) == space.num_layers


def test_one_hot_A_costs_what_the_cost_model_says():
    profile = gpt_like_profile(num_blocks=4, heavy={1: 2})
    cluster = mixed_cluster()
    space = _space(profile, cluster, global_batch_size=32, activation_precisions=("fp32", "bf16", "fp8"),
                   gradient_precisions=("fp32", "int8"), data_parallel="fsdp")
    tables = StackedTables.build(space)
    coster = GroupCost(space, tables, None, "hinge", 5.0, 2.0)
    gen = torch.Generator().manual_seed(0)
    dp2 = space.shapes.index((2, 1))
    tp2 = space.shapes.index((1, 2))
    for choice in (
        Choice(0, (2, 4), (dp2, tp2, dp2), 4, "1f1b", (True, False, True, False, False, True), "bf16", "int8"),
        Choice(1, (3,), (dp2, dp2), 2, "gpipe", (False,) * 6, "fp8", "fp32"),
    ):
        A = StrategyMatrix(space)
        A.load_choice(choice)
        with torch.no_grad():
            g = A.global_probs(1.0)
            # Bytes per element relative to the 2-byte training dtype.
            act_f = g["activation_precision"] @ torch.tensor([ACT_BYTES[a] / 2 for a in ("fp32", "bf16", "fp8")],
                                                             dtype=torch.float64)
            grad_f = g["gradient_precision"] @ torch.tensor([GRAD_BYTES[q] / 2 for q in ("fp32", "int8")],
                                                            dtype=torch.float64)
            b = A.branch(choice.order, choice.num_stages)
            out = coster(A, b.group, 1.0, "softmax", gen, act_f, grad_f, 1.0)
        relaxed = float(out["step"][choice.order, space.options.schedules.index(choice.schedule),
                                    space.microbatch_counts.index(choice.microbatches)])
        expected = space.cost_model.evaluate(space.make_plan(choice)).step_time_s
        assert relaxed == pytest.approx(expected, rel=1e-9)


# ------------------------------------------------------------------------------------ bilevel
@pytest.fixture(scope="module")
def numerics_space():
    profile = gpt_like_profile(num_blocks=4)
    cluster = mixed_cluster(fast_nodes=1, slow_nodes=1, per_node=2)
    return _space(profile, cluster, global_batch_size=8, stage_counts=(1, 2, 3), tp_degrees=(1, 2),
                  activation_precisions=("fp32", "bf16", "fp8"), gradient_precisions=("fp32", "bf16", "int8"))


def test_quantizers():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    y = mix_activation(x, torch.tensor(1.0), torch.tensor([0.0, 0.0, 1.0]), ("fp32", "bf16", "fp8"))
    rel = ((y - x).abs() / x.abs().clamp(min=1e-3)).median()
    assert 1e-3 < float(rel) < 0.1  # fp8 e4m3: ~2-3 significant bits of error
    assert torch.equal(mix_activation(x, torch.tensor(0.0), torch.tensor([0.0, 0.0, 1.0]), ("fp32", "bf16", "fp8")), x)
    q = quantize_gradient(x, "int8")
    assert len(torch.unique(q)) <= 255 and float((q - x).abs().max()) <= float(x.abs().max()) / 127 / 2 + 1e-6


def test_activation_precision_row_gets_gradient_from_L_val(numerics_space):
    A = StrategyMatrix(numerics_space)
    task = ProxyTask(numerics_space.num_layers, ("fp32", "bf16", "fp8"), ("fp32", "bf16", "int8"),
                     ProxyConfig(num_train=128, num_val=64), seed=0)
    assert task.num_proxy_layers == numerics_space.num_layers
    g = A.global_probs(1.0)
    cut = A.cut_probs(1.0, g)
    assert bool((cut > 0).all()) and bool((cut < 1).all())
    arch = task.arch_grads(cut, g["activation_precision"], g["gradient_precision"], "first")
    assert float(arch.act.abs().max()) > 0
    assert float(arch.grad.abs().max()) == 0.0  # first order: no L_val signal for gradients
    torch.autograd.backward([cut, g["activation_precision"]], [arch.cut, arch.act])
    assert float(A.global_logits["activation_precision"].grad.abs().max()) > 0
    assert any(float(p.grad.abs().max()) > 0 for p in A.stage_logits if p.grad is not None)
    # The unrolled step gives the gradient-precision row a signal too.
    second = task.arch_grads(cut.detach(), g["activation_precision"].detach(),
                             g["gradient_precision"].detach(), "second")
    assert float(second.grad.abs().max()) > 0 and float(second.act.abs().max()) > 0


def test_weights_train_loss_decreases_with_relaxed_numerics(numerics_space):
    A = StrategyMatrix(numerics_space)
    task = ProxyTask(numerics_space.num_layers, ("fp32", "bf16", "fp8"), ("fp32", "bf16", "int8"),
                     ProxyConfig(num_train=256, num_val=64), seed=0)
    with torch.no_grad():
        g = A.global_probs(1.0)
        cut = A.cut_probs(1.0, g)
    before = task.eval_loss("train", cut, g["activation_precision"])
    losses = [task.train_step(cut, g["activation_precision"], g["gradient_precision"]) for _ in range(40)]
    after = task.eval_loss("train", cut, g["activation_precision"])
    assert after < before - 0.2
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("order", ["first", "second"])
def test_bilevel_darts_runs_and_reports_numerics(numerics_space, order):
    result = darts_search(numerics_space, seed=0, order=order, proxy={"num_train": 128, "num_val": 64},
                          **{**FAST_DARTS, "steps": 8})
    info = result.info
    assert info["numerics"]["mode"] == "bilevel"
    assert info["numerics"]["searched_numerics_choices"] == ["activation_precision", "gradient_precision"]
    assert all("L_val" in h and "L_train" in h for h in result.history)
    result.plan.validate(numerics_space.profile, numerics_space.cluster)
    assert result.plan.activation_precision in ("fp32", "bf16", "fp8")
    if order == "first":
        assert any("no signal from L_val" in note for note in info["numerics"]["notes"])


def test_numerics_on_without_numerics_choices_is_an_error(heavy_last_case):
    space, _ = heavy_last_case
    with pytest.raises(ValueError, match="numerics='on'"):
        darts_search(space, numerics="on", progress=False, steps=2)
    with pytest.raises(ValueError, match="relaxation"):
        darts_search(space, relaxation="sparsemax", progress=False)
