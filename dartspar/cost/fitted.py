"""The fitted kernel latency estimator: a roofline corrected by an efficiency surface measured
per device model (``dartspar-profile-kernels`` tables).

GEMM time = roofline(m, n, k, batch; device spec) / efficiency(m, n, k, batch), where

- the roofline is a smooth maximum (4-norm) of compute time (FLOPs / peak) and memory time
  (operand + result bytes / bandwidth); the smooth version keeps the predicted time free of the
  kink a hard max puts where a GEMM turns memory-bound, which real kernels do not have;
- log efficiency is a smooth function of x = (log m, log n, log k, log batch): a quadratic
  least-squares trend plus a Gaussian-process correction (squared-exponential kernel in log
  space, length scale and noise chosen by closed-form leave-one-out error), so it interpolates
  the table and is differentiable in m, n, k, batch;
- outside the table, x is clamped to the box the table spans and the efficiency to the range
  it measured: extrapolation is bounded.

Memory-bound work: time = fixed_s + bytes / effective bandwidth, least squares in relative
error over the table's timings of whole blocks' memory-bound sequences (layer norms, softmax,
GELU, residual adds: kernel "block"), the mix a layer's ``other_bytes_moved`` stands for. On a
CPU the single kernels differ 10x in bytes per second (GELU's erf vs an add), so a fit to single
kernels would describe none of them.

Layers: kernels timed alone are not a layer timed whole. The table's probe blocks, timed whole,
calibrate the difference (``layer_calibration``): a tiny block measures the framework's host
work per GEMM call (dispatch, autograd, allocation), a preset-size block the factor by which
kernels run slower in a layer than alone (cold caches; on a CPU, fused attention's softmax).
On a CPU host work adds to kernel time (one thread does both); on a GPU the host runs ahead
asynchronously, so a layer takes the larger of the two (``layer_time_s``). ``gemm_time_s`` and
``memory_time_s`` stay pure kernel times.

A device without a table is predicted from the nearest profiled device (distance of log peak
and log bandwidth): its efficiency surface on the new device's roofline, and its bandwidth
efficiency on the new device's bandwidth. ``is_extrapolated(device)`` says so, and a warning is
issued once per device. Devices more than ``max_scale`` times away in peak or bandwidth (a GPU
when only the CPU is profiled) get an error instead of a guess, or, when the estimator is built
with ``fallback="roofline"`` (any registered estimator name), that estimator's answer, also
flagged and warned about.

Importing this module registers the estimator as ``make_estimator("fitted", tables=...)``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..cluster import DeviceSpec
from ..models.gpt import GPTConfig
from .kernels.table import ProfileTable, shipped_tables
from .latency import DTYPE_BYTES, make_estimator, register_estimator

__all__ = [
    "FittedEstimator", "EfficiencySurface", "MemoryModel", "LayerCalibration", "roofline_time_s", "ROOFLINE_NORM",
]

# p of the p-norm smooth max in the roofline: within 2**(1/4) - 1 = 19% of the hard max at the
# ridge point and within 1.6% once one term is twice the other.
ROOFLINE_NORM = 4.0

_LENGTH_SCALES = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6)  # natural-log units of the sizes
_NOISE_RATIOS = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1)          # noise variance / signal variance


def roofline_time_s(
    m: torch.Tensor, n: torch.Tensor, k: torch.Tensor, batch: torch.Tensor,
    itemsize: int, peak_flops_per_s: float, bandwidth_bytes_per_s: float,
) -> torch.Tensor:
    """Smooth roofline seconds of ``batch`` products (m x k) @ (k x n); broadcasts, float64."""
    compute = 2.0 * batch * m * n * k / peak_flops_per_s
    memory = itemsize * batch * (m * k + k * n + m * n) / bandwidth_bytes_per_s
    p = ROOFLINE_NORM
    big = torch.maximum(compute, memory)
    # Factor out the larger term so the p-th powers cannot overflow or underflow.
    return big * ((compute / big) ** p + (memory / big) ** p) ** (1.0 / p)


@contextmanager
def _one_thread():
    # The fit's matrices are a few hundred rows: a thread team only adds synchronisation, and on
    # a busy machine a spinning OpenMP team makes a 200x200 Cholesky ~10x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _log_features(m, n, k, batch) -> torch.Tensor:
    parts = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float64) for v in (m, n, k, batch)))
    return torch.stack([torch.log(v) for v in parts], dim=-1)


def _quadratic_basis(z: torch.Tensor) -> torch.Tensor:
    d = z.shape[-1]
    cols = [torch.ones_like(z[..., 0])] + [z[..., i] for i in range(d)]
    cols += [z[..., i] * z[..., j] for i in range(d) for j in range(i, d)]
    return torch.stack(cols, dim=-1)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.unsqueeze(-2) - b) ** 2).sum(-1)


class EfficiencySurface:
    """log efficiency as a smooth function of x = log sizes: quadratic trend + GP correction.

    ``x`` is (N, D) float64, ``y`` (N,) float64. Dimensions the data does not vary (e.g. batch
    when every row has batch 1) are dropped. Attributes after fitting: ``length_scale``,
    ``noise_ratio``, ``loo_rms`` (leave-one-out RMS error of log efficiency at the chosen
    hyper-parameters), ``lo``/``hi`` (the box), ``y_min``/``y_max`` (the measured range).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 2 or y.shape != x.shape[:1] or x.shape[0] < 2:
            raise ValueError(f"EfficiencySurface needs x (N, D) and y (N,) with N >= 2, got {tuple(x.shape)}, {tuple(y.shape)}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("EfficiencySurface: non-finite sizes or efficiencies in the table")
        x, y = x.to(torch.float64), y.to(torch.float64)
        self.active = (x.max(0).values - x.min(0).values) > 1e-12
        x = x[:, self.active]
        self.lo, self.hi = x.min(0).values, x.max(0).values
        self.mid, self.half = (self.lo + self.hi) / 2, (self.hi - self.lo) / 2
        self.y_min, self.y_max = float(y.min()), float(y.max())

        basis = _quadratic_basis((x - self.mid) / self.half)
        # A whisker of ridge keeps the normal equations solvable when the rows are too few for
        # every quadratic term (small tables); it is far below the data's own scale.
        gram = basis.T @ basis + 1e-9 * torch.eye(basis.shape[1], dtype=torch.float64) * basis.shape[0]
        self.trend_coef = torch.linalg.solve(gram, basis.T @ y)
        resid = y - basis @ self.trend_coef
        signal = float(resid.var()) if x.shape[0] > 1 else 0.0
        self.x = x
        if signal < 1e-16:
            self.alpha = torch.zeros_like(y)
            self.length_scale, self.noise_ratio, self.signal_var, self.loo_rms = 1.0, 0.0, 0.0, 0.0
            return

        sq = _sq_dist(x, x)
        best = None
        for ell in _LENGTH_SCALES:
            corr = torch.exp(-sq / (2 * ell * ell))
            for ratio in _NOISE_RATIOS:
                kmat = signal * (corr + ratio * torch.eye(len(y), dtype=torch.float64))
                inv = torch.cholesky_inverse(torch.linalg.cholesky(kmat))
                alpha = inv @ resid
                # Closed-form leave-one-out residuals of GP regression (Rasmussen & Williams, eq. 5.12).
                loo = alpha / torch.diagonal(inv)
                rms = float(loo.pow(2).mean().sqrt())
                if best is None or rms < best[0]:
                    best = (rms, ell, ratio, alpha)
        self.loo_rms, self.length_scale, self.noise_ratio, self.alpha = best
        self.signal_var = signal

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """log efficiency at x (..., D) -> (...); bounded by the table's box and range."""
        x = x[..., self.active]
        x = torch.minimum(torch.maximum(x, self.lo), self.hi)
        log_eff = _quadratic_basis((x - self.mid) / self.half) @ self.trend_coef
        if self.signal_var > 0:
            kx = self.signal_var * torch.exp(-_sq_dist(x, self.x) / (2 * self.length_scale**2))
            log_eff = log_eff + kx @ self.alpha
        return log_eff.clamp(self.y_min, self.y_max)


@dataclass(frozen=True)
class MemoryModel:
    """time = fixed_s + num_bytes / bandwidth_bytes_per_s for a memory-bound kernel."""

    fixed_s: float
    bandwidth_bytes_per_s: float

    @classmethod
    def fit(cls, num_bytes: torch.Tensor, time_s: torch.Tensor, origin: str) -> "MemoryModel":
        """Least squares in relative error, with fixed_s >= 0 (the exact constrained optimum)."""
        if len(num_bytes) < 2:
            raise ValueError(f"{origin}: {len(num_bytes)} memory-bound timings; need >= 2 to fit bandwidth and fixed time")
        b, t = num_bytes.to(torch.float64), time_s.to(torch.float64)
        design = torch.stack([torch.ones_like(b), b], dim=1) / t[:, None]
        coef = torch.linalg.lstsq(design, torch.ones_like(t)).solution
        fixed, per_byte = float(coef[0]), float(coef[1])
        if fixed < 0:  # the optimum lies on the boundary fixed = 0: one-parameter fit
            fixed, per_byte = 0.0, float((b / t).sum() / ((b / t) ** 2).sum())
        if per_byte <= 0:
            raise ValueError(f"{origin}: memory-bound timings do not grow with bytes (slope {per_byte:.3g} s/B); re-profile")
        return cls(fixed_s=fixed, bandwidth_bytes_per_s=1.0 / per_byte)

    def __call__(self, num_bytes: torch.Tensor) -> torch.Tensor:
        return self.fixed_s + num_bytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class LayerCalibration:
    """A layer's kernels run ``context_factor`` times slower inside a training step than alone,
    and the framework adds ``host_per_gemm_s`` seconds of host work per GEMM call."""

    context_factor: float
    host_per_gemm_s: float


def _load_tables(tables) -> list[ProfileTable]:
    if tables is None:
        paths = shipped_tables()
        if not paths:
            raise FileNotFoundError("no kernel tables are shipped in dartspar/cost/kernels/tables: run dartspar-profile-kernels")
        return [ProfileTable.load(p) for p in paths]
    if isinstance(tables, (str, Path, ProfileTable)):
        tables = [tables]
    if isinstance(tables, dict):  # device name -> table path: the name overrides the table's own
        loaded = []
        for name, path in tables.items():
            table = ProfileTable.load(path)
            loaded.append(replace(table, device=name, spec=replace(table.spec, name=name)))
        return loaded
    return [t if isinstance(t, ProfileTable) else ProfileTable.load(t) for t in tables]


class FittedEstimator:
    """``LatencyEstimator`` from profile tables; see the module docstring.

    Args:
        tables: None (every table shipped in dartspar/cost/kernels/tables), a path, a list of
            paths / ``ProfileTable``s, or a dict {DeviceSpec.name: path} to bind tables to
            catalogue names.
        max_scale: largest ratio of peak FLOP/s or bandwidth between a device without a table
            and the profiled device it is scaled from.
        fallback: None (devices beyond ``max_scale`` are an error), or an estimator / registered
            estimator name that answers for them.
    """

    name = "fitted"

    def __init__(self, tables=None, max_scale: float = 30.0, fallback=None) -> None:
        loaded = _load_tables(tables)
        self.tables: dict[str, ProfileTable] = {}
        for t in loaded:
            if t.device in self.tables:
                raise ValueError(
                    f"two kernel tables for device {t.device!r}: pass tables={{name: path}} to pick one"
                )
            self.tables[t.device] = t
        if max_scale < 1:
            raise ValueError(f"max_scale={max_scale} must be >= 1")
        self.max_scale = max_scale
        self.fallback = make_estimator(fallback) if isinstance(fallback, str) else fallback
        self._surfaces: dict[tuple[str, str], EfficiencySurface] = {}
        self._memory: dict[str, MemoryModel] = {}
        self._calibration: dict[tuple[str, bool], LayerCalibration] = {}
        self._warned: set[str] = set()

    # -- which table serves a device -------------------------------------------------------
    def is_extrapolated(self, device: DeviceSpec) -> bool:
        """True when ``device`` has no table of its own and is scaled from another device."""
        return device.name not in self.tables

    def source_table(self, device: DeviceSpec, dtype: str | None = None) -> ProfileTable | None:
        """The table whose measurements predict ``device`` (its own, or the nearest one's);
        None when no table is within ``max_scale`` and a fallback estimator answers instead."""
        if device.name in self.tables:
            return self.tables[device.name]
        candidates = [t for t in self.tables.values() if dtype is None or dtype in t.dtypes]
        if not candidates:
            raise ValueError(f"no kernel table has dtype {dtype!r} (tables: {self._describe()}); profile it with --dtypes")

        def gap(t: ProfileTable) -> tuple[float, float]:
            dt = dtype or t.dtypes[0]
            peak_ratio = abs(math.log(device.peak(dt) / t.spec.peak(dt)))
            bw_ratio = abs(math.log(device.memory_bandwidth_bytes_per_s / t.spec.memory_bandwidth_bytes_per_s))
            return peak_ratio, bw_ratio

        best = min(candidates, key=lambda t: sum(r * r for r in gap(t)))
        if max(gap(best)) > math.log(self.max_scale):
            if self.fallback is None:
                raise ValueError(
                    f"device {device.name!r} has no kernel table and the nearest profiled device {best.device!r} is "
                    f"more than max_scale={self.max_scale}x away in peak or bandwidth: profile it "
                    f"(dartspar-profile-kernels --device-name {device.name}), pass fallback='roofline', "
                    "or use cost.estimator=roofline"
                )
            self._warn_once(device, f"the fallback estimator {self.fallback.name!r} answers for it")
            return None
        self._warn_once(device, f"its kernel times are scaled from {best.device!r}")
        return best

    def _warn_once(self, device: DeviceSpec, what: str) -> None:
        if device.name not in self._warned:
            self._warned.add(device.name)
            warnings.warn(f"device {device.name!r} has no kernel table: {what} "
                          "(flagged: FittedEstimator.is_extrapolated)", stacklevel=4)

    def _describe(self) -> str:
        return ", ".join(f"{n}: {t.dtypes}" for n, t in self.tables.items()) or "none"

    # -- fitted pieces ----------------------------------------------------------------------
    def surface(self, table: ProfileTable, dtype: str) -> EfficiencySurface:
        """The efficiency surface of ``table`` for ``dtype`` (fitted on first use)."""
        key = (table.device, dtype)
        if key not in self._surfaces:
            rows = [r for r in table.gemm_rows if r.dtype == dtype]
            if not rows:
                raise ValueError(
                    f"kernel table of {table.device!r} has no {dtype} GEMMs (it has {table.dtypes}): "
                    f"profile them with dartspar-profile-kernels --dtypes {dtype}"
                )
            m, n, k, b, t = (torch.tensor([getattr(r, f) for r in rows], dtype=torch.float64)
                             for f in ("m", "n", "k", "batch", "time_s"))
            roof = roofline_time_s(m, n, k, b, DTYPE_BYTES[dtype], table.spec.peak(dtype),
                                   table.spec.memory_bandwidth_bytes_per_s)
            with _one_thread():
                self._surfaces[key] = EfficiencySurface(_log_features(m, n, k, b), torch.log(roof / t))
        return self._surfaces[key]

    def memory_model(self, table: ProfileTable) -> MemoryModel:
        """time(bytes) of a layer's memory-bound work on ``table``'s device, fitted to the
        whole-block sequences (kernel "block") when the table has them, else to every kernel."""
        if table.device not in self._memory:
            rows = [r for r in table.memory_rows if r.kernel == "block"] or list(table.memory_rows)
            self._memory[table.device] = MemoryModel.fit(
                torch.tensor([float(r.num_bytes) for r in rows]), torch.tensor([r.time_s for r in rows]),
                origin=f"kernel table of {table.device!r}",
            )
        return self._memory[table.device]

    # -- LatencyEstimator -------------------------------------------------------------------
    def efficiency(self, m, n, k, batch, dtype: str, device: DeviceSpec) -> torch.Tensor:
        """Fraction of the (smooth) roofline that a GEMM reaches, float64, broadcast shape."""
        table = self.source_table(device, dtype)
        if table is None:
            raise ValueError(f"device {device.name!r} is answered by the fallback estimator: it has no efficiency surface")
        return torch.exp(self.surface(table, dtype)(_log_features(m, n, k, batch)))

    def gemm_time_s(self, m, n, k, batch, dtype: str, device: DeviceSpec) -> torch.Tensor:
        """Seconds for ``batch`` products (m x k) @ (k x n); inputs broadcast, float64 out,
        differentiable in m, n, k, batch."""
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype {dtype!r} unknown; choose from {sorted(DTYPE_BYTES)}")
        m, n, k, batch = (torch.as_tensor(v, dtype=torch.float64) for v in (m, n, k, batch))
        table = self.source_table(device, dtype)
        if table is None:
            return self.fallback.gemm_time_s(m, n, k, batch, dtype, device)
        surface = self.surface(table, dtype)
        spec = table.spec if table.device == device.name else device
        roof = roofline_time_s(m, n, k, batch, DTYPE_BYTES[dtype], spec.peak(dtype),
                               spec.memory_bandwidth_bytes_per_s)
        return roof / torch.exp(surface(_log_features(m, n, k, batch)))

    def memory_time_s(self, num_bytes, device: DeviceSpec) -> torch.Tensor:
        """Seconds of a layer's memory-bound work moving ``num_bytes`` (read + written; norms,
        softmax, activation, residual adds: see ``memory_model``), float64."""
        num_bytes = torch.as_tensor(num_bytes, dtype=torch.float64)
        table = self.source_table(device)
        if table is None:
            return self.fallback.memory_time_s(num_bytes, device)
        model = self.memory_model(table)
        if table.device != device.name:
            scale = device.memory_bandwidth_bytes_per_s / table.spec.memory_bandwidth_bytes_per_s
            model = MemoryModel(model.fixed_s, model.bandwidth_bytes_per_s * scale)
        return model(num_bytes)

    def layer_calibration(self, device: DeviceSpec, backward: bool) -> "LayerCalibration":
        """How a layer's kernel time becomes its time on ``device`` (forward, or forward +
        backward), from the table's probe blocks (measured M_i, predicted kernel time K_i, GEMM
        calls c_i).

        On a CPU, one thread runs both framework and kernels: M = factor * K + c * host, solved
        exactly from the smallest and the largest probe (host >= 0; with one probe, factor = 1).
        On a GPU the host runs ahead of the device: a layer takes max(factor * K, c * host), with
        host = the tiny probe's M / c and factor = the large probe's M / K. No probes: factor 1,
        host 0; a device the fallback estimator answers: the same."""
        table = self.source_table(device)
        if table is None or not table.probe_rows:
            return LayerCalibration(1.0, 0.0)
        key = (table.device, backward)
        if key not in self._calibration:
            from .kernels.workload import gpt_block_work, kernel_time_s

            spec = self.device_spec(table.device)
            points = []
            for probe in table.probe_rows:
                cfg = GPTConfig(num_layers=1, hidden=probe.hidden, num_heads=probe.num_heads, seq_len=probe.seq_len,
                                vocab_size=8)
                work = gpt_block_work(cfg, probe.micro_batch, 1, DTYPE_BYTES[probe.dtype])
                kernels = float(kernel_time_s(self, work.gemms, work.other_bytes_moved, probe.dtype, spec, backward))
                calls = sum(g.count for g in work.gemms)
                points.append((kernels, calls, probe.fwd_bwd_s if backward else probe.fwd_s))
            points.sort()
            (k_lo, c_lo, m_lo), (k_hi, c_hi, m_hi) = points[0], points[-1]
            if not table.on_cpu:
                factor = m_hi / k_hi if len(points) > 1 else 1.0
                calibration = LayerCalibration(factor, m_lo / c_lo)
            elif len(points) == 1:
                calibration = LayerCalibration(1.0, max(m_lo - k_lo, 0.0) / c_lo)
            else:
                det = k_hi * c_lo - k_lo * c_hi
                factor = (m_hi * c_lo - m_lo * c_hi) / det
                host = (k_hi * m_lo - k_lo * m_hi) / det
                if host < 0:  # the constrained optimum: no host time, the large probe sets the factor
                    factor, host = m_hi / k_hi, 0.0
                calibration = LayerCalibration(factor, host)
            if not calibration.context_factor > 0:
                raise ValueError(f"kernel table of {table.device!r}: probe blocks give a context factor "
                                 f"{calibration.context_factor:.3g}; re-profile")
            self._calibration[key] = calibration
        return self._calibration[key]

    def layer_time_s(self, kernel_time_s: torch.Tensor, gemm_calls: int, device: DeviceSpec,
                     backward: bool) -> torch.Tensor:
        """A layer's seconds from its kernels' seconds and its number of GEMM calls (see
        ``layer_calibration``): factor * kernels + calls * host on a CPU, the larger of the two
        on a GPU."""
        cal = self.layer_calibration(device, backward)
        host = gemm_calls * cal.host_per_gemm_s
        table = self.source_table(device)
        if table is None or table.on_cpu:
            return cal.context_factor * kernel_time_s + host
        return torch.clamp(cal.context_factor * kernel_time_s, min=host)

    def device_spec(self, name: str) -> DeviceSpec:
        """The spec a profiled device's table was taken against (e.g. the measured CPU)."""
        if name not in self.tables:
            raise KeyError(f"no kernel table for device {name!r}; tables: {self._describe()}")
        return self.tables[name].spec


register_estimator("fitted", FittedEstimator)
