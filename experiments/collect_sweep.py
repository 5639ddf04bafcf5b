"""One table (and JSON, and plot) from a Hydra sweep of ``dartspar-search`` or ``dartspar-run``.

A ``-m`` sweep writes one folder per job (``multirun/DATE/TIME/N/``) with the job's overrides
in ``.hydra/overrides.yaml``. Every ``dartspar-search`` job is a benchmark of its case: its
``comparison.json`` has the main method and the baselines (``compare.baselines``) on the same
model, cluster and space; every ``dartspar-run`` job's ``run_report.json`` has the measured and
the predicted step time. This script gathers them:

    dartspar-search -m cluster=mixed-small,mixed64 search.seed=0,1 search.options.relaxation=softmax,gumbel_hard
    python experiments/collect_sweep.py multirun/DATE/TIME [--out sweep.json]

Search jobs: per job, each method's predicted step time and its ratio to the job's best, and
the search wall time; plotted as the ratio per job and method (``<out>.png``). Run jobs: the
measured step time (median after warm-up), the cost model's prediction and their ratio.
Writes ``<sweep folder>/sweep.json`` by default and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def job_overrides(job: Path) -> list[str]:
    path = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.exists() else []


def collect(sweep: Path) -> dict:
    """Rows of every job folder under ``sweep`` that holds a comparison.json or run_report.json."""
    search_rows, run_rows = [], []
    for job in sorted({p.parent for pattern in ("comparison.json", "run_report.json") for p in sweep.rglob(pattern)}):
        label = " ".join(job_overrides(job)) or job.relative_to(sweep).as_posix()
        if (job / "comparison.json").exists():
            methods = json.loads((job / "comparison.json").read_text())
            timed = [m for m in methods if m.get("step_time_s") is not None and m.get("fits")]
            best = min((m["step_time_s"] for m in timed), default=None)
            for m in methods:
                step = m.get("step_time_s")
                search_rows.append({
                    "job": job.relative_to(sweep).as_posix(), "overrides": label, "method": m["method"],
                    "step_time_s": step, "fits": m.get("fits"),
                    "vs_best": step / best if step is not None and best else None,
                    "wall_time_s": m.get("wall_time_s"), "note": m.get("note", ""),
                })
        if (job / "run_report.json").exists():
            report = json.loads((job / "run_report.json").read_text())
            predicted = (report.get("predicted") or {}).get("step_time_s")
            measured = report.get("step_time_s")
            run_rows.append({
                "job": job.relative_to(sweep).as_posix(), "overrides": label, "measured_step_s": measured,
                "predicted_step_s": predicted,
                "predicted_over_measured": predicted / measured if predicted and measured else None,
                "tokens_per_s": report.get("tokens_per_s"),
            })
    return {"sweep": str(sweep), "search": search_rows, "run": run_rows}


def print_tables(data: dict) -> None:
    if data["search"]:
        print(f"{'overrides':48s} {'method':>13} {'step ms':>10} {'vs best':>8} {'search s':>9}")
        for r in data["search"]:
            step = "-" if r["step_time_s"] is None else f"{1e3 * r['step_time_s']:.3f}"
            ratio = "-" if r["vs_best"] is None else f"{r['vs_best']:.3f}x"
            wall = "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.2f}"
            print(f"{r['overrides'][:48]:48s} {r['method']:>13} {step:>10} {ratio:>8} {wall:>9}")
    if data["run"]:
        print(f"\n{'overrides':48s} {'measured ms':>12} {'predicted ms':>13} {'pred/meas':>10}")
        for r in data["run"]:
            meas = "-" if r["measured_step_s"] is None else f"{1e3 * r['measured_step_s']:.2f}"
            pred = "-" if r["predicted_step_s"] is None else f"{1e3 * r['predicted_step_s']:.2f}"
            ratio = "-" if r["predicted_over_measured"] is None else f"{r['predicted_over_measured']:.3f}"
            print(f"{r['overrides'][:48]:48s} {meas:>12} {pred:>13} {ratio:>10}")


def plot(data: dict, path: Path) -> None:
    """Ratio to the job's best plan, one group of bars per job, one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = list(dict.fromkeys(r["overrides"] for r in data["search"]))
    methods = list(dict.fromkeys(r["method"] for r in data["search"]))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(jobs) * max(1, len(methods)) * 0.4), 4.2))
    for i, method in enumerate(methods):
        ratios = [next((r["vs_best"] for r in data["search"] if r["overrides"] == job and r["method"] == method
                        and r["vs_best"] is not None), float("nan")) for job in jobs]
        ax.bar([j + i * width for j in range(len(jobs))], ratios, width, label=method)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(jobs))])
    ax.set_xticklabels(jobs, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("predicted step time / best in job")
    ax.set_title(f"sweep {Path(data['sweep']).name}: {len(jobs)} jobs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep folder (multirun/DATE/TIME)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: <sweep>/sweep.json)")
    args = parser.parse_args(argv)
    if not args.sweep.is_dir():
        print(f"collect_sweep: sweep folder {args.sweep} does not exist: pass the multirun/DATE/TIME "
              "folder a `-m` run printed", file=sys.stderr)
        return 2
    data = collect(args.sweep)
    if not data["search"] and not data["run"]:
        print(f"collect_sweep: no job under {args.sweep} has a comparison.json or run_report.json: "
              "did the jobs finish?", file=sys.stderr)
        return 2
    out = args.out or args.sweep / "sweep.json"
    out.write_text(json.dumps(data, indent=1))
    print_tables(data)
    if data["search"]:
        plot(data, out.with_suffix(".png"))
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
    else:
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
