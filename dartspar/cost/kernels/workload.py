"""The kernel work of a GPT layer, and its time under a latency estimator.

Two jobs that the profiler and the accuracy report share:

- ``gpt_block_work`` / ``gpt_head_work`` derive a layer's forward GEMMs and memory-bound bytes
  analytically from a ``GPTConfig``, a micro-batch size and a tensor-parallel degree (Megatron
  split: q/k/v and fc column-parallel, the two output projections row-parallel, heads divided).
  The profiler's shape grid is the union of these shapes, forward and backward.
- ``kernel_time_s`` / ``layer_time_s`` turn (GEMMs, memory bytes) into seconds with any
  ``LatencyEstimator``, modelling the backward pass explicitly from the shapes: the backward of
  (m x k) @ (k x n) is dX = (m x n) @ (n x k) and dW = (k x m) @ (m x n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...cluster import DeviceSpec
from ...models.gpt import GPTConfig
from ...profile import GemmShape

__all__ = [
    "GPT_PRESETS", "LayerWork", "gpt_block_work", "gpt_head_work", "backward_gemms",
    "training_gemm_shapes", "kernel_time_s", "layer_time_s", "BACKWARD_MEMORY_FACTOR",
]

# Named model sizes the profiler derives its shape grid from. The GPT-2 / GPT-3 sizes are the
# published ones (Radford et al. 2019; Brown et al. 2020, table 2.1); the cpu-* sizes are what the
# CPU executor can train on two cores.
GPT_PRESETS: dict[str, GPTConfig] = {
    "cpu-tiny": GPTConfig(num_layers=4, hidden=64, num_heads=4, seq_len=32, vocab_size=128),
    "cpu-small": GPTConfig(num_layers=4, hidden=128, num_heads=4, seq_len=64, vocab_size=256),
    "cpu-medium": GPTConfig(num_layers=4, hidden=256, num_heads=8, seq_len=128, vocab_size=512),
    "cpu-large": GPTConfig(num_layers=4, hidden=512, num_heads=8, seq_len=128, vocab_size=1024),
    "gpt-small": GPTConfig(num_layers=12, hidden=768, num_heads=12, seq_len=1024, vocab_size=50257),
    "gpt-medium": GPTConfig(num_layers=24, hidden=1024, num_heads=16, seq_len=1024, vocab_size=50257),
    "gpt-large": GPTConfig(num_layers=36, hidden=1280, num_heads=20, seq_len=1024, vocab_size=50257),
    "gpt-xl": GPTConfig(num_layers=48, hidden=1600, num_heads=25, seq_len=1024, vocab_size=50257),
    "gpt-2.7b": GPTConfig(num_layers=32, hidden=2560, num_heads=32, seq_len=2048, vocab_size=50257),
    "gpt-6.7b": GPTConfig(num_layers=32, hidden=4096, num_heads=32, seq_len=2048, vocab_size=50257),
}

# Backward of the memory-bound ops (norms, GELU, residual adds) reads the saved input
# and the incoming gradient and writes the outgoing gradient: about twice the forward traffic.
BACKWARD_MEMORY_FACTOR = 2.0


@dataclass(frozen=True)
class LayerWork:
    """One layer's forward work on one tensor-parallel rank.

    Attributes:
        gemms: forward matrix multiplies (``GemmShape.count`` repeats each).
        memory_ops: (name, bytes) of each memory-bound forward kernel, bytes read + written.
    """

    gemms: tuple[GemmShape, ...]
    memory_ops: tuple[tuple[str, int], ...]

    @property
    def other_bytes_moved(self) -> int:
        """Total memory-bound bytes, the quantity ``LayerProfile.other_bytes_moved`` holds."""
        return sum(b for _, b in self.memory_ops)


def _check_split(cfg: GPTConfig, micro_batch: int, tp: int) -> None:
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1")
    if tp < 1 or cfg.num_heads % tp:
        raise ValueError(
            f"tensor-parallel degree tp={tp} must divide num_heads={cfg.num_heads}: "
            "pick a divisor of the head count"
        )


def gpt_block_work(cfg: GPTConfig, micro_batch: int, tp: int = 1, dtype_bytes: int = 2) -> LayerWork:
    """Forward work of one ``dartspar.models.gpt.Block`` on one of ``tp`` ranks.

    Tokens T = micro_batch * seq_len, hidden h, heads H, head width d = h / H. The attention
    products are batched over the rank's micro_batch * H / tp heads. The memory-bound ops are
    counted as ``dartspar.profile.profile`` counts them with fused (flash) attention, which is
    what training runs: two layer norms, GELU on the 4h / tp activation, two residual adds; the
    softmax runs inside the attention kernel, whose time the two attention GEMMs stand for.
    """
    _check_split(cfg, micro_batch, tp)
    h, s = cfg.hidden, cfg.seq_len
    tokens = micro_batch * s
    d = h // cfg.num_heads
    heads = micro_batch * cfg.num_heads // tp
    ffn = cfg.mlp_ratio * h // tp
    gemms = (
        GemmShape(m=tokens, n=h // tp, k=h, count=3, tp_split="n"),          # q, k, v
        GemmShape(m=s, n=s, k=d, batch=heads, tp_split="batch", scales_with_batch="batch"),  # q k^T
        GemmShape(m=s, n=d, k=s, batch=heads, tp_split="batch", scales_with_batch="batch"),  # p v
        GemmShape(m=tokens, n=h, k=h // tp, tp_split="k"),                   # attention proj
        GemmShape(m=tokens, n=ffn, k=h, tp_split="n"),                       # mlp fc
        GemmShape(m=tokens, n=h, k=ffn, tp_split="k"),                       # mlp proj
    )
    act = tokens * h * dtype_bytes
    memory_ops = (
        ("layernorm", 2 * act),
        ("layernorm", 2 * act),
        ("gelu", 2 * tokens * ffn * dtype_bytes),
        ("add", 3 * act),
        ("add", 3 * act),
    )
    return LayerWork(gemms=gemms, memory_ops=memory_ops)


def gpt_head_work(cfg: GPTConfig, micro_batch: int, dtype_bytes: int = 2) -> LayerWork:
    """Forward work of ``dartspar.models.gpt.Head``: final norm and the vocabulary projection."""
    _check_split(cfg, micro_batch, 1)
    tokens = micro_batch * cfg.seq_len
    return LayerWork(
        gemms=(GemmShape(m=tokens, n=cfg.vocab_size, k=cfg.hidden),),
        memory_ops=(("layernorm", 2 * tokens * cfg.hidden * dtype_bytes),),
    )


def backward_gemms(g: GemmShape) -> tuple[GemmShape, GemmShape]:
    """The two backward products of ``g``: dX = dY @ W^T (m x n)@(n x k), dW = X^T @ dY (k x m)@(m x n)."""
    return (GemmShape(m=g.m, n=g.k, k=g.n, batch=g.batch, count=g.count),
            GemmShape(m=g.k, n=g.n, k=g.m, batch=g.batch, count=g.count))


def training_gemm_shapes(
    models: dict[str, GPTConfig], tps: list[int], micro_batches: list[int]
) -> list[tuple[int, int, int, int]]:
    """Sorted distinct (m, n, k, batch) of every forward and backward GEMM of the models' blocks
    and heads, for each tensor-parallel degree that divides the heads and each micro-batch size."""
    shapes: set[tuple[int, int, int, int]] = set()
    for cfg in models.values():
        for b in micro_batches:
            works = [gpt_head_work(cfg, b)]
            works += [gpt_block_work(cfg, b, tp) for tp in tps if cfg.num_heads % tp == 0]
            for work in works:
                for g in work.gemms:
                    for x in (g, *backward_gemms(g)):
                        shapes.add((x.m, x.n, x.k, x.batch))
    return sorted(shapes)


def kernel_time_s(
    estimator, gemms: tuple[GemmShape, ...], other_bytes_moved: float | torch.Tensor,
    dtype: str, device: DeviceSpec, backward: bool = True,
) -> torch.Tensor:
    """Predicted seconds of a layer's kernels, forward (and backward), float64 scalar tensor.

    Sums ``estimator.gemm_time_s`` over the forward GEMMs (times ``count``) and, with
    ``backward``, over their dX and dW products; the memory-bound part is one
    ``memory_time_s(other_bytes_moved)`` forward (the fitted estimator's memory term describes a
    layer's whole memory-bound sequence) and one of ``BACKWARD_MEMORY_FACTOR`` times the bytes
    backward.
    """
    shapes = list(gemms)
    if backward:
        shapes += [x for g in gemms for x in backward_gemms(g)]
    if shapes:
        m, n, k, batch, count = (
            torch.tensor([getattr(g, f) for g in shapes], dtype=torch.float64)
            for f in ("m", "n", "k", "batch", "count")
        )
        total = (count * estimator.gemm_time_s(m, n, k, batch, dtype, device)).sum()
    else:
        total = torch.zeros((), dtype=torch.float64)
    fwd_bytes = torch.as_tensor(other_bytes_moved, dtype=torch.float64)
    passes = [1.0, BACKWARD_MEMORY_FACTOR] if backward else [1.0]
    for factor in passes:
        if float(fwd_bytes) > 0:
            total = total + estimator.memory_time_s(factor * fwd_bytes, device)
    return total


def layer_time_s(
    estimator, gemms: tuple[GemmShape, ...], other_bytes_moved: float | torch.Tensor,
    dtype: str, device: DeviceSpec, backward: bool = True,
) -> torch.Tensor:
    """Predicted seconds of a layer's forward (and backward) pass, float64 scalar tensor:
    ``kernel_time_s``, turned into a layer's time by the estimator's calibration when it has one
    (``FittedEstimator.layer_time_s``: kernels' in-context factor and host time per GEMM call;
    other estimators: the kernel time as is)."""
    kernels = kernel_time_s(estimator, gemms, other_bytes_moved, dtype, device, backward)
    combine = getattr(estimator, "layer_time_s", None)
    if combine is None:
        return kernels
    return combine(kernels, sum(g.count for g in gemms), device, backward)
