"""Tiled (batched) matrix multiply in Triton: fp32 / fp16 / bf16 inputs, fp32 accumulation.

``matmul(a, b)`` computes ``a @ b`` for (M x K) @ (K x N) or batched (B x M x K) @ (B x K x N)
inputs of any strides. The output has the input dtype (as ``torch.matmul``), accumulated in fp32.
On a GPU the tile sizes are autotuned per (M, N, K); in the interpreter or without CUDA there is
one configuration, because Triton's autotuner benchmarks configurations on a GPU driver
(../shared/FACTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._runtime import check_kernel_inputs, gpu_available, interpreting

__all__ = ["matmul", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _configs() -> list[triton.Config]:
    if not gpu_available():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    # Tile shapes of the Triton matmul tutorial's search space, from large square tiles (big
    # GEMMs) to narrow ones (tensor-parallel shards with small N, attention's small K).
    shapes = [
        (128, 256, 64, 3, 8), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4), (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2),
        (128, 128, 64, 3, 8), (64, 64, 64, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                      num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
    ]


def _tuning_bench(fn, quantiles):
    # Short timings while choosing a tile: ten configurations per new shape at do_bench's default
    # 25 + 100 ms would dominate a profiling run; the profiler times the winner on its own.
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


@triton.autotune(configs=_configs(), key=["M", "N", "K"], do_bench=_tuning_bench)
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    # Only builtins (no tl.cdiv / tl.zeros): see _reduce.py on library functions in the interpreter.
    grid_m = (M + BLOCK_M - 1) // BLOCK_M
    grid_n = (N + BLOCK_N - 1) // BLOCK_N
    # Grouped ordering: GROUP_M row-tiles share the same column tiles of B while they are in L2.
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    group_size = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + batch * stride_ab + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + batch * stride_bb + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # tl.zeros is a library function too
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] + k0 < K), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] + k0 < K) & (offs_n[None, :] < N), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + batch * stride_cb + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, fp32_precision: str = "ieee") -> torch.Tensor:
    """``a @ b`` with fp32 accumulation; a (M, K) or (B, M, K), b (K, N) or (B, K, N).

    ``fp32_precision`` is Triton's ``input_precision`` for fp32 inputs on a GPU: "ieee" (exact
    fp32, what ``torch.matmul`` does by default) or "tf32" (tensor cores). fp16/bf16 inputs always
    use the tensor cores with fp32 accumulation.
    """
    check_kernel_inputs("matmul", a, b)
    if a.dtype != b.dtype or a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"matmul dtypes a={a.dtype}, b={b.dtype}: both must be one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}; cast the inputs first"
        )
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"matmul fp32_precision={fp32_precision!r} must be 'ieee' or 'tf32'")
    if a.dim() != b.dim() or a.dim() not in (2, 3):
        raise ValueError(f"matmul needs two 2-D or two 3-D tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    squeeze = a.dim() == 2
    if squeeze:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"matmul shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    batch, m, k = a.shape
    n = b.shape[2]
    c = torch.empty((batch, m, n), dtype=a.dtype, device=a.device)
    # The interpreter's tl.dot is wrong on bf16 (triton#11584); fp32 operands give the exact
    # products of the bf16 values, which is what fp32 accumulation on tensor cores computes.
    upcast = interpreting() and a.dtype == torch.bfloat16

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch)

    _matmul_kernel[grid](
        a, b, c, m, n, k,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        c.stride(0), c.stride(1), c.stride(2),
        UPCAST=upcast, INPUT_PRECISION=fp32_precision,
    )
    return c[0] if squeeze else c
