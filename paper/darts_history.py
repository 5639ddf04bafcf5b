"""Producer of figure (a): one DARTS search whose layer-to-stage probabilities are snapshotted.

GPT-2 small (14 layers: embedding, 12 blocks, head) on the ``mixed-small`` cluster (4 H100 + 4 T4),
global batch 32, the stage count fixed to ``--stages`` so that every snapshot of A has the same
(layers, stages) shape and the evolution view can put them side by side.

    .venv/bin/python paper/darts_history.py [--steps 60] [--stages 4] [--out experiments/results/darts_history.json]

Writes the snapshots, the per-step history and the final plan's cost as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "experiments" / "results" / "darts_history.json"


def run(steps: int, stages: int, model: str = "gpt-small", cluster: str = "mixed-small",
        seed: int = 0) -> dict:
    """Search and return the JSON-ready record (times in seconds)."""
    from omegaconf import OmegaConf

    from dartspar.cli import build_profile
    from dartspar.cluster import load_cluster
    from dartspar.search.api import search

    start = time.perf_counter()
    model_cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{model}.yaml")
    prof, spec = build_profile(model_cfg, model)
    result = search(prof, load_cluster(cluster), "darts", global_batch_size=int(model_cfg.global_batch_size),
                    space={"stage_counts": (stages,)}, seed=seed, progress=True, steps=steps)
    snapshots = result.info["stage_snapshots"]
    if not snapshots:
        raise RuntimeError("darts_search returned no stage_snapshots: figure (a) has nothing to draw")
    history = [{k: v for k, v in h.items() if k in ("step", "temperature", "expected_step_time_s",
                                                      "best_step_time_s", "decoded_step_time_s")}
               for h in result.history]
    return {
        "description": "DARTS search with layer-to-stage probability snapshots (figure a)",
        "model": model, "cluster": cluster, "global_batch_size": int(model_cfg.global_batch_size),
        "num_layers": prof.num_layers, "layer_names": [layer.name for layer in prof.layers],
        "stages": stages, "steps": steps, "seed": seed,
        "snapshots": snapshots, "history": history,
        "relaxed_cost_s": result.info["relaxed_cost_s"], "decoded_cost_s": result.info["decoded_cost_s"],
        "final_step_time_s": result.cost.step_time_s,
        "final_plan_stages": [[s.layers[0], s.layers[1]] for s in result.cost.stages],
        "search_wall_s": result.wall_time_s, "total_wall_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    record = run(args.steps, args.stages, seed=args.seed)
    record["command"] = "python paper/darts_history.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}: {len(record['snapshots'])} snapshots, final step "
          f"{1e3 * record['final_step_time_s']:.3f} ms, search {record['search_wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
