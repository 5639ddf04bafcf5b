"""A GPT-style decoder (nanoGPT-like) written as an explicit layer sequence.

``GPT.layers`` is ``[Embedding, Block x num_layers, Head]`` and the forward pass is their
composition, so a pipeline stage is a slice of it and the profiler sees the same layers.
Attention uses separate q/k/v projections and reshapes with ``-1`` heads so that a Megatron
column/row tensor-parallel split (DTensor) only has to shard the linears.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sequential import SequentialModel

__all__ = ["GPTConfig", "GPT", "Embedding", "Block", "Head"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT decoder. ``hidden`` must be divisible by ``num_heads``."""

    num_layers: int = 4
    hidden: int = 64
    num_heads: int = 4
    seq_len: int = 32
    vocab_size: int = 128
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "num_heads", "seq_len", "vocab_size", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name}={getattr(self, name)} must be >= 1")
        if self.hidden % self.num_heads:
            raise ValueError(
                f"GPTConfig.hidden={self.hidden} is not divisible by num_heads={self.num_heads}: "
                "pick a hidden size that is a multiple of the head count"
            )


class Embedding(nn.Module):
    """Token + learned position embedding: (B, S) int64 -> (B, S, H)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.tok(tokens) + self.pos(positions)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden // cfg.num_heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q, k, v = (
            lin(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for lin in (self.q, self.k, self.v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: (B, S, H) -> (B, S, H).

    ``tp_plan`` is the Megatron split, read both by the profiler (which GEMM dimension a
    tensor-parallel degree divides) and by the executor (DTensor sharding): q/k/v and fc are
    column-parallel, the two output projections row-parallel, so a block all-reduces twice.
    """

    tp_plan = {
        "attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.proj": "rowwise",
        "mlp.fc": "colwise", "mlp.proj": "rowwise",
    }

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        # Heads are the unit of the split; every divisor of the head count also divides 4h.
        self.tp_max_degree = cfg.num_heads
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final norm + vocabulary projection: (B, S, H) -> (B, S, V) logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


class GPT(SequentialModel):
    """GPT decoder as ``[Embedding, Block * num_layers, Head]``; (B, S) tokens -> (B, S, V)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__([Embedding(cfg), *(Block(cfg) for _ in range(cfg.num_layers)), Head(cfg)])
        self.config = cfg

    def example_inputs(self, batch_size: int, device: str | torch.device = "cpu") -> tuple:
        return (torch.zeros(batch_size, self.config.seq_len, dtype=torch.long, device=device),)

    def example_target(self, batch_size: int, device: str | torch.device = "cpu") -> torch.Tensor:
        return torch.zeros(batch_size, self.config.seq_len, dtype=torch.long, device=device)

    @staticmethod
    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; logits (B, S, V), target (B, S)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
