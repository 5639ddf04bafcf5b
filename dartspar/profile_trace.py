"""Run a model's forward and backward once on the meta device and attribute every op to a layer.

The layer sequence is cut into *segments*: segment 0 is everything before the first block,
segments 1..n the blocks, n+1 everything after the last block, and n+2 the loss reduction the
profiler adds (discarded). Three mechanisms attribute work to segments:

* forward ops: module hooks on the blocks set the current segment, and a ``TorchDispatchMode``
  charges each aten op (FLOPs, GEMM shapes, bytes moved) to it;
* backward ops: autograd numbers every graph node it creates with a per-thread sequence number
  (``torch.autograd._get_sequence_nr``), so the sequence number at each segment's start splits
  the nodes into segments; while backward runs, ``torch._C._current_autograd_node()`` names the
  node an op belongs to, which gives the op's segment exactly, even for tensors that skip
  layers or weights tied across them;
* saved activations: ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor autograd
  keeps for backward while the segment that saves it is running.

Work done between two blocks (outside both) is charged to the earlier one. A model that sets
its own saved-tensor hooks (non-reentrant activation checkpointing) hides those tensors from
the profiler, and its recomputation shows up as backward FLOPs, as it would on a GPU.
Functional meta kernels are replayed from a cache (``_MetaOpCache``), which is what makes a
96-block model profile in seconds.
"""

from __future__ import annotations

import bisect
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .profile_ops import (
    GemmProduct, iter_tensors, op_bytes_moved, op_flops, op_gemm_products, storage_bytes,
    storage_key, tensor_bytes,
)

__all__ = ["SegmentStats", "TraceResult", "trace", "TP_STYLES", "ATTENTION_BACKENDS"]

TP_STYLES = ("colwise", "rowwise")
ATTENTION_BACKENDS = ("flash", "math")


@dataclass
class SegmentStats:
    """What one segment did in one training step (mutable while tracing).

    ``gemms`` holds (product, tp_split) pairs in execution order; ``saved`` maps a storage
    identity to its bytes, so a tensor saved twice in one segment counts once;
    ``params_read`` holds storage identities of parameters the forward read here.
    """

    fwd_flops: int = 0
    bwd_flops: int = 0
    gemms: list[tuple[GemmProduct, str]] = field(default_factory=list)
    saved: dict[int, int] = field(default_factory=dict)
    other_bytes_moved: int = 0
    tp_allreduce_bytes: int = 0
    tp_allreduce_count: int = 0
    tp_bwd_allreduce_bytes: int = 0
    tp_bwd_allreduce_count: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    params_read: set[int] = field(default_factory=set)
    tensor_parallel: bool = False


@dataclass
class TraceResult:
    """Per-segment statistics: index 0 = before the blocks, 1..n = blocks, n+1 = after them."""

    segments: list[SegmentStats]


def _boundary_bytes(obj: Any, dtype_bytes: int) -> int:
    seen: set[int] = set()
    total = 0
    for t in iter_tensors(obj):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t, dtype_bytes)
    return total


def _freeze(obj: Any) -> Any:
    """A hashable description of an op argument that fixes a meta kernel's result."""
    if isinstance(obj, torch.Tensor):
        return (torch.Tensor, tuple(obj.shape), obj.stride(), obj.storage_offset(), obj.dtype,
                obj.device, obj.layout)
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_freeze(item) for item in obj))
    if isinstance(obj, dict):
        return (dict, tuple((key, _freeze(item)) for key, item in obj.items()))
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device,
                                       torch.memory_format, torch.layout)):
        return (type(obj), obj)  # the type keeps 1, 1.0 and True apart
    raise TypeError


