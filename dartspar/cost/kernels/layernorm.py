"""Fused layer norm (forward) in Triton: one program per row, statistics in fp32.

This is the memory-bound work beside a transformer block's GEMMs: it reads a (rows x cols)
activation once and writes it once, so its time is ~ 2 * rows * cols * itemsize / bandwidth plus
a launch, which is what the profiler measures and the estimator's memory term fits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._reduce import row_sum
from ._runtime import check_kernel_inputs

__all__ = ["layer_norm", "layer_norm_bytes"]

# A row is held in registers; beyond this width a two-pass kernel would be needed.
MAX_COLS = 65536


@triton.jit
def _layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, stride_x, stride_y, cols, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    mean = row_sum(x) / cols
    centred = tl.where(mask, x - mean, 0.0)
    var = row_sum(centred * centred) / cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd * w + b
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, (cols,), weight, bias, eps)`` over the last dimension of ``x``."""
    check_kernel_inputs("layer_norm", x, weight, bias)
    cols = x.shape[-1]
    if weight.shape != (cols,) or bias.shape != (cols,):
        raise ValueError(
            f"layer_norm weight {tuple(weight.shape)} / bias {tuple(bias.shape)} must both be ({cols},), "
            "the last dimension of x"
        )
    if cols > MAX_COLS:
        raise ValueError(f"layer_norm row width {cols} exceeds MAX_COLS={MAX_COLS} of this one-pass kernel")
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    _layer_norm_kernel[(x2.shape[0],)](
        x2, weight, bias, y, x2.stride(0), y.stride(0), cols, eps, BLOCK=triton.next_power_of_2(cols),
    )
    return y.reshape(x.shape)


def layer_norm_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes a layer norm moves: read x, write y (the weights are negligible and stay cached)."""
    return 2 * rows * cols * itemsize
