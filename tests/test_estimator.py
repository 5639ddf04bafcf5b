"""The fitted kernel latency estimator: fit, gradients, bounded extrapolation, unprofiled devices."""

import math
import warnings
from dataclasses import replace

import pytest
import torch

from dartspar.cluster import DeviceSpec
from dartspar.cost.fitted import FittedEstimator, MemoryModel, roofline_time_s
from dartspar.cost.kernels.table import GemmRow, MemoryRow, ProbeRow, ProfileTable, shipped_tables
from dartspar.cost.kernels.workload import gpt_block_work, kernel_time_s, layer_time_s
from dartspar.cost.latency import RooflineEstimator, make_estimator
from dartspar.models.gpt import GPTConfig

SPEC = DeviceSpec("synthetic-gpu", {"fp16": 100e12}, 16e9, 1e12)
SIZES = [64, 128, 256, 512, 1024, 2048, 4096, 8192]


def true_efficiency(m, n, k):
    """A smooth, saturating efficiency: small dimensions waste the machine."""
    return 0.9 / (1 + 0.3 * (512 / m) ** 0.7 + 0.2 * (512 / n) ** 0.5 + 0.2 * (256 / k) ** 0.6)


def true_time_s(m, n, k):
    m, n, k = (torch.as_tensor(float(v), dtype=torch.float64) for v in (m, n, k))
    roof = roofline_time_s(m, n, k, torch.ones((), dtype=torch.float64), 2, 100e12, 1e12)
    return float(roof / true_efficiency(m, n, k))


@pytest.fixture(scope="module")
def table():
    gemms = tuple(GemmRow(m, n, k, 1, "fp16", true_time_s(m, n, k)) for m in SIZES for n in SIZES for k in SIZES)
    memory = tuple(MemoryRow("block", r, 1024, "fp16", 2 * r * 1024 * 2, 5e-6 + 2 * r * 1024 * 2 / 8e11)
                   for r in (64, 256, 1024, 4096, 16384))
    return ProfileTable("synthetic-gpu", "triton", 0, SPEC, "test", gemms, memory,
                        (ProbeRow(8, 1, 4, 1, "fp16", 1e-4, 3e-4),))


@pytest.fixture(scope="module")
def estimator(table):
    return FittedEstimator([table])


