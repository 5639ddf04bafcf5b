"""Executor pieces that need no process group: plan checks, layout, init, stage modules, wire
precision, run options, the launcher's pre-flight refusals."""

import json

import pytest
import torch
from torch import nn

from dartspar.execute import LaunchError, RunOptions, launch, main
from dartspar.execute.build import (
    StageModule,
    boundary_metas,
    build_meta_model,
    init_layer,
    trace_layers,
)
from dartspar.execute.checks import ExecutorError, check_fits, check_plan, model_spec, model_state_bytes_per_rank
from dartspar.execute.launch import torchrun_command
from dartspar.execute.options import Rendezvous
from dartspar.execute.precision import WireReceive, WireSend, fp8_qdq
from dartspar.execute.reference import reference_model
from dartspar.execute.report import RankStats, compare_with_predicted, stage_stats
from dartspar.execute.train import local_batch
from dartspar.plan import Plan

GPT = {"num_layers": 4, "hidden": 32, "num_heads": 4, "seq_len": 16, "vocab_size": 64}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_plan(stages, schedule="1f1b", m=4, mbs=4, model=None, **fields) -> Plan:
    """stages: (start, end, device_ids, dp, tp[, recompute])."""
    data = {
        "stages": [
            {"layer_start": s[0], "layer_end": s[1], "device_ids": list(s[2]), "dp": s[3],
             "tp": s[4], "recompute": list(s[5]) if len(s) > 5 else [False] * (s[1] - s[0])}
            for s in stages
        ],
        "schedule": schedule, "num_microbatches": m, "micro_batch_size": mbs,
        "meta": {"model": model or {"name": "gpt", "config": GPT}},
        **fields,
    }
    return Plan.from_dict(data)


def meta_gpt():
    return build_meta_model("gpt", GPT)


# ------------------------------------------------------------------------------ checks
def test_layout_of_a_pp_dp_tp_plan():
    plan = make_plan([(0, 3, [4, 5, 6, 7], 2, 2), (3, 6, [0, 1, 2, 3], 2, 2)])
    layout = check_plan(plan, meta_gpt(), world_size=8)
    assert (layout.pp, layout.dp, layout.tp) == (2, 2, 2)
    # Stage 0 runs on devices 4..7 (dp-major: replica 0 = (4, 5)).
    assert layout.mesh[0] == ((4, 5), (6, 7))
    assert layout.coords(6) == (0, 1, 0)
    assert layout.coords(1) == (1, 0, 1)
    assert layout.stages_of(5) == (0,)


def test_interleaved_layout_puts_stage_s_on_group_s_mod_p():
    plan = make_plan(
        [(0, 2, [0], 1, 1), (2, 3, [1], 1, 1), (3, 5, [0], 1, 1), (5, 6, [1], 1, 1)],
        schedule="interleaved",
    )
    layout = check_plan(plan, meta_gpt(), world_size=2)
    assert layout.pp == 2 and layout.num_stages == 4
    assert layout.stages_of(0) == (0, 2) and layout.stages_of(1) == (1, 3)
    bad = make_plan(
        [(0, 2, [0], 1, 1), (2, 3, [1], 1, 1), (3, 5, [1], 1, 1), (5, 6, [0], 1, 1)],
        schedule="interleaved",
    )
    with pytest.raises(ExecutorError, match="loop layout"):
        check_plan(bad, meta_gpt(), world_size=2)


