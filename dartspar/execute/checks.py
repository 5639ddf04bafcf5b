"""Checks that a plan can run on this model and this launch, and the rank layout it implies.

Everything here is pure (no process group), so the launcher can refuse a bad plan before it
starts any process, and every worker repeats the same checks and reaches the same verdict.

Layout: rank ``r`` runs device id ``r``. The stages' device groups form one DeviceMesh
``("pp", "dp", "tp")`` of shape ``(P, dp, tp)``: ``mesh[g, d, t]`` is device
``device_ids[d * tp + t]`` of device group ``g`` (the plan's dp-major order). With the "gpipe" and
"1f1b" schedules every stage has its own group (P = number of stages); with "interleaved", stage
``s`` runs on group ``s mod P`` (the loop layout of ``ScheduleInterleaved1F1B``), so each rank
holds ``num_stages / P`` stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..plan import Plan

__all__ = [
    "ExecutorError",
    "EXECUTOR_SCHEDULES",
    "RankLayout",
    "model_spec",
    "check_plan",
    "model_state_bytes_per_rank",
    "check_fits",
]

EXECUTOR_SCHEDULES = ("gpipe", "1f1b", "interleaved")
_ACT_PRECISIONS = ("fp32", "bf16", "fp8")
_GRAD_PRECISIONS = ("fp32", "bf16", "int8")
_DP_MODES = ("replicate", "fsdp")
# fp32 training with AdamW: parameter, gradient, two moments.
_BYTES_PER_PARAM_REPLICATED = 4 + 4 + 8


class ExecutorError(ValueError):
    """A plan, model or launch the executor cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class RankLayout:
    """Where every stage and rank sits in the ("pp", "dp", "tp") mesh.

    Attributes:
        pp, dp, tp: mesh shape (P device groups, data- and tensor-parallel degrees).
        mesh: nested tuples (P, dp, tp) of ranks.
        num_stages: pipeline stages (P, or a multiple of P when interleaved).
    """

    pp: int
    dp: int
    tp: int
    mesh: tuple[tuple[tuple[int, ...], ...], ...]
    num_stages: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp index, dp index, tp index) of ``rank``."""
        for g, group in enumerate(self.mesh):
            for d, replica in enumerate(group):
                if rank in replica:
                    return g, d, replica.index(rank)
        raise ExecutorError(f"rank {rank} is not in the plan's device mesh {self.mesh}")

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stage indices held by ``rank`` in execution order (loop layout)."""
        g = self.coords(rank)[0]
        return tuple(range(g, self.num_stages, self.pp))


def model_spec(plan: Plan) -> tuple[str, dict]:
    """``(name, config)`` of the model a plan was made for, from ``plan.meta["model"]``."""
    spec = plan.meta.get("model") if isinstance(plan.meta, dict) else None
    if not isinstance(spec, dict) or "name" not in spec:
        raise ExecutorError(
            "plan.meta['model'] is missing: the executor needs {'name': 'gpt'|'mlp'|'unbalanced', "
            "'config': {...}} to know which model to build; add it to the plan (the search writes it)"
        )
    config = spec.get("config", {})
    if not isinstance(config, dict):
        raise ExecutorError(f"plan.meta['model']['config'] must be a dict, got {config!r}")
    return str(spec["name"]), dict(config)


def _check_fields(plan: Plan) -> None:
    if not plan.stages:
        raise ExecutorError("plan.stages is empty: a plan needs at least one stage")
    if plan.schedule not in EXECUTOR_SCHEDULES:
        raise ExecutorError(f"plan.schedule={plan.schedule!r} is not one of {EXECUTOR_SCHEDULES}")
    if plan.activation_precision not in _ACT_PRECISIONS:
        raise ExecutorError(
            f"plan.activation_precision={plan.activation_precision!r} is not one of {_ACT_PRECISIONS}"
        )
    if plan.gradient_precision not in _GRAD_PRECISIONS:
        raise ExecutorError(
            f"plan.gradient_precision={plan.gradient_precision!r} is not one of {_GRAD_PRECISIONS}"
        )
    if plan.data_parallel not in _DP_MODES:
        raise ExecutorError(f"plan.data_parallel={plan.data_parallel!r} is not one of {_DP_MODES}")
    if plan.num_microbatches < 1 or plan.micro_batch_size < 1:
        raise ExecutorError(
            f"plan.num_microbatches={plan.num_microbatches} and plan.micro_batch_size="
            f"{plan.micro_batch_size} must both be >= 1"
        )
    if plan.data_parallel == "fsdp" and plan.gradient_precision == "int8":
        raise ExecutorError(
            "plan.gradient_precision='int8' needs plan.data_parallel='replicate': FSDP2 "
            "reduce-scatters in its reduce dtype (fp32 or bf16) and has no int8 path"
        )


