"""``dartspar-profile-kernels``: time GEMMs and memory-bound kernels, write a profile table.

On a GPU it times this package's Triton kernels (``matmul``, ``layer_norm``, ``softmax``) with
``triton.testing.do_bench``; on a CPU it times the torch ops the CPU executor runs (mm / bmm,
layer_norm, softmax, gelu, add) with an interleaved best-of-rounds timer at a fixed thread count (each
executor rank is a process with its own threads). Shapes come from the GEMMs of named GPT sizes
(``workload.GPT_PRESETS``) for every tensor-parallel degree and micro-batch size, forward and
backward, plus a log-spaced coverage grid and log-uniform random shapes, so that the fitted
efficiency surface has support between the models' shapes.

    dartspar-profile-kernels --device cpu --threads 1
    dartspar-profile-kernels --device cuda --models gpt-small,gpt-medium --tp 1,2,4,8
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import platform
import random
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ...catalogue import DEVICES
from ...cluster import DeviceSpec
from ...models.gpt import Block, GPTConfig
from .table import TABLES_DIR, GemmRow, MemoryRow, ProbeRow, ProfileTable
from .timing import cpu_time_s, cpu_times_s, gpu_time_s
from .workload import GPT_PRESETS, training_gemm_shapes

__all__ = [
    "main", "profile_kernels", "coverage_shapes", "random_shapes", "memory_shapes", "cuda_device_spec",
    "TORCH_DTYPES", "CPU_DEFAULTS", "CUDA_DEFAULTS",
]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CPU_DEFAULTS = dict(
    models=["cpu-tiny", "cpu-small", "cpu-medium", "cpu-large"], tp=[1, 2], micro_batch=[1, 2, 4],
    dtypes=["fp32"], coverage=[16, 64, 256, 1024, 4096], random_shapes=150, max_gflop=0.5,
)
CUDA_DEFAULTS = dict(
    models=["gpt-small", "gpt-medium", "gpt-large", "gpt-xl"], tp=[1, 2, 4, 8], micro_batch=[1, 2, 4, 8],
    dtypes=["bf16", "fp16", "fp32"], coverage=[64, 256, 1024, 4096, 16384], random_shapes=100, max_gflop=2000.0,
)

# torch.cuda.get_device_name() substrings -> dartspar.catalogue keys, first match wins.
_CUDA_NAMES = (
    ("H100 80GB HBM3", "H100-SXM"), ("H100 SXM", "H100-SXM"), ("A100-SXM4-80GB", "A100-80GB"),
    ("A100 80GB", "A100-80GB"), ("A100", "A100-40GB"), ("V100", "V100-32GB"), ("L4", "L4"), ("T4", "T4"),
)


def cuda_device_spec(cuda_name: str, device_name: str | None = None) -> DeviceSpec:
    """The catalogue's ``DeviceSpec`` for a GPU: ``device_name`` if given (a catalogue key), else
    the entry that ``torch.cuda.get_device_name()``'s string ``cuda_name`` maps to."""
    if device_name is None:
        device_name = next((key for pattern, key in _CUDA_NAMES if pattern in cuda_name), None)
        if device_name is None:
            raise ValueError(
                f"GPU {cuda_name!r} has no catalogue entry I recognise; pass --device-name with one of "
                f"{sorted(DEVICES)} (or add the GPU to dartspar/catalogue.py first)"
            )
    if device_name not in DEVICES:
        raise ValueError(f"--device-name {device_name!r} is not in the catalogue {sorted(DEVICES)}: add it to "
                         "dartspar/catalogue.py so that the cost model and this table agree on its specs")
    return DEVICES[device_name]


def coverage_shapes(sizes: list[int], max_flops: float) -> list[tuple[int, int, int, int]]:
    """Every (m, n, k, 1) with m, n, k from ``sizes`` and 2mnk <= ``max_flops``."""
    return [(m, n, k, 1) for m, n, k in itertools.product(sizes, repeat=3) if 2.0 * m * n * k <= max_flops]


