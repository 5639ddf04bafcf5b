"""Closing the loop: predicted vs measured step time and memory over many plans, before and
after calibrating the cost model to this machine.

Runs up to 37 different plans of two small GPTs (4 blocks of width 128, and 2 blocks of width
256; s=64, vocab 256) on 1, 2 and 4 CPU processes (gloo) with the dartspar executor: pp 1/2/4,
dp 1/2 (replicated or FSDP), tp 1/2, 1-16 micro-batches of 1-16 samples, GPipe and 1F1B,
recompute on and off. Two widths keep compute, memory-bound work and fixed overheads apart in
the fit (with one model they are nearly collinear, and a fit on them does not carry over to
other models). Every rank runs one torch thread (``OMP_NUM_THREADS=1``), so a "device" is one
core. Plans with more processes than the host has cores are skipped (``--max-processes``,
default the core count: 29 plans on a 2-core host): oversubscribed ranks time-share cores,
which the operating system schedules and no per-device cost model describes.

Measured per plan: step time = the run report's median over the post-warm-up steps of the
slowest rank's step; memory = every rank's peak resident set (VmHWM: Python, torch and gloo
included). Plans of one world size run one after another in one torchrun launch (start-up is
most of a plan's cost on this host), ordered by increasing predicted memory: a process's
VmHWM never decreases, so a later plan's peak is its own only if it needs at least as much as
the plans before it; this order makes that so as far as the cost model ranks them.

The plans are split (seeded, within each parallelism kind) into a fit set and a held-out set.
Reported for both and for all, before calibration (cpu4 as shipped: the catalogue's "CPU"
device, which the fitted estimator replaces by its kernel table, the "loopback" link, no
overheads) and after (``dartspar.calibrate.fit_calibration`` on the fit set): step-time
MAPE, max error and Kendall tau; per-rank memory MAPE (with the fitted runtime baseline after).
Targets: after calibration step-time MAPE <= 10% and Kendall tau >= 0.8 over the plan set;
memory within 10%.

On a shared host the step times move with the other jobs' load: on the 2-vCPU dev VM the
same 2-process plan ran 60% slower for minutes at a time while 1-process plans moved 10%.
Interference only ever adds time, so ``--repeats N`` runs the whole set N times and takes, per
plan, the fastest pass (``--statistic min``, each pass itself the median of its post-warm-up
steps; ``median`` is the other choice), and reports the run-to-run spread of single passes
around the median. The JSON records the load average at start and end.

Writes experiments/results/calibrate.json, experiments/results/calibrate.png and the calibrated
profile conf/cluster/cpu4-calibrated.yaml; prints a table.

    .venv/bin/python experiments/calibrate.py [--steps 10] [--warmup 3] [--repeats 1]
        [--statistic min] [--estimator auto] [--runs-dir runs/calibrate] [--reuse]

``--reuse`` takes the run reports already in --runs-dir instead of running (re-fit only).
The default (one pass, fitted estimator) takes about 10 minutes on the 2-core dev host.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dartspar.calibrate import (  # noqa: E402
    Measurement,
    assess_predictions,
    fit_calibration,
    measurement_from_report,
    predict_peak_bytes,
    write_cluster_profile,
)
from dartspar.cluster import load_cluster  # noqa: E402
from dartspar.cost.latency import make_estimator  # noqa: E402
from dartspar.cost.model import CostModel  # noqa: E402
from dartspar.execute import RunOptions, RunReport, launch_many  # noqa: E402
from dartspar.models import build_model  # noqa: E402
from dartspar.plan import Plan, StageSpec  # noqa: E402
from dartspar.profile import profile as profile_model  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
PROFILE_OUT = ROOT / "conf" / "cluster" / "cpu4-calibrated.yaml"
MODELS = {
    "narrow": {"name": "gpt", "config": {"num_layers": 4, "hidden": 128, "num_heads": 4, "seq_len": 64,
                                         "vocab_size": 256}},
    "wide": {"name": "gpt", "config": {"num_layers": 2, "hidden": 256, "num_heads": 4, "seq_len": 64,
                                       "vocab_size": 256}},
}
FIT_FRACTION = 0.55
SEED = 0


@dataclass(frozen=True)
class Case:
    name: str
    plan: Plan
    model: str  # key of MODELS


def _stage(a: int, b: int, devices, dp: int = 1, tp: int = 1, recompute: bool = False) -> StageSpec:
    return StageSpec(a, b, tuple(devices), dp, tp, (recompute,) * (b - a))


def _plan(stages, schedule: str, m: int, mbs: int, data_parallel: str = "replicate", model: str = "narrow") -> Plan:
    return Plan(stages=tuple(stages), schedule=schedule, num_microbatches=m, micro_batch_size=mbs,
                data_parallel=data_parallel, meta={"model": MODELS[model]})


def plan_set(max_processes: int | None = None) -> list[Case]:
    """The plans (names say pp/dp/tp, schedule, micro-batches m, micro-batch size b) that use
    at most ``max_processes`` processes (None: all 37). Names starting "w-" use the wide model."""
    L = MODELS["narrow"]["config"]["num_layers"] + 2  # embedding, blocks, head
    full = lambda devices, dp=1, tp=1, rc=False: [_stage(0, L, devices, dp, tp, rc)]  # noqa: E731
    two = lambda d0, d1, dp=1, tp=1, rc=False, cut=3: [  # noqa: E731
        _stage(0, cut, d0, dp, tp, rc), _stage(cut, L, d1, dp, tp, rc)]
    four = lambda rc=False: [_stage(0, 2, [0], recompute=rc), _stage(2, 3, [1], recompute=rc),  # noqa: E731
                             _stage(3, 4, [2], recompute=rc), _stage(4, L, [3], recompute=rc)]
    cases = {
        # one process
        "pp1-m1-b8": _plan(full([0]), "1f1b", 1, 8),
        "pp1-m2-b4": _plan(full([0]), "1f1b", 2, 4),
        "pp1-m4-b4-rc": _plan(full([0], rc=True), "1f1b", 4, 4),
        "pp1-gpipe-m4-b2": _plan(full([0]), "gpipe", 4, 2),
        "pp1-m8-b2": _plan(full([0]), "1f1b", 8, 2),
        "pp1-m1-b16": _plan(full([0]), "1f1b", 1, 16),
        # two processes
        "pp2-1f1b-m2-b4": _plan(two([0], [1]), "1f1b", 2, 4),
        "pp2-1f1b-m4-b4": _plan(two([0], [1]), "1f1b", 4, 4),
        "pp2-gpipe-m4-b4": _plan(two([0], [1]), "gpipe", 4, 4),
        "pp2-gpipe-m8-b2-rc": _plan(two([0], [1], rc=True), "gpipe", 8, 2),
        "pp2-1f1b-m4-b4-uneven": _plan(two([0], [1], cut=2), "1f1b", 4, 4),
        "pp2-1f1b-m8-b2": _plan(two([0], [1]), "1f1b", 8, 2),
        "pp2-1f1b-m2-b8": _plan(two([0], [1]), "1f1b", 2, 8),
        "pp2-gpipe-m16-b1": _plan(two([0], [1]), "gpipe", 16, 1),
        "dp2-m2-b4": _plan(full([0, 1], dp=2), "1f1b", 2, 4),
        "dp2-fsdp-m2-b4": _plan(full([0, 1], dp=2), "1f1b", 2, 4, "fsdp"),
        "dp2-m4-b2-rc": _plan(full([0, 1], dp=2, rc=True), "gpipe", 4, 2),
        "dp2-m1-b16": _plan(full([0, 1], dp=2), "1f1b", 1, 16),
        "dp2-fsdp-m4-b2-rc": _plan(full([0, 1], dp=2, rc=True), "1f1b", 4, 2, "fsdp"),
        "tp2-m2-b4": _plan(full([0, 1], tp=2), "1f1b", 2, 4),
        "tp2-m4-b2-rc": _plan(full([0, 1], tp=2, rc=True), "1f1b", 4, 2),
        "tp2-gpipe-m1-b8": _plan(full([0, 1], tp=2), "gpipe", 1, 8),
        # four processes
        "pp4-1f1b-m4-b4": _plan(four(), "1f1b", 4, 4),
        "pp4-gpipe-m8-b2": _plan(four(), "gpipe", 8, 2),
        "pp4-1f1b-m8-b2-rc": _plan(four(rc=True), "1f1b", 8, 2),
        "pp4-gpipe-m4-b4-rc": _plan(four(rc=True), "gpipe", 4, 4),
        "pp2dp2-1f1b-m4-b4": _plan(two([0, 1], [2, 3], dp=2), "1f1b", 4, 4),
        "pp2dp2-fsdp-gpipe-m2-b4": _plan(two([0, 1], [2, 3], dp=2), "gpipe", 2, 4, "fsdp"),
        "pp2tp2-1f1b-m4-b4": _plan(two([0, 1], [2, 3], tp=2), "1f1b", 4, 4),
        "dp2tp2-m2-b4": _plan(full([0, 1, 2, 3], dp=2, tp=2), "1f1b", 2, 4),
    }
    W = MODELS["wide"]["config"]["num_layers"] + 2
    wide = lambda stages, *args, **kw: _plan(stages, *args, **kw, model="wide")  # noqa: E731
    whole = lambda devices, dp=1, tp=1, rc=False: [_stage(0, W, devices, dp, tp, rc)]  # noqa: E731
    halves = lambda rc=False: [_stage(0, 2, [0], recompute=rc), _stage(2, W, [1], recompute=rc)]  # noqa: E731
    cases.update({
        "w-pp1-m2-b4": wide(whole([0]), "1f1b", 2, 4),
        "w-pp1-m4-b2-rc": wide(whole([0], rc=True), "1f1b", 4, 2),
        "w-pp2-1f1b-m4-b4": wide(halves(), "1f1b", 4, 4),
        "w-pp2-gpipe-m2-b8-rc": wide(halves(rc=True), "gpipe", 2, 8),
        "w-dp2-m2-b8": wide(whole([0, 1], dp=2), "1f1b", 2, 8),
        "w-dp2-fsdp-m2-b4": wide(whole([0, 1], dp=2), "1f1b", 2, 4, "fsdp"),
        "w-tp2-m2-b4": wide(whole([0, 1], tp=2), "1f1b", 2, 4),
    })
    return [Case(name, plan, "wide" if name.startswith("w-") else "narrow") for name, plan in cases.items()
            if max_processes is None or len(plan.device_ids) <= max_processes]


def kind(plan: Plan) -> str:
    """Which parallelism a plan uses: "+"-joined subset of pp, dp (replicated or FSDP), tp."""
    parts = [name for name, used in (
        ("pp", plan.num_stages > 1),
        ("dp", any(s.dp > 1 for s in plan.stages)),
        ("tp", any(s.tp > 1 for s in plan.stages)),
    ) if used]
    return "+".join(parts) or "single"


def split(cases: list[Case], seed: int) -> tuple[list[str], list[str]]:
    """Seeded fit / held-out split within each (model, parallelism kind), so that the fit sees
    every cost term (pipeline transfers, gradient synchronisation, tensor-parallel all-reduces)
    of both models and the held-out set tests each it can; a group of one plan goes to the fit."""
    rng = random.Random(seed)
    fit, held = [], []
    kinds: dict[tuple[str, str], list[str]] = {}
    for c in cases:
        kinds.setdefault((c.model, kind(c.plan)), []).append(c.name)
    for names in kinds.values():
        rng.shuffle(names)
        k = len(names) if len(names) == 1 else max(1, min(len(names) - 1, round(FIT_FRACTION * len(names))))
        fit += names[:k]
        held += names[k:]
    return fit, held


def pick_estimator(requested: str):
    """(estimator, note). "auto": the fitted (kernel-table) estimator when tables are shipped."""
    if requested in ("auto", "fitted"):
        try:
            import dartspar.cost.fitted  # noqa: F401  (registers "fitted")

            return make_estimator("fitted"), "fitted estimator (kernel tables of this CPU)"
        except (ImportError, FileNotFoundError, ValueError) as err:
            if requested == "fitted":
                raise
            return make_estimator("roofline"), f"roofline (fitted estimator unusable: {err})"
    return make_estimator(requested), f"{requested} (as requested)"


def run_all(cases: list[Case], runs_dir: Path, steps: int, warmup: int, repeats: int, reuse: bool,
            order_key) -> tuple[dict[str, list[dict]], float]:
    """Run every plan ``repeats`` times: pass after pass, each pass one torchrun launch per world
    size with its plans ordered by ``order_key``. Returns name -> one report dict per pass."""
    plans_dir = runs_dir / "plans"
    plans_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, list[dict]] = {c.name: [] for c in cases}
    start = time.perf_counter()
    sizes = sorted({len(c.plan.device_ids) for c in cases})
    for repeat in range(repeats):
        for size in sizes:
            group = sorted((c for c in cases if len(c.plan.device_ids) == size), key=order_key)
            out_dir = runs_dir / f"pass{repeat}" / f"world{size}"
            paths = []
            for case in group:
                path = plans_dir / f"{case.name}.json"
                case.plan.to_json(path)
                paths.append(path)
            report_paths = [out_dir / p.stem / "run_report.json" if len(paths) > 1 else out_dir / "run_report.json"
                            for p in paths]
            if not (reuse and all(p.exists() for p in report_paths)):
                print(f"pass {repeat}: running {len(paths)} plans on {size} process(es)", flush=True)
                options = RunOptions(steps=steps, warmup_steps=warmup, trace_steps=0, out_dir=str(out_dir),
                                     num_train=512, num_val=16, wall_timeout_s=1800)
                launch_many(paths, options, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
            for position, (case, path) in enumerate(zip(group, report_paths)):
                report = json.loads(path.read_text())
                report["launch_position"] = [repeat, size, position]
                reports[case.name].append(report)
    return reports, time.perf_counter() - start


def combine(plan: Plan, passes: list[dict], profile, statistic: str = "min") -> Measurement:
    """One measurement (of the model ``profile``) from the passes of a plan: over the passes,
    the ``statistic`` ("min" or "median") of each pass's median step time, and the median of
    each rank's peak."""
    singles = [measurement_from_report(plan, r) for r in passes]
    pick = min if statistic == "min" else statistics.median
    ranks = sorted(singles[0].peak_bytes_per_rank)
    return Measurement(
        plan=plan,
        step_time_s=float(pick(m.step_time_s for m in singles)),
        peak_bytes_per_rank={r: float(statistics.median(m.peak_bytes_per_rank[r] for m in singles)) for r in ranks},
        profile=profile,
    )


