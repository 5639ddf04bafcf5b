"""One command for every figure and table of the paper: ``python paper/make_paper.py``.

For each figure it reads the producer's JSON under experiments/results/; when the JSON is missing
(or ``--rerun``) it runs the producer first (small default size; ``--full`` for the bigger one),
then draws paper/figures/*.png and writes paper/paper.md, a template filled from the same JSON
(no number in the document is typed by hand). Producers that do not exist in the tree, or fail,
are reported in the document and on stdout with the command that would produce their JSON;
nothing is invented in their place.

    .venv/bin/python paper/make_paper.py [--only a,b,...] [--rerun] [--full] [--results DIR] [--out DIR]

Figures: a (A over the DARTS search), b (plan quality vs search time), c (mixed-cluster speed-up
over the device-blind plan), d (predicted vs measured step time), e (executor vs simulated
timeline), f (search time vs layers and devices); t (tables of the other benchmarks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paper import figures as F  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
OUT = ROOT / "paper"
ALL = ("a", "b", "c", "d", "e", "f", "t")


@dataclass(frozen=True)
class Producer:
    """A command that writes one JSON file under the results folder."""

    json_name: str
    script: str  # relative to the repository root
    small_args: tuple[str, ...]
    full_args: tuple[str, ...]

    def command(self, full: bool) -> list[str]:
        return ["python", self.script, *(self.full_args if full else self.small_args)]


PRODUCERS = {
    "darts_history": Producer("darts_history.json", "paper/darts_history.py", ("--steps", "60"), ("--steps", "120")),
    "bench_search": Producer("bench_search.json", "experiments/bench_search.py", ("--quick",), ()),
    # The small size cuts the timed steps per plan (the plan set stays); three passes give
    # medians that one busy moment on the host does not move.
    "calibrate": Producer("calibrate.json", "experiments/calibrate.py", ("--steps", "5", "--warmup", "2", "--repeats", "3"),
                          ("--repeats", "3")),
    "timeline": Producer("timeline.json", "paper/timeline_run.py", ("--steps", "8"), ("--steps", "20")),
    "sim_vs_closed_form": Producer("sim_vs_closed_form.json", "experiments/sim_vs_closed_form.py", (), ()),
    "bench_profile": Producer("bench_profile.json", "experiments/bench_profile.py", (), ()),
    "estimator_accuracy": Producer("estimator_accuracy.json", "experiments/estimator_accuracy.py", ("--rounds", "3"), ()),
    "executor_overhead": Producer("executor_overhead.json", "experiments/bench_executor_overhead.py",
                                  ("--rounds", "3", "--steps", "15", "--warmup", "4"), ()),
}
NEEDS = {"a": ["darts_history"], "b": ["bench_search"], "c": ["bench_search"], "d": ["calibrate"],
         "e": ["timeline"], "f": ["bench_search"],
         "t": ["sim_vs_closed_form", "bench_profile", "estimator_accuracy", "executor_overhead"]}


class Missing(Exception):
    """A figure's JSON is absent and could not be produced; the message says how to produce it."""


def ensure(name: str, results: Path, rerun: bool, full: bool, log: dict) -> dict:
    """Load ``name``'s JSON, running its producer first when missing (or ``rerun``)."""
    if name in log:
        if "error" in log[name]:
            raise Missing(log[name]["error"])
        return json.loads((results / PRODUCERS[name].json_name).read_text())
    prod = PRODUCERS[name]
    path = results / prod.json_name
    cmd = prod.command(full)
    cmd_text = " ".join(cmd)
    entry = log[name] = {"json": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}
    if path.exists() and not rerun:
        entry.update(ran=False, command=None)
    elif not (ROOT / prod.script).exists():
        entry["error"] = (f"{prod.json_name} is missing and its producer {prod.script} does not exist in the "
                          f"tree: run `{cmd_text}` once it does")
        print(f"  [missing] {entry['error']}", flush=True)
        raise Missing(entry["error"])
    else:
        print(f"  [run] {cmd_text}", flush=True)
        start = time.perf_counter()
        args = [sys.executable, *cmd[1:]]
        if results != RESULTS:
            if not prod.script.startswith("paper/"):
                entry["error"] = (f"{prod.script} always writes to experiments/results/, not to --results "
                                  f"{results}: run `{cmd_text}` there, or drop --results")
                print(f"  [missing] {entry['error']}", flush=True)
                raise Missing(entry["error"])
            args += ["--out", str(path)]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
        entry.update(ran=True, command=cmd_text, wall_s=time.perf_counter() - start)
        print(f"  [run] done in {entry['wall_s']:.0f} s (exit {proc.returncode})", flush=True)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            entry["error"] = (f"`{cmd_text}` failed (exit {proc.returncode}) or wrote no {prod.json_name}: "
                              + " | ".join(tail))
            print(f"  [failed] {entry['error']}", flush=True)
            raise Missing(entry["error"])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        entry["error"] = f"{path} is not valid JSON ({err}): re-run `{cmd_text}`"
        raise Missing(entry["error"]) from None


