"""How long profiling takes and how much memory it needs, for GPT configurations up to 175B.

Run: .venv/bin/python experiments/bench_profile.py   (writes experiments/results/bench_profile.json)
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from dartspar.models import GPT, GPTConfig
from dartspar.profile import profile

RESULTS = Path(__file__).resolve().parent / "results"
CASES = {
    "gpt-1.3b": GPTConfig(num_layers=24, hidden=2048, num_heads=16, seq_len=2048, vocab_size=51200),
    "gpt-13b": GPTConfig(num_layers=40, hidden=5120, num_heads=40, seq_len=2048, vocab_size=51200),
    "gpt-175b": GPTConfig(num_layers=96, hidden=12288, num_heads=96, seq_len=2048, vocab_size=51200),
}


def megatron_train_flops(batch: int, cfg: GPTConfig) -> float:
    """Megatron-LM eq. 3 without recomputation (DESIGN.md)."""
    s, l, h, v = cfg.seq_len, cfg.num_layers, cfg.hidden, cfg.vocab_size
    return 72 * batch * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))


def main() -> None:
    rows = []
    for name, cfg in CASES.items():
        with torch.device("meta"):
            model = GPT(cfg)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        prof = profile(model, model.example_inputs(1, "meta"), attention="math")
        wall_s = time.perf_counter() - start
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        error = prof.train_flops / megatron_train_flops(1, cfg) - 1
        rows.append({"model": name, "layers": prof.num_layers, "params": prof.total_params,
                     "wall_s": wall_s, "rss_growth_mib": growth_mib, "flops_rel_error_vs_megatron": error})
        print(f"{name:>9}: {prof.num_layers:>3} layers, {prof.total_params / 1e9:7.1f} B params, "
              f"{wall_s:6.2f} s, RSS +{growth_mib:6.1f} MiB, FLOPs vs Megatron {100 * error:+.3f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_profile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
