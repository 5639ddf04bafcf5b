"""The executor against single-process training, through real torchrun launches on CPU/gloo.

Launches are expensive on 2 cores (every rank imports torch), so plans that need the same number
of processes run together in one launch (``launch_many``) and the tests read their outputs:
one launch of 2 ranks and one of 4 ranks for the one-step equality checks, one 4-rank training
run (its report and traces are checked too), one refused plan, one run that loses a rank and its
resumption. The pp x dp x tp = 2 x 2 x 2 case needs 8 processes and runs only with
DARTSPAR_HEAVY_TESTS=1; the default suite covers the tensor-parallel compositions 2x1x2 and
1x2x2 instead.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from dartspar.execute import LaunchError, RunOptions, launch, launch_many, main
from dartspar.execute.options import FAULT_ENV
from dartspar.execute.reference import reference_first_step, reference_model, reference_train
from dartspar.execute.train import local_batch
from dartspar.data import BatchStream, make_dataset_for_model

GPT = {"num_layers": 4, "hidden": 32, "num_heads": 4, "seq_len": 16, "vocab_size": 64}
MODEL = {"name": "gpt", "config": GPT}
# Generous process-group timeout and wall limit: a broken run fails instead of hanging CI.
TIMEOUT_S = 120.0
WALL_S = 500.0


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def plan_dict(stages, schedule="1f1b", m=4, mbs=4, act="fp32", grad="fp32", dp_mode="replicate",
              predicted=None, model=None):
    return {
        "stages": [
            {"layer_start": a, "layer_end": b, "device_ids": list(devs), "dp": dp, "tp": tp,
             "recompute": list(rc) if rc else [False] * (b - a)}
            for a, b, devs, dp, tp, rc in stages
        ],
        "schedule": schedule, "num_microbatches": m, "micro_batch_size": mbs,
        "activation_precision": act, "gradient_precision": grad, "data_parallel": dp_mode,
        "predicted": predicted or {}, "meta": {"model": model or MODEL},
    }


PP2 = [(0, 3, [0], 1, 1, None), (3, 6, [1], 1, 1, None)]
DP2 = [(0, 6, [0, 1], 2, 1, None)]

EXACT_2 = {
    "pp_gpipe": plan_dict(PP2, schedule="gpipe"),
    "pp_1f1b_recompute": plan_dict(
        [(0, 2, [0], 1, 1, [False, True]), (2, 6, [1], 1, 1, [True, False, True, False])]),
    "dp_replicate": plan_dict(DP2, schedule="gpipe", m=2),
    "dp_fsdp": plan_dict(DP2, m=2, dp_mode="fsdp"),
    "pp_interleaved": plan_dict(
        [(0, 2, [0], 1, 1, None), (2, 3, [1], 1, 1, None), (3, 5, [0], 1, 1, None),
         (5, 6, [1], 1, 1, None)], schedule="interleaved"),
}
LOWP_2 = {
    "pp_act_bf16": plan_dict(PP2, act="bf16"),
    "pp_act_fp8": plan_dict(PP2, act="fp8"),
    "dp_grad_bf16": plan_dict(DP2, m=2, grad="bf16"),
    "dp_grad_int8": plan_dict(DP2, m=2, grad="int8"),
}
EXACT_4 = {
    "ppdp_replicate_1f1b": plan_dict([(0, 3, [0, 1], 2, 1, None), (3, 6, [2, 3], 2, 1, None)]),
    "ppdp_fsdp_gpipe": plan_dict([(0, 3, [0, 1], 2, 1, None), (3, 6, [2, 3], 2, 1, None)],
                                 schedule="gpipe", dp_mode="fsdp"),
    "pptp_recompute": plan_dict([(0, 3, [0, 1], 1, 2, [False, True, False]),
                                 (3, 6, [2, 3], 1, 2, [True, False, False])]),
    "dptp_fsdp": plan_dict([(0, 6, [0, 1, 2, 3], 2, 2, None)], schedule="gpipe", m=2,
                           dp_mode="fsdp"),
    "dptp_replicate": plan_dict([(0, 6, [0, 1, 2, 3], 2, 2, None)], m=2),
}
EXACT_8 = {
    "ppdptp_fsdp": plan_dict([(0, 3, [0, 1, 2, 3], 2, 2, None), (3, 6, [4, 5, 6, 7], 2, 2, None)],
                             dp_mode="fsdp"),
    "ppdptp_replicate_recompute": plan_dict(
        [(0, 3, [0, 1, 2, 3], 2, 2, [True, False, True]), (3, 6, [4, 5, 6, 7], 2, 2, None)],
        schedule="gpipe"),
}


def _first_step_batch(plans: dict, tmp: Path) -> Path:
    paths = []
    for name, plan in plans.items():
        path = tmp / f"{name}.json"
        path.write_text(json.dumps(plan))
        paths.append(path)
    out = tmp / "runs"
    options = RunOptions(steps=1, out_dir=str(out), dump_first_step=True, warmup_steps=0,
                         trace_steps=1, timeout_s=TIMEOUT_S, wall_timeout_s=WALL_S)
    launch_many(paths, options)
    return out


@pytest.fixture(scope="module")
def runs_2(tmp_path_factory):
    return _first_step_batch({**EXACT_2, **LOWP_2}, tmp_path_factory.mktemp("w2"))


@pytest.fixture(scope="module")
def runs_4(tmp_path_factory):
    return _first_step_batch(EXACT_4, tmp_path_factory.mktemp("w4"))


def _load_first_step(run_dir: Path) -> tuple[float, dict]:
    loss, grads = None, {}
    for path in sorted(run_dir.glob("first_step_rank*.pt")):
        dump = torch.load(path)
        grads.update(dump["grads"])
        if dump["loss"] is not None:
            loss = dump["loss"]
    assert loss is not None, f"no rank of {run_dir} reported the loss"
    return loss, grads


_REFERENCE_CACHE: dict = {}


def _reference(batch: int):
    if batch not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[batch] = reference_first_step("gpt", GPT, batch)
    return _REFERENCE_CACHE[batch]


def _assert_grads_close(grads, ref, rtol, atol=1e-6):
    assert set(grads) == set(ref), set(grads) ^ set(ref)
    for name, r in ref.items():
        err = float((grads[name] - r).abs().max())
        assert err <= rtol * float(r.abs().max()) + atol, (name, err, float(r.abs().max()))


def _check_exact(runs: Path, name: str, plan: dict):
    loss, grads = _load_first_step(runs / name)
    ref_loss, ref_grads = _reference(plan["num_microbatches"] * plan["micro_batch_size"])
    assert loss == pytest.approx(ref_loss, abs=1e-5)
    _assert_grads_close(grads, ref_grads, rtol=1e-4)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(EXACT_2))
def test_one_step_equals_single_process_2_ranks(runs_2, name):
    _check_exact(runs_2, name, EXACT_2[name])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(EXACT_4))
def test_one_step_equals_single_process_4_ranks(runs_4, name):
    _check_exact(runs_4, name, EXACT_4[name])


@pytest.mark.timeout(900)
@pytest.mark.skipif(os.environ.get("DARTSPAR_HEAVY_TESTS") != "1",
                    reason="8 processes: set DARTSPAR_HEAVY_TESTS=1")
def test_one_step_equals_single_process_8_ranks(tmp_path):
    runs = _first_step_batch(EXACT_8, tmp_path)
    for name, plan in EXACT_8.items():
        _check_exact(runs, name, plan)


def _global_rel_err(grads, ref) -> float:
    num = sum(float(((grads[n] - r) ** 2).sum()) for n, r in ref.items())
    den = sum(float((r**2).sum()) for r in ref.values())
    return (num / den) ** 0.5


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, loss_tol, rel_tol", [("pp_act_bf16", 2e-3, 2e-2),
                                                     ("pp_act_fp8", 2e-2, 0.15)])
def test_low_precision_activations_are_close_but_not_exact(runs_2, name, loss_tol, rel_tol):
    loss, grads = _load_first_step(runs_2 / name)
    ref_loss, ref_grads = _reference(16)
    assert loss == pytest.approx(ref_loss, abs=loss_tol)
    err = _global_rel_err(grads, ref_grads)
    assert 1e-6 < err < rel_tol


def _replica_grads(plan: dict) -> list[dict]:
    """Each data-parallel replica's own gradient (before averaging), from the reference."""
    m, mbs = plan["num_microbatches"], plan["micro_batch_size"]
    dp = plan["stages"][0]["dp"]
    data = make_dataset_for_model("gpt", GPT, 4096, 256, 0)
    x, y = BatchStream((data.train_inputs, data.train_targets), m * mbs, 0).batch(0)
    out = []
    for d in range(dp):
        model = reference_model("gpt", GPT, seed=0)
        loss = model.loss_fn(model(local_batch(x, m, dp, d)), local_batch(y, m, dp, d))
        loss.backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name, bound_per_absmax", [("dp_grad_bf16", 2.0**-7),
                                                    ("dp_grad_int8", 1.0 / 127)])
