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

__all__ = [
    "init_layer", "build_meta_model", "materialize_layer", "StageModule", "trace_layers",
    "boundary_metas",
]


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
    ``autocast_dtype`` (e.g. bf16) runs the layers under autocast. Layers flagged in
    ``recompute`` run under non-reentrant activation checkpointing. A stage that is not first
    casts its input back from the wire format; one that is not last casts its output to it.
    """

    def __init__(
        self,
        layers: dict[int, nn.Module],
        recompute: dict[int, bool],
        activation_precision: str,
        is_first: bool,
        is_last: bool,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.receive = None if is_first else WireReceive(activation_precision)
        self.send = None if is_last else WireSend(activation_precision)
        self._run = [(layers[i], bool(recompute.get(i, False))) for i in sorted(layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.receive is not None:
            x = self.receive(x)
        if self.autocast_dtype is None:
            x = self._layers(x)
        else:
            with torch.autocast(x.device.type, dtype=self.autocast_dtype):
                x = self._layers(x)
            # Stage outputs keep the fp32 contract (the static pipeline metadata says fp32).
            x = x.float() if x.is_floating_point() else x
        if self.send is not None:
            x = self.send(x)
        return x

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        for layer, recompute in self._run:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        return x


def _signature(layer: nn.Module, x: torch.Tensor) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
    return (type(layer), params, tuple(x.shape), x.dtype)


def trace_layers(
    model: SequentialModel, example: torch.Tensor, count_flops: bool = True
) -> tuple[list[torch.Tensor], list[float]]:
    """Walk the (meta) model's layers on a meta ``example`` micro-batch.

    Returns ``(activations, flops)``: ``activations[i]`` is the meta tensor entering layer ``i``
    (``activations[-1]`` the model output) and ``flops[i]`` the forward + backward FLOPs of layer
    ``i`` (``torch.utils.flop_counter``; backward includes the input gradient except for the
    first layer, whose input is data). Layers of the same class, parameter shapes and input
    shape are traced once: a 48-block GPT costs three layer traces, not fifty.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cache: dict[tuple, tuple[torch.Tensor, float]] = {}
    activations, flops = [example], []
    x = example
    for index, layer in enumerate(model.layers):
        key = _signature(layer, x) + (index == 0,)
        if key not in cache:
            inp = x.detach().requires_grad_(index > 0 and x.is_floating_point())
            counter = FlopCounterMode(display=False)
            with counter if count_flops else torch.no_grad():
                out = layer(inp)
                if count_flops and out.requires_grad:
                    out.float().sum().backward()
            for p in layer.parameters():
                p.grad = None
            cache[key] = (out.detach(), float(counter.get_total_flops()) if count_flops else 0.0)
        x, f = cache[key]
        activations.append(x)
        flops.append(f)
    return activations, flops


def boundary_metas(
    activations: list[torch.Tensor], cut_points: list[int], wire_dtype: torch.dtype
) -> list[torch.Tensor]:
    """Example tensors (meta) entering each layer index in ``cut_points``, from
    ``trace_layers``' activations (``cut_points`` may include ``len(layers)``, the output).

    Floating activations crossing a stage boundary are in ``wire_dtype`` and require grad: the
    static metadata the pipeline stages are built with.
    """
    num_layers = len(activations) - 1
    metas = []
    for c in cut_points:
        t = activations[c]
        is_boundary = 0 < c < num_layers
        dtype = wire_dtype if (is_boundary and t.is_floating_point()) else t.dtype
        meta = torch.empty(t.shape, dtype=dtype, device="meta")
        metas.append(meta.requires_grad_(is_boundary and t.is_floating_point()))
    return metas
