"""Calibration: fit the cost model's device and link figures to measured runs.

The catalogue's figures for a CPU host (or any device) are datasheet or rule-of-thumb numbers;
what a plan really costs on one machine also includes fixed per-pass and per-step overheads
(Python dispatch, the pipelining runtime, the optimizer). ``fit_calibration`` takes runs of
several plans (the executor's run reports) and fits, for the cluster's one device model and
its intra-node link:

- ``peak_scale.<dtype>``: factor on the device's peak FLOP/s in each compute dtype the cost
  model uses (it absorbs the latency estimator's efficiency as well);
- ``memory_bandwidth_scale``: factor on the device's memory bandwidth;
- ``intra_link_latency_s`` / ``intra_link_bandwidth_bytes_per_s``: the alpha-beta figures of
  the link between devices of a node (for CPU processes: gloo over loopback);
- ``stage_overhead_s`` / ``step_overhead_s``: the cost model's fixed overheads per stage,
  micro-batch and pass, and per step;
- ``recompute_overhead_s``: fixed seconds per recomputed layer and micro-batch (the checkpoint
  wrapper's bookkeeping, ~1.5 ms on a CPU core; fitted only when a plan recomputes),

by minimizing the mean absolute percentage error (MAPE) of the predicted step time, in
log-space (every parameter is positive and they span ten orders of magnitude), with searches
written here that use only predicted step times (the device and link figures are plain floats,
not tensors the cost model can differentiate): Levenberg-Marquardt on log(predicted /
measured), MAPE's smooth twin, with a forward-difference Jacobian, briefly from several starts
(the roofline's max(compute, memory) makes the landscape piecewise, with plateaus where a
bandwidth stops mattering) and then to convergence from the best; a compass (coordinate
pattern) search on the MAPE itself settles its kinks. (Nelder-Mead was tried first: on a
six-parameter synthetic case it used 1,600 evaluations and stalled at 1.2% MAPE; every
evaluation rebuilds the cost tables of every plan.) Predictions come from ``CostModel`` itself,
so the fitted figures mean exactly what the search will use. An estimator that answers for the
device from a measured kernel table of its own (``FittedEstimator``) ignores the cluster's
figures for it; the fit then scales a renamed copy of the table's device (``calibration_base``).

Memory: the cost model predicts the bytes the training state and activations need; a process
also holds its runtime (on CPU the Python interpreter, torch and gloo: ~450 MB of resident
set). ``fit_calibration`` fits that as one constant, ``memory_baseline_bytes`` (the weighted
median of measured - predicted peak, which minimizes the MAPE of predicted + baseline), and
reports the error before and after. ``predict_peak_bytes`` adds it to the cost model's figure
until ``CostModel`` reads it from the cluster's calibration itself.

``write_cluster_profile`` writes the calibrated cluster as a cluster YAML (the schema of
``conf/cluster/*.yaml``) with a ``calibration:`` section holding the overheads, the memory
baseline, the fitted factors and the fit's quality, date, host and versions.
"""

from __future__ import annotations

import datetime
import math
import platform
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml

from .cluster import Cluster, Link, Node
from .cost.latency import LatencyEstimator, make_estimator
from .cost.model import CostModel, relaxed_cost
from .plan import Plan
from .profile import ModelProfile

__all__ = [
    "CalibrationParams",
    "CalibrationResult",
    "DEFAULT_STARTS",
    "initial_params",
    "calibration_base",
    "Measurement",
    "measurement_from_report",
    "fit_calibration",
    "apply_calibration",
    "assess_predictions",
    "predict_step_times",
    "predict_peak_bytes",
    "fit_memory_baseline",
    "mape",
    "kendall_tau",
    "write_cluster_profile",
    "levenberg_marquardt",
    "compass_search",
]