def _f64(*values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def test_reproduces_table_and_interpolates_off_grid(estimator, table):
    m, n, k, t = (torch.tensor([getattr(r, f) for r in table.gemm_rows], dtype=torch.float64)
                  for f in ("m", "n", "k", "time_s"))
    pred = estimator.gemm_time_s(m, n, k, 1, "fp16", SPEC)
    assert (pred / t - 1).abs().max().item() < 0.02
    gen = torch.Generator().manual_seed(0)
    logs = torch.empty(200, 3, dtype=torch.float64).uniform_(math.log(80), math.log(6000), generator=gen)
    m, n, k = logs.exp().round().unbind(1)
    truth = torch.tensor([true_time_s(*s) for s in zip(m.tolist(), n.tolist(), k.tolist())], dtype=torch.float64)
    err = (estimator.gemm_time_s(m, n, k, 1, "fp16", SPEC) / truth - 1).abs()
    assert err.mean().item() < 0.01 and err.max().item() < 0.05


def test_gradients_are_finite_and_match_finite_differences(estimator):
    m, n, k = _f64([300.0, 1500.0, 700.0], [200.0, 3000.0, 900.0], [100.0, 600.0, 5000.0])
    for x in (m, n, k):
        x.requires_grad_(True)
    estimator.gemm_time_s(m, n, k, 1, "fp16", SPEC).sum().backward()
    for i, x in enumerate((m, n, k)):
        assert torch.isfinite(x.grad).all() and (x.grad > 0).all()  # bigger GEMMs take longer
        for j in range(3):
            step = 1e-4 * x[j].item()
            args = [v.detach().clone() for v in (m, n, k)]
            args[i][j] += step
            up = estimator.gemm_time_s(*args, 1, "fp16", SPEC)[j]
            args[i][j] -= 2 * step
            down = estimator.gemm_time_s(*args, 1, "fp16", SPEC)[j]
            assert x.grad[j].item() == pytest.approx(((up - down) / (2 * step)).item(), rel=1e-4)


def test_extrapolation_is_bounded(estimator, table):
    effs = [true_efficiency(r.m, r.n, r.k) for r in table.gemm_rows]
    m, n, k = _f64([1.0, 1e6, 8.0, 1e5, 64.0], [1.0, 1e6, 1e5, 3.0, 64.0], [1.0, 1e6, 2.0, 1e5, 1e7])
    eff = estimator.efficiency(m, n, k, 1, "fp16", SPEC)
    # The smooth roofline and the fitted surface agree with the true efficiency only up to a few
    # percent at the table's extremes; outside it the efficiency stays inside the measured range.
    assert (eff >= 0.98 * min(effs)).all() and (eff <= 1.02 * max(effs)).all()
    big = estimator.gemm_time_s(*_f64(2e4, 2e4, 2e4), 1, "fp16", SPEC)
    bigger = estimator.gemm_time_s(*_f64(4e4, 2e4, 2e4), 1, "fp16", SPEC)
    assert bigger.item() == pytest.approx(2 * big.item(), rel=1e-6)  # beyond the box: pure roofline scaling


def test_device_without_table_is_scaled_and_flagged(estimator):
    twice = DeviceSpec("twice-gpu", {"fp16": 200e12}, 16e9, 2e12)
    assert not estimator.is_extrapolated(SPEC) and estimator.is_extrapolated(twice)
    m, n, k = _f64([128.0, 4096.0], [512.0, 4096.0], [64.0, 4096.0])
    with pytest.warns(UserWarning, match="twice-gpu.*scaled from 'synthetic-gpu'"):
        fast = estimator.gemm_time_s(m, n, k, 1, "fp16", twice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per device only
        slow = estimator.gemm_time_s(m, n, k, 1, "fp16", SPEC)
        assert torch.allclose(fast, slow / 2, rtol=1e-12)  # same efficiency, half the roofline
        mem = estimator.memory_time_s(torch.tensor(8e9), twice)
    assert mem.item() == pytest.approx(5e-6 + 8e9 / 1.6e12, rel=1e-6)
    far = DeviceSpec("far-gpu", {"fp16": 1e16}, 16e9, 1e12)
    with pytest.raises(ValueError, match="max_scale"):
        estimator.gemm_time_s(*_f64(64, 64, 64), 1, "fp16", far)


def test_fallback_estimator_answers_for_far_devices(table):
    far = DeviceSpec("far-gpu", {"fp16": 1e16}, 16e9, 1e12)
    estimator = FittedEstimator([table], fallback="roofline")
    with pytest.warns(UserWarning, match="far-gpu.*fallback estimator 'roofline'"):
        got = estimator.gemm_time_s(*_f64(4096, 4096, 4096), 1, "fp16", far)
    assert estimator.is_extrapolated(far)
    assert got.item() == RooflineEstimator().gemm_time_s(4096, 4096, 4096, 1, "fp16", far).item()


def test_missing_dtype_and_duplicate_tables_are_errors(estimator, table):
    with pytest.raises(ValueError, match="no fp32 GEMMs"):
        estimator.gemm_time_s(*_f64(64, 64, 64), 1, "fp32", DeviceSpec("synthetic-gpu", {"fp32": 1e12}, 1, 1e12))
    with pytest.raises(ValueError, match="two kernel tables"):
        FittedEstimator([table, table])


def test_memory_model_recovers_bandwidth_and_fixed_time(estimator, table):
    model = estimator.memory_model(table)
    assert model.fixed_s == pytest.approx(5e-6, rel=1e-6)
    assert model.bandwidth_bytes_per_s == pytest.approx(8e11, rel=1e-6)
    through_origin = MemoryModel.fit(torch.tensor([1e6, 2e6]), torch.tensor([1.0e-3, 2.1e-3]), "test")
    assert through_origin.fixed_s == 0.0  # the unconstrained fit would give a negative fixed time


def test_layer_time_on_gpu_takes_the_larger_of_kernels_and_host(estimator):
    cfg = GPTConfig(hidden=64, num_heads=4, seq_len=16)
    small = gpt_block_work(cfg, 1, dtype_bytes=2)
    kernels = kernel_time_s(estimator, small.gemms, small.other_bytes_moved, "fp16", SPEC)
    layer = layer_time_s(estimator, small.gemms, small.other_bytes_moved, "fp16", SPEC)
    # Probe: 3e-4 s forward + backward over its 8 GEMM calls; the tiny block's kernels take less.
    assert kernels.item() < 3e-4 and layer.item() == pytest.approx(3e-4)
    roofline = layer_time_s(RooflineEstimator(), small.gemms, small.other_bytes_moved, "fp16", SPEC)
    assert roofline.item() == pytest.approx(
        kernel_time_s(RooflineEstimator(), small.gemms, small.other_bytes_moved, "fp16", SPEC).item())


def test_table_json_round_trip(table, tmp_path):
    path = tmp_path / "t.json"
    table.save(path)
    assert ProfileTable.load(path) == table
    bound = FittedEstimator({"renamed": path})
    assert list(bound.tables) == ["renamed"] and bound.device_spec("renamed").name == "renamed"
    path.write_text(path.read_text().replace("dartspar-kernel-table/1", "other"))
    with pytest.raises(ValueError, match="format"):
        ProfileTable.load(path)


def test_shipped_cpu_table_is_fitted_and_registered():
    cpu = [p for p in shipped_tables() if ProfileTable.load(p).device == "CPU"]
    assert len(cpu) == 1
    estimator = make_estimator("fitted")
    table = estimator.tables["CPU"]
    assert table.threads == 1 and table.dtypes == ("fp32",)
    spec = estimator.device_spec("CPU")
    rows = table.gemm_rows
    m, n, k, b, t = (torch.tensor([getattr(r, f) for r in rows], dtype=torch.float64)
                     for f in ("m", "n", "k", "batch", "time_s"))
    err = (estimator.gemm_time_s(m, n, k, b, "fp32", spec) / t - 1).abs()
    assert err.median().item() < 0.05
    assert estimator.surface(table, "fp32").loo_rms < 0.15  # held-out-style error of the fit, in log space
    work = gpt_block_work(GPTConfig(hidden=128, num_heads=4, seq_len=64), 2, dtype_bytes=4)
    kernels = kernel_time_s(estimator, work.gemms, work.other_bytes_moved, "fp32", spec)
    layer = layer_time_s(estimator, work.gemms, work.other_bytes_moved, "fp32", spec)
    # On a CPU one thread runs the framework and the kernels: host time adds.
    cal = estimator.layer_calibration(spec, backward=True)
    assert layer.item() == pytest.approx(cal.context_factor * kernels.item() + 8 * cal.host_per_gemm_s)
    assert cal.host_per_gemm_s > 0 and 0.8 < cal.context_factor < 1.5


def test_cpu_layer_calibration_solves_the_two_probes(table):
    cpu_spec = DeviceSpec("synthetic-cpu", {"fp16": 100e12}, 16e9, 1e12)
    coarse = tuple(r for r in table.gemm_rows if {r.m, r.n, r.k} <= set(SIZES[::2]))  # a quicker fit
    cpu = replace(table, device="synthetic-cpu", spec=cpu_spec, threads=1, gemm_rows=coarse, probe_rows=())
    plain = FittedEstimator([cpu])
    rows = []
    for hidden, heads, seq, batch in ((8, 1, 4, 1), (512, 8, 256, 2)):
        cfg = GPTConfig(hidden=hidden, num_heads=heads, seq_len=seq)
        work = gpt_block_work(cfg, batch, dtype_bytes=2)
        k_fwd, k_all = (kernel_time_s(plain, work.gemms, work.other_bytes_moved, "fp16", cpu_spec, b).item()
                        for b in (False, True))
        # Measured = 1.1 x kernels + 8 GEMM calls x 20 us (forward), 50 us (forward + backward).
        rows.append(ProbeRow(hidden, heads, seq, batch, "fp16", 1.1 * k_fwd + 8 * 20e-6, 1.1 * k_all + 8 * 50e-6))
    calibrated = FittedEstimator([replace(cpu, probe_rows=tuple(rows))])
    for backward, host in ((False, 20e-6), (True, 50e-6)):
        cal = calibrated.layer_calibration(cpu_spec, backward)
        assert cal.context_factor == pytest.approx(1.1, rel=1e-9) and cal.host_per_gemm_s == pytest.approx(host)
