"""The base of the built-in models: a model that *is* its layer sequence."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SequentialModel"]


class SequentialModel(nn.Module):
    """``forward(x) = layers[-1](...layers[0](x))``.

    Pipeline stages are slices of ``layers`` and the profiler's layers are its entries, so the
    plan, the cost model and the executor all count layers the same way. Subclasses provide
    ``example_inputs(batch_size)``, ``example_target(batch_size)`` and ``loss_fn``.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
