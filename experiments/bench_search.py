"""Search benchmark: every planner on the same cost model, GPT-style models x clusters.

Per case (a GPT of L blocks on a cluster) each method searches the same space; its plan's
step time is compared with the best plan any method found for the case (``rel`` = step / best
- 1, 0 = best known), and its wall time is recorded. Where the exact DP finished, the best known
plan is the optimum; where it hit its time limit, ``lower_bound_s`` is the DP's certified lower
bound, so ``certified_gap`` bounds how far the best known plan can be from the optimum.

Models: the GPT-3 XL / Megatron 1.3B shape (hidden 2048, 16 heads, 2048 tokens, vocabulary
51200) with 24 to 1024 blocks, global batch 64 sequences. The profile is taken with
``dartspar.profile.profile`` on a meta-device 2-block GPT and its block repeated L times (all
blocks of this GPT are identical, so this equals profiling the L-block model, which takes
minutes for 1024 blocks).

Space: the default ``SpaceOptions`` (1-8 stages, micro-batch counts 1..64, both schedules, tp
1/2/4/8, up to 6 node orders) with recompute granularity "stage", on which the DP is exact.

Methods: darts (5 seeds), mcmc and random (5 seeds, each with the evaluation budget darts spent
on the same case and seed), dp (time-limited), device_blind (mixed clusters), bruteforce (only
on the tiny sanity case). Targets (issue 3): darts within 2% of the exact optimum in the median
and 5% worst; >= 10% faster than device-blind plans on mixed clusters; darts wall time about
linear in layers, < 60 s for 96 layers on 64 mixed devices.

Run: .venv/bin/python experiments/bench_search.py --quick   (small, a few minutes)
     .venv/bin/python experiments/bench_search.py           (full grid; hours)
Writes experiments/results/bench_search.json (or --out) and prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from dartspar.cluster import load_cluster
from dartspar.profile import ModelProfile
from dartspar.search import search

RESULTS = Path(__file__).resolve().parent / "results"
GPT_SHAPE = dict(hidden=2048, num_heads=16, seq_len=2048, vocab_size=51200)
GLOBAL_BATCH = 64
SPACE = {"recompute": "stage"}

FULL_CASES = [
    (24, "h100x8"), (48, "h100x8"), (96, "h100x8"), (256, "h100x8"),
    (24, "mixed"), (48, "mixed"), (96, "mixed"),
    (24, "mixed64"), (48, "mixed64"), (96, "mixed64"), (256, "mixed64"), (1024, "mixed64"),
    (96, "mixed1024"), (256, "mixed1024"), (1024, "mixed1024"),
]
QUICK_CASES = [(24, "h100x8"), (48, "h100x8"), (24, "mixed")]
# A space small enough to enumerate: checks the DP against brute force inside the benchmark.
TINY_CASE = (2, "mixed-small", {"recompute": "stage", "stage_counts": (1, 2, 3),
                                "microbatch_counts": (2, 4), "tp_degrees": (1, 2),
                                "max_node_orders": 1})
SEEDED = ("darts", "mcmc", "random")


def gpt_profile(num_blocks: int, _cache: dict = {}) -> ModelProfile:
    """Profile of the GPT shape above with ``num_blocks`` blocks (see module doc)."""
    if "base" not in _cache:
        from dartspar.models import GPT, GPTConfig
        from dartspar.profile import profile

        with torch.device("meta"):
            model = GPT(GPTConfig(num_layers=2, **GPT_SHAPE))
        tokens = torch.zeros(1, GPT_SHAPE["seq_len"], dtype=torch.long, device="meta")
        _cache["base"] = profile(model, tokens, name="gpt")
    base = _cache["base"]
    pre, block, post = base.layers[0], base.layers[1], base.layers[-1]
    blocks = tuple(replace(block, name=f"layers.{i + 1}") for i in range(num_blocks))
    post = replace(post, name=f"layers.{num_blocks + 1}")
    meta = {**base.meta, "config": {**base.meta.get("config", GPT_SHAPE), "num_layers": num_blocks},
            "profiled_blocks": 2}
    return replace(base, name=f"gpt-{num_blocks}x{GPT_SHAPE['hidden']}", layers=(pre, *blocks, post), meta=meta)


def run_method(profile, cluster, method, seed, space, options) -> dict:
    """One search; the record the JSON keeps (errors are recorded, not raised)."""
    record = {"method": method, "seed": seed, "options": {k: v for k, v in options.items()}}
    try:
        result = search(profile, cluster, method, global_batch_size=GLOBAL_BATCH, space=space,
                        seed=seed, progress=False, **options)
    except Exception as err:  # a method that fails on a case is a result too
        record.update(error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(limit=3))
        return record
    info = result.info
    keep = ("exact", "gap_bound", "lower_bound_s", "solves", "stopped_early", "found_fitting",
            "acceptance_rate", "evaluator", "evaluator_fallback", "fits_as_planned",
            "repaired_stages", "blind_step_time_s", "relaxed_cost_s", "decoded_cost_s", "gap",
            "refined_cost_s", "setup_s", "search_s", "space_points")
    plan = result.plan
    record.update(
        step_time_s=result.cost.step_time_s, fits=result.cost.fits, wall_time_s=result.wall_time_s,
        evaluations=result.evaluations,
        plan={"stages": [(s.layer_start, s.layer_end, s.dp, s.tp, len(s.device_ids)) for s in plan.stages],
              "schedule": plan.schedule, "microbatches": plan.num_microbatches},
        info={k: _plain(info[k]) for k in keep if k in info},
    )
    if method == "dp" or method == "device_blind":
        inner = info.get("dp", info)
        record["info"].update({k: _plain(inner[k]) for k in ("exact", "gap_bound", "lower_bound_s", "solves")
                               if k in inner})
    return record


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def run_case(layers: int, cluster_name: str, args, space=None, sanity: bool = False) -> dict:
    cluster = load_cluster(cluster_name)
    profile = gpt_profile(layers)
    space = dict(space or SPACE)
    mixed = len(cluster.device_types) > 1
    case = {"layers": layers, "num_layers": profile.num_layers, "cluster": cluster_name,
            "devices": cluster.num_devices, "device_types": [d.name for d in cluster.device_types],
            "space": {k: list(v) if isinstance(v, tuple) else v for k, v in space.items()},
            "sanity": sanity, "runs": []}
    print(f"== {profile.name} ({profile.num_layers} layers) on {cluster_name} ({cluster.num_devices} devices)",
          flush=True)

    def add(record):
        case["runs"].append(record)
        if "error" in record:
            print(f"   {record['method']:>12} seed {record['seed']}: ERROR {record['error'][:160]}", flush=True)
        else:
            print(f"   {record['method']:>12} seed {record['seed']}: {1e3 * record['step_time_s']:10.3f} ms "
                  f"fits={record['fits']} wall {record['wall_time_s']:7.1f} s evals {record['evaluations']}",
                  flush=True)

    methods = args.methods
    if space.get("stage_counts") is not None and "bruteforce" in methods:
        add(run_method(profile, cluster, "bruteforce", 0, space, {}))
    if "dp" in methods:
        add(run_method(profile, cluster, "dp", 0, space, {"time_limit_s": args.dp_time_limit}))
    if "device_blind" in methods and mixed:
        add(run_method(profile, cluster, "device_blind", 0, space, {"time_limit_s": args.dp_time_limit}))
    for seed in range(args.seeds):
        budget = None
        if "darts" in methods:
            darts = run_method(profile, cluster, "darts", seed, space, {})
            add(darts)
            budget = darts.get("evaluations") or None
        for method in ("mcmc", "random"):
            if method in methods:
                add(run_method(profile, cluster, method, seed, space,
                               {"budget": budget or args.default_budget}))
    summarize_case(case)
    return case


def summarize_case(case: dict) -> None:
    ok = [r for r in case["runs"] if "error" not in r and r["fits"]]
    best = min((r["step_time_s"] for r in ok), default=math.nan)
    bounds = [r["info"].get("lower_bound_s") for r in case["runs"]
              if r["method"] == "dp" and "error" not in r and isinstance(r["info"].get("lower_bound_s"), float)]
    dp_exact = any(r["method"] == "dp" and "error" not in r and r["info"].get("exact") for r in case["runs"])
    case["best_known_s"] = best
    case["dp_exact"] = dp_exact
    case["lower_bound_s"] = max(bounds) if bounds else None
    case["certified_gap"] = (best / case["lower_bound_s"] - 1) if bounds and case["lower_bound_s"] > 0 else None
    for r in case["runs"]:
        if "error" not in r:
            r["rel"] = r["step_time_s"] / best - 1 if r["fits"] else None


def summarize(all_cases: list[dict]) -> dict:
    """Figures over the GPT cases (the brute-force sanity case is reported on its own)."""
    cases = [c for c in all_cases if not c["sanity"]]
    sanity = {}
    for c in all_cases:
        if c["sanity"]:
            steps = {r["method"]: r.get("step_time_s") for r in c["runs"] if r["seed"] == 0}
            if steps.get("dp") is not None and steps.get("bruteforce") is not None:
                sanity[f"{c['layers']}:{c['cluster']}"] = {
                    "dp_s": steps["dp"], "bruteforce_s": steps["bruteforce"],
                    "dp_equals_bruteforce": abs(steps["dp"] - steps["bruteforce"]) <= 1e-9 * steps["bruteforce"]}
    per_method: dict = {}
    for case in cases:
        for r in case["runs"]:
            entry = per_method.setdefault(r["method"], {"rel": [], "wall_s": [], "errors": 0, "no_fit": 0})
            if "error" in r:
                entry["errors"] += 1
            elif r["rel"] is None:
                entry["no_fit"] += 1
                entry["wall_s"].append(r["wall_time_s"])
            else:
                entry["rel"].append(r["rel"])
                entry["wall_s"].append(r["wall_time_s"])
    methods = {}
    for name, e in per_method.items():
        methods[name] = {
            "runs": len(e["rel"]) + e["no_fit"] + e["errors"], "errors": e["errors"], "no_fit": e["no_fit"],
            "median_rel": statistics.median(e["rel"]) if e["rel"] else None,
            "worst_rel": max(e["rel"]) if e["rel"] else None,
            "median_wall_s": statistics.median(e["wall_s"]) if e["wall_s"] else None,
        }
    # darts against the exact optimum, where the DP proved it.
    vs_exact = [r["rel"] for c in cases if c["dp_exact"] for r in c["runs"]
                if r["method"] == "darts" and r.get("rel") is not None]
    # darts against device-blind plans on mixed clusters (speed-up of darts' plan).
    speedups = []
    for c in cases:
        blind = [r for r in c["runs"] if r["method"] == "device_blind" and "error" not in r and r["fits"]]
        for r in c["runs"]:
            if r["method"] == "darts" and "error" not in r and r["fits"] and blind:
                speedups.append({"case": f"{c['layers']}:{c['cluster']}", "seed": r["seed"],
                                 "speedup": blind[0]["step_time_s"] / r["step_time_s"] - 1})
    wall_vs_layers: dict = {}
    for c in cases:
        walls = [r["wall_time_s"] for r in c["runs"] if r["method"] == "darts" and "error" not in r]
        if walls:
            wall_vs_layers.setdefault(c["cluster"], {})[c["layers"]] = statistics.median(walls)
    dp_practical = [{"case": f"{c['layers']}:{c['cluster']}", "exact": r["info"].get("exact"),
                     "wall_s": r["wall_time_s"], "gap_bound": r["info"].get("gap_bound"),
                     "solves": r["info"].get("solves")} if "error" not in r else
                    {"case": f"{c['layers']}:{c['cluster']}", "error": r["error"]}
                    for c in cases for r in c["runs"] if r["method"] == "dp"]
    return {
        "sanity": sanity,
        "methods": methods,
        "darts_vs_exact": {"cases": sum(1 for c in cases if c["dp_exact"]), "runs": len(vs_exact),
                           "median_rel": statistics.median(vs_exact) if vs_exact else None,
                           "worst_rel": max(vs_exact) if vs_exact else None},
        "darts_vs_device_blind": {"runs": speedups,
                                  "median_speedup": statistics.median([s["speedup"] for s in speedups])
                                  if speedups else None,
                                  "min_speedup": min([s["speedup"] for s in speedups]) if speedups else None},
        "darts_wall_s_vs_layers": wall_vs_layers,
        "dp_practicality": dp_practical,
    }


def _fmt(x, pct=False):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:.2f}%" if pct else f"{x:.1f}"


def print_tables(cases: list[dict], summary: dict) -> None:
    print("\nper case: median / worst rel. cost vs best known, median wall (s)")
    methods = sorted({r["method"] for c in cases for r in c["runs"]})
    print(f"{'case':>16} {'best ms':>9} {'gap<=':>7} " + " ".join(f"{m:>24}" for m in methods))
    for c in cases:
        cells = []
        for m in methods:
            runs = [r for r in c["runs"] if r["method"] == m]
            if not runs:
                cells.append(f"{'':>24}")
                continue
            rels = [r["rel"] for r in runs if r.get("rel") is not None]
            walls = [r["wall_time_s"] for r in runs if "wall_time_s" in r]
            bad = sum(1 for r in runs if "error" in r or r.get("rel") is None)
            text = (f"{_fmt(statistics.median(rels), True) if rels else '-'}/"
                    f"{_fmt(max(rels), True) if rels else '-'} {_fmt(statistics.median(walls)) if walls else '-'}s"
                    + (f" !{bad}" if bad else ""))
            cells.append(f"{text:>24}")
        gap = "exact" if c["dp_exact"] else _fmt(c["certified_gap"], True)
        print(f"{str(c['layers']) + ':' + c['cluster']:>16} {1e3 * c['best_known_s']:9.3f} {gap:>7} " + " ".join(cells))
    for name, x in summary["sanity"].items():
        print(f"\nsanity case {name}: dp {1e3 * x['dp_s']:.4f} ms, bruteforce {1e3 * x['bruteforce_s']:.4f} ms, "
              f"equal: {x['dp_equals_bruteforce']}")
    print("\nper method over the GPT cases: runs, median rel, worst rel, median wall (s), errors, no-fit")
    for m, s in summary["methods"].items():
        print(f"{m:>12} {s['runs']:5d} {_fmt(s['median_rel'], True):>9} {_fmt(s['worst_rel'], True):>9} "
              f"{_fmt(s['median_wall_s']):>9} {s['errors']:4d} {s['no_fit']:4d}")
    d = summary["darts_vs_exact"]
    print(f"\ndarts vs exact optimum ({d['cases']} cases with a finished DP, {d['runs']} runs): "
          f"median {_fmt(d['median_rel'], True)}, worst {_fmt(d['worst_rel'], True)} (target 2% / 5%)")
    b = summary["darts_vs_device_blind"]
    print(f"darts speed-up over device-blind plans on mixed clusters: median {_fmt(b['median_speedup'], True)}, "
          f"min {_fmt(b['min_speedup'], True)} (target >= 10%)")
    print("darts wall time (s) vs layers: "
          + "; ".join(f"{cl}: " + ", ".join(f"{L}->{w:.1f}" for L, w in sorted(v.items()))
                      for cl, v in summary["darts_wall_s_vs_layers"].items()))
    print("dp: " + "; ".join(
        f"{x['case']} " + (f"error" if "error" in x else
                           f"{'exact' if x['exact'] else 'gap<=' + _fmt(x['gap_bound'], True)} in {x['wall_s']:.0f}s")
        for x in summary["dp_practicality"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases and 3 seeds (a few minutes)")
    parser.add_argument("--cases", help="comma-separated layers:cluster, e.g. 24:h100x8,96:mixed64")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per stochastic method (5; quick 3)")
    parser.add_argument("--methods", default="darts,dp,mcmc,random,device_blind,bruteforce")
    parser.add_argument("--dp-time-limit", type=float, default=None, help="seconds (600; quick 120)")
    parser.add_argument("--default-budget", type=int, default=3000,
                        help="mcmc/random evaluations when darts did not run on the case")
    parser.add_argument("--no-tiny", action="store_true", help="skip the brute-force sanity case")
    parser.add_argument("--out", default=str(RESULTS / "bench_search.json"))
    args = parser.parse_args()
    args.methods = tuple(m.strip() for m in args.methods.split(","))
    args.seeds = args.seeds if args.seeds is not None else (3 if args.quick else 5)
    args.dp_time_limit = args.dp_time_limit or (120.0 if args.quick else 600.0)
    if args.cases:
        cases_spec = [(int(c.split(":")[0]), c.split(":")[1]) for c in args.cases.split(",")]
    else:
        cases_spec = QUICK_CASES if args.quick else FULL_CASES

    start = time.perf_counter()
    cases = []
    if not args.no_tiny:
        layers, cluster, space = TINY_CASE
        cases.append(run_case(layers, cluster, args, space, sanity=True))
    for layers, cluster in cases_spec:
        cases.append(run_case(layers, cluster, args))
    summary = summarize(cases)
    out = {
        "mode": "quick" if args.quick else "full",
        "config": {"gpt_shape": GPT_SHAPE, "global_batch_size": GLOBAL_BATCH, "space": SPACE,
                   "seeds": args.seeds, "methods": args.methods, "dp_time_limit_s": args.dp_time_limit,
                   "mcmc_random_budget": "darts' evaluations on the same case and seed"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "processor": platform.processor()},
        "wall_time_s": time.perf_counter() - start,
        "cases": cases,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # The exact command, so that the paper can say which one produced these numbers.
    out["command"] = " ".join(["python", Path(__file__).resolve().relative_to(Path(__file__).resolve().parents[1]).as_posix(), *sys.argv[1:]])
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print_tables(cases, summary)
    print(f"\nwrote {args.out} ({out['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    main()
