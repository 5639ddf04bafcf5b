"""Figure drawing for the paper: pure functions from a benchmark's JSON (a dict) to a PNG.

Each ``fig_*`` takes the loaded JSON and an output path, writes the PNG and returns the numbers
the document quotes (so text and figure come from the same dict). Bad or incomplete JSON gets a
``ValueError`` naming the file's missing key and the command that writes it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.ticker import NullFormatter, ScalarFormatter
from matplotlib.figure import Figure

from dartspar.viz.heatmap import plot_stage_evolution, plot_stage_probabilities, save_figure
from dartspar.viz.timeline import plot_timelines

__all__ = ["fig_darts_evolution", "fig_quality_vs_time", "fig_mixed_speedup", "fig_calibration",
           "fig_timeline", "fig_search_scaling", "bench_rows", "need"]

METHOD_ORDER = ("darts", "dp", "mcmc", "random", "bruteforce", "device_blind")


def need(data: dict, key: str, source: str):
    """``data[key]``, or a ValueError naming the key and the JSON it should be in."""
    if not isinstance(data, dict) or key not in data:
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{source} lacks {key!r} (has {have}): re-run its producer")
    return data[key]


def _new(figsize=(6.0, 4.2)):
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------- (a)
def fig_darts_evolution(data: dict, out_dir: Path, source: str = "darts_history.json") -> dict:
    """(a): the evolution heatmap (expected stage index per layer over steps) and panels of
    P(layer in stage) at a few steps. Writes fig_a_evolution.png and fig_a_panels.png."""
    snaps = need(data, "snapshots", source)
    if not snaps:
        raise ValueError(f"{source} has no snapshots")
    final_p = snaps[-1]["num_stages"]
    same = [s for s in snaps if s["num_stages"] == final_p]
    pairs = [(int(s["step"]), np.asarray(s["layer_stage_probs"], dtype=np.float64)) for s in same]
    title = f"{data.get('model', '?')} on {data.get('cluster', '?')}: A over the search ({final_p} stages)"
    evo = save_figure(plot_stage_evolution(pairs, title=title), Path(out_dir) / "fig_a_evolution.png")
    panels = save_figure(plot_stage_probabilities(pairs, layer_names=data.get("layer_names"), max_panels=5),
                         Path(out_dir) / "fig_a_panels.png")
    last = pairs[-1][1]
    return {"files": [evo.name, panels.name], "snapshots": len(pairs), "num_stages": final_p,
            "first_step": pairs[0][0], "last_step": pairs[-1][0],
            "final_max_prob_min": float(last.max(axis=1).min()),
            "first_max_prob_mean": float(pairs[0][1].max(axis=1).mean()),
            "final_step_time_s": data.get("final_step_time_s"),
            "relaxed_cost_s": data.get("relaxed_cost_s"), "decoded_cost_s": data.get("decoded_cost_s"),
            "search_wall_s": data.get("search_wall_s"), "final_plan_stages": data.get("final_plan_stages")}


# ---------------------------------------------------------------- bench_search adapters
def _first(row: dict, keys: tuple[str, ...], what: str, source: str):
    for k in keys:
        if k in row and row[k] is not None:
            return row[k]
    raise ValueError(f"{source}: a {what} row lacks all of {list(keys)} (row keys {sorted(row)})")


def bench_rows(data: dict, section: str, source: str = "bench_search.json") -> list[dict]:
    """Rows of one section of bench_search.json, read tolerantly.

    Sections and the fields read (first key present wins):
    - "quality": method, relative cost (``relative_cost`` | ``rel_cost`` | ``cost_ratio``),
      wall time (``wall_s`` | ``wall_time_s`` | ``search_s``), case (``case`` | ``name``).
    - "mixed": case, ``speedup`` (device-blind step time / darts step time) or both step times.
    - "scaling": ``layers``, ``devices``, wall time.
    """
    keys = {"quality": ("quality", "methods", "plan_quality"),
            "mixed": ("mixed", "mixed_speedup", "speedup"),
            "scaling": ("scaling", "search_time_scaling")}[section]
    rows = None
    for k in keys:
        if k in data:
            rows = data[k]
            break
    if rows is None and isinstance(data.get("cases"), list):
        rows = _rows_from_cases(data, section)
    if rows is None:
        raise ValueError(f"{source} has none of the sections {list(keys)} (has {sorted(data)})")
    if isinstance(rows, dict):
        rows = rows.get("rows", rows.get("cases", [{"case": c, **v} for c, v in rows.items() if isinstance(v, dict)]))
    out = []
    for row in rows:
        if section == "quality":
            out.append({"case": str(row.get("case", row.get("name", "?"))),
                        "method": str(_first(row, ("method",), "quality", source)),
                        "relative_cost": float(_first(row, ("relative_cost", "rel_cost", "cost_ratio"), "quality", source)),
                        "wall_s": float(_first(row, ("wall_s", "wall_time_s", "search_s"), "quality", source))})
        elif section == "mixed":
            if "speedup" in row:
                speedup = float(row["speedup"])
            else:
                blind = float(_first(row, ("device_blind_step_s", "device_blind_step_time_s"), "mixed", source))
                darts = float(_first(row, ("darts_step_s", "darts_step_time_s"), "mixed", source))
                speedup = blind / darts
            out.append({"case": str(_first(row, ("case", "cluster", "name"), "mixed", source)), "speedup": speedup})
        else:
            out.append({"layers": int(_first(row, ("layers", "num_layers"), "scaling", source)),
                        "devices": int(_first(row, ("devices", "num_devices"), "scaling", source)),
                        "wall_s": float(_first(row, ("wall_s", "wall_time_s", "search_s"), "scaling", source))})
    if not out:
        raise ValueError(f"{source}: section {section!r} is empty")
    return out


def _rows_from_cases(data: dict, section: str) -> list[dict]:
    """The sections derived from experiments/bench_search.py's per-case runs and summary."""
    if section == "mixed":
        return list(data.get("summary", {}).get("darts_vs_device_blind", {}).get("runs", []))
    rows = []
    for case in data["cases"]:
        name = f"{case['layers']}:{case['cluster']}"
        for run in case.get("runs", []):
            if run.get("rel") is None or run.get("wall_time_s") is None:
                continue
            if section == "quality":
                rows.append({"case": name, "method": run["method"], "relative_cost": 1.0 + run["rel"],
                             "wall_s": run["wall_time_s"]})
            elif run["method"] == "darts":
                rows.append({"layers": case["layers"], "devices": case["devices"], "wall_s": run["wall_time_s"]})
    return rows