@pytest.mark.parametrize(
    "stages, kwargs, world, message",
    [
        ([(0, 3, [0], 1, 1), (3, 6, [2], 1, 1)], {}, 2, "world size 2"),
        ([(0, 3, [0], 1, 1), (3, 5, [1], 1, 1)], {}, 2, "does not match the model"),
        ([(0, 3, [0, 1], 2, 1), (3, 6, [2], 1, 1)], {}, 3, "heterogeneous"),
        ([(0, 6, [0, 1, 2], 1, 3)], {"mbs": 3}, 3, "degrees dividing 4"),
        ([(0, 6, [0, 1], 2, 1)], {"gradient_precision": "int8", "data_parallel": "fsdp"}, 2, "int8"),
        ([(0, 3, [0], 1, 1), (3, 6, [1], 1, 1)], {"m": 1}, 2, "1F1B schedule needs"),
        ([(0, 3, [0], 1, 1), (3, 6, [0], 1, 1)], {}, 1, "interleaved"),
        ([(0, 6, [0, 1], 2, 1)], {"mbs": 3}, 2, "does not divide"),
        ([(0, 3, [0], 1, 1), (3, 6, [1], 1, 1)], {"schedule": "zb"}, 2, "schedule"),
    ],
)
def test_check_plan_refuses_with_a_clear_message(stages, kwargs, world, message):
    kwargs = dict(kwargs)
    m, mbs = kwargs.pop("m", 4), kwargs.pop("mbs", 4)
    schedule = kwargs.pop("schedule", "1f1b")
    plan = make_plan(stages, schedule=schedule, m=m, mbs=mbs, **kwargs)
    with pytest.raises(ExecutorError, match=message):
        check_plan(plan, meta_gpt(), world_size=world)


def test_model_spec_is_required():
    plan = Plan.from_dict({**make_plan([(0, 6, [0], 1, 1)]).to_dict(), "meta": {}})
    with pytest.raises(ExecutorError, match=r"plan.meta\['model'\] is missing"):
        model_spec(plan)


def test_model_state_bytes_follow_tp_and_fsdp_sharding():
    model = meta_gpt()
    block = sum(p.numel() for p in model.layers[1].parameters())
    edge = sum(p.numel() for i in (0, 5) for p in model.layers[i].parameters())
    total = block * 4 + edge
    plan = make_plan([(0, 6, [0], 1, 1)])
    assert model_state_bytes_per_rank(plan, model, check_plan(plan, model, 1)) == [16 * total]
    fsdp = make_plan([(0, 6, [0, 1], 2, 1)], data_parallel="fsdp")
    assert model_state_bytes_per_rank(fsdp, model, check_plan(fsdp, model, 2)) == [
        int(total * (16 / 2 + 8))
    ]
    tp = make_plan([(0, 6, [0, 1], 1, 2)])
    # Megatron split: every block weight and the column-parallel biases halve; layer norms and
    # the row-parallel biases (2 x hidden) stay whole.
    ln_and_row_bias = 2 * 2 * 32 + 2 * 32
    split = block - ln_and_row_bias
    expected = 16 * (4 * (split // 2 + ln_and_row_bias) + edge)
    assert model_state_bytes_per_rank(tp, model, check_plan(tp, model, 2)) == [expected]
    with pytest.raises(ExecutorError, match="does not fit"):
        check_fits(plan, model, check_plan(plan, model, 1), 1000, "test budget")


# --------------------------------------------------------------------- init and stages
def test_init_layer_depends_only_on_seed_and_index():
    a, b, c = (build_meta_model("gpt", GPT).layers[2] for _ in range(3))
    for layer, index in ((a, 2), (b, 2), (c, 3)):
        layer.to_empty(device="cpu")
        init_layer(layer, index, seed=7)
    state = torch.get_rng_state()
    init_layer(a, 2, seed=7)
    assert torch.equal(torch.get_rng_state(), state), "init_layer must not move the global RNG"
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not torch.equal(a.attn.q.weight, c.attn.q.weight)


def test_init_layer_refuses_parameters_it_cannot_initialize():
    layer = nn.Module()
    layer.lin = nn.Linear(2, 2)
    layer.scale = nn.Parameter(torch.ones(2))
    with pytest.raises(ExecutorError, match="scale"):
        init_layer(layer, 0, seed=0)


def test_trace_layers_counts_the_whole_models_flops():
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_gpt()
    x = model.example_inputs(3, device="meta")[0]
    activations, flops = trace_layers(model, x)
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss_fn(model(x), model.example_target(3, device="meta")).backward()
    assert sum(flops) == counter.get_total_flops() > 0
    assert [tuple(a.shape) for a in activations] == [(3, 16)] + [(3, 16, 32)] * 5 + [(3, 16, 64)]
    metas = boundary_metas(activations, [0, 3, 6], torch.bfloat16)
    assert metas[0].dtype == torch.long and not metas[0].requires_grad
    assert metas[1].dtype == torch.bfloat16 and metas[1].requires_grad
    assert metas[2].dtype == torch.float32 and tuple(metas[2].shape) == (3, 16, 64)


def _stages(model, cut, precision, recompute=False):
    layers = dict(enumerate(model.layers))
    first = StageModule({i: layers[i] for i in range(cut)}, {i: recompute for i in range(cut)},
                        precision, is_first=True, is_last=False)
    last = StageModule({i: layers[i] for i in range(cut, 6)}, {i: recompute for i in range(cut, 6)},
                       precision, is_first=False, is_last=True)
    return first, last


def test_stage_modules_compose_to_the_model_with_recompute_and_wire_casts():
    model = reference_model("gpt", GPT, seed=0)
    x = torch.randint(64, (2, 16))
    y = torch.randint(64, (2, 16))
    ref_loss = model.loss_fn(model(x), y)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, last = _stages(model, 3, "fp32", recompute=True)
    assert [n for n, _ in first.named_parameters()][0] == "layers.0.tok.weight"
    loss = model.loss_fn(last(first(x)), y)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)
    model.zero_grad()
    first, last = _stages(model, 3, "bf16")
    boundary = first(x)
    assert boundary.dtype == torch.bfloat16
    loss = model.loss_fn(last(boundary), y)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-2)
    assert loss.item() != ref_loss.item()