# Log-space box of every parameter: wide enough for any host or GPU, tight enough that a
# parameter no plan constrains cannot run off to inf. Overheads of 1e-9 s mean "none".
_BOUNDS = {
    "peak_scale": (1e-4, 1e4),
    "memory_bandwidth_scale": (1e-4, 1e4),
    "intra_link_latency_s": (1e-8, 1.0),
    "intra_link_bandwidth_bytes_per_s": (1e5, 1e14),
    "stage_overhead_s": (1e-9, 10.0),
    "step_overhead_s": (1e-9, 100.0),
    "recompute_overhead_s": (1e-9, 10.0),
}
# Starting points of the search, as factors on the initial device figures: the catalogue's CPU
# entry can be an order of magnitude off a busy host, and the search must not start on the
# wrong side of the roofline's ridge only.
DEFAULT_STARTS = (
    {},
    {"peak_scale": 0.1},
    {"memory_bandwidth_scale": 0.1},
    {"peak_scale": 0.1, "memory_bandwidth_scale": 0.1},
    {"memory_bandwidth_scale": 0.01},
    {"peak_scale": 0.1, "memory_bandwidth_scale": 0.01},
)
# Starting overheads when the cluster has no calibration: the log-space search cannot start
# at 0; these are below anything a CPU run measures and far above GPU launch latencies.
_START_OVERHEAD_S = {"stage_overhead_s": 1e-4, "step_overhead_s": 1e-3, "recompute_overhead_s": 1e-4}
_OVERHEADS = tuple(_START_OVERHEAD_S)


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class CalibrationParams:
    """The fitted quantities (see module doc). ``peak_scale`` maps dtype -> factor."""

    peak_scale: dict
    memory_bandwidth_scale: float
    intra_link_latency_s: float
    intra_link_bandwidth_bytes_per_s: float
    stage_overhead_s: float
    step_overhead_s: float
    recompute_overhead_s: float

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: value}``, dtype peaks as ``peak_scale.<dtype>`` (the fit's names)."""
        out = {f"peak_scale.{d}": float(v) for d, v in sorted(self.peak_scale.items())}
        for name in ("memory_bandwidth_scale", "intra_link_latency_s",
                     "intra_link_bandwidth_bytes_per_s", *_OVERHEADS):
            out[name] = float(getattr(self, name))
        return out

    def with_values(self, values: Mapping[str, float]) -> "CalibrationParams":
        """A copy with the named flat values (``as_dict`` names) replaced."""
        peaks = dict(self.peak_scale)
        fields_: dict[str, float] = {}
        for name, value in values.items():
            if name.startswith("peak_scale."):
                dtype = name.split(".", 1)[1]
                if dtype not in peaks:
                    raise ValueError(f"parameter {name!r}: dtype {dtype!r} is not fitted (fitted: {sorted(peaks)})")
                peaks[dtype] = float(value)
            elif name in _BOUNDS and name != "peak_scale":
                fields_[name] = float(value)
            else:
                raise ValueError(f"unknown calibration parameter {name!r}; known: {list(self.as_dict())}")
        return replace(self, peak_scale=peaks, **fields_)

    @staticmethod
    def bounds(name: str) -> tuple[float, float]:
        return _BOUNDS["peak_scale" if name.startswith("peak_scale.") else name]


def _single_device_and_link(cluster: Cluster):
    devices = cluster.device_types
    if len(devices) != 1:
        raise ValueError(
            f"cluster {cluster.name!r} has device models {[d.name for d in devices]}: calibration "
            "fits one device model; calibrate each model on a cluster of its own"
        )
    links = {node.intra_link for node in cluster.nodes}
    if len(links) != 1:
        raise ValueError(
            f"cluster {cluster.name!r} has intra-node links {sorted(l.kind for l in links)}: "
            "calibration fits one intra-node link; use one link kind for every node"
        )
    return devices[0], next(iter(links))


def initial_params(cluster: Cluster, dtypes: Sequence[str]) -> CalibrationParams:
    """Scales 1, the cluster's link figures, and its calibrated overheads (when positive: the
    log-space search cannot start at 0; else small ones)."""
    _, link = _single_device_and_link(cluster)
    calibration = getattr(cluster, "calibration", None) or {}
    overheads = {
        k: float(calibration[k]) if calibration.get(k, 0) > 0 else v for k, v in _START_OVERHEAD_S.items()
    }
    return CalibrationParams(
        peak_scale={d: 1.0 for d in dtypes},
        memory_bandwidth_scale=1.0,
        intra_link_latency_s=max(link.latency_s, _BOUNDS["intra_link_latency_s"][0]),
        intra_link_bandwidth_bytes_per_s=link.bandwidth_bytes_per_s,
        **overheads,
    )


def apply_calibration(
    cluster: Cluster, params: CalibrationParams, name: str | None = None,
    memory_baseline_bytes: float | None = None,
) -> Cluster:
    """``cluster`` with its device's peaks and bandwidth scaled, its intra-node link replaced and
    ``calibration`` = the overheads (and ``memory_baseline_bytes`` when given).

    The device keeps its name (a calibrated entry overrides the catalogue's in the YAML); the
    inter-node link is left as is: measurements on one host never cross it.
    """
    device, link = _single_device_and_link(cluster)
    missing = sorted(set(params.peak_scale) - set(device.peak_flops_per_s))
    if missing:
        raise ValueError(
            f"calibration scales dtypes {missing} that device {device.name!r} has no peak for "
            f"(it has {sorted(device.peak_flops_per_s)})"
        )
    peaks = {
        dtype: rate * params.peak_scale.get(dtype, 1.0) for dtype, rate in device.peak_flops_per_s.items()
    }
    new_device = replace(
        device,
        peak_flops_per_s=peaks,
        memory_bandwidth_bytes_per_s=device.memory_bandwidth_bytes_per_s * params.memory_bandwidth_scale,
    )
    new_link = Link(link.kind, params.intra_link_latency_s, params.intra_link_bandwidth_bytes_per_s)
    nodes = tuple(Node(n.name, new_device, n.num_devices, new_link) for n in cluster.nodes)
    calibration = {name: float(getattr(params, name)) for name in _OVERHEADS}
    if memory_baseline_bytes is not None:
        calibration["memory_baseline_bytes"] = float(memory_baseline_bytes)
    return Cluster(name=name or cluster.name, nodes=nodes, inter_link=cluster.inter_link,
                   calibration=calibration)


def calibration_base(cluster: Cluster, estimator: LatencyEstimator | str) -> Cluster:
    """The cluster whose device figures a fit for ``estimator`` scales.

    ``cluster`` itself, except when the estimator answers for the cluster's device from a
    measured kernel table of its own (``FittedEstimator``): it then ignores the cluster's
    figures for that device, so scaling them would change nothing. The base is then a device
    named ``<name>-calibrated`` with the table's measured figures (and the cluster's memory
    size), which the estimator treats as a device scaled from that table: factors of 1 predict
    exactly what the table does, and the fitted factors scale it.
    """
    est = _estimator(estimator)
    device, _ = _single_device_and_link(cluster)
    is_extrapolated = getattr(est, "is_extrapolated", None)
    table_spec = getattr(est, "device_spec", None)
    if is_extrapolated is None or table_spec is None or is_extrapolated(device):
        return cluster
    measured = table_spec(device.name)
    rebased = replace(
        device,
        name=f"{device.name}-calibrated",
        peak_flops_per_s={**device.peak_flops_per_s, **measured.peak_flops_per_s},
        memory_bandwidth_bytes_per_s=measured.memory_bandwidth_bytes_per_s,
    )
    nodes = tuple(Node(n.name, rebased, n.num_devices, n.intra_link) for n in cluster.nodes)
    return Cluster(cluster.name, nodes, cluster.inter_link, calibration=dict(cluster.calibration))


def _bounds(name: str, estimator: LatencyEstimator) -> tuple[float, float]:
    lo, hi = CalibrationParams.bounds(name)
    max_scale = getattr(estimator, "max_scale", None)
    if max_scale and (name.startswith("peak_scale.") or name == "memory_bandwidth_scale"):
        # A table-backed estimator refuses devices more than max_scale away from its table.
        lo, hi = max(lo, 1.0001 / max_scale), min(hi, max_scale / 1.0001)
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class Measurement:
    """What a run measured for ``plan``: the step time (s) and each rank's peak memory (bytes).

    Rank r ran the plan's device id r (the executor's layout). ``profile``: the model the plan
    ran, when the measurements span several models (None: the profile the caller passes)."""

    plan: Plan
    step_time_s: float
    peak_bytes_per_rank: dict
    profile: ModelProfile | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.step_time_s, (int, float)) and math.isfinite(self.step_time_s)
                and self.step_time_s > 0):
            raise ValueError(f"Measurement.step_time_s={self.step_time_s!r} must be a positive number of seconds")
        devices = set(self.plan.device_ids)
        for rank, peak in self.peak_bytes_per_rank.items():
            if rank not in devices:
                raise ValueError(
                    f"Measurement.peak_bytes_per_rank has rank {rank}, but the plan uses devices "
                    f"{sorted(devices)}: rank r must be the plan's device id r"
                )
            if not (math.isfinite(peak) and peak > 0):
                raise ValueError(f"Measurement.peak_bytes_per_rank[{rank}]={peak!r} must be positive")


