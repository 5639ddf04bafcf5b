"""Building a rank's share of the model: meta-device construction, deterministic per-layer init,
and the stage module that runs a contiguous slice of layers.

The whole model is only ever built on the meta device (no storage); a rank materializes the
layers of its own stages one at a time, so no rank holds the whole model. Weights depend only on
``(seed, layer index)``, never on the plan, so every plan and the single-process reference start
from identical weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models import SequentialModel, build_model
from .checks import ExecutorError
from .precision import WireReceive, WireSend

__all__ = ["init_layer", "build_meta_model", "materialize_layer", "StageModule", "boundary_metas"]


def init_layer(layer: nn.Module, index: int, seed: int) -> None:
    """Initialize ``layer`` (model layer number ``index``) in place from ``seed + index``.

    Runs ``reset_parameters`` of every submodule that has one, in registration order, under a
    forked CPU RNG (the caller's RNG state is untouched). Parameters must live on the CPU: a CUDA
    generator would draw different numbers from the same seed, and the reference runs on CPU.
    Raises ExecutorError if a parameter is not covered by any ``reset_parameters``.
    """
    covered: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + index)
        for module in layer.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
    missing = [n for n, p in layer.named_parameters() if id(p) not in covered]
    if missing:
        raise ExecutorError(
            f"layer {index} ({type(layer).__name__}) has parameters {missing} that no submodule's "
            "reset_parameters initializes: give their module a reset_parameters()"
        )


def build_meta_model(name: str, config: dict) -> SequentialModel:
    """The whole model on the meta device (shapes only, no memory)."""
    try:
        with torch.device("meta"):
            return build_model(name, **dict(config))
    except (ValueError, TypeError) as err:
        raise ExecutorError(f"plan.meta['model'] does not build: {err}") from None


def materialize_layer(layer: nn.Module, index: int, seed: int, device: torch.device) -> nn.Module:
    """Allocate a meta layer on the CPU, initialize it with ``init_layer``, move it to ``device``."""
    layer.to_empty(device="cpu")
    init_layer(layer, index, seed)
    return layer.to(device)


class StageModule(nn.Module):
    """Layers ``[start, end)`` of the model, run in order.

    Layers are registered under their global index (``layers.<i>.<param>``), the same names as in
    the whole model, so checkpoints of any plan are interchangeable and gradients compare by name.
    Layers flagged in ``recompute`` run under non-reentrant activation checkpointing. A stage that
    is not first casts its input back from the wire format; one that is not last casts its output
    to it.
    """

    def __init__(
        self,
        layers: dict[int, nn.Module],
        recompute: dict[int, bool],
        activation_precision: str,
        is_first: bool,
        is_last: bool,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.receive = None if is_first else WireReceive(activation_precision)
        self.send = None if is_last else WireSend(activation_precision)
        self._run = [(layers[i], bool(recompute.get(i, False))) for i in sorted(layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.receive is not None:
            x = self.receive(x)
        for layer, recompute in self._run:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        if self.send is not None:
            x = self.send(x)
        return x


def boundary_metas(
    model: SequentialModel, example: torch.Tensor, cut_points: list[int], wire_dtype: torch.dtype
) -> list[torch.Tensor]:
    """Meta tensors of the activations entering each layer index in ``cut_points`` (and the model
    output for ``len(model.layers)``), for a micro-batch shaped like ``example`` (meta).

    Floating activations crossing a stage boundary are in ``wire_dtype`` and require grad; this
    is the static metadata the pipeline stages are built with.
    """
    wanted = set(cut_points)
    out: dict[int, torch.Tensor] = {}
    x = example
    with torch.no_grad():
        for i, layer in enumerate(model.layers):
            if i in wanted:
                out[i] = x
            x = layer(x)
    out[len(model.layers)] = x
    metas = []
    for c in cut_points:
        t = out[c]
        is_boundary = 0 < c < len(model.layers)
        dtype = wire_dtype if (is_boundary and t.is_floating_point()) else t.dtype
        meta = torch.empty(t.shape, dtype=dtype, device="meta")
        metas.append(meta.requires_grad_(is_boundary and t.is_floating_point()))
    return metas
