"""Calibration: the fitter recovers known device/link/overhead figures from measurements the
cost model itself generated, the memory baseline fit, the figures of merit, and the calibrated
cluster YAML's round trip through ``load_cluster``."""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import yaml

from dartspar.calibrate import (
    Measurement,
    apply_calibration,
    calibration_base,
    compass_search,
    fit_calibration,
    fit_memory_baseline,
    initial_params,
    kendall_tau,
    levenberg_marquardt,
    mape,
    measurement_from_report,
    predict_peak_bytes,
    predict_step_times,
    write_cluster_profile,
)
from dartspar.catalogue import DEVICES, LINKS
from dartspar.cluster import Cluster, Node, load_cluster
from dartspar.cost.model import CostModel
from dartspar.plan import Plan, StageSpec

from synthetic import FAST, gpt_like_profile

BASELINE_BYTES = 3.5e8


def stage(a: int, b: int, devices, dp: int, tp: int, recompute: bool = False) -> StageSpec:
    return StageSpec(a, b, tuple(devices), dp, tp, (recompute,) * (b - a))


@pytest.fixture(scope="module")
def setup():
    # Small, memory-heavy layers (h=64, large vocabulary) so that compute, memory traffic,
    # links and both overheads each move the step times by several percent.
    profile = replace(gpt_like_profile(num_blocks=2, batch=4, seq=32, hidden=64, vocab=1024, heads=4),
                      dtype_bytes=4)
    cluster = Cluster("cpu4", (Node("host", DEVICES["CPU"], 4, LINKS["loopback"]),), LINKS["loopback"])
    L = profile.num_layers
    plans = [
        Plan((stage(0, L, [0], 1, 1),), "1f1b", 1, 4),
        Plan((stage(0, L, [0], 1, 1, True),), "1f1b", 8, 1),
        Plan((stage(0, L, [0, 1], 2, 1),), "1f1b", 1, 4),
        Plan((stage(0, L, [0, 1], 1, 2),), "1f1b", 4, 2),
        Plan((stage(0, 2, [0], 1, 1), stage(2, L, [1], 1, 1)), "gpipe", 4, 4),
        Plan((stage(0, L, [0, 1], 1, 2),), "1f1b", 1, 8),
        Plan((stage(0, 2, [0, 1], 2, 1), stage(2, L, [2, 3], 1, 2)), "1f1b", 2, 4, data_parallel="fsdp"),
        Plan((stage(0, 1, [0], 1, 1), stage(1, 2, [1], 1, 1), stage(2, 3, [2], 1, 1),
              stage(3, L, [3], 1, 1)), "1f1b", 4, 8),
    ]
    truth = initial_params(cluster, ["fp32"]).with_values({
        "peak_scale.fp32": 0.3, "memory_bandwidth_scale": 0.2, "intra_link_latency_s": 4e-4,
        "intra_link_bandwidth_bytes_per_s": 6e8, "stage_overhead_s": 2e-3, "step_overhead_s": 1e-2,
        "recompute_overhead_s": 3e-3,
    })
    true_cluster = apply_calibration(cluster, truth)
    times = predict_step_times(plans, profile, true_cluster)
    peaks = predict_peak_bytes(plans, profile, true_cluster)
    measurements = [
        Measurement(p, float(t), {d: b + BASELINE_BYTES for d, b in peak.items()})
        for p, t, peak in zip(plans, times, peaks)
    ]
    result = fit_calibration(measurements, profile, cluster, "roofline",
                             starts=({}, {"memory_bandwidth_scale": 0.1}))
    return profile, cluster, plans, truth, measurements, result


def test_fit_recovers_perturbed_parameters(setup):
    _, _, _, truth, _, result = setup
    fitted, true = result.params.as_dict(), truth.as_dict()
    for name, value in true.items():
        assert fitted[name] == pytest.approx(value, rel=0.05), name
    assert result.free == tuple(true)
    assert result.before["step"]["mape"] > 0.5  # the catalogue CPU is far from the truth
    assert result.after["step"]["mape"] < 1e-3
    assert result.after["step"]["kendall_tau"] == pytest.approx(1.0)
    assert result.at_bound == ()
    for name, change in result.sensitivity.items():
        assert min(change.values()) > 0, f"{name}: the fit is not a minimum along this axis"