def test_bf16_autocast_stages_keep_fp32_outputs():
    model = reference_model("gpt", GPT, seed=0)
    x = torch.randint(64, (2, 16))
    ref = model(x)
    layers = dict(enumerate(model.layers))
    first = StageModule({i: layers[i] for i in range(3)}, {}, "fp32", is_first=True,
                        is_last=False, autocast_dtype=torch.bfloat16)
    last = StageModule({i: layers[i] for i in range(3, 6)}, {}, "fp32", is_first=False,
                       is_last=True, autocast_dtype=torch.bfloat16)
    boundary = first(x)
    out = last(boundary)
    assert boundary.dtype == out.dtype == torch.float32  # the static pipeline metadata's dtype
    err = float((out - ref).abs().max().detach())
    assert 0 < err < 0.05 * float(ref.abs().max().detach())


def test_fp8_wire_values_are_exact_in_bf16_and_close():
    x = torch.randn(1000) * 3.0
    q = fp8_qdq(x, "e4m3")
    assert torch.equal(q.to(torch.bfloat16).float(), q)
    big = x.abs() > x.abs().max() / 64  # normal range of e4m3 under the shared scale
    rel = ((q - x).abs() / x.abs())[big]
    assert float(rel.max()) <= 2.0**-4 + 1e-6 and float(rel.max()) > 0
    assert torch.equal(fp8_qdq(torch.zeros(4), "e5m2"), torch.zeros(4))
    # Forward e4m3, backward e5m2; both sides keep gradients flowing.
    a = x.clone().requires_grad_(True)
    wire = WireSend("fp8")(a)
    assert wire.dtype == torch.bfloat16
    b = wire.detach().requires_grad_(True)
    WireReceive("fp8")(b).sum().backward()
    assert b.grad.dtype == torch.bfloat16 and torch.equal(b.grad.float(), torch.ones(1000))
    wire.backward(torch.ones(1000, dtype=torch.bfloat16))
    assert a.grad.dtype == torch.float32


def test_local_batch_splits_every_micro_batch_across_replicas():
    batch = torch.arange(24).view(24, 1)  # 3 micro-batches of 8
    parts = [local_batch(batch, 3, 4, d) for d in range(4)]
    assert all(p.shape == (6, 1) for p in parts)
    for j in range(3):  # micro-batch j of the schedule on replica d = its 2-sample slice
        rebuilt = torch.cat([p[2 * j : 2 * j + 2] for p in parts])
        assert torch.equal(rebuilt, batch[8 * j : 8 * j + 8])


# ------------------------------------------------------------------- options, report
def test_run_options_validate_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        RunOptions(resume=True)
    with pytest.raises(ValueError, match="backend"):
        RunOptions(backend="mpi")
    opts = RunOptions(steps=3, checkpoint_dir="ck", checkpoint_every=2, lr=0.01)
    opts.to_json(tmp_path / "o.json")
    assert RunOptions.from_json(tmp_path / "o.json") == opts


