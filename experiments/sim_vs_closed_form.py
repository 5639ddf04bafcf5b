"""How far the closed-form pipeline makespans are from the discrete-event simulation.

Sweep: p in {2, 4, 8, 16}, m in {p, 2p, 4p, 8p}, GPipe and 1F1B, equal stages and seeded random
unequal stages (forward times log-uniform over a 10x range, backward 1.5-2.5x forward), without
and with point-to-point delays (each link 0.05-0.5x the mean forward time; on equal stages
0.25x). Error = (closed form - simulated) / simulated: positive means the closed form is too
pessimistic.

Besides ``pipeline_makespan_s`` it scores two candidate replacements for the 1F1B closed form
(numpy, defined below) so the lead can judge a fix with numbers:
- "window": sum(f+b) + 2 sum(c) + (m-1) * max(c, max over stage windows [s, t] of the
  round-trip time per micro-batch, (sum_{s..t}(f+b) + 2 sum_{s..t-1} c) / (t - s + 1)).
  A 1F1B stage holds at most p - s micro-batches, so a window's round trip must be covered by
  that many micro-batches: this is the pipeline's steady-state cycle time.
- "stage_path": max over stages k of the critical path through stage k: reach stage k, wait for
  the first backward (the longer of k's warm-up forwards and the round trip through the stages
  after k), then m - w more 1F1B cycles at the cycle time of the windows containing k, then
  the backward chain to stage 0.
- "equal_exact" (equal stages, c <= f + b only): (m + p - 1)(f + b) + 2c((p - 1) +
  floor((m - 1)(p - 1) / p)), fitted to the simulation and checked here on every equal case.

Writes experiments/results/sim_vs_closed_form.json and sim_timeline_example.png.
Run: .venv/bin/python experiments/sim_vs_closed_form.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dartspar.cost.schedule import pipeline_makespan_s
from dartspar.sim import simulate
from dartspar.viz import plot_timelines

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = (2, 4, 8, 16)
M_FACTORS = (1, 2, 4, 8)
SCHEDULES = ("gpipe", "1f1b")
UNEQUAL_SEEDS = 12
SEED = 2024


def closed_form_s(f, b, c, m, schedule) -> float:
    as_t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64))  # noqa: E731
    return float(pipeline_makespan_s(as_t(f), as_t(b), as_t(np.append(c, 0.0)), m, schedule))


def _window_cycle_s(f, b, c, contains: int | None = None) -> float:
    fb = f + b
    best = 0.0
    for s in range(len(f)):
        for t in range(s, len(f)):
            if contains is None or s <= contains <= t:
                best = max(best, (fb[s : t + 1].sum() + 2 * c[s:t].sum()) / (t - s + 1))
    return best


def window_1f1b_s(f, b, c, m) -> float:
    cycle = max(_window_cycle_s(f, b, c), c.max() if len(c) else 0.0)
    return float((f + b).sum() + 2 * c.sum() + (m - 1) * cycle)


def stage_path_1f1b_s(f, b, c, m) -> float:
    p = len(f)
    paths = []
    for k in range(p):
        reach = f[:k].sum() + c[:k].sum()
        back = b[:k].sum() + c[:k].sum()
        round_trip = (f[k + 1 :] + b[k + 1 :]).sum() + 2 * c[k:].sum()
        warmup = min(m, p - k)
        links = [c[j] for j in (k - 1, k) if 0 <= j < p - 1]
        cycle = max([_window_cycle_s(f, b, c, contains=k)] + links)
        first_b = reach + max(warmup * f[k], f[k] + round_trip)
        paths.append(first_b + warmup * b[k] + (m - warmup) * cycle + back)
    return float(max(paths))


def equal_exact_1f1b_s(f, b, c, p, m) -> float:
    return (m + p - 1) * (f + b) + 2 * c * ((p - 1) + ((m - 1) * (p - 1)) // p)


def stage_times(rng, p: int, equal: bool, with_p2p: bool):
    if equal:
        f = np.full(p, 1.0)
        b = np.full(p, 2.0)
        c = np.full(p - 1, 0.25 if with_p2p else 0.0)
    else:
        f = np.exp(rng.uniform(0.0, np.log(10.0), p))
        b = f * rng.uniform(1.5, 2.5, p)
        c = rng.uniform(0.05, 0.5, p - 1) * f.mean() if with_p2p else np.zeros(p - 1)
    return f, b, c


def run_sweep() -> list[dict]:
    rng = np.random.default_rng(SEED)
    cases = []
    for p in STAGES:
        for factor in M_FACTORS:
            m = factor * p
            for equal in (True, False):
                for with_p2p in (False, True):
                    for seed_index in range(1 if equal else UNEQUAL_SEEDS):
                        f, b, c = stage_times(rng, p, equal, with_p2p)
                        for schedule in SCHEDULES:
                            cases.append(_case(f, b, c, m, schedule, equal, with_p2p, seed_index))
    return cases


def _case(f, b, c, m, schedule, equal, with_p2p, seed_index) -> dict:
    p = len(f)
    sim = simulate(f, b, c, m, schedule)
    closed = closed_form_s(f, b, c, m, schedule)
    row = {
        "p": p, "m": m, "schedule": schedule, "stages": "equal" if equal else "unequal",
        "p2p": with_p2p, "sample": seed_index,
        "fwd_s": f.tolist(), "bwd_s": b.tolist(), "p2p_s": c.tolist(),
        "sim_makespan_s": sim.makespan_s, "closed_form_s": closed,
        "rel_err": (closed - sim.makespan_s) / sim.makespan_s,
        "sim_bubble_fraction": sim.bubble_fraction,
        "sim_peak_inflight": list(sim.peak_inflight),
    }
    if schedule == "1f1b":
        for name, value in (("window", window_1f1b_s(f, b, c, m)),
                            ("stage_path", stage_path_1f1b_s(f, b, c, m))):
            row[f"{name}_s"] = value
            row[f"{name}_rel_err"] = (value - sim.makespan_s) / sim.makespan_s
        if equal:
            exact = equal_exact_1f1b_s(f[0], b[0], c[0] if p > 1 else 0.0, p, m)
            row["equal_exact_rel_err"] = (exact - sim.makespan_s) / sim.makespan_s
    return row


def _stats(errors: list[float]) -> dict:
    e = np.asarray(errors)
    return {
        "n": int(e.size), "median": float(np.median(e)), "min": float(e.min()),
        "max": float(e.max()), "max_abs": float(np.abs(e).max()),
        "p95_abs": float(np.quantile(np.abs(e), 0.95)),
    }


def summarise(cases: list[dict]) -> dict:
    summary = {}
    for schedule in SCHEDULES:
        for stages in ("equal", "unequal"):
            for with_p2p in (False, True):
                rows = [r for r in cases if r["schedule"] == schedule
                        and r["stages"] == stages and r["p2p"] == with_p2p]
                key = f"{schedule}/{stages}/{'p2p' if with_p2p else 'no_p2p'}"
                entry = {"closed_form": _stats([r["rel_err"] for r in rows])}
                for name in ("window", "stage_path", "equal_exact"):
                    errs = [r[f"{name}_rel_err"] for r in rows if f"{name}_rel_err" in r]
                    if errs:
                        entry[name] = _stats(errs)
                summary[key] = entry
    return summary


def print_table(summary: dict) -> None:
    header = f"{'schedule/stages/p2p':28s} {'formula':12s} {'n':>4s} {'median':>9s} {'min':>9s} {'max':>9s} {'p95|e|':>8s}"
    print(header)
    print("-" * len(header))
    for key, entry in summary.items():
        for name, s in entry.items():
            print(f"{key:28s} {name:12s} {s['n']:4d} {100 * s['median']:8.2f}% "
                  f"{100 * s['min']:8.2f}% {100 * s['max']:8.2f}% {100 * s['p95_abs']:7.2f}%")


def save_example_plot(path: Path) -> None:
    rng = np.random.default_rng(SEED + 1)
    f, b, c = stage_times(rng, 4, equal=False, with_p2p=True)
    panels = []
    for schedule in SCHEDULES:
        sim = simulate(f, b, c, 8, schedule)
        panels.append((f"{schedule}: p=4, m=8, unequal stages, makespan {sim.makespan_s:.1f} s",
                       sim.events))
    plot_timelines(panels, path, vertical=True)


def main() -> None:
    started = time.perf_counter()
    cases = run_sweep()
    summary = summarise(cases)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "description": __doc__.split("\n\n")[0],
        "error_definition": "(closed form - simulated) / simulated",
        "config": {"stages": STAGES, "m_factors": M_FACTORS, "unequal_seeds": UNEQUAL_SEEDS,
                   "seed": SEED},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__},
        "summary": summary,
        "cases": cases,
        "runtime_s": time.perf_counter() - started,
    }
    # The exact command, so that the paper can say which one produced these numbers.
    out["command"] = " ".join(["python", Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix(), *sys.argv[1:]])
    (RESULTS / "sim_vs_closed_form.json").write_text(json.dumps(out, indent=1))
    save_example_plot(RESULTS / "sim_timeline_example.png")
    print_table(summary)
    print(f"\n{len(cases)} cases in {out['runtime_s']:.1f} s -> {RESULTS}")


if __name__ == "__main__":
    main()
