"""Plan JSON round trip and validation errors that name the field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dartspar.plan import Plan, PlanError, StageSpec

from synthetic import gpt_like_profile, mixed_cluster


def two_stage_plan() -> Plan:
    return Plan(
        stages=(
            StageSpec(0, 4, (0, 1, 2, 3), dp=2, tp=2, recompute=(False, True, True, False)),
            StageSpec(4, 8, (4, 5), dp=2, tp=1, recompute=(False,) * 4),
        ),
        schedule="1f1b", num_microbatches=4, micro_batch_size=8,
        activation_precision="bf16", gradient_precision="int8", data_parallel="fsdp",
        predicted={"step_time_s": 0.5}, meta={"model": {"name": "gpt", "config": {"num_layers": 6}}},
    )


def test_json_round_trip(tmp_path):
    plan = two_stage_plan()
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = Plan.from_json(path)
    assert again == plan
    assert again.global_batch_size == 32
    assert again.stages[0].replica_devices(1) == (2, 3)
    assert again.stage_of_layer(5) == 1


def test_valid_plan_passes():
    plan = two_stage_plan()
    assert plan.validate(gpt_like_profile(), mixed_cluster()) is None  # raises PlanError if invalid
    assert plan.device_ids == (0, 1, 2, 3, 4, 5) and plan.global_batch_size == 32


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: replace(p, stages=(replace(p.stages[0], layer_end=3, recompute=(False,) * 3), p.stages[1])), r"stages\[1\]\.layer_start=4 but the previous stage ends at 3"),
        (lambda p: replace(p, stages=p.stages[:1]), r"covers layers \[0, 4\) but model 'gpt-like' has 8 layers"),
        (lambda p: replace(p, stages=(p.stages[0], replace(p.stages[1], device_ids=(3, 5)))), r"device 3 is used by stage 0 and stage 1"),
        (lambda p: replace(p, stages=(p.stages[0], replace(p.stages[1], dp=1))), r"dp=1 x tp=1 must equal the stage's 2 devices"),
        (lambda p: replace(p, stages=(p.stages[0], replace(p.stages[1], device_ids=(8, 9)))), r"device_ids has 8, but cluster 'test-mixed' has devices 0\.\.7"),
        (lambda p: replace(p, stages=(replace(p.stages[0], recompute=(True,)), p.stages[1])), r"recompute has 1 entries for 4 layers"),
        (lambda p: replace(p, schedule="zigzag"), r"plan\.schedule='zigzag'"),
        (lambda p: replace(p, activation_precision="fp4"), r"plan\.activation_precision='fp4'"),
        (lambda p: replace(p, micro_batch_size=3), r"stages\[0\]\.dp=2 does not divide plan\.micro_batch_size=3"),
    ],
)
def test_validation_errors_name_the_field(mutate, message):
    with pytest.raises(PlanError, match=message):
        mutate(two_stage_plan()).validate(gpt_like_profile(), mixed_cluster())


def test_tp_degree_must_divide_heads():
    plan = Plan(stages=(StageSpec(0, 8, tuple(range(4)) + (4, 5, 6), dp=1, tp=7, recompute=(False,) * 8),))
    with pytest.raises(PlanError, match=r"tp=7 but layer 1 \(blocks.0\) supports tensor-parallel degrees dividing 16"):
        plan.validate(gpt_like_profile(), mixed_cluster())


def test_bad_json_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json(bad)
    data = two_stage_plan().to_dict()
    data["stagez"] = 1
    bad.write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"unknown fields \['stagez'\]"):
        Plan.from_json(bad)
    del data["stagez"]
    del data["stages"][0]["dp"]
    bad.write_text(json.dumps(data))
    with pytest.raises(PlanError, match="missing field 'dp'"):
        Plan.from_json(bad)