def test_memory_baseline_is_recovered(setup):
    *_, result = setup
    assert result.memory_baseline_bytes == pytest.approx(BASELINE_BYTES, rel=1e-9)
    assert result.cluster.calibration["memory_baseline_bytes"] == pytest.approx(BASELINE_BYTES, rel=1e-9)
    assert result.before["memory"]["mape"] > 0.9  # the model alone misses the runtime's bytes
    assert result.after["memory"]["mape"] < 1e-9
    assert result.after["memory"]["median_measured_over_predicted_above_baseline"] == pytest.approx(1.0)


def test_calibrated_cluster_predicts_what_the_fit_saw(setup):
    profile, _, plans, _, measurements, result = setup
    predicted = predict_step_times(plans, profile, result.cluster)
    assert np.allclose(predicted, result.after["step"]["predicted_s"], rtol=1e-12)
    cm = CostModel(profile, result.cluster)  # overheads come from cluster.calibration
    assert cm.stage_overhead_s == pytest.approx(result.params.stage_overhead_s, rel=1e-12)
    assert cm.evaluate(plans[4]).step_time_s == pytest.approx(predicted[4], rel=1e-12)
    assert mape(predicted, [m.step_time_s for m in measurements]) < 1e-3


def test_cluster_profile_round_trips_through_load_cluster(setup, tmp_path):
    profile, _, plans, _, _, result = setup
    path = write_cluster_profile(result, tmp_path / "cpu4-calibrated.yaml",
                                 extra={"heldout_step_time_mape": 0.07})
    loaded = load_cluster(path)
    assert loaded.name == "cpu4-calibrated"
    (device,) = loaded.device_types
    (expected,) = result.cluster.device_types
    assert device.peak_flops_per_s == pytest.approx(expected.peak_flops_per_s, rel=1e-12)
    assert device.memory_bandwidth_bytes_per_s == pytest.approx(expected.memory_bandwidth_bytes_per_s, rel=1e-12)
    assert loaded.nodes[0].intra_link == result.cluster.nodes[0].intra_link
    assert loaded.num_devices == 4
    for key in ("stage_overhead_s", "step_overhead_s", "recompute_overhead_s", "memory_baseline_bytes"):
        assert loaded.calibration[key] == pytest.approx(result.cluster.calibration[key], rel=1e-12)
    assert loaded.calibration["estimator"] == "roofline"
    assert loaded.calibration["fit"]["num_plans"] == len(plans)
    assert loaded.calibration["fit"]["heldout_step_time_mape"] == 0.07
    assert {"date", "host", "torch_version"} <= set(loaded.calibration)
    assert np.allclose(predict_step_times(plans, profile, loaded),
                       predict_step_times(plans, profile, result.cluster), rtol=1e-12)
    # Plain YAML: no Python-specific tags a non-Python reader would choke on.
    assert "!!python" not in path.read_text()
    assert yaml.safe_load(path.read_text())["calibration"]["compute_dtype"] == "fp32"


def test_links_are_not_fitted_without_multi_device_plans(setup):
    profile, cluster, plans, truth, measurements, _ = setup
    single = [m for m in measurements if len(m.plan.device_ids) == 1]
    result = fit_calibration(single, profile, cluster, "roofline", starts=({},), max_evals=30)
    assert result.not_exercised == ("intra_link_latency_s", "intra_link_bandwidth_bytes_per_s")
    assert result.cluster.nodes[0].intra_link == cluster.nodes[0].intra_link
    with pytest.raises(ValueError, match="intra_link_latency_s"):
        fit_calibration(single, profile, cluster, "roofline", free=["intra_link_latency_s"])


def test_bad_inputs_name_the_problem(setup):
    profile, cluster, plans, _, measurements, _ = setup
    with pytest.raises(ValueError, match="unknown parameters"):
        fit_calibration(measurements, profile, cluster, free=["peak_scale.bf16"])
    with pytest.raises(ValueError, match="step_time_s"):
        Measurement(plans[0], 0.0, {0: 1e8})
    with pytest.raises(ValueError, match="rank 3"):
        Measurement(plans[0], 0.1, {3: 1e8})
    with pytest.raises(ValueError, match="'ranks'"):
        measurement_from_report(plans[0], {"step_time_s": 0.1})
    mixed = Cluster("mixed", (Node("a", DEVICES["CPU"], 2, LINKS["loopback"]),
                              Node("b", FAST, 2, LINKS["loopback"])), LINKS["loopback"])
    with pytest.raises(ValueError, match="one device model"):
        fit_calibration(measurements[:1], profile, mixed)