def _dense_storage_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def _output_spec(out: Any, storages: set[int]) -> Any:
    """How to rebuild ``out`` with fresh tensors, or None if fresh tensors would not match it.

    ``storages`` holds the storages ``out`` must not share (the inputs'); it collects the
    outputs' own as it goes, so outputs aliasing each other are refused too.
    """
    if isinstance(out, torch.Tensor):
        key = storage_key(out)
        if (not out.is_meta or out.storage_offset() != 0 or key in storages
                or out.untyped_storage().nbytes() != _dense_storage_bytes(out)):
            return None
        storages.add(key)
        return ("tensor", tuple(out.shape), out.stride(), out.dtype)
    if isinstance(out, (tuple, list)):
        items = [_output_spec(item, storages) for item in out]
        return None if any(item is None for item in items) else (type(out), items)
    if out is None or isinstance(out, (bool, int, float)):
        return ("value", out)
    return None


def _build(spec: Any) -> Any:
    if spec[0] == "tensor":
        _, shape, stride, dtype = spec
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    if spec[0] == "value":
        return spec[1]
    return spec[0](_build(item) for item in spec[1])


class _MetaOpCache:
    """Replays meta kernels: same op + same argument metadata -> same output metadata, FLOPs.

    Many meta kernels are Python decompositions (layer norm and its backward take ~10 ms
    each), and a deep model repeats the same shapes block after block. A meta tensor has no
    values, so a functional op's outputs are fixed by its arguments' metadata; the cache
    returns fresh tensors of the recorded shapes and strides. Views, in-place/out= ops and
    outputs that alias anything are never cached: they run the real kernel so that storage
    sharing (which saved-activation accounting relies on) stays exact.
    """

    def __init__(self) -> None:
        self._results: dict[Any, Any] = {}
        self._functional: dict[Any, bool] = {}

    def _is_functional(self, func) -> bool:
        known = self._functional.get(func)
        if known is None:
            schema = func._schema
            known = not func.is_view and func is not torch.ops.aten._unsafe_view.default and all(
                arg.alias_info is None for arg in (*schema.arguments, *schema.returns))
            self._functional[func] = known
        return known

    def run(self, func, args: tuple, kwargs: dict) -> tuple[Any, int]:
        """``func(*args, **kwargs)`` and its FLOPs (which depend on the same metadata)."""
        if not self._is_functional(func):
            out = func(*args, **kwargs)
            return out, op_flops(func, args, kwargs, out)
        try:
            key = (func, _freeze(args), _freeze(kwargs))
        except TypeError:
            out = func(*args, **kwargs)
            return out, op_flops(func, args, kwargs, out)
        cached = self._results.get(key)
        if cached is not None:
            return _build(cached[0]), cached[1]
        out = func(*args, **kwargs)
        flops = op_flops(func, args, kwargs, out)
        input_storages = {storage_key(t) for t in iter_tensors((args, kwargs))}
        spec = _output_spec(out, input_storages)
        if spec is not None:
            self._results[key] = (spec, flops)
        return out, flops


