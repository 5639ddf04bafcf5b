"""Per-layer cost profile of a model: what the cost model needs to know about each layer.

A model is seen as a sequence of layers whose composition is the forward pass (embedding,
blocks..., head). Figures are for the batch the profile was taken at (``ModelProfile.batch_size``
samples); everything that scales with the batch (FLOPs, activation bytes, the token dimension of
GEMMs) scales linearly, and ``LayerProfile.scaled(batch)`` does that.

Byte conventions (mixed-precision Adam, as in Megatron/ZeRO): parameters and gradients in the
training dtype (2 bytes for bf16), optimizer state = fp32 master copy + two fp32 moments
(12 bytes per parameter). Activation bytes are in the training dtype.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

__all__ = ["GemmShape", "LayerProfile", "ModelProfile"]


@dataclass(frozen=True)
class GemmShape:
    """One matrix multiply of a layer's forward pass: ``batch`` products of (m x k) @ (k x n).

    ``tp_split`` says which dimension a Megatron tensor-parallel split divides:
    "n" (column-parallel linear), "k" (row-parallel linear), "batch" (attention heads) or
    "none" (not split, e.g. an embedding/head GEMM in a layer that is not tensor-parallel).
    ``scales_with_batch`` names the dimension that grows with the number of samples
    ("m" for linears on (tokens x features), "batch" for per-head attention products).
    """

    m: int
    n: int
    k: int
    batch: int = 1
    count: int = 1
    tp_split: str = "none"
    scales_with_batch: str = "m"

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k * self.count

    def scaled(self, factor: float) -> "GemmShape":
        """The same GEMM for ``factor`` times as many samples (factor may be fractional)."""
        if self.scales_with_batch == "batch":
            return replace(self, batch=max(1, round(self.batch * factor)))
        return replace(self, m=max(1, round(self.m * factor)))


@dataclass(frozen=True)
class LayerProfile:
    """Cost-relevant figures of one layer at the profiled batch size.

    Attributes:
        name: module path or a descriptive name ("embed", "blocks.3", "head").
        kind: "pre" (before the block sequence), "block", or "post" (after it).
        fwd_flops / bwd_flops: floating-point operations of the forward / backward pass.
        num_params: parameter count.
        param_bytes / grad_bytes / optimizer_bytes: training-state bytes (see module doc).
        saved_bytes: bytes kept alive between this layer's forward and its backward.
        input_bytes / output_bytes: bytes of the activation entering / leaving the layer
            (what a pipeline stage boundary sends, and what recomputation must keep).
        gemms: the forward pass's matrix multiplies.
        tp_allreduce_bytes: bytes all-reduced in the forward pass when the layer runs
            tensor-parallel (Megatron: two all-reduces of b*s*h elements per transformer block);
            the backward pass all-reduces the same amount. 0 for layers that do not split.
        tp_max_degree: the largest tensor-parallel degree the layer supports (divides its heads
            and hidden sizes); 1 means not tensor-parallel.
        other_bytes_moved: memory traffic of the non-GEMM work (norms, softmax, elementwise)
            in the forward pass, for the roofline's memory-bound part.
    """

    name: str
    kind: str
    fwd_flops: float
    bwd_flops: float
    num_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    saved_bytes: int
    input_bytes: int
    output_bytes: int
    gemms: tuple[GemmShape, ...] = ()
    tp_allreduce_bytes: int = 0
    tp_max_degree: int = 1
    other_bytes_moved: int = 0

    @property
    def state_bytes(self) -> int:
        """Parameters + gradients + optimizer state."""
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes

    def scaled(self, factor: float) -> "LayerProfile":
        """The same layer for ``factor`` times as many samples per micro-batch."""
        return replace(
            self,
            fwd_flops=self.fwd_flops * factor,
            bwd_flops=self.bwd_flops * factor,
            saved_bytes=round(self.saved_bytes * factor),
            input_bytes=round(self.input_bytes * factor),
            output_bytes=round(self.output_bytes * factor),
            gemms=tuple(g.scaled(factor) for g in self.gemms),
            tp_allreduce_bytes=round(self.tp_allreduce_bytes * factor),
            other_bytes_moved=round(self.other_bytes_moved * factor),
        )


@dataclass(frozen=True)
class ModelProfile:
    """The layer sequence of a model, profiled at ``batch_size`` samples.

    ``dtype_bytes`` is the training dtype's width used for activations, parameters and gradients
    (2 for bf16 mixed precision). ``meta`` carries descriptive facts (model config, seq length).
    """

    name: str
    layers: tuple[LayerProfile, ...]
    batch_size: int
    dtype_bytes: int = 2
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    @property
    def train_flops(self) -> float:
        """Forward + backward FLOPs of one training step at ``batch_size`` samples."""
        return sum(layer.fwd_flops + layer.bwd_flops for layer in self.layers)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> "ModelProfile":
        layers = tuple(
            LayerProfile(**{**lay, "gemms": tuple(GemmShape(**g) for g in lay.get("gemms", ()))})
            for lay in data["layers"]
        )
        return cls(
            name=data["name"],
            layers=layers,
            batch_size=data["batch_size"],
            dtype_bytes=data.get("dtype_bytes", 2),
            meta=data.get("meta", {}),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelProfile":
        return cls.from_dict(json.loads(Path(path).read_text()))
