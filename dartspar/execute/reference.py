"""Single-process reference training: the whole model, the same initialization, the same batches.

The distributed executor must reproduce it: one step's loss and gradients (up to floating-point
reassociation) and the loss curve of a training run. Tests and benchmarks use it.
"""

from __future__ import annotations

import torch

from ..data import BatchStream, make_dataset_for_model
from ..models import SequentialModel, build_model
from .build import init_layer

__all__ = ["reference_model", "reference_first_step", "reference_train"]


def reference_model(name: str, config: dict, seed: int) -> SequentialModel:
    """The whole model on the CPU, layer ``i`` initialized by ``init_layer(layer, i, seed)``."""
    with torch.device("meta"):
        model = build_model(name, **dict(config))
    model.to_empty(device="cpu")
    for index, layer in enumerate(model.layers):
        init_layer(layer, index, seed)
    return model


def _stream(name: str, config: dict, batch_size: int, num_train: int, num_val: int, data_seed: int):
    data = make_dataset_for_model(name, config, num_train, num_val, data_seed)
    return BatchStream((data.train_inputs, data.train_targets), batch_size, data_seed)


def reference_first_step(
    name: str, config: dict, batch_size: int, seed: int = 0, data_seed: int = 0,
    num_train: int = 4096, num_val: int = 256, step: int = 0,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (mean over the global batch) and gradients by parameter name at batch ``step``."""
    model = reference_model(name, config, seed)
    x, y = _stream(name, config, batch_size, num_train, num_val, data_seed).batch(step)
    loss = model.loss_fn(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_train(
    name: str, config: dict, batch_size: int, steps: int, lr: float, seed: int = 0,
    data_seed: int = 0, num_train: int = 4096, num_val: int = 256, weight_decay: float = 0.0,
) -> list[float]:
    """Per-step training losses of ``steps`` AdamW steps on the global batch."""
    model = reference_model(name, config, seed)
    stream = _stream(name, config, batch_size, num_train, num_val, data_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        x, y = stream.batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
