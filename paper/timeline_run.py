"""Producer of figure (e): the executor's measured pipeline next to the simulated one.

Runs a 2-stage 1F1B plan of ``gpt-tiny`` (6 layers, cut after layer 3; 4 micro-batches of 2) on
2 CPU processes (gloo) with the dartspar executor, takes the last traced step of the merged
Chrome trace, and simulates the same pipeline (``dartspar.sim.simulate``) twice:
- with the per-micro-batch forward/backward times the executor measured for each stage (its
  step-median totals divided by m) and no transfer time (the executor does not separate transfer
  from waiting, so "measured p2p" is not available);
- with the cost model's predicted per-stage times and p2p on the calibrated CPU cluster profile
  (``conf/cluster/cpu4-calibrated.yaml``) when it exists, else ``cpu4``.

    .venv/bin/python paper/timeline_run.py [--steps 8] [--out experiments/results/timeline.json]

Writes the executor events, both simulations and the step times as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "experiments" / "results" / "timeline.json"
CUT = 3
MICROBATCHES = 4
MICRO_BATCH_SIZE = 2
SCHEDULE = "1f1b"


def trace_to_events(trace: dict) -> tuple[list[dict], int]:
    """Events of the last fully traced step of a merged Chrome trace.

    Returns ``(events, step)``: dicts with ``stage`` (the trace's tid, the pipeline stage),
    ``name`` ("F3", "B0", "loss", ...), ``start_s`` / ``end_s`` relative to the earliest start of
    that step on any rank.
    """
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = [e for e in spans if e.get("cat") == "step"]
    if not steps:
        raise ValueError("the trace has no 'step' spans: run the executor with trace_steps >= 1")
    last = max(int(e["name"].split()[-1]) for e in steps)
    windows = {e["pid"]: (e["ts"], e["ts"] + e["dur"]) for e in steps if int(e["name"].split()[-1]) == last}
    t0 = min(lo for lo, _ in windows.values())
    events = []
    for e in spans:
        if e.get("cat") == "step" or e["pid"] not in windows:
            continue
        lo, hi = windows[e["pid"]]
        if lo <= e["ts"] <= hi:
            events.append({"stage": int(e["tid"]), "name": e["name"],
                           "start_s": (e["ts"] - t0) * 1e-6, "end_s": (e["ts"] + e["dur"] - t0) * 1e-6})
    if not events:
        raise ValueError(f"the trace's step {last} holds no spans")
    return sorted(events, key=lambda e: (e["stage"], e["start_s"])), last


def _sim_events(sim) -> list[dict]:
    return [{"stage": e.stage, "microbatch": e.microbatch, "kind": e.kind, "start_s": e.start_s,
             "end_s": e.end_s} for e in sim.events]


def run(steps: int, workdir: Path) -> dict:
    """Run the plan, simulate it, and return the JSON-ready record (seconds)."""
    from omegaconf import OmegaConf

    from dartspar.cli import build_profile
    from dartspar.cluster import load_cluster
    from dartspar.cost.latency import make_estimator
    from dartspar.cost.model import CostModel
    from dartspar.execute import RunOptions, launch
    from dartspar.plan import Plan, StageSpec
    from dartspar.sim import simulate

    prof, spec = build_profile(OmegaConf.load(ROOT / "conf" / "model" / "gpt-tiny.yaml"), "gpt-tiny")
    num_layers = prof.num_layers
    plan = Plan(stages=(StageSpec(0, CUT, (0,), 1, 1, (False,) * CUT),
                        StageSpec(CUT, num_layers, (1,), 1, 1, (False,) * (num_layers - CUT))),
                schedule=SCHEDULE, num_microbatches=MICROBATCHES, micro_batch_size=MICRO_BATCH_SIZE,
                data_parallel="replicate", meta={"model": spec})
    calibrated = ROOT / "conf" / "cluster" / "cpu4-calibrated.yaml"
    cluster = load_cluster(calibrated if calibrated.exists() else "cpu4")
    try:
        import dartspar.cost.fitted  # noqa: F401  (registers "fitted")

        estimator = make_estimator("fitted")
    except (ImportError, FileNotFoundError, ValueError) as err:
        print(f"[timeline] fitted estimator unusable ({err}); using roofline")
        estimator = make_estimator("roofline")
    cost_model = CostModel(prof, cluster, estimator)
    plan = cost_model.with_prediction(plan)
    predicted = cost_model.evaluate(plan)
    plan_path = workdir / "plan.json"
    plan.to_json(plan_path)
    start = time.perf_counter()
    report = launch(plan_path, RunOptions(steps=steps, nproc=2, out_dir=str(workdir), warmup_steps=3,
                                          trace_steps=2, num_train=256, num_val=16, backend="gloo"))
    run_s = time.perf_counter() - start
    trace = json.loads(Path(report.merged_trace).read_text())
    executor_events, traced_step = trace_to_events(trace)
    traced_step_s = max(e["end_s"] for e in executor_events)

    m = plan.num_microbatches
    by_stage = sorted(report.stages, key=lambda s: s["stage"])
    fwd_measured = [s["forward_s"] / m for s in by_stage]
    bwd_measured = [s["backward_s"] / m for s in by_stage]
    sim_measured = simulate(fwd_measured, bwd_measured, [0.0] * (len(by_stage) - 1), m, SCHEDULE)
    fwd_pred = [s.fwd_s for s in predicted.stages]
    bwd_pred = [s.bwd_s + s.recompute_s for s in predicted.stages]
    p2p_pred = [s.p2p_s for s in predicted.stages]
    sim_predicted = simulate(fwd_pred, bwd_pred, p2p_pred, m, SCHEDULE)
    return {
        "description": "executor pipeline timeline vs simulated (figure e)",
        "model": spec, "cluster": cluster.name, "estimator": cost_model.estimator.name,
        "plan": json.loads(plan_path.read_text()),
        "world_size": 2, "steps": steps, "traced_step": traced_step,
        "measured_step_time_s": report.step_time_s,
        "traced_step_span_s": traced_step_s,
        "measured_fwd_per_microbatch_s": fwd_measured, "measured_bwd_per_microbatch_s": bwd_measured,
        "sim_measured_makespan_s": sim_measured.makespan_s,
        "predicted_fwd_per_microbatch_s": fwd_pred, "predicted_bwd_per_microbatch_s": bwd_pred,
        "predicted_p2p_s": p2p_pred,
        "sim_predicted_makespan_s": sim_predicted.makespan_s,
        "predicted_step_time_s": predicted.step_time_s,
        "executor_events": executor_events,
        "sim_measured_events": _sim_events(sim_measured),
        "sim_predicted_events": _sim_events(sim_predicted),
        "run_wall_s": run_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=None, help="run folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dartspar-timeline-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        record = run(args.steps, workdir)
    record["command"] = "python paper/timeline_run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}: measured step {1e3 * record['measured_step_time_s']:.1f} ms, simulated "
          f"(measured times) {1e3 * record['sim_measured_makespan_s']:.1f} ms, predicted "
          f"{1e3 * record['predicted_step_time_s']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
