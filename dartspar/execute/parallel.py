"""Tensor parallelism (DTensor, Megatron column/row split) and FSDP2 for one stage's layers.

Order per stage, as torchtitan composes it: tensor parallelism on each layer, then activation
checkpointing (``StageModule`` applies it at call time), then FSDP2 per layer and on the stage root
with ``reshard_after_forward=False`` (resharding after forward gives wrong gradients under some
pipelining schedules, FACTS.md).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from .build import StageModule
from .checks import ExecutorError

__all__ = ["apply_tensor_parallel", "apply_fsdp"]

_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def apply_tensor_parallel(layer: nn.Module, index: int, tp_mesh: DeviceMesh) -> bool:
    """Shard ``layer`` over ``tp_mesh`` following its ``tp_plan`` (submodule path -> "colwise" |
    "rowwise"); returns whether it was split. Layers without a plan stay replicated: every tp rank
    gets the same input, so they compute the same output and gradients without communication.

    Weights are initialized identically on every rank beforehand, so each rank keeps its own
    slice (``src_data_rank=None``) instead of receiving it from rank 0.
    """
    plan = getattr(layer, "tp_plan", None)
    if tp_mesh.size() == 1 or not plan:
        return False
    styles = {}
    for path, style in plan.items():
        if style not in _STYLES:
            raise ExecutorError(
                f"layer {index} ({type(layer).__name__}).tp_plan[{path!r}]={style!r} is not one "
                f"of {sorted(_STYLES)}"
            )
        styles[path] = _STYLES[style]()
    parallelize_module(layer, tp_mesh, styles, src_data_rank=None)
    return True


def apply_fsdp(stage: StageModule, dp_mesh: DeviceMesh, gradient_precision: str) -> None:
    """FSDP2 over ``dp_mesh``: one unit per layer plus the stage root (which the pipelining
    schedule needs to see as an FSDP module to drive gradient reduction itself). Gradients are
    reduce-scattered in bf16 when the plan asks for bf16 gradient communication."""
    if gradient_precision not in ("fp32", "bf16"):
        raise ExecutorError(
            f"plan.gradient_precision={gradient_precision!r} is not supported with FSDP: use "
            "'fp32' or 'bf16', or data_parallel='replicate'"
        )
    reduce_dtype = torch.bfloat16 if gradient_precision == "bf16" else None
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)
    for layer in stage.layers.values():
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=False, mp_policy=policy)
