"""The compute-latency interface of the cost model, and its analytical roofline.

An estimator answers "how long does this GEMM / this memory-bound work take on this device"
as a float64 torch tensor, so that a fitted estimator may stay differentiable in its continuous
inputs. The cost model only calls ``gemm_time_s`` and ``memory_time_s``; estimators are chosen
by name with ``make_estimator`` (config field ``cost.estimator``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..cluster import DeviceSpec

__all__ = [
    "LatencyEstimator", "RooflineEstimator", "make_estimator", "register_estimator",
    "available_estimators",
]


class LatencyEstimator(Protocol):
    name: str

    def gemm_time_s(
        self, m: torch.Tensor, n: torch.Tensor, k: torch.Tensor, batch: torch.Tensor,
        dtype: str, device: DeviceSpec,
    ) -> torch.Tensor:
        """Seconds for ``batch`` products (m x k) @ (k x n); inputs broadcast, float64 out."""

    def memory_time_s(self, num_bytes: torch.Tensor, device: DeviceSpec) -> torch.Tensor:
        """Seconds to stream ``num_bytes`` through device memory (memory-bound kernels)."""


DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


class RooflineEstimator:
    """max(FLOPs / (peak * efficiency), bytes / bandwidth), plus a fixed kernel launch time.

    ``efficiency`` is the fraction of the datasheet peak a large GEMM reaches (~0.8 on H100,
    ~0.87 on A100 per ../shared/FACTS.md); it is one number for every shape, which is exactly
    what the fitted Triton estimator refines.
    """

    name = "roofline"

    def __init__(self, efficiency: float = 0.8, launch_s: float = 5e-6) -> None:
        if not 0 < efficiency <= 1:
            raise ValueError(f"roofline efficiency={efficiency} must be in (0, 1]")
        if launch_s < 0:
            raise ValueError(f"roofline launch_s={launch_s} must be >= 0")
        self.efficiency = efficiency
        self.launch_s = launch_s

    def gemm_time_s(self, m, n, k, batch, dtype, device):
        m, n, k, batch = (torch.as_tensor(v, dtype=torch.float64) for v in (m, n, k, batch))
        flops = 2.0 * batch * m * n * k
        moved = DTYPE_BYTES[dtype] * batch * (m * k + k * n + m * n)
        compute = flops / (device.peak(dtype) * self.efficiency)
        memory = moved / device.memory_bandwidth_bytes_per_s
        return torch.maximum(compute, memory) + self.launch_s

    def memory_time_s(self, num_bytes, device):
        num_bytes = torch.as_tensor(num_bytes, dtype=torch.float64)
        return num_bytes / device.memory_bandwidth_bytes_per_s


_REGISTRY: dict[str, Callable[..., LatencyEstimator]] = {"roofline": RooflineEstimator}


def register_estimator(name: str, factory: Callable[..., LatencyEstimator]) -> None:
    """Make ``make_estimator(name, **options)`` build estimators with ``factory``."""
    _REGISTRY[name] = factory


def _register_builtin() -> None:
    # The fitted estimator registers itself on import; importing it lazily keeps its tables off
    # the import path of users who only need the roofline.
    from . import fitted  # noqa: F401


def available_estimators() -> list[str]:
    """Names ``make_estimator`` accepts (config field ``cost.estimator``)."""
    _register_builtin()
    return sorted(_REGISTRY)


def make_estimator(name: str = "roofline", **options) -> LatencyEstimator:
    """Build a latency estimator by its config name."""
    if name not in _REGISTRY:
        _register_builtin()
    if name not in _REGISTRY:
        raise ValueError(
            f"cost.estimator={name!r} is unknown; available: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name](**options)
