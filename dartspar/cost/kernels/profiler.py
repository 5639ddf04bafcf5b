"""``dartspar-profile-kernels``: time GEMMs and memory-bound kernels, write a profile table.

On a GPU it times this package's Triton kernels (``matmul``, ``layer_norm``, ``softmax``) with
``triton.testing.do_bench``; on a CPU it times the torch ops the CPU executor runs (mm / bmm,
layer_norm, softmax, gelu, add) with a best-of-repeats timer at a fixed thread count (each
executor rank is a process with its own threads). Shapes come from the GEMMs of named GPT sizes
(``workload.GPT_PRESETS``) for every tensor-parallel degree and micro-batch size, forward and
backward, plus a log-spaced coverage grid so that the fitted efficiency surface has support
between the models' shapes.

    dartspar-profile-kernels --device cpu --threads 1
    dartspar-profile-kernels --device cuda --models gpt-small,gpt-medium --tp 1,2,4,8
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ...cluster import DeviceSpec
from .table import TABLES_DIR, GemmRow, MemoryRow, ProfileTable
from .timing import cpu_time_s, gpu_time_s
from .workload import GPT_PRESETS, training_gemm_shapes

__all__ = [
    "main", "profile_kernels", "coverage_shapes", "memory_shapes", "cuda_datasheet_spec",
    "TORCH_DTYPES", "CPU_DEFAULTS", "CUDA_DEFAULTS",
]

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

CPU_DEFAULTS = dict(
    models=["cpu-tiny", "cpu-small", "cpu-medium", "cpu-large"], tp=[1, 2], micro_batch=[1, 2, 4],
    dtypes=["fp32"], coverage=[16, 64, 256, 1024, 4096], max_gflop=0.5,
)
CUDA_DEFAULTS = dict(
    models=["gpt-small", "gpt-medium", "gpt-large", "gpt-xl"], tp=[1, 2, 4, 8], micro_batch=[1, 2, 4, 8],
    dtypes=["bf16", "fp16", "fp32"], coverage=[64, 256, 1024, 4096, 16384], max_gflop=2000.0,
)

# Dense datasheet figures (NVIDIA datasheets; bf16/fp16 and bandwidth as in ../shared/FACTS.md).
# fp32 is the CUDA-core rate, which the matmul kernel's exact-fp32 ("ieee") mode runs at.
# Matched against torch.cuda.get_device_name() in order; first match wins.
_CUDA_DATASHEETS = (
    ("H200", "H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 141e9, 4.8e12),
    ("H100 80GB HBM3", "H100-SXM", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 80e9, 3.35e12),
    ("A100-SXM4-80GB", "A100-SXM-80GB", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 80e9, 2.0e12),
    ("A100-SXM4-40GB", "A100-40GB", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 40e9, 1.55e12),
    ("V100", "V100-SXM2-32GB", {"fp16": 125e12, "fp32": 15.7e12}, 32e9, 0.9e12),
    ("L4", "L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}, 24e9, 0.3e12),
    ("T4", "T4", {"fp16": 65e12, "fp32": 8.1e12}, 16e9, 0.32e12),
)


def cuda_datasheet_spec(cuda_name: str) -> DeviceSpec:
    """Datasheet ``DeviceSpec`` for a ``torch.cuda.get_device_name()`` string."""
    for pattern, name, peaks, memory, bandwidth in _CUDA_DATASHEETS:
        if pattern in cuda_name:
            return DeviceSpec(name=name, peak_flops_per_s=peaks, memory_bytes=memory,
                              memory_bandwidth_bytes_per_s=bandwidth)
    raise ValueError(
        f"no datasheet for GPU {cuda_name!r}; known: {[p for p, *_ in _CUDA_DATASHEETS]}. "
        "Add its dense peaks and bandwidth to _CUDA_DATASHEETS in dartspar/cost/kernels/profiler.py"
    )


def coverage_shapes(sizes: list[int], max_flops: float) -> list[tuple[int, int, int, int]]:
    """Every (m, n, k, 1) with m, n, k from ``sizes`` and 2mnk <= ``max_flops``."""
    return [(m, n, k, 1) for m, n, k in itertools.product(sizes, repeat=3) if 2.0 * m * n * k <= max_flops]


def memory_shapes(models: dict, tps: list[int], micro_batches: list[int]) -> list[tuple[str, int, int]]:
    """Sorted distinct (kernel, rows, cols) of the memory-bound ops of the models' blocks
    (the ops ``workload.gpt_block_work`` counts)."""
    shapes = set()
    for cfg in models.values():
        for b, tp in itertools.product(micro_batches, tps):
            if cfg.num_heads % tp:
                continue
            tokens, s = b * cfg.seq_len, cfg.seq_len
            heads = b * cfg.num_heads // tp
            shapes |= {
                ("layernorm", tokens, cfg.hidden), ("add", tokens, cfg.hidden),
                ("softmax", heads * s, s), ("gelu", tokens, cfg.mlp_ratio * cfg.hidden // tp),
            }
    return sorted(shapes)


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


class _Backend:
    """The ops being timed and the timer, for one device kind."""

    def __init__(self, device: str, backend: str, min_repeat_s: float, repeats: int, rep_ms: float):
        self.device, self.backend = device, backend
        self.min_repeat_s, self.repeats, self.rep_ms = min_repeat_s, repeats, rep_ms
        if backend == "triton":
            from . import layernorm, matmul, softmax

            self._mm, self._ln, self._sm = matmul.matmul, layernorm.layer_norm, softmax.softmax

    def time(self, fn) -> float:
        if self.device == "cuda":
            return gpu_time_s(fn, rep_ms=self.rep_ms)
        return cpu_time_s(fn, min_repeat_s=self.min_repeat_s, repeats=self.repeats)

    def gemm(self, m: int, n: int, k: int, batch: int, dtype: torch.dtype) -> float:
        shape_a, shape_b = ((batch, m, k), (batch, k, n)) if batch > 1 else ((m, k), (k, n))
        a = torch.randn(shape_a, device=self.device).to(dtype)
        b = torch.randn(shape_b, device=self.device).to(dtype)
        if self.backend == "triton":
            return self.time(lambda: self._mm(a, b))
        return self.time(lambda: torch.matmul(a, b))

    def memory(self, kernel: str, rows: int, cols: int, dtype: torch.dtype) -> float:
        x = torch.randn(rows, cols, device=self.device).to(dtype)
        w = torch.ones(cols, device=self.device, dtype=dtype)
        b = torch.zeros(cols, device=self.device, dtype=dtype)
        triton = self.backend == "triton"
        fns = {
            "layernorm": (lambda: self._ln(x, w, b)) if triton else (lambda: F.layer_norm(x, (cols,), w, b)),
            "softmax": (lambda: self._sm(x)) if triton else (lambda: torch.softmax(x, dim=-1)),
            "gelu": lambda: F.gelu(x),
            "add": lambda: x + x,
        }
        return self.time(fns[kernel])


def _measured_cpu_bandwidth(min_repeat_s: float, repeats: int) -> float:
    # A 64 MiB copy is far beyond the caches: read + write of DRAM.
    src = torch.ones(16 * 2**20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cpu_time_s(lambda: dst.copy_(src), min_repeat_s, repeats)


def profile_kernels(
    device: str, models: list[str], tps: list[int], micro_batches: list[int], dtypes: list[str],
    coverage: list[int], max_gflop: float, threads: int = 1, backend: str | None = None,
    device_name: str | None = None, min_repeat_s: float = 0.01, repeats: int = 5, rep_ms: float = 100.0,
    memory_kernels: list[str] | None = None, progress: bool = True,
) -> ProfileTable:
    """Time the GEMM and memory-bound shapes of ``models`` on ``device`` ("cpu" or "cuda").

    ``backend`` is "torch" (default on CPU, the only choice there: the Triton interpreter's
    speed says nothing) or "triton" (default on CUDA). ``threads`` sets ``torch.set_num_threads``
    on CPU. Returns the table; ``main`` writes it.
    """
    from tqdm import tqdm

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
                         | set(coverage_shapes(coverage, max_gflop * 1e9)))
    mem_shapes = [s for s in memory_shapes(configs, tps, micro_batches)
                  if memory_kernels is None or s[0] in memory_kernels]
    if backend == "triton":
        mem_shapes = [s for s in mem_shapes if s[0] in ("layernorm", "softmax")]

    previous_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        runner = _Backend(device, backend, min_repeat_s, repeats, rep_ms)
        gemm_rows, memory_rows = [], []
        jobs = [(d, s) for d in dtypes for s in gemm_shapes]
        for dtype, (m, n, k, batch) in tqdm(jobs, desc=f"GEMMs on {device}", disable=not progress, file=sys.stderr):
            gemm_rows.append(GemmRow(m, n, k, batch, dtype, runner.gemm(m, n, k, batch, TORCH_DTYPES[dtype])))
        jobs = [(d, s) for d in dtypes for s in mem_shapes]
        for dtype, (kernel, rows, cols) in tqdm(jobs, desc=f"memory-bound on {device}", disable=not progress,
                                                file=sys.stderr):
            nbytes = _memory_bytes(kernel, rows, cols, TORCH_DTYPES[dtype].itemsize)
            memory_rows.append(MemoryRow(kernel, rows, cols, dtype, nbytes,
                                         runner.memory(kernel, rows, cols, TORCH_DTYPES[dtype])))
        if device == "cpu":
            model = _cpu_model_name()
            peaks = {d: max(2.0 * r.m * r.n * r.k * r.batch / r.time_s for r in gemm_rows if r.dtype == d)
                     for d in dtypes}
            name = device_name or "cpu"
            spec = DeviceSpec(name=name, peak_flops_per_s=peaks, memory_bytes=0.0,
                              memory_bandwidth_bytes_per_s=_measured_cpu_bandwidth(min_repeat_s, repeats))
            source = ("measured here: peak = best GEMM rate of this table, bandwidth = 64 MiB copy, "
                      f"{threads} thread(s)")
            timer = f"best of {repeats} rounds of >= {min_repeat_s} s (timing.cpu_time_s)"
        else:
            model = torch.cuda.get_device_name()
            spec = cuda_datasheet_spec(model)
            if device_name:
                spec = DeviceSpec(device_name, spec.peak_flops_per_s, spec.memory_bytes,
                                  spec.memory_bandwidth_bytes_per_s)
            name = spec.name
            source = "datasheet (dense peaks), see _CUDA_DATASHEETS"
            timer = f"triton.testing.do_bench median, rep={rep_ms} ms"
    finally:
        torch.set_num_threads(previous_threads)

    import triton

    meta = {
        "device_model": model,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "timer": timer,
        "models": models, "tp": tps, "micro_batch": micro_batches, "coverage": coverage, "max_gflop": max_gflop,
    }
    return ProfileTable(device=name, backend=backend, threads=threads if device == "cpu" else 0, spec=spec,
                        spec_source=source, gemm_rows=tuple(gemm_rows), memory_rows=tuple(memory_rows), meta=meta)


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
    p.add_argument("--max-gflop", type=float, default=None, help="skip coverage GEMMs above this many GFLOP")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (one executor rank's share of the cores)")
    p.add_argument("--backend", choices=["torch", "triton"], default=None)
    p.add_argument("--device-name", default=None, help="catalogue name to store (DeviceSpec.name it matches)")
    p.add_argument("--min-repeat-s", type=float, default=0.01, help="CPU: seconds per timing round")
    p.add_argument("--repeats", type=int, default=5, help="CPU: timing rounds (the fastest counts)")
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
        threads=args.threads, backend=args.backend, device_name=args.device_name,
        min_repeat_s=args.min_repeat_s, repeats=args.repeats, rep_ms=args.rep_ms, progress=not args.no_progress,
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
