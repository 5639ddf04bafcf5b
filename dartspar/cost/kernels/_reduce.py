"""Row reductions built on ``tl.reduce`` with this package's own combine functions.

``tl.sum`` / ``tl.max`` (and ``tl.cdiv``, ``tl.zeros``) are Triton-library functions decorated when
``triton.language`` is first imported. If anything imports triton before ``TRITON_INTERPRET=1``
is set (torch does, through its flop counter), they are compiled-mode functions that the
interpreter cannot call; functions decorated here, after the flag is set, work in both modes.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["row_sum", "row_max"]


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def row_sum(x):
    """Sum of a 1-D block."""
    return tl.reduce(x, 0, _add)


@triton.jit
def row_max(x):
    """Maximum of a 1-D block."""
    return tl.reduce(x, 0, _maximum)
