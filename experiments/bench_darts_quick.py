"""Quick DARTS benchmark: search time and plan quality on a 96-layer GPT-like model, 64 mixed devices.

Case (a): ``tests/synthetic.gpt_like_profile(num_blocks=94)`` (embedding + 94 blocks + head = 96
layers) on ``load_cluster("mixed64")`` (16 H100 + 16 A100 + 32 V100; falls back to the synthetic
mixed cluster of 4 fast + 4 slow nodes of 8 when the YAML is missing), global batch 128.
Target (issue 3): under 60 s on 2 CPU cores, wall time growing about linearly in layers.

Options:
    --scaling        also run 24- and 48-layer versions (wall time vs layers)
    --baselines      also run device_blind and the DP (with --dp-time-limit) on case (a)
    --bilevel        also run case (a) with precision choices (bilevel, first and second order)
    --seeds 0 1 ...  seeds of darts (default 0)
    --steps N        darts steps (default: darts_search's)

Run: .venv/bin/python experiments/bench_darts_quick.py [--scaling] [--baselines]
Writes experiments/results/bench_darts_quick.json and prints a table. Wall time depends on what
else the machine runs; the CPU time of the process (single-threaded search) is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
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


def cluster_64():
    try:
        from dartspar.cluster import load_cluster

        return load_cluster("mixed64"), "mixed64"
    except Exception as err:  # the YAML catalogue is optional for this benchmark
        print(f"load_cluster('mixed64') unavailable ({err}); using the synthetic 4+4 x 8 cluster")
        return mixed_cluster(fast_nodes=4, slow_nodes=4, per_node=8), "synthetic-mixed-4+4x8"


NUMERICS = dict(activation_precisions=("fp32", "bf16", "fp8"), gradient_precisions=("fp32", "bf16", "int8"))


def make_space(num_blocks: int, cluster, numerics: bool = False) -> SearchSpace:
    profile = gpt_like_profile(num_blocks=num_blocks)
    options = SpaceOptions(global_batch_size=GLOBAL_BATCH, **(NUMERICS if numerics else {}))
    return SearchSpace(profile, cluster, options, CostModel(profile, cluster))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_darts(num_blocks: int, cluster, seed: int, steps: int | None, order: str | None = None) -> dict:
    """One darts run; ``order`` set = bilevel (precision choices in the space, DARTS order)."""
    # Setup (tables) is part of the search time: a user pays it.
    def go():
        space = make_space(num_blocks, cluster, numerics=order is not None)
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


def run_baselines(num_blocks: int, cluster, dp_time_limit_s: float) -> dict:
    out = {}
    from dartspar.search.device_blind import device_blind_search
    from dartspar.search.dp import dp_search

    space = make_space(num_blocks, cluster)
    blind, wall_s, cpu_s = timed(lambda: device_blind_search(space, time_limit_s=dp_time_limit_s))
    out["device_blind"] = {"step_time_s": blind.cost.step_time_s, "fits": blind.cost.fits,
                           "wall_s": wall_s, "cpu_s": cpu_s}
    dp, wall_s, cpu_s = timed(lambda: dp_search(space, time_limit_s=dp_time_limit_s))
    out["dp"] = {"step_time_s": dp.cost.step_time_s, "exact": dp.info.get("exact"),
                 "gap_bound": dp.info.get("gap_bound"), "wall_s": wall_s, "cpu_s": cpu_s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--dp-time-limit", type=float, default=600.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--bilevel", action="store_true",
                        help="also run with precision choices (bilevel, first and second order)")
    args = parser.parse_args()

    cluster, cluster_name = cluster_64()
    blocks = ([22, 46] if args.scaling else []) + [94]
    runs = [(b, s, None) for b in blocks for s in args.seeds]
    if args.bilevel:
        runs += [(94, args.seeds[0], "first"), (94, args.seeds[0], "second")]
    rows = []
    for num_blocks, seed, order in runs:
        row = run_darts(num_blocks, cluster, seed, args.steps, order)
        rows.append(row)
        print(f"darts[{row['mode']}] {row['layers']:>3} layers x {row['devices']} devices seed {seed}: "
              f"wall {row['wall_s']:6.1f} s (cpu {row['cpu_s']:6.1f} s)  step {1e3 * row['step_time_s']:8.3f} ms  "
              f"relaxed {1e3 * row['relaxed_cost_s']:8.3f}  decoded {1e3 * row['decoded_cost_s']:8.3f}  "
              f"p={row['stages']} m={row['microbatches']} {row['schedule']} "
              f"act={row['activation_precision']} grad={row['gradient_precision']}")
    report = {
        "case": "gpt_like_profile(num_blocks=94) on " + cluster_name, "global_batch_size": GLOBAL_BATCH,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "darts": rows,
    }
    if args.baselines:
        report["baselines"] = run_baselines(94, cluster, args.dp_time_limit)
        best = min(r["step_time_s"] for r in rows if r["layers"] == 96 and r["mode"] == "cost-only")
        for name, b in report["baselines"].items():
            print(f"{name:>12}: step {1e3 * b['step_time_s']:8.3f} ms (darts / {name} = "
                  f"{best / b['step_time_s']:.4f}), wall {b['wall_s']:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_darts_quick.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {RESULTS / 'bench_darts_quick.json'}")


if __name__ == "__main__":
    main()