def test_measurement_from_report_reads_step_time_and_rank_peaks(setup):
    plans = setup[2]
    report = {"step_time_s": 0.25, "ranks": [{"rank": 1, "peak_memory_bytes": 5e8},
                                             {"rank": 0, "peak_memory_bytes": 4e8}]}
    m = measurement_from_report(plans[2], report)
    assert (m.step_time_s, m.peak_bytes_per_rank) == (0.25, {0: 4e8, 1: 5e8})
    assert measurement_from_report(plans[2], report, step_time_s=0.2).step_time_s == 0.2


def test_table_backed_estimator_is_rebased_to_its_measured_device():
    class TableEstimator:  # answers for "CPU" from a table measured at 1e10 FLOP/s, 5e9 B/s
        name = "table"
        spec = replace(DEVICES["CPU"], peak_flops_per_s={"fp32": 1e10}, memory_bandwidth_bytes_per_s=5e9)

        def is_extrapolated(self, device):
            return device.name != "CPU"

        def device_spec(self, name):
            return self.spec

    cluster = load_cluster("cpu4")
    base = calibration_base(cluster, TableEstimator())
    (device,) = base.device_types
    assert device.name == "CPU-calibrated"
    assert device.peak("fp32") == 1e10 and device.memory_bandwidth_bytes_per_s == 5e9
    assert device.memory_bytes == DEVICES["CPU"].memory_bytes
    assert calibration_base(cluster, "roofline") is cluster