def test_compressed_gradient_all_reduce_stays_within_its_quantization_bound(runs_2, name,
                                                                           bound_per_absmax):
    loss, grads = _load_first_step(runs_2 / name)
    ref_loss, ref_grads = _reference(8)
    assert loss == pytest.approx(ref_loss, abs=1e-5)  # the forward is not compressed
    replicas = _replica_grads(LOWP_2[name])
    worst = 0.0
    for n, r in ref_grads.items():
        absmax = max(float(g[n].abs().max()) for g in replicas)
        err = float((grads[n] - r).abs().max())
        assert err <= bound_per_absmax * absmax + 1e-6, (n, err, absmax)
        worst = max(worst, err)
    assert worst > 0, "the payload was not compressed"


# ---------------------------------------------------------------------------- training
TRAIN_STEPS = 80
TRAIN_LR = 3e-3
TRAIN_PLAN = plan_dict([(0, 3, [0, 1], 2, 1, None), (3, 6, [2, 3], 2, 1, None)], dp_mode="fsdp",
                       predicted={"step_time_s": 0.05, "peak_bytes": 2.0e8})


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "plan.json").write_text(json.dumps(TRAIN_PLAN))
    code = main([
        str(tmp / "plan.json"), "--steps", str(TRAIN_STEPS), "--lr", str(TRAIN_LR),
        "--out", str(tmp / "out"), "--checkpoint-dir", str(tmp / "ck"),
        "--timeout-s", str(TIMEOUT_S), "--wall-timeout-s", str(WALL_S),
    ])
    assert code == 0
    return tmp