def provenance(name: str, data, log: dict) -> str:
    """The command that wrote ``name``'s JSON, as far as the JSON and this run know it."""
    prod = PRODUCERS[name]
    if log.get(name, {}).get("ran"):
        return f"`{log[name]['command']}` (run by make_paper in this regeneration)"
    if isinstance(data, dict) and data.get("command"):
        return f"`{data['command'].strip()}`"
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in data["options"].items()
                        if k in ("steps", "warmup", "seed", "rounds", "repeats", "max_processes"))
        return f"`python {prod.script} {opts}`".replace(" `", "`") + " (options as recorded in the JSON)"
    return f"`python {prod.script}` (existing JSON, options not recorded in it)"


# ---------------------------------------------------------------- per-figure steps
def step_a(ctx):
    data = ensure("darts_history", ctx.results, ctx.rerun, ctx.full, ctx.log)
    return F.fig_darts_evolution(data, ctx.figdir), provenance("darts_history", data, ctx.log)


def _bench(ctx, section):
    data = ensure("bench_search", ctx.results, ctx.rerun, ctx.full, ctx.log)
    return F.bench_rows(data, section), provenance("bench_search", data, ctx.log)


def step_b(ctx):
    rows, prov = _bench(ctx, "quality")
    return F.fig_quality_vs_time(rows, ctx.figdir / "fig_b_quality_vs_time.png"), prov


def step_c(ctx):
    rows, prov = _bench(ctx, "mixed")
    return F.fig_mixed_speedup(rows, ctx.figdir / "fig_c_mixed_speedup.png"), prov


def step_d(ctx):
    data = ensure("calibrate", ctx.results, ctx.rerun, ctx.full, ctx.log)
    return F.fig_calibration(data, ctx.figdir / "fig_d_predicted_vs_measured.png"), provenance("calibrate", data, ctx.log)


def step_e(ctx):
    data = ensure("timeline", ctx.results, ctx.rerun, ctx.full, ctx.log)
    return F.fig_timeline(data, ctx.figdir / "fig_e_timeline.png"), provenance("timeline", data, ctx.log)


def step_f(ctx):
    rows, prov = _bench(ctx, "scaling")
    return F.fig_search_scaling(rows, ctx.figdir / "fig_f_search_scaling.png"), prov


def step_t(ctx):
    out, provs = {}, {}
    for name in NEEDS["t"]:
        try:
            data = ensure(name, ctx.results, ctx.rerun, ctx.full, ctx.log)
        except Missing as err:
            out[name] = {"missing": str(err)}
            continue
        out[name] = data
        provs[name] = provenance(name, data, ctx.log)
    return out, provs


STEPS = {"a": step_a, "b": step_b, "c": step_c, "d": step_d, "e": step_e, "f": step_f, "t": step_t}


@dataclass
class Context:
    results: Path
    figdir: Path
    rerun: bool
    full: bool
    log: dict


# ---------------------------------------------------------------- document
def _ms(x) -> str:
    return "n/a" if x is None else f"{1e3 * x:.2f} ms"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _img(files) -> str:
    return "\n".join(f"![{f}](figures/{f})" for f in files)


