"""Row softmax in Triton (the attention-score normalisation of an unfused attention).

One program per row, exp and sum in fp32; reads the scores once and writes the probabilities
once, so like the layer norm it is memory-bound: ~ 2 * rows * cols * itemsize bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._reduce import row_max, row_sum
from ._runtime import check_kernel_inputs

__all__ = ["softmax", "softmax_bytes"]

MAX_COLS = 65536


@triton.jit
def _softmax_kernel(x_ptr, y_ptr, stride_x, stride_y, cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=-float("inf")).to(tl.float32)
    # Subtracting the row max keeps exp() finite for any input scale.
    z = x - row_max(x)
    e = tl.exp(z)
    y = e / row_sum(e)
    tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=-1)``."""
    check_kernel_inputs("softmax", x)
    cols = x.shape[-1]
    if cols > MAX_COLS:
        raise ValueError(f"softmax row width {cols} exceeds MAX_COLS={MAX_COLS} of this one-pass kernel")
    x2 = x.reshape(-1, cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    _softmax_kernel[(x2.shape[0],)](x2, y, x2.stride(0), y.stride(0), cols, BLOCK=triton.next_power_of_2(cols))
    return y.reshape(x.shape)


def softmax_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes a row softmax moves: read the scores, write the probabilities."""
    return 2 * rows * cols * itemsize