def test_fitted_estimator_rebase_predicts_what_its_table_does():
    from dartspar.cost.fitted import FittedEstimator
    from dartspar.cost.kernels.table import GemmRow, MemoryRow, ProfileTable

    # A small table for "CPU" measured at 1e10 FLOP/s and 4e9 B/s, efficiency growing with size.
    spec = replace(DEVICES["CPU"], peak_flops_per_s={"fp32": 1e10}, memory_bandwidth_bytes_per_s=4e9)
    sizes = (16, 64, 256)
    gemms = tuple(
        GemmRow(m, n, k, 1, "fp32", 2.0 * m * n * k / (1e10 * (0.2 + 0.1 * np.log2(m * n * k) / 8)))
        for m in sizes for n in sizes for k in sizes
    )
    memory = tuple(MemoryRow("block", 1, int(b // 4), "fp32", int(b), 2e-6 + b / 4e9)
                   for b in (1e4, 1e5, 1e6, 1e7))
    table = ProfileTable(device="CPU", backend="torch", threads=1, spec=spec, spec_source="test",
                         gemm_rows=gemms, memory_rows=memory)
    estimator = FittedEstimator(tables=[table])
    profile = replace(gpt_like_profile(num_blocks=1, batch=2, seq=32, hidden=64, vocab=256, heads=4),
                      dtype_bytes=4)
    cluster = load_cluster("cpu4")
    plan = Plan((stage(0, 2, [0], 1, 1), stage(2, profile.num_layers, [1], 1, 1)), "1f1b", 2, 2)
    base = calibration_base(cluster, estimator)
    assert base.device_types[0].name == "CPU-calibrated"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scaled from 'CPU'": intended here
        rebased = predict_step_times([plan], profile, base, estimator)
        faster = predict_step_times(
            [plan], profile, apply_calibration(base, initial_params(base, ["fp32"]).with_values(
                {"peak_scale.fp32": 2.0, "memory_bandwidth_scale": 2.0, "stage_overhead_s": 1e-12,
                 "step_overhead_s": 1e-12})), estimator)
    direct = predict_step_times([plan], profile, cluster, estimator)
    assert rebased[0] == pytest.approx(direct[0], rel=1e-9)
    # Scaled figures reach the estimator (its own-table path would ignore them).
    assert faster[0] < 0.75 * direct[0]


def test_mape_and_kendall_tau():
    assert mape([1.1, 0.9], [1.0, 1.0]) == pytest.approx(0.1)
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # One discordant pair (3, 4) of six: (5 - 1) / 6.
    assert kendall_tau([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(4 / 6)
    # tau-b with a tie in y: 5 untied pairs in y, all concordant: 5 / sqrt(6 * 5).
    assert kendall_tau([1, 2, 3, 4], [1, 1, 2, 3]) == pytest.approx(5 / np.sqrt(30))
    with pytest.raises(ValueError):
        mape([1.0], [1.0, 2.0])


def test_memory_baseline_is_the_weighted_median_gap():
    predicted = np.array([1.0, 2.0, 3.0, 4.0]) * 1e7
    measured = predicted + 3e8
    assert fit_memory_baseline(predicted, measured) == pytest.approx(3e8)
    # One outlier rank does not move an L1 fit.
    measured[0] += 5e8
    assert fit_memory_baseline(predicted, measured) == pytest.approx(3e8)


def test_minimizers_find_known_optima():
    target = np.array([0.5, -1.0, 2.0])
    x, fx, evals = compass_search(lambda v: float(np.abs(v - target).sum()), np.zeros(3),
                                  step=1.0, min_step=1e-6, max_evals=2000)
    assert np.allclose(x, target, atol=1e-5) and evals < 2000
    # y = a * exp(b * t): log-residuals in (log a, b), solved from far away.
    t = np.linspace(0.0, 2.0, 9)
    y = 3.0 * np.exp(-0.7 * t)
    residuals = lambda v: np.log(np.exp(v[0]) * np.exp(v[1] * t) / y)  # noqa: E731
    lo, hi = np.array([-10.0, -10.0]), np.array([10.0, 10.0])
    x, cost, _ = levenberg_marquardt(residuals, np.array([3.0, 2.0]), lo, hi, max_evals=200)
    assert np.allclose(x, [np.log(3.0), -0.7], atol=1e-6) and cost < 1e-12


def test_fit_predicts_through_the_shipped_fitted_estimator_as_the_cost_model_does():
    """The fit's cached predictor applies the table-backed estimator's whole-layer calibration
    exactly as ``CostModel`` does (it once skipped it, so fits optimised another model)."""
    import dartspar.cost.fitted  # noqa: F401  (registers "fitted")
    from dartspar.calibrate import _StepTimePredictor
    from dartspar.cost.latency import make_estimator

    estimator = make_estimator("fitted")
    profile = replace(gpt_like_profile(num_blocks=2, batch=4, seq=32, hidden=64, vocab=256, heads=4), dtype_bytes=4)
    cluster = load_cluster("cpu4")
    L = profile.num_layers
    plans = [Plan((stage(0, L, [0], 1, 1),), "1f1b", 2, 4),
             Plan((stage(0, 2, [0], 1, 1), stage(2, L, [1], 1, 1)), "gpipe", 4, 4),
             Plan((stage(0, L, [0, 1], 1, 2),), "1f1b", 1, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "scaled from": intended
        base = calibration_base(cluster, estimator)
        params = initial_params(base, ["fp32"]).with_values({"peak_scale.fp32": 1.7, "stage_overhead_s": 1e-3})
        fit_view = _StepTimePredictor(plans, profile, base, estimator, "fp32")(params)
        model_view = predict_step_times(plans, profile, apply_calibration(base, params), estimator)
    assert np.allclose(fit_view, model_view, rtol=1e-12)


def test_measurements_of_several_models_are_predicted_with_their_own_profiles(setup):
    profile, cluster, plans, truth, measurements, _ = setup
    wide = replace(gpt_like_profile(num_blocks=2, batch=4, seq=32, hidden=128, vocab=1024, heads=4), dtype_bytes=4)
    true_cluster = apply_calibration(cluster, truth)
    wide_times = predict_step_times(plans, wide, true_cluster)
    assert not np.allclose(wide_times, [m.step_time_s for m in measurements], rtol=0.05)
    mixed = measurements[:4] + [Measurement(p, float(t), {}, profile=wide) for p, t in zip(plans[4:], wide_times[4:])]
    # One profile per plan, or each measurement's own: the same predictions.
    per_plan = predict_step_times(plans, [profile] * 4 + [wide] * 4, true_cluster)
    assert np.allclose(per_plan[4:], wide_times[4:], rtol=1e-12)
    result = fit_calibration(mixed, profile, cluster, "roofline", starts=({}, {"memory_bandwidth_scale": 0.1}))
    assert result.after["step"]["mape"] < 1e-3
    with pytest.raises(ValueError, match="one ModelProfile per plan"):
        predict_step_times(plans, [profile] * 3, true_cluster)
