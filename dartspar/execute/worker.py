"""The per-rank training process that ``dartspar-run`` starts through torchrun.

``python -m dartspar.execute.worker PLAN.json --options OPTIONS.json`` (torchrun sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous). Several plans may be given; they
run one after another in the same process group (each needs the same world size) and write to
``out_dir/<plan file stem>/``, which saves the process start-up per plan.

Exit codes: 0 success, 2 the plan cannot run here (ExecutorError, same verdict on every rank),
1 anything else (the traceback goes to stderr and ``out_dir/errors/rank<r>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..plan import Plan, PlanError
from .build import build_meta_model
from .checks import ExecutorError, check_plan, model_spec
from .options import RunOptions
from .train import train

__all__ = ["main", "run"]


def _record_error(out_dir: Path, rank: int, kind: str, message: str) -> None:
    """``out_dir/errors/rank<r>.json``: {"rank", "kind": "plan" | "crash", "message"}, read by the
    launcher to say why a run failed."""
    try:
        errors = out_dir / "errors"
        errors.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank, "kind": kind, "message": message}
        (errors / f"rank{rank}.json").write_text(json.dumps(record))
    except OSError:
        pass


def _resolve_backend(requested: str) -> tuple[str, torch.device]:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        requested = "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl":
        if not torch.cuda.is_available():
            raise ExecutorError("backend 'nccl' needs GPUs but torch sees none: use --backend gloo")
        if local_rank >= torch.cuda.device_count():
            raise ExecutorError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                "launch at most one process per GPU (--nproc)"
            )
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def run(plan_paths: list[str], options: RunOptions) -> None:
    """Run every plan in turn inside one process group (this process is one torchrun rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plans = []
    for path in plan_paths:
        try:
            plan = Plan.from_json(path)
        except PlanError as err:
            raise ExecutorError(str(err)) from None
        name, config = model_spec(plan)
        check_plan(plan, build_meta_model(name, config), world)  # before any collective
        plans.append((path, plan))
    backend, device = _resolve_backend(options.backend)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=options.timeout_s), **kwargs)
    for path, plan in plans:
        out_dir = Path(options.out_dir)
        if len(plans) > 1:
            out_dir = out_dir / Path(path).stem
        out_dir.mkdir(parents=True, exist_ok=True)
        train(plan, path, options, device, out_dir)
        dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dartspar.execute.worker")
    parser.add_argument("plans", nargs="+")
    parser.add_argument("--options", required=True, help="RunOptions JSON written by the launcher")
    args = parser.parse_args(argv)
    options = RunOptions.from_json(args.options)
    rank = int(os.environ.get("RANK", "0"))
    out_dir = Path(options.out_dir)
    code = 0
    try:
        run(args.plans, options)
    except ExecutorError as err:
        _record_error(out_dir, rank, "plan", str(err))
        print(f"[rank {rank}] dartspar-run: error: {err}", file=sys.stderr)
        code = 2
    except BaseException as err:  # noqa: BLE001 - every failure must leave a record and a code
        text = traceback.format_exc()
        _record_error(out_dir, rank, "crash", f"{type(err).__name__}: {err}\n{text}")
        print(f"[rank {rank}] {text}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        # Skip interpreter teardown: process-group destructors can block on dead peers.
        os._exit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
