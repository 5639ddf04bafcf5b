"""Assembling one rank's share of a plan: mesh, stage modules, parallel wrappers, optimizer.

Per stage this rank holds: materialize its layers from the meta model (deterministic init), tensor
parallelism per layer, the stage module (activation checkpointing, wire casts), FSDP2 when the plan
asks for it; then one AdamW over all the rank's parameters, the replicated-DP gradient sync, and the
pipeline runner. One DeviceMesh ``("pp", "dp", "tp")`` provides every process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from ..plan import Plan
from .build import StageModule, boundary_metas, build_meta_model, materialize_layer, trace_layers
from .checks import RankLayout, check_fits, check_plan, model_spec
from .measure import PhaseClock
from .options import RunOptions
from .parallel import apply_fsdp, apply_tensor_parallel
from .pipeline import PipelineRunner
from .precision import WIRE_DTYPES, ReplicaGradSync

__all__ = ["RankRuntime", "assemble", "device_budget_bytes"]


class _LocalModel(nn.Module):
    """All layers a rank holds (several stages when interleaved) under the whole model's names,
    for the optimizer and checkpoints."""

    def __init__(self, stages: list[StageModule]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({k: v for s in stages for k, v in s.layers.items()})


@dataclass
class RankRuntime:
    """Everything one rank trains with.

    ``state_model`` holds the rank's parameters under the whole model's names (the stage module
    itself, or a container of the stages when interleaved). ``model_flops_per_step`` is the
    whole model's forward + backward FLOPs per global batch; ``tokens_per_step`` the tokens
    (GPT) or samples (dense models) per global batch.
    """

    rank: int
    layout: RankLayout
    coords: tuple[int, int, int]
    stage_indices: tuple[int, ...]
    modules: list[StageModule]
    state_model: nn.Module
    runner: PipelineRunner
    optimizer: torch.optim.Optimizer
    grad_sync: ReplicaGradSync | None
    dp_group: object
    loss_fn: Callable
    model_flops_per_step: float
    tokens_per_step: int


def device_budget_bytes(device: torch.device, options: RunOptions) -> tuple[int, str]:
    """(per-rank memory budget in bytes, where it comes from)."""
    if options.memory_limit_bytes is not None:
        return int(options.memory_limit_bytes), "RunOptions.memory_limit_bytes"
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory), "device memory"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 // local, f"available RAM / {local} local processes"
    return 1 << 62, "unknown (no /proc/meminfo)"


def assemble(plan: Plan, options: RunOptions, device: torch.device) -> RankRuntime:
    """Build this rank's runtime (collective: every rank of the process group calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    name, config = model_spec(plan)
    meta_model = build_meta_model(name, config)
    layout = check_plan(plan, meta_model, world)
    check_fits(plan, meta_model, layout, *device_budget_bytes(device, options))
    stage_indices = layout.stages_of(rank)
    mesh = DeviceMesh(device.type, torch.tensor(layout.mesh), mesh_dim_names=("pp", "dp", "tp"))
    dp_mesh, tp_mesh = mesh["dp"], mesh["tp"]

    micro = plan.micro_batch_size // layout.dp
    activations, layer_flops = trace_layers(meta_model, meta_model.example_inputs(micro, device="meta")[0])
    cuts = [s.layer_start for s in plan.stages] + [len(meta_model.layers)]
    metas = boundary_metas(activations, cuts, WIRE_DTYPES[plan.activation_precision])
    # FLOPs of the built-in models are linear in the batch (attention is per sample).
    flops = sum(layer_flops) * plan.global_batch_size / micro
    seq_len = getattr(getattr(meta_model, "config", None), "seq_len", 1)
    loss_fn = type(meta_model).loss_fn

    autocast = torch.bfloat16 if options.compute_precision == "bf16" else None
    modules = []
    for s in stage_indices:
        spec = plan.stages[s]
        layers = {}
        for i in range(spec.layer_start, spec.layer_end):
            layers[i] = materialize_layer(meta_model.layers[i], i, options.seed, device)
            apply_tensor_parallel(layers[i], i, tp_mesh)
        recompute = {spec.layer_start + j: r for j, r in enumerate(spec.recompute)}
        module = StageModule(
            layers, recompute, plan.activation_precision,
            is_first=s == 0, is_last=s == plan.num_stages - 1, autocast_dtype=autocast,
        )
        if plan.data_parallel == "fsdp" and layout.dp > 1:
            apply_fsdp(module, dp_mesh, plan.gradient_precision)
        modules.append(module)
    del meta_model  # the layers this rank does not own stay shapes on the meta device

    state_model = modules[0] if len(modules) == 1 else _LocalModel(modules)
    params = list(state_model.parameters())
    # foreach kernels want one tensor kind per call: plain tensors next to DTensors (tensor-
    # parallel blocks beside a replicated embedding) take the per-parameter path.
    mixed = len({type(p) for p in params}) > 1
    optimizer = torch.optim.AdamW(
        params, lr=options.lr, weight_decay=options.weight_decay, foreach=not mixed
    )
    grad_sync = None
    if plan.data_parallel == "replicate" and layout.dp > 1:
        grad_sync = ReplicaGradSync(
            params, dp_mesh.get_group(), plan.gradient_precision, options.int8_error_feedback
        )
    clock = PhaseClock(rank, device)
    runner = PipelineRunner(
        modules, list(stage_indices), plan.num_stages, plan.schedule, plan.num_microbatches,
        loss_fn, [metas[s] for s in stage_indices], [metas[s + 1] for s in stage_indices],
        mesh.get_group("pp"), device, clock,
    )
    return RankRuntime(
        rank=rank, layout=layout, coords=layout.coords(rank), stage_indices=stage_indices,
        modules=modules, state_model=state_model, runner=runner, optimizer=optimizer,
        grad_sync=grad_sync, dp_group=dp_mesh.get_group(), loss_fn=loss_fn,
        model_flops_per_step=flops, tokens_per_step=plan.global_batch_size * seq_len,
    )