def _state_bytes_per_stage(cm: CostModel, plan: Plan) -> list[float]:
    """Predicted per-device training-state bytes (params, grads, optimizer) of every stage."""
    soft, tables = cm.one_hot(plan)
    per_config = soft.membership @ tables.memory.state_bytes  # (p, C)
    return [float(per_config[k, int(soft.config_probs[k].argmax())]) for k in range(plan.num_stages)]


def summarize(figures: dict) -> dict:
    step, memory = figures["step"], figures["memory"]
    return {"num_plans": figures["num_plans"], "step_mape": step["mape"], "step_max_ape": step["max_ape"],
            "kendall_tau": step["kendall_tau"], "memory_mape": memory.get("mape"),
            "memory_max_ape": memory.get("max_ape"),
            "memory_measured_over_predicted_above_baseline":
                memory.get("median_measured_over_predicted_above_baseline")}


def plot(path: Path, rows: list[dict], figures: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    ax = axes[0]
    for r in rows:
        ax.scatter(r["measured_step_s"], r["predicted_before_s"], marker="x", color="0.6", s=25)
    for subset, marker, color in (("fit", "o", "tab:blue"), ("heldout", "^", "tab:orange")):
        sel = [r for r in rows if r["subset"] == subset]
        ax.scatter([r["measured_step_s"] for r in sel], [r["predicted_after_s"] for r in sel],
                   marker=marker, color=color, s=36,
                   label=f"after, {subset} (MAPE {100 * figures['after'][subset]['step_mape']:.1f}%)")
    ax.scatter([], [], marker="x", color="0.6", label=f"before (MAPE {100 * figures['before']['all']['step_mape']:.0f}%)")
    values = [v for r in rows for v in (r["measured_step_s"], r["predicted_before_s"], r["predicted_after_s"])]
    xs = np.array([min(values) / 1.3, max(values) * 1.3])
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, xs / 1.1, xs * 1.1, color="0.85", zorder=0, label="±10%")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(*xs)
    ax.set_ylim(*xs)
    ax.set_aspect("equal")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    sizes = sorted({r["world_size"] for r in rows})
    ax.set_title(f"step time: {len(rows)} plans on {'/'.join(map(str, sizes))} CPU processes")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1]
    mib = 2.0**20
    for r in rows:
        for rank, (meas_b, before_b, after_b) in enumerate(zip(r["measured_peak_bytes"], r["predicted_peak_before_bytes"],
                                                                 r["predicted_peak_after_bytes"])):
            color = "tab:blue" if r["subset"] == "fit" else "tab:orange"
            ax.scatter(meas_b / mib, after_b / mib, marker="o" if r["subset"] == "fit" else "^", color=color, s=14)
    all_meas = [b for r in rows for b in r["measured_peak_bytes"]]
    xs = np.array([min(all_meas) / mib * 0.9, max(all_meas) / mib * 1.1])
    ax.plot(xs, xs, "k-", lw=0.8)
    ax.fill_between(xs, xs / 1.1, xs * 1.1, color="0.85", zorder=0)
    ax.set_xlabel("measured peak RSS per rank (MiB)")
    ax.set_ylabel("predicted peak per rank (MiB)")
    ax.set_title(f"memory after calibration (baseline {figures['memory_baseline_bytes'] / mib:.0f} MiB; "
                 f"MAPE {100 * figures['after']['all']['memory_mape']:.1f}%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes over the plan set (medians over passes; >= 2 also measures "
                             "the run-to-run spread, the floor for any model's error)")
    parser.add_argument("--statistic", default="min", choices=("min", "median"),
                        help="per plan over the passes: the fastest (interference only adds time) or the median")
    parser.add_argument("--estimator", default="auto", choices=("auto", "roofline", "fitted"))
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "calibrate"))
    parser.add_argument("--reuse", action="store_true", help="use the reports in --runs-dir")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-processes", type=int, default=os.cpu_count() or 1,
                        help="skip plans with more processes than this (default: the core count)")
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--profile-out", default=str(PROFILE_OUT))
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    cases = plan_set(args.max_processes)
    if len(cases) < 20:
        print(f"note: only {len(cases)} plans use at most --max-processes={args.max_processes} processes")
    fit_names, held_names = split(cases, args.seed)
    cluster = load_cluster("cpu4")
    estimator, estimator_note = pick_estimator(args.estimator)
    roofline = make_estimator("roofline")

    t0 = time.perf_counter()
    profiles = {}
    for key, spec in MODELS.items():
        model = build_model(spec["name"], **spec["config"])
        # The executor trains in fp32 on CPU: 4-byte activations, parameters and gradients.
        profiles[key] = profile_model(model, model.example_inputs(4, device="meta"), dtype_bytes=4, name=key)
    profile = profiles["narrow"]  # for calls that need one; every measurement carries its own
    profile_s = time.perf_counter() - t0

    catalogue_cm = {key: CostModel(p, cluster, roofline) for key, p in profiles.items()}
    peak_before = predict_peak_bytes([c.plan for c in cases], [profiles[c.model] for c in cases], cluster, roofline)
    order = {c.name: max(p.values()) for c, p in zip(cases, peak_before)}
    reports, run_s = run_all(cases, Path(args.runs_dir), args.steps, args.warmup, args.repeats,
                             args.reuse, order_key=lambda c: order[c.name])

    measurements = {c.name: combine(c.plan, reports[c.name], profiles[c.model], args.statistic) for c in cases}
    # Run-to-run spread: how far single passes fall from the plan's median over passes, in the
    # MAPE's units; no model of the median can be expected to do better on a single pass.
    medians = {c.name: statistics.median(r["step_time_s"] for r in reports[c.name]) for c in cases}
    spread = [abs(r["step_time_s"] - medians[c.name]) / medians[c.name]
              for c in cases for r in reports[c.name]] if args.repeats > 1 else []
    fit_set = [measurements[n] for n in fit_names]
    held_set = [measurements[n] for n in held_names]
    every = [measurements[c.name] for c in cases]

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fitted estimator's "scaled from" note
        # A kernel table already measured this CPU: its figures are the one start the search
        # needs (the multi-start grid is for the catalogue's rule-of-thumb figures).
        starts = ({},) if estimator.name == "fitted" else None
        result = fit_calibration(fit_set, profile, cluster, estimator, starts=starts)
    fit_s = time.perf_counter() - t0

    figures: dict = {"before": {}, "after": {}, "memory_baseline_bytes": result.memory_baseline_bytes}
    detail = {}
    for label, subset in (("fit", fit_set), ("heldout", held_set), ("all", every)):
        before = assess_predictions(subset, profile, cluster, estimator)
        after = assess_predictions(subset, profile, result.cluster, estimator)
        figures["before"][label] = summarize(before)
        figures["after"][label] = summarize(after)
        detail[label] = (before, after)
    roofline_before = summarize(assess_predictions(every, profile, cluster, roofline))

    before_all, after_all = detail["all"]
    rows = []
    offset = 0
    for i, case in enumerate(cases):
        m = measurements[case.name]
        ranks = sorted(m.peak_bytes_per_rank)
        n = len(ranks)
        report = reports[case.name][0]
        state_pred = _state_bytes_per_stage(catalogue_cm[case.model], case.plan)
        stage_of = {d: k for k, s in enumerate(case.plan.stages) for d in s.device_ids}
        rows.append({
            "name": case.name,
            "model": case.model,
            "subset": "fit" if case.name in fit_names else "heldout",
            "world_size": len(case.plan.device_ids),
            "launch_position": [r["launch_position"] for r in reports[case.name]],
            "plan": case.plan.to_dict(),
            "measured_step_s": m.step_time_s,
            "measured_step_s_per_pass": [r["step_time_s"] for r in reports[case.name]],
            "measured_step_times_s_per_pass": [r["step_times_s"] for r in reports[case.name]],
            "predicted_before_s": before_all["step"]["predicted_s"][i],
            "predicted_after_s": after_all["step"]["predicted_s"][i],
            "ranks": ranks,
            "measured_peak_bytes": after_all["memory"]["measured_bytes"][offset:offset + n],
            "predicted_peak_before_bytes": before_all["memory"]["predicted_bytes"][offset:offset + n],
            "predicted_peak_after_bytes": after_all["memory"]["predicted_bytes"][offset:offset + n],
            "measured_model_state_bytes": [r["model_state_bytes"]["total"] for r in
                                           sorted(report["ranks"], key=lambda r: r["rank"])],
            "predicted_model_state_bytes": [state_pred[stage_of[r]] for r in ranks],
        })
        offset += n
    state_ratio = [meas / pred for r in rows for meas, pred in
                   zip(r["measured_model_state_bytes"], r["predicted_model_state_bytes"])]

    RESULTS.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profile_path = write_cluster_profile(result, args.profile_out, extra={
        "fit_plans": fit_names, "heldout_plans": held_names,
        "heldout_step_time_mape": figures["after"]["heldout"]["step_mape"],
        "heldout_kendall_tau": figures["after"]["heldout"]["kendall_tau"],
        "heldout_memory_mape": figures["after"]["heldout"]["memory_mape"],
        "all_step_time_mape": figures["after"]["all"]["step_mape"],
        "all_kendall_tau": figures["after"]["all"]["kendall_tau"],
        "measurement": f"experiments/calibrate.py, {args.steps} steps ({args.warmup} warm-up), "
                       "median step time, peak RSS per rank, OMP_NUM_THREADS=1",
    })
    total_s = time.perf_counter() - t_start
    out = {
        "description": f"predicted vs measured step time and peak memory of {len(cases)} plans on "
                       "this CPU host, before and after dartspar.calibrate",
        "targets": {"step_mape_max": 0.10, "kendall_tau_min": 0.8, "memory_mape_max": 0.10},
        "models": MODELS,
        "estimator": estimator.name,
        "estimator_note": estimator_note,
        "fit_plans": fit_names,
        "heldout_plans": held_names,
        "figures": figures,
        "roofline_before_all": roofline_before,
        "fitted_params": result.params.as_dict(),
        "initial_params": result.initial.as_dict(),
        "calibrated_device": result.cluster.device_types[0].name,
        "free": list(result.free),
        "sensitivity": result.sensitivity,
        "at_bound": list(result.at_bound),
        "fit_evaluations": result.evaluations,
        "run_to_run_spread": ({"mean_abs_dev_from_median": float(np.mean(spread)),
                               "max_abs_dev_from_median": float(np.max(spread))} if spread else None),
        "model_state_measured_over_predicted": {
            "median": float(statistics.median(state_ratio)), "min": float(min(state_ratio)),
            "max": float(max(state_ratio))},
        "plans": rows,
        "runtime_s": {"total": total_s, "runs": run_s, "profile": profile_s, "fit": fit_s,
                      "reused_runs": bool(args.reuse)},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "host": {"node": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "cluster_profile": str(profile_path),
        "options": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                    "statistic": args.statistic,
                    "max_processes": args.max_processes},
    }
    # The exact command, so that the paper can say which one produced these numbers.
    out["command"] = " ".join(["python", Path(__file__).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])
    (out_dir / "calibrate.json").write_text(json.dumps(out, indent=1))
    plot(out_dir / "calibrate.png", rows, figures)

    print(f"\nestimator: {estimator_note}")
    print(result.summary())
    print(f"\n{'plan':28s} {'set':8s} {'measured ms':>12s} {'before ms':>10s} {'after ms':>9s} {'err':>7s}")
    for r in rows:
        err = r["predicted_after_s"] / r["measured_step_s"] - 1
        print(f"{r['name']:28s} {r['subset']:8s} {1e3 * r['measured_step_s']:12.1f} "
              f"{1e3 * r['predicted_before_s']:10.1f} {1e3 * r['predicted_after_s']:9.1f} {100 * err:+6.1f}%")
    print(f"\n{'':10s} {'step MAPE':>10s} {'tau':>6s} {'mem MAPE':>9s}   (before -> after)")
    for label in ("fit", "heldout", "all"):
        b, a = figures["before"][label], figures["after"][label]
        print(f"{label:10s} {100 * b['step_mape']:5.1f}->{100 * a['step_mape']:4.1f}% "
              f"{b['kendall_tau']:.2f}->{a['kendall_tau']:.2f} {100 * b['memory_mape']:5.1f}->{100 * a['memory_mape']:4.1f}%")
    if spread:
        print(f"run-to-run spread of single passes around the median: mean {100 * np.mean(spread):.1f}%, "
              f"max {100 * np.max(spread):.1f}%")
    print(f"model state (params+grads+optimizer) measured / predicted: median "
          f"{out['model_state_measured_over_predicted']['median']:.3f}")
    print(f"runtime {total_s:.0f} s (runs {run_s:.0f} s, fit {fit_s:.0f} s); wrote {out_dir / 'calibrate.json'}, "
          f"{out_dir / 'calibrate.png'}, {profile_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