def measurement_from_report(plan: Plan, report: Any, step_time_s: float | None = None) -> Measurement:
    """A ``Measurement`` from a run report (``RunReport`` or its JSON dict).

    Uses ``step_time_s`` (the median over post-warm-up steps of the slowest rank's step) unless
    ``step_time_s`` is given, and every rank's ``peak_memory_bytes``.
    """
    data = report.__dict__ if hasattr(report, "__dataclass_fields__") else report
    if not isinstance(data, Mapping):
        raise ValueError(f"report must be a RunReport or its dict, got {type(report).__name__}")
    for key in ("step_time_s", "ranks"):
        if key not in data:
            raise ValueError(f"run report has no {key!r} field: is it a dartspar RunReport?")
    peaks = {}
    for i, rank in enumerate(data["ranks"]):
        rank = rank if isinstance(rank, Mapping) else rank.__dict__
        if "rank" not in rank or "peak_memory_bytes" not in rank:
            raise ValueError(f"run report ranks[{i}] lacks 'rank' or 'peak_memory_bytes'")
        peaks[int(rank["rank"])] = float(rank["peak_memory_bytes"])
    step = float(data["step_time_s"] if step_time_s is None else step_time_s)
    return Measurement(plan=plan, step_time_s=step, peak_bytes_per_rank=peaks)


# ---------------------------------------------------------------------------------------------
# Figures of merit


def mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """Mean absolute percentage error, as a fraction: mean(|p - m| / m)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.size == 0:
        raise ValueError(f"mape needs equal, non-empty shapes, got {p.shape} and {m.shape}")
    return float(np.mean(np.abs(p - m) / m))


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b rank correlation of ``x`` and ``y`` (ties counted as neither)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"kendall_tau needs two 1-D sequences of equal length >= 2, got {a.shape}, {b.shape}")
    i, j = np.triu_indices(a.size, k=1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    concordance = float(np.sum(da * db))
    untied_a, untied_b = float(np.sum(da != 0)), float(np.sum(db != 0))
    if untied_a == 0 or untied_b == 0:
        return float("nan")
    return concordance / math.sqrt(untied_a * untied_b)


def _step_figures(predicted: np.ndarray, measured: np.ndarray) -> dict:
    ape = np.abs(predicted - measured) / measured
    return {
        "mape": float(ape.mean()),
        "max_ape": float(ape.max()),
        "kendall_tau": kendall_tau(predicted, measured) if len(measured) > 1 else float("nan"),
        "predicted_s": [float(v) for v in predicted],
        "measured_s": [float(v) for v in measured],
    }


# ---------------------------------------------------------------------------------------------
# Predictions


def _estimator(estimator: LatencyEstimator | str) -> LatencyEstimator:
    return make_estimator(estimator) if isinstance(estimator, str) else estimator


class _MemoEstimator:
    """A latency estimator that remembers its answers, keyed by the call's values.

    The search rebuilds the cost tables of every plan at every point, but most of its moves
    change a link or an overhead and leave the device alone: the estimator's answers repeat.
    (The fitted estimator costs ~1 ms per call on a CPU; the cache makes it as cheap as the
    roofline.) Exact: the key holds every input bit for bit.
    """

    def __init__(self, inner: LatencyEstimator) -> None:
        self.inner = inner
        self.name = inner.name
        self._cache: dict = {}
        if getattr(inner, "layer_time_s", None) is not None:
            # compute_tables applies a table-backed estimator's whole-layer calibration when
            # the estimator has one: so must this wrapper, or the fit would see other tables
            # than the cost model it calibrates.
            self.layer_time_s = self._layer_time_s

    def _layer_time_s(self, kernels_s, gemm_calls, device, backward):
        key = ("layer", self._tensor_key(kernels_s), gemm_calls, self._device_key(device), backward)
        return self._remember(key, lambda: self.inner.layer_time_s(kernels_s, gemm_calls, device, backward=backward))

    @staticmethod
    def _device_key(device) -> tuple:
        return (device.name, tuple(sorted(device.peak_flops_per_s.items())),
                device.memory_bandwidth_bytes_per_s, device.memory_bytes)

    @staticmethod
    def _tensor_key(value) -> tuple:
        t = torch.as_tensor(value, dtype=torch.float64)
        return tuple(t.shape), t.numpy().tobytes()

    def _remember(self, key, compute):
        if key not in self._cache:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key] = compute()
        return self._cache[key]

    def gemm_time_s(self, m, n, k, batch, dtype, device):
        key = ("gemm", *(self._tensor_key(v) for v in (m, n, k, batch)), dtype, self._device_key(device))
        return self._remember(key, lambda: self.inner.gemm_time_s(m, n, k, batch, dtype, device)).clone()

    def memory_time_s(self, num_bytes, device):
        key = ("memory", self._tensor_key(num_bytes), self._device_key(device))
        return self._remember(key, lambda: self.inner.memory_time_s(num_bytes, device)).clone()


def _memory_baseline_in_model(cm: CostModel) -> bool:
    # Once CostModel adds the runtime baseline itself (``CostModel.memory_baseline_bytes``, read
    # from the cluster's calibration), it must not be added here a second time.
    return hasattr(cm, "memory_baseline_bytes")


def _per_plan_profiles(plans: Sequence[Plan], profile) -> list[ModelProfile]:
    """``profile`` (one ModelProfile for every plan, or a sequence with one per plan) as a list."""
    if isinstance(profile, ModelProfile):
        return [profile] * len(plans)
    profiles = list(profile)
    if len(profiles) != len(plans) or not all(isinstance(p, ModelProfile) for p in profiles):
        raise ValueError(
            f"profile must be a ModelProfile or one ModelProfile per plan ({len(plans)} plans), "
            f"got {len(profiles)} entries"
        )
    return profiles


def _cost_models(plans: Sequence[Plan], profile, cluster: Cluster, **options) -> list[CostModel]:
    """One CostModel per plan, shared by the plans of one profile (its tables are cached)."""
    models: dict[int, CostModel] = {}
    out = []
    for prof in _per_plan_profiles(plans, profile):
        if id(prof) not in models:
            models[id(prof)] = CostModel(prof, cluster, **options)
        out.append(models[id(prof)])
    return out


def predict_step_times(
    plans: Sequence[Plan], profile: ModelProfile | Sequence[ModelProfile], cluster: Cluster,
    estimator: LatencyEstimator | str = "roofline", compute_dtype: str | None = None,
) -> np.ndarray:
    """``CostModel(profile, cluster, estimator).evaluate(plan).step_time_s`` of every plan, in
    seconds (the cluster's calibrated overheads included). ``profile``: one for every plan, or
    one per plan."""
    models = _cost_models(plans, profile, cluster, estimator=_estimator(estimator), compute_dtype=compute_dtype)
    return np.array([cm.evaluate(p).step_time_s for cm, p in zip(models, plans)])


def predict_peak_bytes(
    plans: Sequence[Plan], profile: ModelProfile | Sequence[ModelProfile], cluster: Cluster,
    estimator: LatencyEstimator | str = "roofline", compute_dtype: str | None = None,
) -> list[dict[int, float]]:
    """Per plan, the predicted peak bytes of every device id: the cost model's figure plus the
    cluster's ``calibration["memory_baseline_bytes"]`` (the runtime's own footprint).
    ``profile``: one for every plan, or one per plan."""
    models = _cost_models(plans, profile, cluster, estimator=_estimator(estimator), compute_dtype=compute_dtype)
    baseline = 0.0 if _memory_baseline_in_model(models[0]) else float(
        (cluster.calibration or {}).get("memory_baseline_bytes", 0.0))
    return [{d: b + baseline for d, b in cm.evaluate(p).peak_bytes_per_device.items()}
            for cm, p in zip(models, plans)]


class _StepTimePredictor:
    """Step times of fixed plans as a function of ``CalibrationParams``, through ``CostModel``
    on ``apply_calibration(cluster, params)`` (equal to ``predict_step_times`` there).

    The cost tables depend on the device and link figures only, not on the overheads, so the
    one-hot plans and their tables are cached per hardware key and reused when only the
    overheads change.
    """

    def __init__(self, plans: Sequence[Plan], profile: ModelProfile | Sequence[ModelProfile], cluster: Cluster,
                 estimator: LatencyEstimator, compute_dtype: str | None) -> None:
        self.plans = list(plans)
        self.profile, self.cluster = profile, cluster
        self.estimator = _MemoEstimator(estimator)
        self.compute_dtype = compute_dtype
        self._cache: dict[tuple, list] = {}
        self.table_builds = 0

    def _one_hots(self, params: CalibrationParams) -> list:
        # The recompute overhead lives in the tables (the other overheads are added below).
        key = (tuple(sorted(params.peak_scale.items())), params.memory_bandwidth_scale,
               params.intra_link_latency_s, params.intra_link_bandwidth_bytes_per_s,
               params.recompute_overhead_s)
        if key not in self._cache:
            if len(self._cache) > 64:  # the search revisits only its latest points
                self._cache.pop(next(iter(self._cache)))
            models = _cost_models(self.plans, self.profile, apply_calibration(self.cluster, params),
                                  estimator=self.estimator, compute_dtype=self.compute_dtype,
                                  stage_overhead_s=0.0, step_overhead_s=0.0,
                                  recompute_overhead_s=params.recompute_overhead_s)
            with warnings.catch_warnings():
                # A table-backed estimator warns that the calibrated device is scaled from its
                # table: that is the point here (see ``calibration_base``).
                warnings.simplefilter("ignore", UserWarning)
                self._cache[key] = [cm.one_hot(plan) for cm, plan in zip(models, self.plans)]
            self.table_builds += 1
        return self._cache[key]

    def __call__(self, params: CalibrationParams) -> np.ndarray:
        out = np.empty(len(self.plans))
        for i, (soft, tables) in enumerate(self._one_hots(params)):
            cost = relaxed_cost(soft, tables, None, params.stage_overhead_s, params.step_overhead_s)
            out[i] = float(cost.step_time_s)
        return out


def _memory_pairs(measurements: Sequence[Measurement], predicted: Sequence[Mapping[int, float]]):
    pred, meas, where = [], [], []
    for k, (m, peaks) in enumerate(zip(measurements, predicted)):
        for rank, measured in sorted(m.peak_bytes_per_rank.items()):
            pred.append(float(peaks[rank]))
            meas.append(float(measured))
            where.append((k, rank))
    return np.array(pred), np.array(meas), where


def fit_memory_baseline(predicted: Sequence[float], measured: Sequence[float]) -> float:
    """The constant b minimizing mean(|predicted + b - measured| / measured): the median of
    (measured - predicted) weighted by 1 / measured (the exact minimizer of that weighted L1)."""
    p, m = np.asarray(predicted, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    if p.shape != m.shape or p.size == 0:
        raise ValueError(f"fit_memory_baseline needs equal, non-empty shapes, got {p.shape}, {m.shape}")
    gap, weight = m - p, 1.0 / m
    order = np.argsort(gap, kind="stable")
    cumulative = np.cumsum(weight[order])
    return float(gap[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


def _memory_figures(pred: np.ndarray, meas: np.ndarray, baseline: float) -> dict:
    ape = np.abs(pred - meas) / meas
    model_pred = pred - baseline
    return {
        "mape": float(ape.mean()),
        "max_ape": float(ape.max()),
        "median_abs_error_bytes": float(np.median(np.abs(pred - meas))),
        # The bytes above the runtime baseline against what the cost model predicts for them
        # (1 = exact): the memory model's own error, which the baseline would otherwise hide.
        "median_measured_over_predicted_above_baseline": (
            float(np.median((meas - baseline) / model_pred)) if np.all(model_pred > 0) else float("nan")
        ),
        "predicted_bytes": [float(v) for v in pred],
        "measured_bytes": [float(v) for v in meas],
    }


def assess_predictions(
    measurements: Sequence[Measurement], profile: ModelProfile, cluster: Cluster,
    estimator: LatencyEstimator | str = "roofline", compute_dtype: str | None = None,
) -> dict:
    """How well the cost model on ``cluster`` (with its calibration, if any) predicts
    ``measurements``: step time (mape, max_ape, kendall_tau, per plan) and per-rank peak memory
    (mape, max_ape, per rank; ``plan_rank`` lists (measurement index, rank) of each entry)."""
    if not measurements:
        raise ValueError("assess_predictions needs at least one measurement")
    est = _estimator(estimator)
    plans = [m.plan for m in measurements]
    profiles = [m.profile or profile for m in measurements]
    measured = np.array([m.step_time_s for m in measurements])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        step = _step_figures(predict_step_times(plans, profiles, cluster, est, compute_dtype), measured)
        peaks = predict_peak_bytes(plans, profiles, cluster, est, compute_dtype)
    pred, meas, where = _memory_pairs(measurements, peaks)
    baseline = float((cluster.calibration or {}).get("memory_baseline_bytes", 0.0))
    memory = _memory_figures(pred, meas, baseline) if len(meas) else {}
    memory["baseline_bytes"] = baseline
    memory["plan_rank"] = [list(w) for w in where]
    return {"num_plans": len(measurements), "step": step, "memory": memory}


# ---------------------------------------------------------------------------------------------
# Derivative-free minimizers (log-space callers; no bounds: the objective clips)


def compass_search(
    f: Callable[[np.ndarray], float], x0: np.ndarray, step: float, min_step: float,
    max_evals: int, f0: float | None = None,
) -> tuple[np.ndarray, float, int]:
    """Coordinate (compass) search: try x +- step along each axis, move to the first
    improvement, halve the step when no axis improves; stop below ``min_step``.

    Returns (x, f(x), evaluations)."""
    x = np.array(x0, dtype=np.float64)
    fx = f(x) if f0 is None else f0
    evals = 0 if f0 is not None else 1
    while step >= min_step and evals < max_evals:
        improved = False
        for i in range(x.size):
            for sign in (1.0, -1.0):
                trial = x.copy()
                trial[i] += sign * step
                ft = f(trial)
                evals += 1
                if ft < fx:
                    x, fx, improved = trial, ft, True
                    break
            if evals >= max_evals:
                break
        if not improved:
            step /= 2
    return x, fx, evals


def levenberg_marquardt(
    residuals: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, lo: np.ndarray, hi: np.ndarray,
    max_evals: int, diff_step: float = 1e-3, max_step: float = 1.0, tol: float = 1e-12,
) -> tuple[np.ndarray, float, int]:
    """Minimize ``sum(residuals(x) ** 2)`` over the box [lo, hi] by Levenberg-Marquardt with a
    forward-difference Jacobian (only values of ``residuals`` are used: the cost model's
    figures are not differentiable in the device and link specs, which are plain floats).

    Marquardt's scaling (damping proportional to diag(J^T J), plus a small ridge) makes the step
    independent of the parameters' units; no coordinate moves more than ``max_step`` per
    iteration, which keeps a parameter with almost no curvature (a bandwidth whose transfers
    are hidden behind compute) from leaping onto a plateau. Steps are clipped to the box;
    differences at an upper bound are taken backwards. Stops when a step lowers the cost by
    less than ``tol`` (relative), the cost is below ``tol``, or after ``max_evals`` evaluations.

    Returns (x, cost, evaluations)."""
    x = np.clip(np.array(x0, dtype=np.float64), lo, hi)
    r = residuals(x)
    cost = float(r @ r)
    evals, damping = 1, 1e-3
    while evals + x.size < max_evals and cost > tol:
        jac = np.empty((r.size, x.size))
        for i in range(x.size):
            h = diff_step if x[i] + diff_step <= hi[i] else -diff_step
            shifted = x.copy()
            shifted[i] += h
            jac[:, i] = (residuals(shifted) - r) / h
        evals += x.size
        gram, grad = jac.T @ jac, jac.T @ r
        diag = np.diag(gram)
        scale = diag + 1e-6 * max(float(diag.max()), 1e-300)
        improved = False
        while evals < max_evals and damping < 1e12:
            step = np.linalg.solve(gram + damping * np.diag(scale), -grad)
            longest = float(np.max(np.abs(step)))
            if longest > max_step:
                step *= max_step / longest
            trial = np.clip(x + step, lo, hi)
            r_trial = residuals(trial)
            evals += 1
            cost_trial = float(r_trial @ r_trial)
            if cost_trial < cost:
                improved = (cost - cost_trial) > tol * cost
                x, r, cost = trial, r_trial, cost_trial
                damping = max(damping / 3.0, 1e-9)
                break
            damping *= 4.0
        if not improved:
            break
    return x, cost, evals


# ---------------------------------------------------------------------------------------------
# The fit


@dataclass(frozen=True)
class CalibrationResult:
    """What ``fit_calibration`` found.

    Attributes:
        cluster: the calibrated cluster: device peaks and bandwidth scaled, intra-node link
            refitted, ``calibration`` = overheads and memory baseline (the device is renamed
            ``<name>-calibrated`` when the estimator has a kernel table for it: see
            ``calibration_base``).
        base_cluster: name of the cluster that was calibrated.
        estimator: the latency estimator's name.
        compute_dtype: the dtype the cost model computed in.
        initial / params: the search's starting point and the fitted parameters.
        free: names of the parameters that were fitted; the others kept their initial values.
        not_exercised: parameters left out because no measured plan depends on them.
        memory_baseline_bytes: bytes the cost model should add to every device's predicted peak
            (the runtime's own footprint), also in ``cluster.calibration``.
        before / after: ``assess_predictions`` of the cluster as given and of the calibrated
            one, on the fitted measurements.
        sensitivity: for each fitted parameter, the MAPE with it x1.1 and /1.1 minus the fitted
            MAPE (~0 means the measurements do not determine it).
        at_bound: fitted parameters that ended on their search bound.
        evaluations: objective evaluations (and of those, cost-table rebuilds).
    """

    cluster: Cluster
    base_cluster: str
    estimator: str
    compute_dtype: str
    initial: CalibrationParams
    params: CalibrationParams
    free: tuple[str, ...]
    not_exercised: tuple[str, ...]
    memory_baseline_bytes: float
    before: dict
    after: dict
    sensitivity: dict
    at_bound: tuple[str, ...]
    evaluations: dict = field(default_factory=dict)

    @property
    def calibration(self) -> dict:
        """The ``calibration:`` figures the cost model reads (overheads, memory baseline)."""
        return dict(self.cluster.calibration)

    def summary(self) -> str:
        """A few lines: the parameters and the fit's quality before and after."""
        lines = [f"calibration of {self.base_cluster!r} with estimator {self.estimator!r} ({self.compute_dtype}):"]
        initial = self.initial.as_dict()
        for name, value in self.params.as_dict().items():
            tag = "fitted" if name in self.free else "fixed"
            lines.append(f"  {name:34s} {initial[name]:12.4g} -> {value:12.4g}  ({tag})")
        lines.append(f"  memory_baseline_bytes              {self.memory_baseline_bytes:12.4g}")
        for label, figures in (("before", self.before), ("after", self.after)):
            s, m = figures["step"], figures["memory"]
            lines.append(
                f"  {label:6s}: step MAPE {100 * s['mape']:.1f}% (max {100 * s['max_ape']:.1f}%), "
                f"Kendall tau {s['kendall_tau']:.3f}; memory MAPE {100 * m.get('mape', float('nan')):.1f}%"
            )
        return "\n".join(lines)


def _exercised(name: str, plans: Sequence[Plan]) -> bool:
    """Whether any plan's predicted time depends on parameter ``name`` structurally."""
    if name in ("intra_link_latency_s", "intra_link_bandwidth_bytes_per_s"):
        return any(p.num_stages > 1 or any(s.dp > 1 or s.tp > 1 for s in p.stages) for p in plans)
    if name == "recompute_overhead_s":
        return any(any(s.recompute) for p in plans for s in p.stages)
    return True


def fit_calibration(
    measurements: Sequence[Measurement | tuple[Plan, Any]],
    profile: ModelProfile,
    cluster: Cluster,
    estimator: LatencyEstimator | str = "roofline",
    *,
    initial: CalibrationParams | None = None,
    free: Sequence[str] | None = None,
    compute_dtype: str | None = None,
    starts: Sequence[Mapping[str, float]] | None = None,
    explore_evals: int = 40,
    max_evals: int = 800,
    prior_weight: float = 1e-3,
    min_step: float = 1e-3,
) -> CalibrationResult:
    """Fit the device and link figures and the overheads to measured step times; fit the
    memory baseline to measured per-rank peaks (see the module doc).

    Args:
        measurements: ``Measurement``s, or (plan, run report) pairs (``RunReport`` or its dict,
            read by ``measurement_from_report``). Every plan must validate against ``profile``
            and ``cluster``.
        profile: the model's profile, for measurements without one of their own
            (``Measurement.profile``); its ``dtype_bytes`` must match what ran (4 for fp32).
            Measurements of several models (different widths) separate compute, memory-bound
            work and fixed overheads, which the plans of one model leave nearly collinear.
        cluster: the cluster the plans ran on, with one device model and one intra-node link.
        estimator: latency estimator (name or instance) the cost model uses; the fitted figures
            are specific to it.
        initial: starting point (default ``initial_params(calibration_base(cluster, estimator),
            [compute dtype])``).
        free: parameter names (``CalibrationParams.as_dict`` names) to fit; default every one
            the measurements exercise (link figures need a plan with more than one device).
        compute_dtype: the cost model's compute dtype (default: ``CostModel.dtype_for``).
        starts: starting points as factors on ``initial`` ({parameter name or "peak_scale":
            factor}); default ``DEFAULT_STARTS``. Each gets ``explore_evals`` evaluations of
            least squares; the best is continued.
        explore_evals: evaluations per starting point.
        max_evals: evaluation budget of the rest of the search (continued least squares, then
            compass search; the compass search always gets at least 30 per parameter).
        prior_weight: weight of the pull towards the start: mean |log(value / start)| added to
            the MAPE (its square, squared, to the least squares). A parameter moves only as far as
            each e-fold buys more than prior_weight / (number of free parameters) of MAPE.
        min_step: the compass search stops below this step in log space (1e-3: 0.1%).

    Raises:
        ValueError: no measurements, a bad measurement, a parameter in ``free`` that is unknown,
            or one that changes no prediction (naming it and why).
    """
    if not measurements:
        raise ValueError("fit_calibration needs at least one measurement")
    data = [m if isinstance(m, Measurement) else measurement_from_report(*m) for m in measurements]
    est = _estimator(estimator)
    base_cluster = calibration_base(cluster, est)
    device, _ = _single_device_and_link(base_cluster)
    plans = [m.plan for m in data]
    profiles = [m.profile or profile for m in data]
    dtype = compute_dtype or CostModel(profiles[0], base_cluster, est).dtype_for(device)
    start = initial or initial_params(base_cluster, [dtype])
    measured = np.array([m.step_time_s for m in data])
    names = list(start.as_dict())
    if free is None:
        free_names = [n for n in names if _exercised(n, plans)]
    else:
        unknown = sorted(set(free) - set(names))
        if unknown:
            raise ValueError(f"fit_calibration free={list(free)}: unknown parameters {unknown}; known: {names}")
        free_names = [n for n in names if n in free]
    not_exercised = tuple(n for n in names if n not in free_names and free is None)
    if not free_names:
        raise ValueError("fit_calibration: nothing to fit (free is empty)")

    predictor = _StepTimePredictor(plans, profiles, base_cluster, est, dtype)
    lo = np.log([_bounds(n, est)[0] for n in free_names])
    hi = np.log([_bounds(n, est)[1] for n in free_names])
    start_values = start.as_dict()
    x0 = np.clip(np.log([start_values[n] for n in free_names]), lo, hi)

    def params_at(x: np.ndarray) -> CalibrationParams:
        return start.with_values(dict(zip(free_names, np.exp(np.clip(x, lo, hi)))))

    evaluations = 0

    def predicted(x: np.ndarray) -> np.ndarray:
        nonlocal evaluations
        evaluations += 1
        return predictor(params_at(x))

    def prior_l1(x: np.ndarray) -> float:
        # A pull towards the start keeps parameters the measurements barely constrain (e.g. the
        # peak when every kernel of the plans is memory-bound, or peak and bandwidth when all
        # plans share one model shape) at their prior instead of letting them drift along flat
        # directions; under L1 it does not bias a parameter whose MAPE slope exceeds
        # prior_weight / len(free_names) per e-fold.
        return prior_weight * float(np.mean(np.abs(x - x0)))

    def log_residuals(x: np.ndarray) -> np.ndarray:
        # log(predicted / measured): MAPE's smooth twin (equal to first order near a good fit),
        # plus the prior as residuals of its own, squared like them: prior_weight ** 2 keeps
        # flat directions from running off without pulling on those the data determine.
        prior = prior_weight / math.sqrt(len(x)) * (x - x0)
        return np.concatenate([np.log(predicted(x) / measured), prior])

    def objective(x: np.ndarray) -> float:
        return mape(predicted(x), measured) + prior_l1(x)

    # A parameter that moves no prediction cannot be fitted: say which and stop. (Probed a
    # factor 100 either way: a peak may not matter where everything is memory-bound.)
    base = predictor(params_at(x0))
    for i, name in enumerate(free_names):
        moved = False
        for shift in (math.log(100.0), -math.log(100.0)):
            probe = x0.copy()
            probe[i] += shift
            moved = moved or not np.allclose(predictor(params_at(probe)), base, rtol=1e-9, atol=0.0)
        if not moved:
            raise ValueError(
                f"calibration parameter {name!r} changes no predicted step time of the {len(plans)} "
                f"plans with estimator {est.name!r} (probed x100 and /100): no plan exercises it "
                "(link figures need plans with several devices); leave it out of `free`"
            )

    # The roofline's max(compute, memory) makes the landscape piecewise: from some starts the
    # least squares settles where a bandwidth no longer matters. So: a short run from each of
    # several starts (device factors over two decades), the best run to convergence, then a
    # compass search on the MAPE itself, whose axis moves cope with its kinks.
    starting_points = []
    for factors in (starts if starts is not None else DEFAULT_STARTS):
        x_start = x0.copy()
        for name, factor in factors.items():
            matched = [i for i, n in enumerate(free_names) if n == name or n.startswith(name + ".")]
            if not matched and not any(n == name or n.startswith(name + ".") for n in names):
                raise ValueError(f"fit_calibration starts: unknown parameter {name!r}; known: {names}")
            for i in matched:
                x_start[i] = np.clip(x_start[i] + math.log(factor), lo[i], hi[i])
        starting_points.append(x_start)
    used = 0
    runs = []
    for x_start in starting_points:
        x_run, cost, spent = levenberg_marquardt(log_residuals, x_start, lo, hi, max_evals=explore_evals)
        used += spent
        runs.append((cost, x_run))
    _, x = min(runs, key=lambda run: run[0])
    x, _, spent = levenberg_marquardt(log_residuals, x, lo, hi, max_evals=max(max_evals - used, 1))
    used += spent
    fx = objective(x)
    x, fx, _ = compass_search(objective, x, step=math.log(2.0), min_step=min_step,
                              max_evals=max(max_evals - used, 30 * len(free_names)), f0=fx)

    def step_mape(x: np.ndarray) -> float:
        return mape(predicted(x), measured)

    fitted = params_at(x)
    fitted_mape = step_mape(x)
    sensitivity = {}
    for i, name in enumerate(free_names):
        up, down = x.copy(), x.copy()
        up[i] += math.log(1.1)
        down[i] -= math.log(1.1)
        sensitivity[name] = {"x1.1": step_mape(up) - fitted_mape, "/1.1": step_mape(down) - fitted_mape}
    at_bound = tuple(n for i, n in enumerate(free_names) if x[i] <= lo[i] + 1e-9 or x[i] >= hi[i] - 1e-9)

    # The cost model's own bytes (no baseline in the calibration yet) against the measured peaks.
    model_only = apply_calibration(base_cluster, fitted)
    pred_mem, meas_mem, _ = _memory_pairs(data, predict_peak_bytes(plans, profiles, model_only, est, dtype))
    baseline = fit_memory_baseline(pred_mem, meas_mem) if len(meas_mem) else 0.0
    calibrated = apply_calibration(base_cluster, fitted, f"{cluster.name}-calibrated", baseline)
    return CalibrationResult(
        cluster=calibrated, base_cluster=cluster.name, estimator=est.name, compute_dtype=dtype,
        initial=start, params=fitted, free=tuple(free_names), not_exercised=not_exercised,
        memory_baseline_bytes=baseline,
        before=assess_predictions(data, profile, cluster, est, compute_dtype),
        after=assess_predictions(data, profile, calibrated, est, compute_dtype),
        sensitivity=sensitivity, at_bound=at_bound,
        evaluations={"objective": evaluations, "cost_table_builds": predictor.table_builds},
    )


# ---------------------------------------------------------------------------------------------
# Writing the cluster profile


def _plain(value: Any) -> Any:
    """numpy / tuple values as plain YAML-safe Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, str):
        return str(value)  # str subclasses (torch's TorchVersion) need a YAML tag otherwise
    return value


def write_cluster_profile(
    result: CalibrationResult, path: str | Path, *, name: str | None = None,
    description: str | None = None, extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the calibrated cluster as a cluster YAML plus a ``calibration:`` section.

    The cluster part is ``Cluster.to_dict()`` (the schema of ``conf/cluster/*.yaml``; the
    calibrated device overrides the catalogue entry of the same name). ``calibration`` holds
    ``stage_overhead_s``, ``step_overhead_s``, ``recompute_overhead_s`` and ``memory_baseline_bytes`` (what the cost model
    reads), the fitted factors relative to ``base_cluster``, the fit quality ("fit"; ``extra``
    entries are added to it, e.g. held-out figures), and date, host, torch and Python versions.
    """
    path = Path(path)
    data = result.cluster.to_dict()
    data["name"] = name or result.cluster.name
    data = {
        "name": data["name"],
        "description": description or (
            f"{result.base_cluster} calibrated on {platform.node()} with the {result.estimator} "
            "estimator (dartspar.calibrate)"
        ),
        **{k: v for k, v in data.items() if k != "name"},
    }
    before, after = result.before, result.after
    fit = {
        "num_plans": after["num_plans"],
        "objective": "MAPE of the step time",
        "step_time_mape_before": before["step"]["mape"],
        "step_time_mape_after": after["step"]["mape"],
        "step_time_max_ape_after": after["step"]["max_ape"],
        "kendall_tau_before": before["step"]["kendall_tau"],
        "kendall_tau_after": after["step"]["kendall_tau"],
        "memory_mape_before": before["memory"].get("mape"),
        "memory_mape_after": after["memory"].get("mape"),
        **(dict(extra) if extra else {}),
    }
    data["calibration"] = _plain({
        **result.calibration,
        "base_cluster": result.base_cluster,
        "estimator": result.estimator,
        "compute_dtype": result.compute_dtype,
        "fitted": result.params.as_dict(),
        "free": list(result.free),
        "fit": fit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    })
    header = (
        f"# Calibrated cluster profile written by dartspar.calibrate.write_cluster_profile.\n"
        f"# Device and link figures are fitted to measured runs (see calibration.fit); they are\n"
        f"# specific to this host and to the {result.estimator!r} latency estimator.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))
    return path