# ---------------------------------------------------------------- (b)
def fig_quality_vs_time(rows: list[dict], path: Path) -> dict:
    """(b): relative plan cost (1 = best known) against search wall time, one marker per method
    and case; returns per-method medians."""
    fig = _new()
    ax = fig.subplots()
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    methods += sorted({r["method"] for r in rows} - set(methods))
    summary = {}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        ax.scatter([max(r["wall_s"], 1e-4) for r in mine], [r["relative_cost"] for r in mine], label=m, s=28)
        summary[m] = {"cases": len(mine), "median_relative_cost": float(np.median([r["relative_cost"] for r in mine])),
                      "max_relative_cost": float(max(r["relative_cost"] for r in mine)),
                      "median_wall_s": float(np.median([r["wall_s"] for r in mine]))}
    ax.set_xscale("log")
    ax.set_xlabel("search wall time (s)")
    ax.set_ylabel("plan step time / best found")
    ax.legend(fontsize=8)
    ax.set_title("plan quality vs search time")
    fig.savefig(path, dpi=130)
    return {"files": [Path(path).name], "methods": summary}


# ---------------------------------------------------------------- (c)
def fig_mixed_speedup(rows: list[dict], path: Path) -> dict:
    """(c): darts' speed-up over the device-blind plan per mixed cluster case."""
    fig = _new((max(4.0, 0.9 * len(rows) + 2), 3.8))
    ax = fig.subplots()
    ax.bar(range(len(rows)), [r["speedup"] for r in rows], color="#4C72B0")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["case"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("device-blind step time / darts step time")
    ax.set_title("speed-up on mixed clusters")
    fig.savefig(path, dpi=130)
    speedups = [r["speedup"] for r in rows]
    return {"files": [Path(path).name], "cases": {r["case"]: r["speedup"] for r in rows},
            "geomean": float(math.exp(np.mean(np.log(speedups)))), "min": min(speedups), "max": max(speedups)}


# ---------------------------------------------------------------- (d)
def fig_calibration(data: dict, path: Path, source: str = "calibrate.json") -> dict:
    """(d): predicted vs measured step time per plan, before and after calibration, with MAPE."""
    plans = need(data, "plans", source)
    figures = need(data, "figures", source)
    fig = _new((10.0, 4.4))
    axes = fig.subplots(1, 2)
    numbers = {}
    for ax, when in zip(axes, ("before", "after")):
        stats = need(figures, when, f"{source}['figures']")
        for subset, marker in (("fit", "o"), ("heldout", "^")):
            mine = [p for p in plans if p.get("subset") == subset]
            ax.scatter([1e3 * p["measured_step_s"] for p in mine], [1e3 * p[f"predicted_{when}_s"] for p in mine],
                       marker=marker, label=f"{subset} (MAPE {100 * stats[subset]['step_mape']:.1f}%)")
        values = [1e3 * p["measured_step_s"] for p in plans] + [1e3 * p[f"predicted_{when}_s"] for p in plans]
        lo, hi = min(values) * 0.8, max(values) * 1.25
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Minor-tick labels of a log axis collide at these ranges; plain numbers read better.
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ScalarFormatter())
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("measured step time (ms)")
        ax.set_ylabel("predicted step time (ms)")
        ax.set_title(f"{when} calibration: MAPE {100 * stats['all']['step_mape']:.1f}%, "
                     f"tau {stats['all']['kendall_tau']:.2f}", fontsize=10)
        ax.legend(fontsize=8)
        numbers[when] = {s: {k: stats[s][k] for k in ("num_plans", "step_mape", "step_max_ape", "kendall_tau",
                                                       "memory_mape") if k in stats[s]}
                         for s in ("fit", "heldout", "all")}
    fig.savefig(path, dpi=130)
    return {"files": [Path(path).name], "num_plans": len(plans), **numbers,
            "targets": data.get("targets", {}), "options": data.get("options", {}),
            "runtime_s": data.get("runtime_s", {}).get("total")}