def _missing(label: str, err: str) -> str:
    return f"**Not produced in this regeneration.** {err}\n"


def section_a(r, prov):
    stages = ", ".join(f"[{a}, {b})" for a, b in (r["final_plan_stages"] or []))
    return (f"{_img(r['files'])}\n\n"
            f"Expected stage index of every layer (top) and P(layer in stage) at {min(5, r['snapshots'])} of the "
            f"{r['snapshots']} snapshots (steps {r['first_step']}..{r['last_step']}, {r['num_stages']} stages). "
            f"Mean row maximum at the first snapshot: {r['first_max_prob_mean']:.3f}; smallest row maximum at the "
            f"last: {r['final_max_prob_min']:.3f} (1.0 = every layer's stage decided). Relaxed cost "
            f"{_ms(r['relaxed_cost_s'])}, decoded {_ms(r['decoded_cost_s'])}, after refinement "
            f"{_ms(r['final_step_time_s'])}; final stages (layer ranges) {stages}; search wall time "
            f"{r['search_wall_s']:.1f} s.\n\nData: `experiments/results/darts_history.json`, written by {prov}.\n")


def section_b(r, prov):
    rows = ["| method | cases | median cost / best | max cost / best | median wall time (s) |", "|---|---|---|---|---|"]
    for m, s in r["methods"].items():
        rows.append(f"| {m} | {s['cases']} | {s['median_relative_cost']:.3f} | {s['max_relative_cost']:.3f} | "
                    f"{s['median_wall_s']:.3g} |")
    return f"{_img(r['files'])}\n\n" + "\n".join(rows) + f"\n\nData: `experiments/results/bench_search.json`, written by {prov}.\n"


def section_c(r, prov):
    rows = ["| case | speed-up |", "|---|---|"] + [f"| {c} | {v:.2f}x |" for c, v in r["cases"].items()]
    return (f"{_img(r['files'])}\n\n" + "\n".join(rows) +
            f"\n\nGeometric mean {r['geomean']:.2f}x (min {r['min']:.2f}x, max {r['max']:.2f}x).\n\n"
            f"Data: `experiments/results/bench_search.json`, written by {prov}.\n")


def section_d(r, prov):
    rows = ["| | plans | step MAPE | max APE | Kendall tau | memory MAPE |", "|---|---|---|---|---|---|"]
    for when in ("before", "after"):
        for subset in ("fit", "heldout", "all"):
            s = r[when][subset]
            rows.append(f"| {when}, {subset} | {s.get('num_plans')} | {_pct(s.get('step_mape'))} | "
                        f"{_pct(s.get('step_max_ape'))} | {s.get('kendall_tau', float('nan')):.2f} | "
                        f"{_pct(s.get('memory_mape'))} |")
    t = r.get("targets", {})
    after = r["after"]["all"]
    verdict = []
    if "step_mape_max" in t:
        ok = after["step_mape"] <= t["step_mape_max"]
        verdict.append(f"step-time MAPE after calibration {_pct(after['step_mape'])} vs target <= "
                       f"{_pct(t['step_mape_max'])}: **{'met' if ok else 'missed'}**")
    if "kendall_tau_min" in t:
        ok = after["kendall_tau"] >= t["kendall_tau_min"]
        verdict.append(f"Kendall tau {after['kendall_tau']:.2f} vs target >= {t['kendall_tau_min']}: "
                       f"**{'met' if ok else 'missed'}**")
    if "memory_mape_max" in t and "memory_mape" in after:
        ok = after["memory_mape"] <= t["memory_mape_max"]
        verdict.append(f"memory MAPE {_pct(after['memory_mape'])} vs target <= {_pct(t['memory_mape_max'])}: "
                       f"**{'met' if ok else 'missed'}**")
    return (f"{_img(r['files'])}\n\n" + "\n".join(rows) + "\n\n" + "; ".join(verdict) +
            f".\n\nData: `experiments/results/calibrate.json` ({r['num_plans']} plans), written by {prov}.\n")


