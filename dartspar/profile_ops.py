"""What one aten op costs: FLOPs, its matrix multiplies, the bytes it moves, tensor byte sizes.

Pure functions of an op and its arguments, used by the profiler's dispatch mode
(``profile_trace.py``). Byte sizes are expressed in the *training* dtype: the profiler runs an
fp32 model on the meta device, but a bf16 run moves half the bytes, so floating-point tensors
count ``dtype_bytes`` per element while integer/bool tensors (token ids, masks, RNG state) keep
their own width.
"""

from __future__ import annotations

from math import prod
from typing import Any, Iterator

import torch
from torch.utils.flop_counter import flop_registry

__all__ = [
    "GemmProduct", "iter_tensors", "tensor_bytes", "storage_bytes", "storage_key",
    "op_flops", "op_gemm_products", "op_bytes_moved",
]

aten = torch.ops.aten

# (m, n, k, batch, family): ``batch`` products of (m x k) @ (k x n). family "linear" has the
# tokens flattened into m; "batched" carries the samples (times heads) in ``batch``.
GemmProduct = tuple[int, int, int, int, str]

_SDPA_FORWARD = {
    aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_cudnn_attention,
}
# Convolutions whose argument 6 is ``transposed``; the other two are never transposed.
_CONV_WITH_TRANSPOSED_ARG = {aten.convolution, aten._convolution, aten.convolution_overrideable}
_CONV_PLAIN = {aten.cudnn_convolution, aten._slow_conv2d_forward}

# Ops that allocate or re-describe memory without reading or writing tensor data.
_NO_TRAFFIC = {
    aten._unsafe_view, aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.lift_fresh, aten.lift_fresh_copy,
}
# Gathers read only the selected rows of their table, not the whole table.
_GATHERS = {aten.embedding, aten.index_select, aten.gather, aten.index}


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested tuples/lists/dicts (module outputs, op arguments), in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)


def _width_bytes(t: torch.Tensor, dtype_bytes: int) -> int:
    return dtype_bytes if t.is_floating_point() else t.element_size()


def tensor_bytes(t: torch.Tensor, dtype_bytes: int) -> int:
    """Bytes of ``t``'s elements in the training dtype (floating: ``dtype_bytes`` each)."""
    return t.numel() * _width_bytes(t, dtype_bytes)


def storage_key(t: torch.Tensor) -> int:
    """Identity of the memory ``t`` views: equal for a tensor and all its views."""
    return t.untyped_storage()._cdata


def storage_bytes(t: torch.Tensor, dtype_bytes: int) -> int:
    """Bytes of the whole storage behind ``t`` (what keeping ``t`` alive costs), training dtype."""
    return t.untyped_storage().nbytes() // t.element_size() * _width_bytes(t, dtype_bytes)


def op_flops(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one aten op by ``torch.utils.flop_counter``'s formulas (0 if it has none)."""
    formula = flop_registry.get(func._overloadpacket)
    return 0 if formula is None else int(formula(*args, **kwargs, out_val=out))


def op_gemm_products(func: torch._ops.OpOverload, args: tuple, out: Any) -> list[GemmProduct]:
    """The matrix multiplies a FLOP-counted forward op performs.

    Convolutions are written as their implicit GEMM (m = samples x output positions,
    one product per group), attention kernels as their two batched products QK^T and PV over
    batch x query-heads. Raises ``NotImplementedError`` for a FLOP-counted op with no mapping,
    so that its FLOPs never silently go missing from the GEMM list.
    """
    packet = func._overloadpacket
    if packet in (aten.mm, aten._scaled_mm):
        a, b = args[0], args[1]
        return [(a.shape[0], b.shape[1], a.shape[1], 1, "linear")]
    if packet is aten.addmm:
        a, b = args[1], args[2]
        return [(a.shape[0], b.shape[1], a.shape[1], 1, "linear")]
    if packet in (aten.bmm, aten.baddbmm):
        a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
        return [(a.shape[1], b.shape[2], a.shape[2], a.shape[0], "batched")]
    if packet in _SDPA_FORWARD:
        query, key, value = args[0], args[1], args[2]
        batch, heads, seq_q, head_dim = query.shape
        seq_k, value_dim = key.shape[2], value.shape[3]
        return [
            (seq_q, seq_k, head_dim, batch * heads, "batched"),
            (seq_q, value_dim, seq_k, batch * heads, "batched"),
        ]
    if packet in _CONV_WITH_TRANSPOSED_ARG or packet in _CONV_PLAIN:
        x, w = args[0], args[1]
        transposed = bool(args[6]) if packet in _CONV_WITH_TRANSPOSED_ARG else False
        out_t = out[0] if isinstance(out, (tuple, list)) else out
        positions = prod((x if transposed else out_t).shape[2:])
        kernel = prod(w.shape[2:])
        if transposed:  # weight (c_in, c_out / groups, *kernel)
            groups = out_t.shape[1] // w.shape[1]
            k, n = x.shape[1] // groups, w.shape[1] * kernel
        else:  # weight (c_out, c_in / groups, *kernel)
            groups = x.shape[1] // w.shape[1]
            k, n = w.shape[1] * kernel, w.shape[0] // groups
        return [(x.shape[0] * positions, n, k, groups, "linear")]
    raise NotImplementedError(
        f"profile: forward op {func} performs FLOPs but the profiler has no GEMM shape for it; "
        "extend dartspar.profile_ops.op_gemm_products so its cost reaches the roofline"
    )


def op_bytes_moved(
    func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any, dtype_bytes: int,
) -> int:
    """Bytes a non-GEMM op reads plus writes (training dtype); 0 for views and allocations.

    Gathers (embedding lookups, index_select, ...) read as many table bytes as they write,
    not the whole table.
    """
    packet = func._overloadpacket
    if func.is_view or packet in _NO_TRAFFIC:
        return 0
    out_bytes = sum(tensor_bytes(t, dtype_bytes) for t in iter_tensors(out))
    if packet in _GATHERS:
        index_bytes = sum(
            tensor_bytes(t, dtype_bytes)
            for t in iter_tensors((args, kwargs)) if not t.is_floating_point()
        )
        return 2 * out_bytes + index_bytes
    in_bytes = sum(tensor_bytes(t, dtype_bytes) for t in iter_tensors((args, kwargs)))
    return in_bytes + out_bytes
