"""Communication precision: what stage-to-stage activations and data-parallel gradients travel as.

Activations (``plan.activation_precision``): the sending stage casts its output, the receiving
stage casts back to fp32 for compute, and the gradient travels back in the same format.
"fp8" is simulated: values are quantized to float8 (e4m3 forward, e5m2 backward, the usual
split) with a power-of-two per-tensor scale and dequantized; a power-of-two scale makes every
dequantized value exact in bf16, so the wire carries bf16 holding fp8 values (2 bytes per element
on the wire instead of 1 — the numerics are fp8's, the bytes are not).

Gradients (``plan.gradient_precision``, replicated data parallelism): the all-reduce payload is
fp32, bf16 (summed in bf16), or int8 with per-tensor scales shared across replicas and fp32
accumulation (see ``int8_allreduce_mean_``), optionally with error feedback.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "WIRE_DTYPES",
    "fp8_qdq",
    "WireSend",
    "WireReceive",
    "ReplicaGradSync",
    "int8_allreduce_mean_",
]

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}
_FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_qdq(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize ``x`` to float8 ``fmt`` ("e4m3" or "e5m2") with a power-of-two per-tensor scale
    chosen so that the largest magnitude fits, then dequantize; same shape, float32."""
    dtype = _FP8_FORMATS[fmt]
    x32 = x.float()
    amax = float(x32.abs().max()) if x32.numel() else 0.0
    if amax == 0.0 or not math.isfinite(amax):
        scale = 1.0
    else:
        scale = 2.0 ** math.ceil(math.log2(amax / torch.finfo(dtype).max))
    return (x32 / scale).to(dtype).float() * scale


class _SendFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return fp8_qdq(x, "e4m3").to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.float()


class _ReceiveFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return fp8_qdq(grad, "e5m2").to(torch.bfloat16)


class WireSend(nn.Module):
    """Last op of a stage that is not the last: cast the boundary activation to the wire format."""

    def __init__(self, precision: str) -> None:
        super().__init__()
        if precision not in WIRE_DTYPES:
            raise ValueError(f"activation precision {precision!r} is not one of {list(WIRE_DTYPES)}")
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or self.precision == "fp32":
            return x
        if self.precision == "fp8":
            return _SendFp8.apply(x)
        return x.to(torch.bfloat16)


