"""Small fully connected models: a uniform MLP and a deliberately unbalanced network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sequential import SequentialModel

__all__ = ["MLPConfig", "MLP", "UnbalancedConfig", "Unbalanced"]


class DenseBlock(nn.Module):
    """Residual Linear(dim->width) -> GELU -> Linear(width->dim): (B, dim) -> (B, dim).

    Column-parallel ``up`` and row-parallel ``down`` (one all-reduce per forward) under tensor
    parallelism; ``tp_max_degree`` is the width, the dimension the split divides.
    """

    tp_plan = {"up": "colwise", "down": "rowwise"}

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, width)
        self.down = nn.Linear(width, dim)
        self.tp_max_degree = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(x)))


class _Regression(SequentialModel):
    """Shared inputs/targets/loss of the dense models: (B, dim) -> (B, dim), MSE loss."""

    dim: int

    def example_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple:
        return (torch.zeros(batch_size, self.dim, device=device),)

    def example_target(self, batch_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(batch_size, self.dim, device=device)

    @staticmethod
    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.float(), target.float())


@dataclass(frozen=True)
class MLPConfig:
    num_layers: int = 8
    dim: int = 64
    width: int = 256

    def __post_init__(self) -> None:
        if min(self.num_layers, self.dim, self.width) < 1:
            raise ValueError(f"MLPConfig needs num_layers, dim and width >= 1, got {self}")


class MLP(_Regression):
    """``num_layers`` equal residual blocks dim -> width -> dim."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__([DenseBlock(cfg.dim, cfg.width) for _ in range(cfg.num_layers)])
        self.config, self.dim = cfg, cfg.dim


@dataclass(frozen=True)
class UnbalancedConfig:
    """Blocks whose hidden width follows ``widths``: costs differ by (max/min width), default 16x."""

    dim: int = 64
    widths: tuple[int, ...] = (64, 1024, 64, 64, 512, 64, 1024, 128)

    def __post_init__(self) -> None:
        if not self.widths or min(self.widths) < 1 or self.dim < 1:
            raise ValueError(f"UnbalancedConfig needs dim >= 1 and positive widths, got {self}")


class Unbalanced(_Regression):
    """A network whose layers differ in cost by 10x or more (a pipeline balancing test case)."""

    def __init__(self, cfg: UnbalancedConfig) -> None:
        super().__init__([DenseBlock(cfg.dim, w) for w in cfg.widths])
        self.config, self.dim = cfg, cfg.dim
