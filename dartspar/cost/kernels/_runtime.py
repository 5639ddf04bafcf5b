"""Where the Triton kernels can run: a CUDA device, or Triton's CPU interpreter.

Triton reads ``TRITON_INTERPRET`` when ``triton`` is first imported, so code that wants the
interpreter (the tests) must set it before importing any kernel module.
"""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting", "gpu_available", "check_kernel_inputs"]


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_available() -> bool:
    """True when kernels compile for a real GPU (a CUDA device and no interpreter)."""
    return torch.cuda.is_available() and not interpreting()


def check_kernel_inputs(kernel: str, *tensors: torch.Tensor) -> None:
    """Fail with a clear message when ``tensors`` cannot be handed to a Triton kernel here."""
    for t in tensors:
        if t.device.type == "cuda" and not interpreting():
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise RuntimeError(
            f"Triton {kernel} got a tensor on {t.device} with TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', 'unset')}: Triton kernels run on CUDA tensors, "
            "or on CPU tensors when TRITON_INTERPRET=1 is set before triton is imported"
        )
