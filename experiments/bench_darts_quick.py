"""Quick DARTS benchmark: search time and plan quality on a 96-layer GPT-like model, 64 mixed devices.

Case (a): ``tests/synthetic.gpt_like_profile(num_blocks=94)`` (embedding + 94 blocks + head = 96
layers) on ``load_cluster("mixed64")`` (16 H100 + 16 A100 + 32 V100; falls back to the synthetic
mixed cluster of 4 fast + 4 slow nodes of 8 when the YAML is missing), global batch 128.
Targets (issue 3, benchmarks not tests): under 60 s on 2 CPU cores, wall time growing about
linearly in layers; plan within 2% of the DP's optimum in the median (5% worst); on mixed
clusters at least 10% faster than the device-blind plan.

Options:
    --scaling        also run 24- and 48-layer versions (wall time vs layers)
    --bilevel        also run case (a) with precision choices (bilevel, first and second order)
    --quality        darts (every seed) vs the exact DP and the device-blind plan on QUALITY_CASES;
                     the DP gets --dp-time-limit seconds per case (then it reports whether it
                     proved optimality; a capped DP is an upper bound, not the optimum)
    --seeds 0 1 ...  seeds of darts (default 0)
    --steps N        darts steps (default: darts_search's)

Run: .venv/bin/python experiments/bench_darts_quick.py [--scaling] [--bilevel] [--quality]
Writes experiments/results/bench_darts_quick.json and prints a table. Wall time depends on what
else the machine runs; the process's CPU time (the search is single-threaded) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import gpt_like_profile, mixed_cluster  # noqa: E402

from dartspar.cost.model import CostModel  # noqa: E402
from dartspar.search.darts import darts_search  # noqa: E402
from dartspar.space import SearchSpace, SpaceOptions  # noqa: E402

RESULTS = ROOT / "experiments" / "results"
GLOBAL_BATCH = 128
NUMERICS = dict(activation_precisions=("fp32", "bf16", "fp8"), gradient_precisions=("fp32", "bf16", "int8"))
# name: (gpt_like_profile kwargs, cluster (YAML name or synthetic (fast nodes, slow nodes, per node)), batch)
QUALITY_CASES = {
    "16L-mixed-small": (dict(num_blocks=14), "mixed-small", 32),
    "16L-heavy-ends-2x4": (dict(num_blocks=14, heavy={0: 2, 13: 2}), (1, 1, 4), 16),
    "24L-heavy-4x4": (dict(num_blocks=22, heavy={3: 2, 10: 3}), (2, 2, 4), 32),
    "32L-mixed": (dict(num_blocks=30), "mixed", 64),
    "48L-mixed64": (dict(num_blocks=46), "mixed64", 64),
    "96L-mixed64": (dict(num_blocks=94), "mixed64", GLOBAL_BATCH),
}


def load(cluster_spec):
    if isinstance(cluster_spec, tuple):
        return mixed_cluster(*cluster_spec), "synthetic-mixed-%d+%dx%d" % cluster_spec
    try:
        from dartspar.cluster import load_cluster

        return load_cluster(cluster_spec), cluster_spec
    except Exception as err:  # the YAML catalogue is optional for this benchmark
        print(f"load_cluster({cluster_spec!r}) unavailable ({err}); using the synthetic 4+4 x 8 cluster")
        return mixed_cluster(fast_nodes=4, slow_nodes=4, per_node=8), "synthetic-mixed-4+4x8"


def make_space(profile_kwargs: dict, cluster, batch: int, numerics: bool = False) -> SearchSpace:
    profile = gpt_like_profile(**profile_kwargs)
    options = SpaceOptions(global_batch_size=batch, **(NUMERICS if numerics else {}))
    return SearchSpace(profile, cluster, options, CostModel(profile, cluster))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_darts(profile_kwargs: dict, cluster, batch: int, seed: int, steps: int | None,
              order: str | None = None) -> dict:
    """One darts run; ``order`` set = bilevel (precision choices in the space, DARTS order)."""
    # Setup (space and tables) is part of the search time: a user pays it.
    def go():
        space = make_space(profile_kwargs, cluster, batch, numerics=order is not None)
        kwargs = {"steps": steps} if steps else {}
        if order is not None:
            kwargs["order"] = order
        return space, darts_search(space, seed=seed, progress=False, **kwargs)

    (space, result), wall_s, cpu_s = timed(go)
    info = result.info
    return {
        "mode": info["numerics"]["mode"] + (f" ({order} order)" if order else ""),
        "layers": space.num_layers, "devices": space.num_devices, "seed": seed,
        "wall_s": wall_s, "cpu_s": cpu_s, "step_time_s": result.cost.step_time_s,
        "relaxed_cost_s": info["relaxed_cost_s"], "decoded_cost_s": info["decoded_cost_s"],
        "gap": info["gap"], "best_decoded_cost_s": info["best_decoded_cost_s"],
        "refined_cost_s": info["refined_cost_s"], "phase_s": info["phase_s"],
        "stages": result.plan.num_stages, "microbatches": result.plan.num_microbatches,
        "schedule": result.plan.schedule, "evaluations": result.evaluations,
        "activation_precision": result.plan.activation_precision,
        "gradient_precision": result.plan.gradient_precision,
        "mean_active_branches": info["mean_active_branches"],
        "plan_stages": [
            {"layers": [s.layer_start, s.layer_end], "devices": c.devices, "dp": s.dp, "tp": s.tp}
            for s, c in zip(result.plan.stages, result.cost.stages)
        ],
    }


def print_row(row: dict) -> None:
    print(f"darts[{row['mode']}] {row['layers']:>3} layers x {row['devices']} devices seed {row['seed']}: "
          f"wall {row['wall_s']:6.1f} s (cpu {row['cpu_s']:6.1f} s)  step {1e3 * row['step_time_s']:8.3f} ms  "
          f"relaxed {1e3 * row['relaxed_cost_s']:8.3f}  decoded {1e3 * row['decoded_cost_s']:8.3f}  "
          f"p={row['stages']} m={row['microbatches']} {row['schedule']} "
          f"act={row['activation_precision']} grad={row['gradient_precision']}")


def quality(seeds: list[int], steps: int | None, dp_time_limit_s: float) -> dict:
    """darts vs the DP and the device-blind plan on every QUALITY_CASES entry."""
    from dartspar.search.device_blind import device_blind_search
    from dartspar.search.dp import dp_search

    rows = []
    for name, (profile_kwargs, cluster_spec, batch) in QUALITY_CASES.items():
        cluster, cluster_name = load(cluster_spec)
        space = make_space(profile_kwargs, cluster, batch)
        dp, dp_wall, _ = timed(lambda: dp_search(space, time_limit_s=dp_time_limit_s))
        blind, blind_wall, _ = timed(lambda: device_blind_search(space, time_limit_s=dp_time_limit_s))
        row = {"case": name, "cluster": cluster_name, "layers": space.num_layers, "devices": space.num_devices,
               "dp_s": dp.cost.step_time_s, "dp_proved_optimal": dp.info.get("gap_bound") == 0.0,
               "dp_gap_bound": dp.info.get("gap_bound"), "dp_wall_s": dp_wall,
               "device_blind_s": blind.cost.step_time_s, "device_blind_wall_s": blind_wall, "darts": []}
        for seed in seeds:
            d = run_darts(profile_kwargs, cluster, batch, seed, steps)
            row["darts"].append({"seed": seed, "step_time_s": d["step_time_s"], "wall_s": d["wall_s"],
                                 "decoded_cost_s": d["decoded_cost_s"], "relaxed_cost_s": d["relaxed_cost_s"],
                                 "vs_dp": d["step_time_s"] / row["dp_s"] - 1,
                                 "speedup_vs_device_blind": row["device_blind_s"] / d["step_time_s"] - 1})
        rows.append(row)
        for d in row["darts"]:
            print(f"{name:>20} seed {d['seed']}: darts {1e3 * d['step_time_s']:8.3f} ms ({d['wall_s']:5.1f} s)  "
                  f"DP {1e3 * row['dp_s']:8.3f} ms ({'optimal' if row['dp_proved_optimal'] else 'capped'}, "
                  f"{row['dp_wall_s']:5.1f} s)  darts vs DP {100 * d['vs_dp']:+6.2f}%  "
                  f"device-blind {1e3 * row['device_blind_s']:8.3f} ms (darts {100 * d['speedup_vs_device_blind']:+.0f}% faster)")
    proven = [d["vs_dp"] for r in rows if r["dp_proved_optimal"] for d in r["darts"]]
    summary = {
        "vs_proven_optimum_median": statistics.median(proven) if proven else None,
        "vs_proven_optimum_worst": max(proven) if proven else None,
        "vs_dp_all_median": statistics.median(d["vs_dp"] for r in rows for d in r["darts"]),
        "speedup_vs_device_blind_min": min(d["speedup_vs_device_blind"] for r in rows for d in r["darts"]),
    }
    print("summary:", json.dumps(summary))
    return {"cases": rows, "summary": summary, "dp_time_limit_s": dp_time_limit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--bilevel", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--dp-time-limit", type=float, default=600.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    cluster, cluster_name = load("mixed64")
    blocks = ([22, 46] if args.scaling else []) + [94]
    runs = [(b, s, None) for b in blocks for s in args.seeds]
    if args.bilevel:
        runs += [(94, args.seeds[0], "first"), (94, args.seeds[0], "second")]
    rows = []
    for num_blocks, seed, order in runs:
        row = run_darts(dict(num_blocks=num_blocks), cluster, GLOBAL_BATCH, seed, args.steps, order)
        rows.append(row)
        print_row(row)
    report = {
        "case": "gpt_like_profile(num_blocks=94) on " + cluster_name, "global_batch_size": GLOBAL_BATCH,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "darts": rows,
    }
    if args.quality:
        report["quality"] = quality(args.seeds, args.steps, args.dp_time_limit)
    RESULTS.mkdir(parents=True, exist_ok=True)
    # The exact command, so that the paper can say which one produced these numbers.
    report["command"] = " ".join(["python", Path(__file__).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]])
    (RESULTS / "bench_darts_quick.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / 'bench_darts_quick.json'}")


if __name__ == "__main__":
    main()