class _Recorder(TorchDispatchMode):
    """Charges aten ops and saved tensors to the current segment (see module docstring)."""

    def __init__(self, num_blocks: int, dtype_bytes: int, param_keys: set[int],
                 state_keys: set[int]) -> None:
        super().__init__()
        self.dtype_bytes = dtype_bytes
        self.segments = [SegmentStats() for _ in range(num_blocks + 3)]
        self.loss_segment = num_blocks + 2
        self.current = -1
        self.starts: list[int] = []
        self.phase = "off"  # "forward" | "backward" | "off"
        self.tp_stack: list[str] = []
        self.param_keys = param_keys
        # Parameters and buffers live for the whole run anyway: not activations.
        self.state_keys = state_keys
        self._meta_cache = _MetaOpCache()

    def begin_segment(self, index: int) -> None:
        if index != len(self.starts):
            raise AssertionError(f"segment {index} began after {len(self.starts)} segments")
        self.starts.append(torch.autograd._get_sequence_nr())
        self.current = index

    def _segment_of_current_node(self, func) -> int:
        node = torch._C._current_autograd_node()
        if node is None:
            raise RuntimeError(
                f"profile: backward op {func} performs FLOPs outside any autograd node, so it "
                "cannot be charged to a layer"
            )
        return bisect.bisect_right(self.starts, node._sequence_nr()) - 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.phase == "off":
            return func(*args, **kwargs)
        out, flops = self._meta_cache.run(func, args, kwargs)
        if self.phase == "forward":
            self._record_forward(func, args, kwargs, out, flops)
        elif flops:
            segment = self._segment_of_current_node(func)
            if segment >= 0:
                self.segments[segment].bwd_flops += flops
        return out

    def _record_forward(self, func, args, kwargs, out, flops: int) -> None:
        stats = self.segments[self.current]
        for t in iter_tensors(args):
            key = storage_key(t)
            if key in self.param_keys:
                stats.params_read.add(key)
        if not flops:
            stats.other_bytes_moved += op_bytes_moved(func, args, kwargs, out, self.dtype_bytes)
            return
        stats.fwd_flops += flops
        products = op_gemm_products(func, args, out)
        if 2 * sum(m * n * k * b for m, n, k, b, _ in products) != flops:
            raise AssertionError(f"profile: GEMM shapes of {func} disagree with its FLOP count")
        for product in products:
            stats.gemms.append((product, self._tp_split(product[4], stats)))

    def _tp_split(self, family: str, stats: SegmentStats) -> str:
        if self.tp_stack:
            return "n" if self.tp_stack[-1] == "colwise" else "k"
        if family == "batched" and stats.tensor_parallel:
            return "batch"
        return "none"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.phase == "forward":
            key = storage_key(t)
            if key not in self.state_keys:
                self.segments[self.current].saved[key] = storage_bytes(t, self.dtype_bytes)
        return t


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    """``F.scaled_dot_product_attention`` through the fused flash / memory-efficient kernels.

    On the meta device torch picks the unfused math path, which keeps the (seq x seq)
    attention probabilities for backward; GPU training runs the fused kernels, which keep only
    q, k, v, the output and the log-sum-exp. Grouped-query attention is expanded to one k/v per
    query head first (an upper bound on the saved k/v bytes of the real kernel).
    """
    if query.dim() != 4:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa,
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    if enable_gqa and kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    if attn_mask is None:
        return torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, dropout_p, is_causal, False, scale=scale,
        )[0]
    bias = attn_mask
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill(
            bias.logical_not(), float("-inf"))
    batch, _, seq_q, _ = query.shape
    bias = bias.expand(batch, heads, seq_q, key.shape[2])
    needs_lse = any(t.requires_grad for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, needs_lse, dropout_p, is_causal, scale=scale,
    )[0]