def test_torchrun_command_standalone_and_multi_node():
    cmd = torchrun_command(["p.json"], "o.json", 4, Rendezvous())
    assert "--standalone" in cmd and "--nproc-per-node=4" in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "dartspar.execute.worker"
    multi = torchrun_command(
        ["p.json"], "o.json", 8,
        Rendezvous(nnodes="2", node_rank=1, rdzv_endpoint="head:29500", rdzv_id="j1",
                   rdzv_backend="c10d"),
    )
    assert "--standalone" not in multi
    for flag in ("--nnodes=2", "--node-rank=1", "--rdzv-endpoint=head:29500", "--rdzv-id=j1"):
        assert flag in multi
    assert Rendezvous(nnodes="1:4").fixed_nnodes() is None


def test_stage_stats_take_the_worst_rank_and_predictions_compare():
    def rank(r, stages, fwd, mem):
        return RankStats(r, stages, 0, 0, 0, fwd, 2 * fwd, 0.0, 0.1, 0.0, 0.01, 0.1, 1.0, 0.9,
                         mem, {"total": mem // 2}, None, None)

    stats = stage_stats([rank(0, (0,), 1.0, 100), rank(1, (0,), 1.5, 90), rank(2, (1,), 0.5, 70)],
                        [(0, 3), (3, 6)])
    assert stats[0].forward_s == 1.5 and stats[0].peak_memory_bytes == 100
    assert stats[1].ranks == (2,)
    cmp = compare_with_predicted({"step_time_s": 2.0, "other": "x"}, {"step_time_s": 3.0})
    assert cmp == {"step_time_s": {"predicted": 2.0, "measured": 3.0, "ratio": 1.5}}


# ------------------------------------------------------------ launcher pre-flight errors
def _write(tmp_path, plan: Plan, name="plan.json"):
    path = tmp_path / name
    path.write_text(json.dumps(plan.to_dict()))
    return path


def test_launch_refuses_bad_plans_before_starting_processes(tmp_path, capsys):
    opts = RunOptions(steps=1, out_dir=str(tmp_path / "out"), nproc=2)
    beyond = _write(tmp_path, make_plan([(0, 3, [0], 1, 1), (3, 6, [3], 1, 1)]))
    with pytest.raises(LaunchError, match="world size 2") as err:
        launch(beyond, opts)
    assert err.value.exit_code == 2
    wrong_model = make_plan([(0, 3, [0], 1, 1), (3, 6, [1], 1, 1)],
                            model={"name": "gpt", "config": {**GPT, "num_layers": 6}})
    with pytest.raises(LaunchError, match="does not match the model"):
        launch(_write(tmp_path, wrong_model), opts)
    assert main([str(tmp_path / "missing.json"), "--steps", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    fits = _write(tmp_path, make_plan([(0, 3, [0], 1, 1), (3, 6, [1], 1, 1)]), "fits.json")
    assert main([str(fits), "--memory-limit-bytes", "1000", "--out", str(tmp_path / "o")]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "o" / "run_report.json").exists()


def test_tensor_parallel_collectives_are_what_the_profile_counts():
    """The profile's per-block tp collective counts and bytes are what DTensor really issues
    (one process, a fake 2-rank process group; CommDebugMode counts the collectives)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dartspar.execute.parallel import apply_tensor_parallel
    from dartspar.models import build_model
    from dartspar.models.gpt import Block, GPTConfig
    from dartspar.profile import profile

    cfg = GPTConfig(num_layers=1, hidden=64, num_heads=4, seq_len=16, vocab_size=32)
    model = build_model("gpt", num_layers=1, hidden=64, num_heads=4, seq_len=16, vocab_size=32)
    block_profile = profile(model, model.example_inputs(2, "meta"), dtype_bytes=4).layers[1]
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(0)
        block = Block(cfg)
        assert apply_tensor_parallel(block, 1, init_device_mesh("cpu", (2,)))
        x = torch.randn(2, 16, 64, requires_grad=True)
        with CommDebugMode() as forward:
            y = block(x)
        with CommDebugMode() as backward:
            y.sum().backward()
    finally:
        dist.destroy_process_group()
    assert forward.get_total_counts() == block_profile.tp_allreduce_count == 2
    assert backward.get_total_counts() == block_profile.tp_bwd_allreduce_count == 4
    assert set(map(str, backward.get_comm_counts())) == {"c10d_functional.all_reduce"}
