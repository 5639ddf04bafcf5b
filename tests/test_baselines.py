"""Baseline planners: the DP is exact (equals brute force), every method returns valid plans
scored by the shared cost model, and the API rejects bad input clearly."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from dartspar.cluster import Cluster, Node
from dartspar.cost.model import CostModel
from dartspar.cost.schedule import pipeline_makespan_s
from dartspar.search import METHODS, search
from dartspar.search.bruteforce import bruteforce_search, count_choices, iter_choices
from dartspar.search.device_blind import average_cluster, device_blind_search
from dartspar.search.dp import dp_search, makespan_terms
from dartspar.search.mcmc import mcmc_search
from dartspar.search.random_search import is_valid_choice, random_choice, random_search
from dartspar.space import SearchSpace, SpaceOptions
from synthetic import FAST, IB, NVLINK, PCIE, SLOW, gpt_like_profile, mixed_cluster


def _space(mixed: bool, memory_bytes: float, blocks: int = 2, heavy=None, **options) -> SearchSpace:
    """A tiny space: ``blocks`` + 2 layers on 2 nodes x 2 devices whose memory binds."""
    profile = gpt_like_profile(blocks, hidden=512, heavy=heavy, seq=512, batch=8)
    fast = replace(FAST, memory_bytes=2 * memory_bytes)
    slow = replace(SLOW, memory_bytes=memory_bytes)
    if mixed:
        cluster = Cluster("tiny-mixed", (Node("f", fast, 2, NVLINK), Node("s", slow, 2, PCIE)), IB)
    else:
        cluster = Cluster("tiny-homog", (Node("a", fast, 2, NVLINK), Node("b", fast, 2, NVLINK)), IB)
    defaults = dict(global_batch_size=8, recompute="stage", stage_counts=(1, 2, 3),
                    microbatch_counts=(1, 2, 4), tp_degrees=(1, 2))
    defaults.update(options)
    return SearchSpace(profile, cluster, SpaceOptions(**defaults), CostModel(profile, cluster))


def _roomy(space: SearchSpace) -> SearchSpace:
    """The same space on devices with 1 TB each (memory never binds)."""
    nodes = tuple(replace(n, device=replace(n.device, memory_bytes=1e12)) for n in space.cluster.nodes)
    cluster = replace(space.cluster, nodes=nodes)
    return SearchSpace(space.profile, cluster, space.options, CostModel(space.profile, cluster))


TINY = {
    "homog-1f1b": dict(mixed=False, memory_bytes=0.06e9, schedules=("1f1b",)),
    "mixed-gpipe-heavy": dict(mixed=True, memory_bytes=0.09e9, heavy={1: 2}, schedules=("gpipe",)),
    "mixed-both": dict(mixed=True, memory_bytes=0.09e9, schedules=("1f1b", "gpipe")),
    "mixed-fsdp-off-int8": dict(mixed=True, memory_bytes=0.07e9, schedules=("1f1b",), recompute="off",
                                data_parallel="fsdp", gradient_precisions=("fp32", "int8")),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_dp_equals_bruteforce(name):
    space = _space(**TINY[name])
    assert count_choices(space) == sum(1 for _ in iter_choices(space))
    dp = dp_search(space)
    brute = bruteforce_search(space, evaluator="reference")
    assert dp.info["exact"]
    assert dp.cost.fits and brute.cost.fits
    assert dp.cost.step_time_s == pytest.approx(brute.cost.step_time_s, rel=1e-9, abs=0)
    # Memory binds: without it the optimum is at least 15% faster.
    assert dp_search(_roomy(space)).cost.step_time_s < 0.85 * dp.cost.step_time_s


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_makespan_terms_restate_the_closed_forms(schedule):
    gen = torch.Generator().manual_seed(3)
    for p in (1, 2, 3, 5, 8):
        for m in (1, 2, 3, 7, 16):
            f, b, c = (torch.rand(p, generator=gen, dtype=torch.float64) for _ in range(3))
            c = c * 3  # links sometimes slower than stages
            kappa, weights = makespan_terms(schedule, m, p)
            comm = c[:-1]
            if schedule == "1f1b":
                maxima = ((f + b).max(),)
            else:
                maxima = (torch.cat([f, comm]).max(), torch.cat([b, comm]).max())
            terms = (f + b).sum() + kappa * comm.sum() + sum(w * x for w, x in zip(weights, maxima))
            assert float(terms) == pytest.approx(float(pipeline_makespan_s(f, b, c, m, schedule)), rel=1e-12)


def test_dp_plan_validates_and_fits_and_says_how_exact():
    space = _space(**TINY["mixed-both"])
    result = search(space.profile, space.cluster, "dp", space=space.options, progress=False)
    result.plan.validate(space.profile, space.cluster)
    assert result.cost.fits and result.plan.predicted["fits"]
    assert result.plan.predicted["step_time_s"] == result.cost.step_time_s
    assert result.plan.meta["method"] == "dp" and result.plan.meta["cluster"] == "tiny-mixed"
    assert result.info["gap_bound"] == 0.0 and result.history[-1]["best_step_time_s"] == pytest.approx(
        result.cost.step_time_s, rel=1e-9)
    # A solve cap leaves a certified gap instead of a claim of exactness.
    capped = dp_search(space, max_solves=5)
    assert not capped.info["exact"] and capped.info["stopped_early"]
    assert capped.info["lower_bound_s"] <= result.cost.step_time_s * (1 + 1e-9)
    assert capped.cost.step_time_s >= result.cost.step_time_s * (1 - 1e-9)
    # Per-layer recompute is searched stage-uniformly, and said so.
    layer = dp_search(_space(**{**TINY["mixed-both"], "recompute": "layer"}))
    assert not layer.info["exact"] and "stage-uniform" in layer.info["notes"][0]


@pytest.mark.parametrize("method", [random_search, mcmc_search])
def test_sampling_baselines_respect_budget_and_return_valid_plans(method):
    space = _space(**TINY["mixed-both"])
    result = method(space, seed=1, budget=60, evaluator="reference")
    again = method(space, seed=1, budget=60, evaluator="reference")
    assert result.evaluations <= 60 and result.info["choice"] == again.info["choice"]
    assert is_valid_choice(space, result.info["choice"])
    result.plan.validate(space.profile, space.cluster)
    step, infeasible = space.evaluate(result.info["choice"])
    assert float(step.step_time_s) == pytest.approx(result.cost.step_time_s, rel=1e-9)
    assert float(infeasible.sum()) == 0
    optimum = dp_search(space).cost.step_time_s
    assert result.cost.step_time_s >= optimum * (1 - 1e-9)
    if result.info["found_fitting"]:
        assert result.cost.fits


def test_random_choices_are_valid_points():
    space = _space(**TINY["mixed-both"])
    rng = random.Random(0)
    points = set(iter_choices(space))
    for _ in range(200):
        choice = random_choice(space, rng)
        assert is_valid_choice(space, choice) and choice in points


def test_average_cluster_means_and_memory_policy():
    cluster = mixed_cluster(fast_nodes=1, slow_nodes=3, per_node=2)
    avg = average_cluster(cluster, "mean")
    device = avg.nodes[0].device
    assert all(n.device is device for n in avg.nodes)
    assert device.peak("bf16") == pytest.approx((400e12 + 3 * 100e12) / 4)
    assert device.memory_bandwidth_bytes_per_s == pytest.approx((2e12 + 3 * 0.5e12) / 4)
    assert device.memory_bytes == pytest.approx((40e9 + 3 * 16e9) / 4)
    assert average_cluster(cluster, "min").nodes[0].device.memory_bytes == 16e9
    assert [n.intra_link for n in avg.nodes] == [n.intra_link for n in cluster.nodes]
    with pytest.raises(ValueError, match="memory"):
        average_cluster(cluster, "max")


def test_device_blind_is_scored_on_the_real_cluster_and_loses_to_dp():
    profile = gpt_like_profile(4)
    cluster = mixed_cluster(1, 1, 4)
    options = SpaceOptions(global_batch_size=8, recompute="stage", stage_counts=(1, 2, 3),
                           microbatch_counts=(1, 2, 4, 8))
    space = SearchSpace(profile, cluster, options, CostModel(profile, cluster))
    blind = device_blind_search(space)
    real = CostModel(profile, cluster).evaluate(blind.plan)
    assert blind.cost.step_time_s == real.step_time_s and blind.cost.fits
    assert blind.info["blind_step_time_s"] != pytest.approx(real.step_time_s, rel=1e-3)
    assert blind.info["choice"] is not None and is_valid_choice(space, blind.info["choice"])
    dp = dp_search(space)
    assert blind.cost.step_time_s >= dp.cost.step_time_s * (1 - 1e-12)


def test_device_blind_mean_memory_overflow_is_repaired_or_reported():
    repaired = device_blind_search(_space(mixed=True, memory_bytes=0.09e9, schedules=("1f1b",)), memory="mean")
    assert not repaired.info["fits_as_planned"] and repaired.info["repaired_stages"]
    assert repaired.cost.fits
    for k in repaired.info["repaired_stages"]:
        assert all(repaired.plan.stages[k].recompute)
    broken = device_blind_search(_space(mixed=True, memory_bytes=0.07e9, blocks=3, schedules=("1f1b",)),
                                 memory="mean")
    assert not broken.info["fits"] and not broken.cost.fits and broken.cost.max_overflow_bytes > 0


def test_bruteforce_refuses_large_spaces():
    space = _space(**TINY["mixed-both"])
    with pytest.raises(ValueError, match="max_choices"):
        bruteforce_search(space, max_choices=10)


def test_api_rejects_unknown_method_and_options():
    profile, cluster = gpt_like_profile(2), mixed_cluster()
    with pytest.raises(ValueError, match="choose one of"):
        search(profile, cluster, "simulated_annealing")
    with pytest.raises(ValueError, match=r"has no options \['budgett'\]"):
        search(profile, cluster, "random", budgett=3)
    with pytest.raises(ValueError, match=r"unknown options \['stages'\]"):
        search(profile, cluster, "dp", space={"stages": 2})
    with pytest.raises(ValueError, match="disagrees"):
        search(profile, cluster, "dp", global_batch_size=8, space={"global_batch_size": 4})
    assert set(METHODS) == {"darts", "dp", "mcmc", "random", "bruteforce", "device_blind"}


def test_api_accepts_config_mappings_with_lists():
    space = _space(**TINY["homog-1f1b"])
    config = {"stage_counts": [1, 2, 3], "microbatch_counts": [1, 2, 4], "tp_degrees": [1, 2],
              "schedules": ["1f1b"], "recompute": "stage"}
    result = search(space.profile, space.cluster, "dp", global_batch_size=8, space=config, progress=False)
    assert result.method == "dp" and result.plan.meta["space"]["stage_counts"] == (1, 2, 3)
    assert result.cost.step_time_s == pytest.approx(dp_search(space).cost.step_time_s, rel=1e-12)
    assert result.wall_time_s >= result.info["search_s"] > 0


def test_dp_layer_groups_and_size_guard():
    space = _space(**{**TINY["mixed-both"], "blocks": 4})
    exact = dp_search(space)
    grouped = dp_search(space, layer_group=2)
    assert not grouped.info["exact"] and "layer_group" in grouped.info["notes"][0]
    assert all(c in (1, 2, 4, 5) for c in grouped.info["choice"].cuts)
    assert grouped.cost.step_time_s >= exact.cost.step_time_s * (1 - 1e-12)
    with pytest.raises(ValueError, match="raise dp.layer_group"):
        dp_search(space, max_elements=100)


def test_api_plan_names_the_builtin_model_for_the_executor_and_takes_a_compute_dtype():
    from dartspar.cluster import load_cluster
    from dartspar.execute.checks import model_spec
    from dartspar.models import build_model
    from dartspar.profile import profile as profile_model

    config = {"num_layers": 2, "hidden": 1024, "num_heads": 16, "seq_len": 512, "vocab_size": 1024}
    model = build_model("gpt", **config)
    prof = profile_model(model, model.example_inputs(8, "meta"), name="tiny-gpt")
    cluster = load_cluster("h100x8")
    options = {"stage_counts": [1, 2], "microbatch_counts": [1, 2], "tp_degrees": [1], "schedules": ["1f1b"]}
    bf16 = search(prof, cluster, "dp", space=options, progress=False)
    name, built = model_spec(bf16.plan)
    assert (name, built) == ("gpt", {**built, **config}) and bf16.plan.meta["model_label"] == "tiny-gpt"
    fp32 = search(prof, cluster, "dp", space=options, compute_dtype="fp32", progress=False)
    # H100 fp32 peak is ~15x below bf16: the same space costs more in fp32.
    assert fp32.cost.step_time_s > 1.5 * bf16.cost.step_time_s
    assert search(gpt_like_profile(2), mixed_cluster(), "dp", space=options, progress=False).plan.meta["model"] == "gpt-like"