# ---------------------------------------------------------------- (e)
def fig_timeline(data: dict, path: Path, source: str = "timeline.json") -> dict:
    """(e): the executor's traced step next to the simulation with measured and predicted times."""
    panels = [
        (f"executor (measured, step {data.get('traced_step', '?')})", need(data, "executor_events", source)),
        ("simulated, measured stage times", need(data, "sim_measured_events", source)),
        ("simulated, cost-model times", need(data, "sim_predicted_events", source)),
    ]
    plot_timelines(panels, path, vertical=True)
    return {"files": [Path(path).name],
            **{k: data.get(k) for k in ("measured_step_time_s", "traced_step_span_s", "sim_measured_makespan_s",
                                        "sim_predicted_makespan_s", "predicted_step_time_s", "cluster", "estimator")}}


# ---------------------------------------------------------------- (f)
def fig_search_scaling(rows: list[dict], path: Path) -> dict:
    """(f): darts search time vs layers (one line per device count), log-log, with the fitted
    slope of log(time) over log(layers) and log(devices)."""
    fig = _new()
    ax = fig.subplots()
    for d in sorted({r["devices"] for r in rows}):
        mine = sorted((r for r in rows if r["devices"] == d), key=lambda r: r["layers"])
        ax.plot([r["layers"] for r in mine], [r["wall_s"] for r in mine], "o-", label=f"{d} devices")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel("darts search wall time (s)")
    ax.legend(fontsize=8)
    ax.set_title("search time vs model and cluster size")
    fig.savefig(path, dpi=130)
    X = np.array([[1.0, math.log(r["layers"]), math.log(r["devices"])] for r in rows])
    y = np.log([r["wall_s"] for r in rows])
    slopes = None
    if len({r["layers"] for r in rows}) > 1 and len({r["devices"] for r in rows}) > 1:
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        slopes = {"layers": float(coef[1]), "devices": float(coef[2])}
    largest = max(rows, key=lambda r: (r["layers"] * r["devices"], r["wall_s"]))
    return {"files": [Path(path).name], "points": len(rows), "slopes": slopes, "largest": largest,
            "max_wall_s": max(r["wall_s"] for r in rows)}