def _check_layers(plan: Plan, model: nn.Module) -> None:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ExecutorError(f"model {type(model).__name__} has no .layers: build a SequentialModel")
    expected_start = 0
    for index, stage in enumerate(plan.stages):
        where = f"plan.stages[{index}]"
        if stage.layer_start != expected_start:
            raise ExecutorError(
                f"{where}.layer_start={stage.layer_start} but the previous stage ends at "
                f"{expected_start}: stages must cover every layer once, in order"
            )
        if stage.layer_end <= stage.layer_start:
            raise ExecutorError(
                f"{where} covers layers [{stage.layer_start}, {stage.layer_end}): a stage needs "
                "at least one layer"
            )
        if len(stage.recompute) != stage.num_layers:
            raise ExecutorError(
                f"{where}.recompute has {len(stage.recompute)} entries for {stage.num_layers} "
                "layers: give one flag per layer"
            )
        expected_start = stage.layer_end
        for layer_index in range(stage.layer_start, min(stage.layer_end, len(layers))):
            layer = layers[layer_index]
            if stage.tp > 1 and getattr(layer, "tp_plan", None):
                max_tp = int(getattr(layer, "tp_max_degree", 1))
                if max_tp % stage.tp:
                    raise ExecutorError(
                        f"{where}.tp={stage.tp} but layer {layer_index} "
                        f"({type(layer).__name__}) splits only into degrees dividing {max_tp}: "
                        "pick a tensor-parallel degree that divides it"
                    )
    if expected_start != len(layers):
        raise ExecutorError(
            f"plan covers layers [0, {expected_start}) but the model in plan.meta['model'] has "
            f"{len(layers)} layers: the plan does not match the model (re-run the search for it)"
        )