class _FusedAttentionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _fused_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def _module_hooks(rec: _Recorder, blocks: list[nn.Module], block_names: list[str],
                  tp_plans: list[dict[str, str] | None]) -> Iterator[set[int]]:
    """Hooks that move the recorder between segments and follow tensor-parallel linears.

    Yields the set of block indices that have run so far.
    """
    handles = []
    ran: set[int] = set()

    def block_pre_hook(index: int) -> Callable:
        def hook(module, args, kwargs):
            if rec.phase != "forward":
                return None
            if index in ran:
                raise ValueError(
                    f"profile: block {block_names[index]!r} ran more than once in one forward "
                    "pass, so its work cannot be told apart; pass blocks= naming modules that "
                    "each run once"
                )
            if rec.current != index:
                raise ValueError(
                    f"profile: block {block_names[index]!r} ran out of order (the blocks must "
                    f"run as listed: {block_names}); pass blocks= naming modules the forward "
                    "calls one after another"
                )
            ran.add(index)
            if index == 0:
                rec.segments[0].output_bytes = _boundary_bytes((args, kwargs), rec.dtype_bytes)
            rec.begin_segment(index + 1)
            rec.segments[index + 1].input_bytes = _boundary_bytes((args, kwargs), rec.dtype_bytes)
            return None
        return hook

    def block_hook(index: int) -> Callable:
        def hook(module, args, output):
            if rec.phase != "forward":
                return None
            out_bytes = _boundary_bytes(output, rec.dtype_bytes)
            rec.segments[index + 1].output_bytes = out_bytes
            if index == len(blocks) - 1:
                rec.begin_segment(index + 2)
                rec.segments[index + 2].input_bytes = out_bytes
            return None
        return hook

    def tp_pre_hook(style: str) -> Callable:
        def hook(module, args):
            if rec.phase == "forward":
                rec.tp_stack.append(style)
                if style == "colwise":
                    # Its input's gradient is all-reduced in backward (one collective each).
                    segment = rec.segments[rec.current]
                    segment.tp_bwd_allreduce_bytes += _boundary_bytes(args, rec.dtype_bytes)
                    segment.tp_bwd_allreduce_count += 1
        return hook

    def tp_hook(style: str) -> Callable:
        def hook(module, args, output):
            if rec.phase != "forward":
                return None
            rec.tp_stack.pop()
            if style == "rowwise":
                rec.segments[rec.current].tp_allreduce_bytes += _boundary_bytes(
                    output, rec.dtype_bytes)
                rec.segments[rec.current].tp_allreduce_count += 1
            return None
        return hook

    try:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(block_pre_hook(index), with_kwargs=True))
            handles.append(block.register_forward_hook(block_hook(index)))
            for path, style in (tp_plans[index] or {}).items():
                sub = block.get_submodule(path)
                handles.append(sub.register_forward_pre_hook(tp_pre_hook(style)))
                handles.append(sub.register_forward_hook(tp_hook(style)))
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def trace(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    blocks: list[nn.Module],
    block_names: list[str],
    tp_plans: list[dict[str, str] | None],
    dtype_bytes: int,
    attention: str,
) -> TraceResult:
    """One forward + backward of ``model(*args, **kwargs)`` (all on meta), split by segment.

    The backward pass differentiates the sum of the floating outputs that require grad with
    respect to the trainable parameters only, as a training step does: inputs get no
    gradient. Parameter ``.grad`` fields are left untouched.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"profile: model {type(model).__name__} has no parameter with requires_grad=True, "
            "so there is no training step to profile; unfreeze its parameters"
        )
    param_keys = {storage_key(p) for p in params}
    state_keys = param_keys | {storage_key(b) for b in model.buffers()}
    rec = _Recorder(len(blocks), dtype_bytes, param_keys, state_keys)
    for index, plan in enumerate(tp_plans):
        rec.segments[index + 1].tensor_parallel = plan is not None

    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        ran = stack.enter_context(_module_hooks(rec, blocks, block_names, tp_plans))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t))
        if attention == "flash":
            stack.enter_context(_FusedAttentionMode())
        stack.enter_context(rec)
        rec.phase = "forward"
        rec.begin_segment(0)
        rec.segments[0].input_bytes = _boundary_bytes((args, kwargs), dtype_bytes)
        try:
            output = model(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as err:
            raise RuntimeError(
                f"profile: the forward pass of {type(model).__name__} failed on the meta device: "
                f"{err}. Tensors the forward creates must be on its inputs' device, and "
                "data-dependent steps (.item(), nonzero) cannot run on meta"
            ) from err
        missing = [name for i, name in enumerate(block_names) if i not in ran]
        if missing:
            raise ValueError(
                f"profile: blocks {missing} never ran in the forward pass; pass blocks= naming "
                "module lists whose entries the forward calls"
            )
        rec.segments[rec.current].output_bytes = _boundary_bytes(output, dtype_bytes)
        rec.begin_segment(rec.loss_segment)
        rec.phase = "off"
        outputs = [t for t in iter_tensors(output) if t.is_floating_point() and t.requires_grad]
        if not outputs:
            raise ValueError(
                f"profile: no floating-point output of {type(model).__name__} requires grad, "
                "so there is no backward pass to profile"
            )
        loss = sum(t.sum() for t in outputs)
        rec.phase = "backward"
        torch.autograd.grad(loss, trainable, allow_unused=True)
        rec.phase = "off"
    return TraceResult(segments=rec.segments[: rec.loss_segment])