@pytest.mark.timeout(900)
def test_training_reduces_the_loss_like_single_process(training_run):
    report = json.loads((training_run / "out" / "run_report.json").read_text())
    losses = report["losses"]
    assert len(losses) == TRAIN_STEPS
    ref = reference_train("gpt", GPT, 16, TRAIN_STEPS, TRAIN_LR)
    assert losses[0] == pytest.approx(ref[0], abs=1e-5)
    tail, ref_tail = sum(losses[-10:]) / 10, sum(ref[-10:]) / 10
    assert tail < losses[0] - 1.0  # it learns...
    assert tail == pytest.approx(ref_tail, rel=0.01)  # ...as single-process training does
    assert max(abs(a - b) for a, b in zip(losses, ref)) < 0.05
    latest = json.loads((training_run / "ck" / "latest.json").read_text())
    assert latest["step"] == TRAIN_STEPS


@pytest.mark.timeout(900)
def test_run_report_and_traces(training_run):
    out = training_run / "out"
    report = json.loads((out / "run_report.json").read_text())
    assert report["world_size"] == 4 and report["mesh_shape"] == {"pp": 2, "dp": 2, "tp": 1}
    assert len(report["step_times_s"]) == TRAIN_STEPS
    assert report["step_time_s"] > 0
    assert report["tokens_per_step"] == 16 * GPT["seq_len"]
    assert report["tokens_per_s"] == pytest.approx(report["tokens_per_step"] / report["step_time_s"])
    assert report["model_flops_per_step"] > 0 and report["mfu"] is None  # CPU: no MFU
    assert len(report["ranks"]) == 4
    for rank in report["ranks"]:
        assert rank["forward_s"] > 0 and rank["backward_s"] > 0
        assert rank["comm_s"] >= rank["dp_sync_s"] > 0  # FSDP reduce-scatter happened
        assert rank["peak_rss_bytes"] > rank["model_state_bytes"]["total"] > 0
        # FSDP over 2 replicas: each rank holds about half of its stage's AdamW state.
        assert rank["model_state_bytes"]["optimizer"] == pytest.approx(
            rank["model_state_bytes"]["params"] * 2, rel=0.01)
    stages = report["stages"]
    assert [s["layers"] for s in stages] == [[0, 3], [3, 6]]
    assert all(s["forward_s"] > 0 and s["backward_s"] > 0 and s["comm_s"] > 0 for s in stages)
    assert report["predicted"] == TRAIN_PLAN["predicted"]
    assert set(report["predicted_vs_measured"]) == {"step_time_s", "peak_bytes"}
    assert report["predicted_vs_measured"]["step_time_s"]["measured"] == report["step_time_s"]
    for r in range(4):
        trace = json.loads((out / f"trace_rank{r}.json").read_text())
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert {e["pid"] for e in spans} == {r}
        # trace_steps (2) steps x 4 micro-batches of forward and of backward on this rank.
        assert sum(e["cat"] == "forward" for e in spans) == 2 * 4
        assert sum(e["cat"] == "backward" for e in spans) == 2 * 4
        assert all(e["dur"] >= 0 and e["ts"] > 0 for e in spans)
    merged = json.loads((out / "trace.json").read_text())
    assert {e["pid"] for e in merged["traceEvents"] if e["ph"] == "X"} == {0, 1, 2, 3}
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, TRAIN_STEPS + 1))


