"""A concrete parallelization plan: what the search returns and the executor runs.

A plan cuts the model's layer sequence into pipeline stages (contiguous layer ranges, in order);
each stage runs on its own device group, split ``dp`` ways data-parallel by ``tp`` ways
tensor-parallel (``dp * tp`` = the group's size; device ids are laid out dp-major, so the ``tp``
ranks of one replica are consecutive ids). A global batch of ``num_microbatches *
micro_batch_size`` samples flows through the pipeline in ``num_microbatches`` micro-batches; a
stage with ``dp`` replicas gives each ``micro_batch_size / dp`` samples of every micro-batch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cluster import Cluster
from .profile import ModelProfile

__all__ = ["StageSpec", "Plan", "PlanError", "SCHEDULES", "ACT_PRECISIONS", "GRAD_PRECISIONS"]

SCHEDULES = ("gpipe", "1f1b")
ACT_PRECISIONS = ("fp32", "bf16", "fp8")
GRAD_PRECISIONS = ("fp32", "bf16", "int8")
DATA_PARALLEL_MODES = ("replicate", "fsdp")


class PlanError(ValueError):
    """A plan that is malformed, or does not match the model or the cluster."""


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: layers ``[layer_start, layer_end)`` on ``device_ids``.

    ``recompute[i]`` says whether layer ``layer_start + i`` recomputes its forward in backward
    (activation checkpointing) instead of keeping its saved activations.
    """

    layer_start: int
    layer_end: int
    device_ids: tuple[int, ...]
    dp: int
    tp: int
    recompute: tuple[bool, ...]

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def replica_devices(self, replica: int) -> tuple[int, ...]:
        """The ``tp`` device ids of data-parallel replica ``replica`` (dp-major layout)."""
        return self.device_ids[replica * self.tp : (replica + 1) * self.tp]


@dataclass(frozen=True)
class Plan:
    """Stages, schedule and batch split of one training step; ``predicted`` holds the cost
    model's figures for the plan when it was made (step_time_s, peak_bytes, ...)."""

    stages: tuple[StageSpec, ...]
    schedule: str = "1f1b"
    num_microbatches: int = 1
    micro_batch_size: int = 1
    activation_precision: str = "fp32"
    gradient_precision: str = "fp32"
    data_parallel: str = "replicate"
    predicted: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def global_batch_size(self) -> int:
        return self.num_microbatches * self.micro_batch_size

    @property
    def device_ids(self) -> tuple[int, ...]:
        return tuple(d for s in self.stages for d in s.device_ids)

    def stage_of_layer(self, layer: int) -> int:
        for index, stage in enumerate(self.stages):
            if stage.layer_start <= layer < stage.layer_end:
                return index
        raise PlanError(f"layer {layer} is in no stage of this plan")

    # ----------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            stages = tuple(
                StageSpec(
                    layer_start=int(s["layer_start"]),
                    layer_end=int(s["layer_end"]),
                    device_ids=tuple(int(d) for d in s["device_ids"]),
                    dp=int(s["dp"]),
                    tp=int(s["tp"]),
                    recompute=tuple(bool(r) for r in s["recompute"]),
                )
                for s in data["stages"]
            )
        except KeyError as err:
            raise PlanError(f"plan stage is missing field {err.args[0]!r}") from None
        known = {f for f in cls.__dataclass_fields__} - {"stages"}
        unknown = set(data) - known - {"stages"}
        if unknown:
            raise PlanError(f"plan has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(stages=stages, **{k: v for k, v in data.items() if k != "stages"})

    @classmethod
    def from_json(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.exists():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------------ validation
    def validate(self, profile: ModelProfile, cluster: Cluster) -> None:
        """Structural checks against a model and a cluster; raises PlanError naming the field.

        Memory fit is checked by ``CostModel.check_fits(plan)``, which knows the per-device
        footprint.
        """
        if not self.stages:
            raise PlanError("plan.stages is empty: a plan needs at least one stage")
        if self.schedule not in SCHEDULES:
            raise PlanError(f"plan.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.activation_precision not in ACT_PRECISIONS:
            raise PlanError(
                f"plan.activation_precision={self.activation_precision!r} is not one of "
                f"{ACT_PRECISIONS}"
            )
        if self.gradient_precision not in GRAD_PRECISIONS:
            raise PlanError(
                f"plan.gradient_precision={self.gradient_precision!r} is not one of "
                f"{GRAD_PRECISIONS}"
            )
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise PlanError(
                f"plan.data_parallel={self.data_parallel!r} is not one of {DATA_PARALLEL_MODES}"
            )
        if self.num_microbatches < 1 or self.micro_batch_size < 1:
            raise PlanError(
                f"plan.num_microbatches={self.num_microbatches} and plan.micro_batch_size="
                f"{self.micro_batch_size} must both be >= 1"
            )
        expected_start = 0
        seen_devices: dict[int, int] = {}
        for index, stage in enumerate(self.stages):
            where = f"plan.stages[{index}]"
            if stage.layer_start != expected_start:
                raise PlanError(
                    f"{where}.layer_start={stage.layer_start} but the previous stage ends at "
                    f"{expected_start}: stages must cover every layer once, in order"
                )
            if stage.layer_end <= stage.layer_start:
                raise PlanError(
                    f"{where} covers layers [{stage.layer_start}, {stage.layer_end}): a stage "
                    "needs at least one layer"
                )
            expected_start = stage.layer_end
            if len(stage.recompute) != stage.num_layers:
                raise PlanError(
                    f"{where}.recompute has {len(stage.recompute)} entries for "
                    f"{stage.num_layers} layers: give one flag per layer"
                )
            if stage.dp < 1 or stage.tp < 1 or stage.dp * stage.tp != len(stage.device_ids):
                raise PlanError(
                    f"{where}: dp={stage.dp} x tp={stage.tp} must equal the stage's "
                    f"{len(stage.device_ids)} devices"
                )
            if self.micro_batch_size % stage.dp:
                raise PlanError(
                    f"{where}.dp={stage.dp} does not divide plan.micro_batch_size="
                    f"{self.micro_batch_size}: every replica needs the same number of samples"
                )
            for device in stage.device_ids:
                if not 0 <= device < cluster.num_devices:
                    raise PlanError(
                        f"{where}.device_ids has {device}, but cluster {cluster.name!r} has "
                        f"devices 0..{cluster.num_devices - 1}"
                    )
                if device in seen_devices:
                    raise PlanError(
                        f"device {device} is used by stage {seen_devices[device]} and stage "
                        f"{index}: every device belongs to at most one stage"
                    )
                seen_devices[device] = index
            for layer in range(stage.layer_start, stage.layer_end):
                max_tp = profile.layers[layer].tp_max_degree
                # tp_max_degree == 1 layers (embeddings, heads) run replicated on the tp ranks.
                if stage.tp > 1 and max_tp > 1 and max_tp % stage.tp:
                    raise PlanError(
                        f"{where}.tp={stage.tp} but layer {layer} ({profile.layers[layer].name})"
                        f" supports tensor-parallel degrees dividing {max_tp}"
                    )
        if expected_start != profile.num_layers:
            raise PlanError(
                f"plan covers layers [0, {expected_start}) but model {profile.name!r} has "
                f"{profile.num_layers} layers"
            )