def random_shapes(count: int, lo: int, hi: int, max_flops: float, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """``count`` distinct (m, n, k, 1), each size log-uniform in [lo, hi], 2mnk <= ``max_flops``.

    Model sizes are mostly powers of two, where BLAS kernels are at their best; sizes in between
    (remainder loops, partial tiles) are slower. Sampling arbitrary integers between the grid's
    sizes lets the fitted surface average over both instead of interpolating only the best case.
    """
    if count and not (1 <= lo <= hi and 2.0 * lo**3 <= max_flops):
        raise ValueError(f"random coverage shapes need 1 <= lo={lo} <= hi={hi} and 2*lo^3 <= max_flops={max_flops}")
    rng = random.Random(seed)
    out: set[tuple[int, int, int, int]] = set()
    while len(out) < count:
        m, n, k = (round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in range(3))
        if 2.0 * m * n * k <= max_flops:
            out.add((m, n, k, 1))
    return sorted(out)


def _block_memory_ops(cfg, micro_batch: int, tp: int) -> list[tuple[str, int, int]]:
    """(kernel, rows, cols) of a block's memory-bound forward ops, as ``gpt_block_work`` counts them."""
    tokens = micro_batch * cfg.seq_len
    return [("layernorm", tokens, cfg.hidden), ("layernorm", tokens, cfg.hidden),
            ("gelu", tokens, cfg.mlp_ratio * cfg.hidden // tp), ("add", tokens, cfg.hidden),
            ("add", tokens, cfg.hidden)]


def _softmax_shape(cfg, micro_batch: int, tp: int) -> tuple[str, int, int]:
    """The attention-score softmax an unfused attention would run (rows: the rank's heads x queries)."""
    return ("softmax", micro_batch * cfg.num_heads // tp * cfg.seq_len, cfg.seq_len)


def memory_shapes(models: dict, tps: list[int], micro_batches: list[int]) -> list[tuple[str, int, int]]:
    """Sorted distinct (kernel, rows, cols) of the memory-bound ops of the models' blocks, and
    of the softmax of their attention scores (timed alone: fused attention runs it inside)."""
    return sorted({op for cfg in models.values() for b, tp in itertools.product(micro_batches, tps)
                   if cfg.num_heads % tp == 0
                   for op in (*_block_memory_ops(cfg, b, tp), _softmax_shape(cfg, b, tp))})


def _memory_bytes(kernel: str, rows: int, cols: int, itemsize: int) -> int:
    # add reads two operands and writes one; the others read one and write one.
    return (3 if kernel == "add" else 2) * rows * cols * itemsize


def _cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Kernels:
    """Builds the calls being timed: torch ops, or this package's Triton kernels."""

    def __init__(self, device: str, backend: str):
        self.device, self.backend = device, backend
        if backend == "triton":
            from . import layernorm, matmul, softmax

            self._mm, self._ln, self._sm = matmul.matmul, layernorm.layer_norm, softmax.softmax

    def gemm(self, m: int, n: int, k: int, batch: int, dtype: torch.dtype):
        shape_a, shape_b = ((batch, m, k), (batch, k, n)) if batch > 1 else ((m, k), (k, n))
        a = torch.randn(shape_a, device=self.device).to(dtype)
        b = torch.randn(shape_b, device=self.device).to(dtype)
        if self.backend == "triton":
            return lambda: self._mm(a, b)
        return lambda: torch.matmul(a, b)

    def memory(self, kernel: str, rows: int, cols: int, dtype: torch.dtype):
        x = torch.randn(rows, cols, device=self.device).to(dtype)
        if kernel == "layernorm":
            w = torch.ones(cols, device=self.device, dtype=dtype)
            b = torch.zeros(cols, device=self.device, dtype=dtype)
            if self.backend == "triton":
                return lambda: self._ln(x, w, b)
            return lambda: F.layer_norm(x, (cols,), w, b)
        if kernel == "softmax":
            return (lambda: self._sm(x)) if self.backend == "triton" else (lambda: torch.softmax(x, dim=-1))
        if kernel == "gelu":
            return lambda: F.gelu(x)
        if kernel == "add":
            return lambda: x + x
        raise ValueError(f"memory-bound kernel {kernel!r} unknown")

    def sequence(self, ops: list[tuple[str, int, int]], dtype: torch.dtype):
        fns = [self.memory(kernel, rows, cols, dtype) for kernel, rows, cols in ops]

        def run():
            for fn in fns:
                fn()
        return run


# Probe blocks, timed whole (forward, and forward + backward): a tiny one, whose kernels take
# almost no time, for the framework's per-layer host work; and one of a preset size, whose
# kernels dominate, for how much slower kernels run inside a layer than alone.
_TINY = GPTConfig(num_layers=1, hidden=8, num_heads=1, seq_len=4, vocab_size=8)
PROBES = {"cpu": ((_TINY, 1), (GPT_PRESETS["cpu-large"], 1)), "cuda": ((_TINY, 1), (GPT_PRESETS["gpt-small"], 1))}


def _probe_makers(cfg: GPTConfig, micro_batch: int, device: str, dtype: torch.dtype) -> list:
    """Makers of a probe block's forward and forward + backward calls (in that order)."""
    def build(backward: bool):
        block = Block(cfg).to(device=device, dtype=dtype)
        x = torch.randn(micro_batch, cfg.seq_len, cfg.hidden, device=device, dtype=dtype, requires_grad=backward)
        if not backward:  # a training forward: parameters require grad, so autograd records
            return lambda: block(x)

        def fwd_bwd():
            block.zero_grad(set_to_none=True)
            block(x).sum().backward()
        return fwd_bwd
    return [lambda: build(False), lambda: build(True)]


def _cpu_clock(threads: int) -> str:
    # One thread: the ops run on the calling thread, whose CPU time ignores preemption.
    return "thread" if threads == 1 else "wall"


def _measured_cpu_bandwidth(rounds: int, min_round_s: float, clock: str) -> float:
    # A 64 MiB copy is far beyond the caches: read + write of DRAM.
    src = torch.ones(16 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cpu_time_s(lambda: dst.copy_(src), rounds, min_round_s, clock)


def _time_all(device: str, makers: list, labels: str, rounds: int, min_round_s: float, rep_ms: float,
              progress: bool, threads: int) -> list[float]:
    """Time the calls that ``makers`` build: all at once, interleaved, on CPU; one at a time on a
    GPU, where each call's operands (up to hundreds of MB for vocabulary GEMMs) are freed after it."""
    if device == "cpu":
        return cpu_times_s([make() for make in makers], rounds, min_round_s, _cpu_clock(threads),
                           progress=labels if progress else None)
    from tqdm import tqdm

    return [gpu_time_s(make(), rep_ms=rep_ms) for make in tqdm(makers, desc=labels, disable=not progress, file=sys.stderr)]


def profile_kernels(
    device: str, models: list[str], tps: list[int], micro_batches: list[int], dtypes: list[str],
    coverage: list[int], max_gflop: float, random_count: int = 0, threads: int = 1, backend: str | None = None,
    device_name: str | None = None, rounds: int = 9, min_round_s: float = 0.01, rep_ms: float = 100.0,
    progress: bool = True,
) -> ProfileTable:
    """Time the GEMM and memory-bound shapes of ``models`` on ``device`` ("cpu" or "cuda").

    ``backend`` is "torch" (default on CPU, the only choice there: the Triton interpreter's
    speed says nothing) or "triton" (default on CUDA; GELU and residual adds stay torch ops).
    ``threads`` sets ``torch.set_num_threads`` on CPU. GEMM shapes: the models' (forward and
    backward, every tp degree and micro-batch), the ``coverage`` sizes' full grid, and
    ``random_count`` log-uniform shapes between its smallest and largest size (``random_shapes``).
    Besides single memory-bound kernels, each block configuration's whole sequence of memory-bound forward ops is timed as kernel "block":
    the estimator's memory term is fitted to those, the mix a layer's ``other_bytes_moved`` has.
    Two torch GPT blocks (``PROBES``) are timed whole, forward and forward + backward: a tiny one
    for the framework's per-layer host time, one of a preset size for kernels' slowdown in context.
    Returns the table; ``main`` writes it.
    """
    unknown = [m for m in models if m not in GPT_PRESETS]
    if unknown:
        raise ValueError(f"--models {unknown} unknown; choose from {sorted(GPT_PRESETS)}")
    bad = [d for d in dtypes if d not in TORCH_DTYPES]
    if bad:
        raise ValueError(f"--dtypes {bad} unknown; choose from {sorted(TORCH_DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} must be cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no CUDA device here; use --device cpu")
    backend = backend or ("triton" if device == "cuda" else "torch")
    if device == "cpu" and backend != "torch":
        raise ValueError("--backend triton needs --device cuda: on CPU Triton only runs in its interpreter")
    configs = {name: GPT_PRESETS[name] for name in models}
    gemm_shapes = sorted(set(training_gemm_shapes(configs, tps, micro_batches))
                         | set(coverage_shapes(coverage, max_gflop * 1e9))
                         | set(random_shapes(random_count, min(coverage, default=16), max(coverage, default=4096),
                                             max_gflop * 1e9)))
    mem_shapes = memory_shapes(configs, tps, micro_batches)
    blocks = sorted({(tuple(_block_memory_ops(cfg, b, tp)), cfg.hidden)
                     for cfg in configs.values() for b in micro_batches for tp in tps if cfg.num_heads % tp == 0})

    if device == "cuda":  # resolve the spec first: a dtype without a catalogue peak fails now, not after an hour
        gpu_spec = cuda_device_spec(torch.cuda.get_device_name(), device_name)
        for dtype in dtypes:
            gpu_spec.peak(dtype)

    previous_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        kernels = _Kernels(device, backend)
        gemm_rows, memory_rows, probe_rows = [], [], []
        for dtype in dtypes:
            tdt = TORCH_DTYPES[dtype]
            makers = [lambda s=s: kernels.gemm(*s, tdt) for s in gemm_shapes]
            times = _time_all(device, makers, f"{dtype} GEMMs", rounds, min_round_s, rep_ms, progress, threads)
            gemm_rows += [GemmRow(*s, dtype, t) for s, t in zip(gemm_shapes, times)]
            makers = ([lambda s=s: kernels.memory(*s, tdt) for s in mem_shapes]
                      + [lambda ops=ops: kernels.sequence(list(ops), tdt) for ops, _ in blocks])
            times = _time_all(device, makers, f"{dtype} memory-bound", rounds, min_round_s, rep_ms, progress, threads)
            size = tdt.itemsize
            memory_rows += [MemoryRow(kern, rows, cols, dtype, _memory_bytes(kern, rows, cols, size), t)
                            for (kern, rows, cols), t in zip(mem_shapes, times)]
            memory_rows += [MemoryRow("block", ops[0][1], hidden, dtype,
                                      sum(_memory_bytes(*op, size) for op in ops), t)
                            for (ops, hidden), t in zip(blocks, times[len(mem_shapes):])]
            makers = [make for cfg, b in PROBES[device] for make in _probe_makers(cfg, b, device, tdt)]
            # Whole rounds of >= 50 ms: the tiny probe's forward + backward is ~1 ms of Python work.
            times = _time_all(device, makers, f"{dtype} probe blocks", rounds, max(min_round_s, 0.05), rep_ms,
                              progress, threads)
            probe_rows += [ProbeRow(cfg.hidden, cfg.num_heads, cfg.seq_len, b, dtype, times[2 * i], times[2 * i + 1])
                           for i, (cfg, b) in enumerate(PROBES[device])]
        if device == "cpu":
            model = _cpu_model_name()
            peaks = {d: max(2.0 * r.m * r.n * r.k * r.batch / r.time_s for r in gemm_rows if r.dtype == d)
                     for d in dtypes}
            name = device_name or "CPU"  # the catalogue's name for a host process
            spec = DeviceSpec(name=name, peak_flops_per_s=peaks, memory_bytes=0.0,
                              memory_bandwidth_bytes_per_s=_measured_cpu_bandwidth(rounds, min_round_s,
                                                                                   _cpu_clock(threads)))
            source = ("measured here: peak = best GEMM rate of this table, bandwidth = 64 MiB copy, "
                      f"{threads} thread(s)")
            timer = (f"fastest of {rounds} interleaved rounds of >= {min_round_s} s, {_cpu_clock(threads)} clock "
                     "(timing.cpu_times_s)")
        else:
            model = torch.cuda.get_device_name()
            spec = gpu_spec
            name = spec.name
            source = "dartspar.catalogue (datasheet dense peaks)"
            timer = f"triton.testing.do_bench median, rep={rep_ms} ms"
    finally:
        torch.set_num_threads(previous_threads)

    import triton

    meta = {
        "device_model": model,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "timer": timer,
        "models": models, "tp": tps, "micro_batch": micro_batches, "coverage": coverage,
        "random_shapes": random_count, "max_gflop": max_gflop,
    }
    return ProfileTable(device=name, backend=backend, threads=threads if device == "cpu" else 0, spec=spec,
                        spec_source=source, gemm_rows=tuple(gemm_rows), memory_rows=tuple(memory_rows),
                        probe_rows=tuple(probe_rows), meta=meta)


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _str_list(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dartspar-profile-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--out", type=Path, default=None,
                   help="table JSON (default: dartspar/cost/kernels/tables/<device>.json)")
    p.add_argument("--models", type=_str_list, default=None, help=f"comma list from {sorted(GPT_PRESETS)}")
    p.add_argument("--tp", type=_int_list, default=None, help="tensor-parallel degrees, e.g. 1,2,4,8")
    p.add_argument("--micro-batch", type=_int_list, default=None, help="micro-batch sizes, e.g. 1,2,4,8")
    p.add_argument("--dtypes", type=_str_list, default=None, help="fp32,fp16,bf16")
    p.add_argument("--coverage", type=_int_list, default=None,
                   help="sizes of the m x n x k coverage grid (empty string: none)")
    p.add_argument("--random-shapes", type=int, default=None,
                   help="log-uniform random GEMM shapes between the coverage sizes (0: none)")
    p.add_argument("--max-gflop", type=float, default=None, help="skip coverage GEMMs above this many GFLOP")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one executor rank's share of the cores)")
    p.add_argument("--backend", choices=["torch", "triton"], default=None)
    p.add_argument("--device-name", default=None,
                   help="the DeviceSpec.name the table serves (CPU default: CPU; GPU: a dartspar.catalogue key, "
                        "guessed from the CUDA device name)")
    p.add_argument("--rounds", type=int, default=9, help="CPU: interleaved timing rounds (the fastest counts)")
    p.add_argument("--min-round-s", type=float, default=0.01, help="CPU: seconds per function per round")
    p.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench rep time in ms")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point of ``dartspar-profile-kernels``."""
    args = build_parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = CUDA_DEFAULTS if device == "cuda" else CPU_DEFAULTS

    def pick(value, key):
        return defaults[key] if value is None else value

    table = profile_kernels(
        device=device, models=pick(args.models, "models"), tps=pick(args.tp, "tp"),
        micro_batches=pick(args.micro_batch, "micro_batch"), dtypes=pick(args.dtypes, "dtypes"),
        coverage=pick(args.coverage, "coverage"), max_gflop=pick(args.max_gflop, "max_gflop"),
        random_count=pick(args.random_shapes, "random_shapes"),
        threads=args.threads, backend=args.backend, device_name=args.device_name,
        rounds=args.rounds, min_round_s=args.min_round_s, rep_ms=args.rep_ms, progress=not args.no_progress,
    )
    out = args.out
    if out is None:
        stem = f"cpu-{_slug(table.meta['device_model'])}-{table.threads}t" if device == "cpu" else _slug(table.device)
        out = TABLES_DIR / f"{stem}.json"
    table.save(out)
    print(f"wrote {len(table.gemm_rows)} GEMM and {len(table.memory_rows)} memory-bound timings of "
          f"{table.device} ({table.meta['device_model']}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