def section_e(r, prov):
    return (f"{_img(r['files'])}\n\n"
            f"Top: one traced step of the executor (2 processes, gloo, {r.get('cluster')} profile); middle: "
            f"`dartspar.sim.simulate` with the executor's measured per-micro-batch forward/backward times "
            f"and no transfer time; bottom: the simulation with the cost model's times ({r.get('estimator')} "
            f"estimator). Measured step time (median after warm-up) {_ms(r['measured_step_time_s'])}; "
            f"traced step span {_ms(r['traced_step_span_s'])}; simulated with measured stage times "
            f"{_ms(r['sim_measured_makespan_s'])}; simulated with predicted times "
            f"{_ms(r['sim_predicted_makespan_s'])}; cost model's step time {_ms(r['predicted_step_time_s'])}. "
            f"The gap between the executor and the measured-time simulation is what the simulator does not "
            f"model: transfers, the loss, gradient synchronisation, the optimizer and waiting on a 2-core host.\n\n"
            f"Data: `experiments/results/timeline.json`, written by {prov}.\n")


def section_f(r, prov):
    slopes = ("n/a (needs more than one layer count and device count)" if not r["slopes"] else
              f"time ~ layers^{r['slopes']['layers']:.2f} x devices^{r['slopes']['devices']:.2f}")
    big = r["largest"]
    return (f"{_img(r['files'])}\n\n{r['points']} points; least-squares fit in log-log: {slopes}. Largest case: "
            f"{big['layers']} layers on {big['devices']} devices in {big['wall_s']:.1f} s; slowest search "
            f"{r['max_wall_s']:.1f} s.\n\nData: `experiments/results/bench_search.json`, written by {prov}.\n")