class WireReceive(nn.Module):
    """First op of a stage that is not the first: back to fp32 for compute."""

    def __init__(self, precision: str) -> None:
        super().__init__()
        if precision not in WIRE_DTYPES:
            raise ValueError(f"activation precision {precision!r} is not one of {list(WIRE_DTYPES)}")
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or self.precision == "fp32":
            return x
        if self.precision == "fp8":
            return _ReceiveFp8.apply(x)
        return x.float()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (same storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def int8_allreduce_mean_(
    grads: list[torch.Tensor], group, residuals: list[torch.Tensor] | None = None
) -> None:
    """Average ``grads`` (local fp32 tensors, modified in place) over ``group`` with int8 payloads.

    Every tensor gets one scale shared by all ranks (the group-wide max |g| / 127, one small fp32
    max-all-reduce for all tensors), so int8 codes of different ranks are comparable. Then a
    reduce-scatter built from an int8 all-to-all (each rank sums its segment's codes from all
    ranks in fp32) and an int8 all-gather of the averaged segment, requantized with the same
    scales (the mean of values within +-absmax stays within +-absmax). Wire bytes per element:
    2 (p-1)/p, a quarter of a fp32 ring all-reduce. Error per element <= scale.

    ``residuals`` (same shapes as grads) enables error feedback: the quantization error of this
    step is added to the next step's gradient, so it is not lost, only delayed.
    """
    p = dist.get_world_size(group)
    if p == 1 or not grads:
        return
    if residuals is not None:
        for g, r in zip(grads, residuals):
            g.add_(r)
    absmax = torch.stack([g.abs().max() if g.numel() else g.new_zeros(()) for g in grads])
    dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
    scales = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    sizes = [g.numel() for g in grads]
    n = sum(sizes)
    seg = -(-n // p)
    flat = torch.zeros(seg * p, dtype=torch.float32, device=grads[0].device)
    flat[:n] = torch.cat([g.reshape(-1) for g in grads])
    elem_scale = torch.ones(seg * p, dtype=torch.float32, device=flat.device)
    elem_scale[:n] = torch.repeat_interleave(scales, torch.tensor(sizes, device=scales.device))
    codes = torch.round(flat / elem_scale).clamp_(-127, 127)
    if residuals is not None:
        local_err = flat - codes * elem_scale
    recv = torch.empty(seg * p, dtype=torch.int8, device=flat.device)
    dist.all_to_all_single(recv, codes.to(torch.int8), group=group)
    me = dist.get_rank(group)
    my_scale = elem_scale[me * seg : (me + 1) * seg]
    mean_seg = recv.view(p, seg).float().sum(0) * my_scale / p
    codes2 = torch.round(mean_seg / my_scale).clamp_(-127, 127)
    gathered = torch.empty(seg * p, dtype=torch.int8, device=flat.device)
    _all_gather_into(gathered, codes2.to(torch.int8), group)
    result = gathered.float() * elem_scale
    if residuals is not None:
        # This rank owns its segment's requantization error; adding p times it to its own
        # residual restores the mean on the next step.
        local_err[me * seg : (me + 1) * seg] += p * (mean_seg - codes2 * my_scale)
        offset = 0
        for r, size in zip(residuals, sizes):
            r.copy_(local_err[offset : offset + size].view_as(r))
            offset += size
    offset = 0
    for g, size in zip(grads, sizes):
        g.copy_(result[offset : offset + size].view_as(g))
        offset += size


class ReplicaGradSync:
    """Averages the gradients of replicated parameters over the data-parallel group, once per
    step after the pipeline schedule (plain replication; DDP is not safe under the pipelining
    schedules, see FACTS.md).

    Args:
        params: the rank's parameters (plain tensors or DTensors; their local shards are reduced).
        group: the data-parallel process group.
        precision: "fp32", "bf16" or "int8" payload.
        error_feedback: int8 only; keep the quantization error and add it to the next step.
        bucket_bytes: fp32 bytes per flattened bucket (bounds the extra memory).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        group,
        precision: str,
        error_feedback: bool = True,
        bucket_bytes: int = 32 << 20,
    ) -> None:
        if precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"gradient precision {precision!r} is not fp32, bf16 or int8")
        self.params, self.group, self.precision = params, group, precision
        self.size = dist.get_world_size(group)
        self.buckets: list[list[nn.Parameter]] = []
        current: list[nn.Parameter] = []
        current_bytes = 0
        for p in params:
            nbytes = _local(p).numel() * 4
            if current and current_bytes + nbytes > bucket_bytes:
                self.buckets.append(current)
                current, current_bytes = [], 0
            current.append(p)
            current_bytes += nbytes
        if current:
            self.buckets.append(current)
        self.residuals = None
        if precision == "int8" and error_feedback:
            self.residuals = {id(p): torch.zeros_like(_local(p).detach()) for p in params}

    @torch.no_grad()
    def sync(self) -> None:
        """Replace every local gradient by its mean over the group (missing grads count as 0)."""
        if self.size == 1:
            return
        for bucket in self.buckets:
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in bucket]
            if self.precision == "int8":
                res = [self.residuals[id(p)] for p in bucket] if self.residuals else None
                int8_allreduce_mean_(grads, self.group, res)
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            wire = flat.to(torch.bfloat16) if self.precision == "bf16" else flat
            dist.all_reduce(wire, group=self.group)
            flat = wire.float() if wire is not flat else flat
            flat.div_(self.size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