# ------------------------------------------------------------------------------ failures
@pytest.mark.timeout(600)
def test_plan_that_does_not_fit_fails_on_the_workers_with_exit_code_2(tmp_path):
    giant = {"name": "gpt", "config": {**GPT, "hidden": 16384, "num_heads": 16}}
    path = tmp_path / "giant.json"
    path.write_text(json.dumps(plan_dict(PP2, model=giant)))
    with pytest.raises(LaunchError, match="does not fit") as err:
        launch(path, RunOptions(steps=1, out_dir=str(tmp_path / "out"), timeout_s=TIMEOUT_S,
                                wall_timeout_s=WALL_S))
    assert err.value.exit_code == 2


@pytest.mark.timeout(900)
def test_dead_rank_fails_the_launch_and_resume_continues_from_the_checkpoint(tmp_path):
    path = tmp_path / "pp2.json"
    path.write_text(json.dumps(EXACT_2["pp_gpipe"]))
    ck = tmp_path / "ck"

    def options(out, resume):
        return RunOptions(steps=8, out_dir=str(tmp_path / out), checkpoint_dir=str(ck),
                          checkpoint_every=4, resume=resume, timeout_s=30.0,
                          wall_timeout_s=WALL_S)

    # Rank 1 dies abruptly after 6 steps: the launch must fail (not hang) and say so.
    with pytest.raises(LaunchError, match=r"ranks \[1\]: exited without recording") as err:
        launch(path, options("crashed", False), env={FAULT_ENV: "1:6"})
    assert err.value.exit_code == 1
    crashed = [json.loads(l) for l in (tmp_path / "crashed" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in crashed] == [1, 2, 3, 4, 5, 6]
    assert json.loads((ck / "latest.json").read_text())["step"] == 4

    report = launch(path, options("resumed", True))
    assert report.start_step == 4 and len(report.losses) == 4
    # Steps 5 and 6 ran in both runs: the resumed run repeats them exactly.
    assert report.losses[:2] == pytest.approx([s["loss"] for s in crashed[4:6]], abs=1e-6)
    ref = reference_train("gpt", GPT, 16, 8, 1e-3)
    assert report.losses == pytest.approx(ref[4:], abs=1e-4)