def section_t(out, provs):
    parts = []
    sim = out.get("sim_vs_closed_form", {})
    if "summary" in sim:
        rows = ["| case | formula | n | median error | max abs error |", "|---|---|---|---|---|"]
        for case, forms in sim["summary"].items():
            for form, s in forms.items():
                rows.append(f"| {case} | {form} | {s['n']} | {_pct(s['median'])} | {_pct(s['max_abs'])} |")
        parts.append("### Closed-form pipeline makespan vs discrete-event simulation\n\n"
                     f"Error = {sim.get('error_definition', '(closed form - simulated) / simulated')}.\n\n"
                     + "\n".join(rows) + f"\n\nData: `experiments/results/sim_vs_closed_form.json`, written by "
                     f"{provs['sim_vs_closed_form']}.\n")
    else:
        parts.append("### Closed-form vs simulation\n\n" + _missing("", sim.get("missing", "no 'summary' in the JSON")))
    est = out.get("estimator_accuracy", {})
    if "summary" in est:
        s = est["summary"]
        parts.append("### CPU kernel latency estimator accuracy\n\n"
                     f"Held-out matmul MAPE {s['heldout_matmul_mape_pct']:.1f}%; whole-block forward+backward MAPE "
                     f"{s['block_fwd_bwd_mape_pct']:.1f}% (target <= {s.get('target_block_mape_pct', 'n/a')}%: "
                     f"**{'met' if s['block_fwd_bwd_mape_pct'] <= s.get('target_block_mape_pct', float('inf')) else 'missed'}**); "
                     f"machine drift factor {s.get('machine_drift', float('nan')):.3f}.\n\n"
                     f"Data: `experiments/results/estimator_accuracy.json`, written by {provs['estimator_accuracy']}.\n")
    else:
        parts.append("### CPU kernel latency estimator accuracy\n\n" + _missing("", est.get("missing", "no 'summary'")))
    prof = out.get("bench_profile")
    if isinstance(prof, list):
        rows = ["| model | layers | parameters | profiling wall time (s) | RSS growth (MiB) | FLOPs error vs Megatron |",
                "|---|---|---|---|---|---|"]
        rows += [f"| {p['model']} | {p['layers']} | {p['params']:,} | {p['wall_s']:.2f} | {p['rss_growth_mib']:.1f} | "
                 f"{p['flops_rel_error_vs_megatron']:.1e} |" for p in prof]
        parts.append("### Profiling time (meta device)\n\n" + "\n".join(rows) +
                     f"\n\nData: `experiments/results/bench_profile.json`, written by {provs['bench_profile']}.\n")
    else:
        parts.append("### Profiling time\n\n" + _missing("", (prof or {}).get("missing", "unexpected JSON")))
    over = out.get("executor_overhead", {})
    if "missing" in over or not over:
        parts.append("### Executor overhead\n\n" + _missing("", over.get("missing", "empty JSON")))
    else:
        flat = {k: v for k, v in over.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        rows = ["| field | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                                                       for k, v in flat.items()]
        parts.append("### Executor overhead vs a hand-written pipelining script\n\n" + "\n".join(rows) +
                     f"\n\nData: `experiments/results/executor_overhead.json`, written by {provs['executor_overhead']}.\n")
    return "\n".join(parts)


TITLES = {"a": "(a) The strategy matrix A over a DARTS search",
          "b": "(b) Plan quality vs search time",
          "c": "(c) Speed-up on mixed clusters over the device-blind plan",
          "d": "(d) Predicted vs measured step time",
          "e": "(e) Executor pipeline timeline vs simulation",
          "f": "(f) Search time vs layers and devices",
          "t": "Other benchmarks"}
SECTIONS = {"a": section_a, "b": section_b, "c": section_c, "d": section_d, "e": section_e, "f": section_f,
            "t": section_t}


def render(done: dict, errors: dict, log: dict, total_s: float, argv: list[str]) -> str:
    lines = ["# dartspar: figures and tables", "",
             "Generated by `python paper/make_paper.py" + (" " + " ".join(argv) if argv else "") + "` "
             f"in {total_s:.0f} s. Every number below is read from the JSON file named under it; edit the "
             "producers, not this file.", ""]
    for key in ALL:
        if key not in done and key not in errors:
            continue
        lines += [f"## {TITLES[key]}", ""]
        if key in done:
            result, prov = done[key]
            lines.append(SECTIONS[key](result, prov))
        else:
            lines.append(_missing(key, errors[key]))
    ran = [f"- `{e['command']}`: {e['wall_s']:.0f} s" for e in log.values() if e.get("ran")]
    lines += ["## Producers run in this regeneration", ""] + (ran or ["- none (all JSON present)"]) + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL),
                        help="comma-separated subset of " + ",".join(ALL) + " (paper.md then holds only those parts)")
    parser.add_argument("--rerun", action="store_true", help="re-run producers even when their JSON exists")
    parser.add_argument("--full", action="store_true", help="producers at their full size")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the benchmarks' JSON")
    parser.add_argument("--out", type=Path, default=OUT, help="where paper.md and figures/ go")
    args = parser.parse_args(argv)
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = sorted(set(only) - set(ALL))
    if bad:
        parser.error(f"--only has unknown figures {bad}; choose from {','.join(ALL)}")
    ctx = Context(args.results, args.out / "figures", args.rerun, args.full, {})
    ctx.figdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done, errors = {}, {}
    for key in [k for k in ALL if k in only]:
        t0 = time.perf_counter()
        print(f"[{key}] {TITLES[key]}", flush=True)
        try:
            done[key] = STEPS[key](ctx)
        except (Missing, ValueError, KeyError) as err:
            errors[key] = str(err) if not isinstance(err, KeyError) else f"a JSON lacks the key {err}"
            print(f"[{key}] NOT PRODUCED: {errors[key]}", flush=True)
            continue
        print(f"[{key}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    total = time.perf_counter() - start
    doc = render(done, errors, ctx.log, total, argv)
    (args.out / "paper.md").write_text(doc)
    (args.out / "make_paper_log.json").write_text(json.dumps(
        {"argv": argv, "total_s": total, "produced": sorted(done), "missing": errors, "producers": ctx.log}, indent=1))
    print(f"wrote {args.out / 'paper.md'}: {len(done)} of {len(done) + len(errors)} parts produced "
          f"({', '.join(sorted(errors)) or 'none'} missing); total {total:.0f} s", flush=True)
    return 0 if not errors else 3


if __name__ == "__main__":
    raise SystemExit(main())