def _check_devices(plan: Plan, world_size: int) -> RankLayout:
    dp, tp = plan.stages[0].dp, plan.stages[0].tp
    for index, stage in enumerate(plan.stages):
        where = f"plan.stages[{index}]"
        if stage.dp < 1 or stage.tp < 1 or stage.dp * stage.tp != len(stage.device_ids):
            raise ExecutorError(
                f"{where}: dp={stage.dp} x tp={stage.tp} must equal the stage's "
                f"{len(stage.device_ids)} devices"
            )
        if (stage.dp, stage.tp) != (dp, tp):
            raise ExecutorError(
                f"{where} has dp={stage.dp}, tp={stage.tp} but stage 0 has dp={dp}, tp={tp}: the "
                "executor runs one ('pp', 'dp', 'tp') DeviceMesh, so every stage needs the same "
                "dp and tp (heterogeneous per-stage meshes are not supported); re-plan with "
                "uniform degrees"
            )
        if plan.micro_batch_size % stage.dp:
            raise ExecutorError(
                f"{where}.dp={stage.dp} does not divide plan.micro_batch_size="
                f"{plan.micro_batch_size}: every replica needs the same number of samples"
            )
    used = [d for s in plan.stages for d in s.device_ids]
    groups: list[tuple[int, ...]] = []
    for stage in plan.stages:
        if stage.device_ids not in groups:
            groups.append(stage.device_ids)
    pp = len(groups)
    distinct = sorted({d for g in groups for d in g})
    if len(distinct) != sum(len(g) for g in groups):
        raise ExecutorError(
            f"device groups {groups} overlap: every device belongs to at most one device group"
        )
    if distinct != list(range(world_size)):
        raise ExecutorError(
            f"the plan uses device ids {distinct} but this launch has world size {world_size} "
            f"(ranks 0..{world_size - 1}, rank r runs device id r): launch with "
            f"{len(distinct)} processes in total, or renumber the plan's devices to "
            f"0..{len(distinct) - 1}"
        )
    num_stages = plan.num_stages
    if plan.schedule == "interleaved":
        if num_stages % pp or num_stages == pp:
            raise ExecutorError(
                f"plan.schedule='interleaved' needs several stages per device group: "
                f"{num_stages} stages on {pp} groups; use a multiple (> 1) of {pp} stages or "
                "schedule '1f1b'"
            )
        for s, stage in enumerate(plan.stages):
            if stage.device_ids != groups[s % pp]:
                raise ExecutorError(
                    f"plan.stages[{s}].device_ids={list(stage.device_ids)} but the interleaved "
                    f"loop layout puts stage {s} on group {s % pp} = {list(groups[s % pp])}"
                )
        rounds = max(1, plan.num_microbatches // pp)
        if plan.num_microbatches % rounds:
            raise ExecutorError(
                f"plan.num_microbatches={plan.num_microbatches} must be a multiple of "
                f"max(1, num_microbatches // {pp}) = {rounds} for the interleaved schedule"
            )
    elif len(used) != len(set(used)):
        raise ExecutorError(
            f"plan.schedule={plan.schedule!r} runs one stage per device group, but a device "
            "appears in several stages; use schedule 'interleaved' for several stages per device"
        )
    if plan.schedule == "1f1b" and plan.num_microbatches < pp:
        raise ExecutorError(
            f"plan.num_microbatches={plan.num_microbatches} is below the {pp} pipeline stages: "
            "the 1F1B schedule needs at least one micro-batch per stage"
        )
    mesh = tuple(
        tuple(tuple(group[d * tp : (d + 1) * tp]) for d in range(dp)) for group in groups
    )
    return RankLayout(pp=pp, dp=dp, tp=tp, mesh=mesh, num_stages=num_stages)


def check_plan(plan: Plan, model: nn.Module, world_size: int) -> RankLayout:
    """Check ``plan`` against ``model`` (any device, meta is fine) and ``world_size`` processes.

    Raises ExecutorError naming the field, the value and the fix; returns the rank layout.
    """
    _check_fields(plan)
    _check_layers(plan, model)
    return _check_devices(plan, world_size)


def _local_numel(layer: nn.Module, tp: int) -> int:
    """Elements of ``layer``'s parameters on one tensor-parallel rank."""
    styles = getattr(layer, "tp_plan", None) or {}
    total = 0
    for name, param in layer.named_parameters():
        owner, _, leaf = name.rpartition(".")
        style = styles.get(owner) if tp > 1 else None
        # Column-parallel splits weight and bias; row-parallel splits the weight, keeps the bias.
        split = style == "colwise" or (style == "rowwise" and leaf == "weight")
        total += -(-param.numel() // tp) if split else param.numel()
    return total


def model_state_bytes_per_rank(plan: Plan, model: nn.Module, layout: RankLayout) -> list[int]:
    """Lower bound of each device group's per-rank training-state bytes (fp32 AdamW), indexed by
    pp index: parameters, gradients and optimizer moments after TP and FSDP sharding, plus under
    FSDP the unsharded parameters and gradients that live through a step. Activations excluded."""
    out = [0] * layout.pp
    for s, stage in enumerate(plan.stages):
        numel = sum(
            _local_numel(model.layers[i], stage.tp) for i in range(stage.layer_start, stage.layer_end)
        )
        if plan.data_parallel == "fsdp":
            per_param = _BYTES_PER_PARAM_REPLICATED / stage.dp + 8
        else:
            per_param = _BYTES_PER_PARAM_REPLICATED
        out[s % layout.pp] += int(numel * per_param)
    return out


def check_fits(plan: Plan, model: nn.Module, layout: RankLayout, budget_bytes: int, source: str) -> None:
    """Refuse a plan whose model state alone exceeds ``budget_bytes`` per rank (``source`` says
    where the budget comes from, for the message)."""
    for g, need in enumerate(model_state_bytes_per_rank(plan, model, layout)):
        if need > budget_bytes:
            stages = list(range(g, layout.num_stages, layout.pp))
            raise ExecutorError(
                f"plan does not fit: stage(s) {stages} need at least {need / 2**20:.1f} MiB per "
                f"rank for parameters, gradients and AdamW state alone, above the "
                f"{budget_bytes / 2**20:.1f} MiB budget ({source}); use data_parallel='fsdp', "
                "more pipeline stages or tensor parallelism, or a larger memory limit"
            )
