"""Small fully connected models: a uniform MLP and a deliberately unbalanced network."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sequential import SequentialModel

__all__ = ["MLPConfig", "MLP", "UnbalancedConfig", "Unbalanced"]


class DenseBlock(nn.Module):
    """Linear -> GELU (-> Linear back to ``dim`` when ``width`` differs): (B, dim) -> (B, dim)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, width)
        self.down = nn.Linear(width, dim) if width != dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.up(x))
        return self.down(y) if self.down is not None else y


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

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.dim < 1:
            raise ValueError(f"MLPConfig needs num_layers >= 1 and dim >= 1, got {self}")


class MLP(_Regression):
    """``num_layers`` equal blocks of width ``dim``."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__([DenseBlock(cfg.dim, cfg.dim) for _ in range(cfg.num_layers)])
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
