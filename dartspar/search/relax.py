"""Relaxations of categorical choices: temperature schedules, softmax, Gumbel-softmax (soft and
hard with the straight-through estimator), their binary versions, and row statistics.

A categorical row of logits ``z`` becomes probabilities ``softmax(z / T)``. Gumbel-softmax adds
Gumbel(0, 1) noise first (a relaxed *sample*, Jang et al. 2017 / Maddison et al. 2017); the hard
variant returns the one-hot argmax in the forward pass and the soft sample's gradient in the
backward pass (straight-through). Masked entries (``mask == False``) get probability exactly 0.
The smooth maximum used for the slowest stage is ``dartspar.cost.schedule.smooth_max``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TemperatureSchedule", "RELAXATIONS", "relax_categorical", "relax_binary", "entropy",
    "binary_entropy", "gumbel_noise",
]

RELAXATIONS = ("softmax", "gumbel", "gumbel_hard")


@dataclass(frozen=True)
class TemperatureSchedule:
    """Temperature ``T(step)`` for ``step`` in [0, steps - 1], from ``start`` to ``end``.

    ``kind``: "linear" (``start + (end - start) t``), "exponential" (``start (end/start)^t``)
    or "constant" (``start``), with ``t = step / (steps - 1)``. Steps past the end keep ``end``.
    """

    start: float = 1.0
    end: float = 0.2
    steps: int = 100
    kind: str = "exponential"

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "exponential", "constant"):
            raise ValueError(f"temperature kind={self.kind!r} is not one of linear, exponential, constant")
        if not (self.start > 0 and self.end > 0):
            raise ValueError(f"temperature start={self.start} and end={self.end} must both be > 0")
        if self.steps < 1:
            raise ValueError(f"temperature steps={self.steps} must be >= 1")

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return self.start
        t = min(max(step, 0), self.steps - 1) / max(self.steps - 1, 1)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return self.start * (self.end / self.start) ** t


def gumbel_noise(shape: torch.Size | tuple, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Gumbel(0, 1) samples ``-log(-log U)`` with U uniform in (0, 1)."""
    u = torch.rand(shape, generator=generator, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny, max=1.0 - 1e-12)))


def _check_relaxation(mode: str, temperature: float, generator: torch.Generator | None) -> None:
    if mode not in RELAXATIONS:
        raise ValueError(f"relaxation={mode!r} is not one of {RELAXATIONS}")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if mode != "softmax" and generator is None:
        raise ValueError(f"relaxation={mode!r} needs a torch.Generator for its noise")


def relax_categorical(
    logits: torch.Tensor,
    temperature: float,
    mode: str = "softmax",
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relaxed probabilities of categorical rows along the last dim.

    Args:
        logits: (..., n) unnormalised log-probabilities.
        temperature: T > 0.
        mode: "softmax", "gumbel" (soft relaxed sample) or "gumbel_hard" (one-hot forward,
            straight-through gradient of the soft sample).
        generator: required for the Gumbel modes (seeded noise).
        mask: (..., n) bool broadcastable to ``logits``; False entries get probability 0.
            Every row needs at least one allowed entry.
    Returns:
        (..., n) probabilities (rows sum to 1).
    """
    _check_relaxation(mode, temperature, generator)
    z = logits
    if mode != "softmax":
        z = z + gumbel_noise(z.shape, generator, z.dtype)
    z = z / temperature
    if mask is not None:
        if not bool(mask.any(-1).all()):
            raise ValueError("relax_categorical: a row has no allowed entry in its mask")
        z = z.masked_fill(~mask, float("-inf"))
    soft = torch.softmax(z, dim=-1)
    if mode != "gumbel_hard":
        return soft
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def relax_binary(
    logits: torch.Tensor, temperature: float, mode: str = "softmax", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Relaxed P(on) of independent binary choices: ``sigmoid(z / T)``, or its Gumbel (logistic
    noise) sample, or the hard straight-through sample; same modes as ``relax_categorical``."""
    _check_relaxation(mode, temperature, generator)
    z = logits
    if mode != "softmax":
        # The difference of two Gumbels is logistic: log u - log(1 - u).
        u = torch.rand(z.shape, generator=generator, dtype=z.dtype).clamp(1e-12, 1 - 1e-12)
        z = z + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(z / temperature)
    if mode != "gumbel_hard":
        return soft
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of categorical rows (..., n) -> (...,); 0 log 0 = 0."""
    return -(probs * torch.log(probs.clamp(min=1e-300))).sum(-1)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of Bernoulli(p), elementwise."""
    q = p.clamp(1e-300, 1.0)
    r = (1 - p).clamp(1e-300, 1.0)
    return -(p * torch.log(q) + (1 - p) * torch.log(r))

