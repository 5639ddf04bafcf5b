"""paper/make_paper.py on small synthetic JSON: figures are written and the document quotes the
JSON's numbers (no producer is run: every JSON is present)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paper import make_paper  # noqa: E402
from paper.figures import bench_rows  # noqa: E402
from paper.timeline_run import trace_to_events  # noqa: E402


def _darts_history() -> dict:
    rng = np.random.default_rng(0)
    snaps = []
    for step in range(0, 30, 5):
        logits = rng.normal(size=(6, 3)) * (1 + step / 5)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        snaps.append({"step": step, "order": 0, "num_stages": 3, "layer_stage_probs": probs.round(5).tolist()})
    return {"model": "gpt-test", "cluster": "toy", "snapshots": snaps, "layer_names": [f"l{i}" for i in range(6)],
            "relaxed_cost_s": 0.0123, "decoded_cost_s": 0.0145, "final_step_time_s": 0.01177,
            "final_plan_stages": [[0, 2], [2, 4], [4, 6]], "search_wall_s": 1.5,
            "command": "python paper/darts_history.py --steps 30"}


def _bench_search() -> dict:
    quality = [{"case": c, "method": m, "relative_cost": 1.0 + 0.1 * i + 0.01 * j, "wall_s": 0.5 * (i + 1) * (j + 1)}
               for j, c in enumerate(("c1", "c2")) for i, m in enumerate(("darts", "dp", "mcmc", "random", "bruteforce"))]
    mixed = [{"case": "mixed-small", "darts_step_s": 0.02, "device_blind_step_s": 0.05},
             {"case": "mixed64", "speedup": 1.6}]
    scaling = [{"layers": L, "devices": D, "wall_s": 0.01 * L * D ** 0.5} for L in (8, 16, 32) for D in (4, 16)]
    return {"quality": quality, "mixed": mixed, "scaling": scaling, "command": "python experiments/bench_search.py --quick"}


def _calibrate() -> dict:
    plans = [{"name": f"p{i}", "subset": "fit" if i % 2 else "heldout", "measured_step_s": 0.1 * (i + 1),
              "predicted_before_s": 0.02 * (i + 1), "predicted_after_s": 0.11 * (i + 1)} for i in range(6)]
    stats = {"num_plans": 6, "step_mape": 0.4321, "step_max_ape": 0.5, "kendall_tau": 0.6, "memory_mape": 0.05}
    after = {**stats, "step_mape": 0.0771, "kendall_tau": 0.93}
    return {"plans": plans, "figures": {"before": {s: stats for s in ("fit", "heldout", "all")},
                                        "after": {s: after for s in ("fit", "heldout", "all")}},
            "targets": {"step_mape_max": 0.1, "kendall_tau_min": 0.8, "memory_mape_max": 0.1},
            "options": {"steps": 5, "warmup": 2, "seed": 0}}


def _timeline() -> dict:
    ev = [{"stage": 0, "name": "F0", "start_s": 0.0, "end_s": 0.01}, {"stage": 1, "name": "F0", "start_s": 0.01, "end_s": 0.02},
          {"stage": 1, "name": "B0", "start_s": 0.02, "end_s": 0.04}, {"stage": 0, "name": "B0", "start_s": 0.04, "end_s": 0.06},
          {"stage": 0, "name": "optimizer", "start_s": 0.06, "end_s": 0.07}]
    sim = [{"stage": 0, "microbatch": 0, "kind": "F", "start_s": 0.0, "end_s": 0.01},
           {"stage": 1, "microbatch": 0, "kind": "F", "start_s": 0.01, "end_s": 0.02},
           {"stage": 1, "microbatch": 0, "kind": "B", "start_s": 0.02, "end_s": 0.04},
           {"stage": 0, "microbatch": 0, "kind": "B", "start_s": 0.04, "end_s": 0.06}]
    return {"executor_events": ev, "sim_measured_events": sim, "sim_predicted_events": sim, "traced_step": 5,
            "measured_step_time_s": 0.0734, "traced_step_span_s": 0.07, "sim_measured_makespan_s": 0.06,
            "sim_predicted_makespan_s": 0.0555, "predicted_step_time_s": 0.0555, "cluster": "toy", "estimator": "roofline",
            "command": "python paper/timeline_run.py --steps 8"}


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    res.mkdir()
    files = {"darts_history.json": _darts_history(), "bench_search.json": _bench_search(),
             "calibrate.json": _calibrate(), "timeline.json": _timeline(),
             "sim_vs_closed_form.json": {"summary": {"gpipe/equal": {"closed_form": {
                 "n": 4, "median": 0.0, "min": 0.0, "max": 0.0, "max_abs": 0.0234, "p95_abs": 0.0}}}},
             "estimator_accuracy.json": {"summary": {"heldout_matmul_mape_pct": 9.25, "block_fwd_bwd_mape_pct": 6.17,
                                                     "target_block_mape_pct": 15.0, "machine_drift": 1.05}},
             "bench_profile.json": [{"model": "gpt-175b", "layers": 98, "params": 175244992512, "wall_s": 1.15,
                                     "rss_growth_mib": 5.4, "flops_rel_error_vs_megatron": 0.0}],
             "executor_overhead.json": {"overhead": 0.0312}}
    for name, data in files.items():
        (res / name).write_text(json.dumps(data))
    return res


def test_make_paper_from_json(results: Path, tmp_path: Path):
    out = tmp_path / "paper"
    assert make_paper.main(["--results", str(results), "--out", str(out)]) == 0
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == ["fig_a_evolution.png", "fig_a_panels.png", "fig_b_quality_vs_time.png", "fig_c_mixed_speedup.png",
                    "fig_d_predicted_vs_measured.png", "fig_e_timeline.png", "fig_f_search_scaling.png"]
    assert all((out / "figures" / f).stat().st_size > 5000 for f in figs)
    doc = (out / "paper.md").read_text()
    for text in ("11.77 ms",  # (a) final step time
                 "2.50x",  # (c) 0.05 / 0.02
                 "43.2%", "7.7%", "0.93",  # (d) before / after MAPE, tau
                 "73.40 ms", "55.50 ms",  # (e)
                 "layers^1.00", "devices^0.50",  # (f) fitted slopes of the synthetic wall times
                 "2.3%", "6.2%", "175,244,992,512", "0.0312",  # tables
                 "**met**", "`python paper/timeline_run.py --steps 8`"):
        assert text in doc, text
    for fig in figs:
        assert f"figures/{fig}" in doc
    assert "Not produced" not in doc
    log = json.loads((out / "make_paper_log.json").read_text())
    assert log["missing"] == {} and not any(e.get("ran") for e in log["producers"].values())


def test_missing_json_is_reported_not_invented(results: Path, tmp_path: Path):
    (results / "bench_search.json").unlink()
    out = tmp_path / "paper"
    # With a non-default --results, experiments/ producers are not run (they write elsewhere).
    assert make_paper.main(["--results", str(results), "--out", str(out), "--only", "b,d"]) == 3
    doc = (out / "paper.md").read_text()
    assert "Not produced" in doc and "bench_search.py --quick" in doc
    assert not (out / "figures" / "fig_b_quality_vs_time.png").exists()
    assert (out / "figures" / "fig_d_predicted_vs_measured.png").exists()


def test_bench_rows_names_missing_field():
    with pytest.raises(ValueError, match="relative_cost"):
        bench_rows({"quality": [{"method": "dp", "wall_s": 1.0}]}, "quality")


def test_trace_to_events_takes_last_step():
    trace = {"traceEvents": [
        {"name": "step 3", "cat": "step", "ph": "X", "pid": 0, "tid": -1, "ts": 0.0, "dur": 100.0},
        {"name": "F0", "cat": "forward", "ph": "X", "pid": 0, "tid": 0, "ts": 10.0, "dur": 20.0},
        {"name": "step 4", "cat": "step", "ph": "X", "pid": 0, "tid": -1, "ts": 1000.0, "dur": 100.0},
        {"name": "step 4", "cat": "step", "ph": "X", "pid": 1, "tid": -1, "ts": 1010.0, "dur": 100.0},
        {"name": "F0", "cat": "forward", "ph": "X", "pid": 0, "tid": 0, "ts": 1000.0, "dur": 30.0},
        {"name": "B0", "cat": "backward", "ph": "X", "pid": 1, "tid": 1, "ts": 1040.0, "dur": 50.0},
    ]}
    events, step = trace_to_events(trace)
    assert step == 4
    assert [(e["stage"], e["name"]) for e in events] == [(0, "F0"), (1, "B0")]
    assert events[1]["start_s"] == pytest.approx(40e-6) and events[1]["end_s"] == pytest.approx(90e-6)
