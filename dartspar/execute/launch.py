"""``dartspar-run``: launch a plan through torchrun.

Single node (default): ``dartspar-run plan.json --steps 100`` starts one process per device of the
plan with ``torchrun --standalone`` (gloo on CPU, NCCL on GPUs). Several nodes: run the same
command on every node with torchrun's rendezvous flags, e.g. for 2 nodes x 8 GPUs::

    dartspar-run plan.json --nproc 8 --nnodes 2 --node-rank $NODE_RANK \\
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 --rdzv-id $JOB_ID

(``dartspar/execute/README.md`` has a SLURM script.) Rank ``r`` runs the plan's device id ``r``;
node ``n`` holds ranks ``n*nproc .. (n+1)*nproc - 1``.

``launch()`` is the Python entry point (a Hydra front end builds ``RunOptions`` and calls it);
``main()`` only parses arguments. Bad plans are refused before any process starts; failures
during the run come back as ``LaunchError`` with every rank's recorded reason.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from ..plan import Plan, PlanError
from .build import build_meta_model
from .checks import ExecutorError, check_fits, check_plan, model_spec
from .options import RunOptions, Rendezvous
from .report import RunReport

__all__ = ["LaunchError", "launch", "launch_many", "torchrun_command", "main"]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class LaunchError(RuntimeError):
    """A run that could not start or did not finish; ``exit_code`` is 2 for plans that cannot run
    here and 1 for failures during the run."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _plan_world_size(plan: Plan) -> int:
    return len({d for s in plan.stages for d in s.device_ids})


def _preflight(plan_paths: list[Path], options: RunOptions, rendezvous: Rendezvous) -> int:
    """Check every plan against its model and the launch; return processes per node."""
    worlds = []
    for path in plan_paths:
        try:
            plan = Plan.from_json(path)
            name, config = model_spec(plan)
            world = _plan_world_size(plan)
            nnodes = rendezvous.fixed_nnodes()
            if nnodes is not None:
                nproc = options.nproc if options.nproc is not None else -(-world // nnodes)
                world = nproc * nnodes
            model = build_meta_model(name, config)
            layout = check_plan(plan, model, world)
            if options.memory_limit_bytes is not None:
                check_fits(plan, model, layout, options.memory_limit_bytes, "--memory-limit-bytes")
        except (PlanError, ExecutorError) as err:
            raise LaunchError(f"{path}: {err}", exit_code=2) from None
        worlds.append(world)
    if len(set(worlds)) > 1:
        raise LaunchError(
            f"plans {[str(p) for p in plan_paths]} need {worlds} processes: plans launched "
            "together share one process group and must use the same number of devices",
            exit_code=2,
        )
    nnodes = rendezvous.fixed_nnodes() or 1
    if options.nproc is not None:
        return options.nproc
    if worlds[0] % nnodes:
        raise LaunchError(
            f"the plan uses {worlds[0]} devices, not a multiple of --nnodes {nnodes}: give --nproc",
            exit_code=2,
        )
    return worlds[0] // nnodes


def torchrun_command(
    plan_paths: list[str], options_path: str, nproc: int, rendezvous: Rendezvous
) -> list[str]:
    """The ``python -m torch.distributed.run`` command line that starts the workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--max-restarts=0"]
    if rendezvous.is_standalone:
        cmd.append("--standalone")
    else:
        for flag, value in (
            ("--nnodes", rendezvous.nnodes), ("--node-rank", rendezvous.node_rank),
            ("--rdzv-endpoint", rendezvous.rdzv_endpoint), ("--rdzv-id", rendezvous.rdzv_id),
            ("--rdzv-backend", rendezvous.rdzv_backend),
        ):
            if value is not None:
                cmd.append(f"{flag}={value}")
    return cmd + ["-m", "dartspar.execute.worker", *plan_paths, "--options", options_path]


def _failure_message(out_dir: Path, returncode: int, world_size: int | None) -> LaunchError:
    records = []
    errors = out_dir / "errors"
    for path in sorted(errors.glob("rank*.json")) if errors.exists() else []:
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if not records:
        return LaunchError(
            f"the run failed (torchrun exit code {returncode}) and no rank recorded an error: a "
            "rank was killed or crashed in native code; torchrun's summary above names the rank "
            "and its exit code"
        )
    kinds = {r["kind"] for r in records}
    by_message: dict[str, list[int]] = {}
    for r in records:
        first = r["message"].strip().splitlines()[0] if r["message"].strip() else "(empty)"
        by_message.setdefault(first, []).append(int(r["rank"]))
    lines = [f"ranks {ranks}: {msg}" for msg, ranks in by_message.items()]
    if world_size is not None:
        silent = sorted(set(range(world_size)) - {int(r["rank"]) for r in records})
        if silent:
            lines.insert(0, f"ranks {silent}: exited without recording an error (killed, or "
                            "crashed in native code) — the others' errors may follow from it")
    return LaunchError(
        f"the run failed (torchrun exit code {returncode}):\n  " + "\n  ".join(lines),
        exit_code=2 if kinds == {"plan"} else 1,
    )


def _run_subprocess(cmd: list[str], env: dict[str, str], wall_timeout_s: float | None) -> int:
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [_PACKAGE_ROOT] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    child_env.update(env)
    proc = subprocess.Popen(cmd, env=child_env, start_new_session=True)
    try:
        return proc.wait(timeout=wall_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise LaunchError(
            f"the run did not finish within wall_timeout_s={wall_timeout_s} s and was killed; "
            "raise the limit or look for a stuck rank in the log above"
        ) from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def launch_many(
    plan_paths: list[str | Path],
    options: RunOptions,
    rendezvous: Rendezvous | None = None,
    env: dict[str, str] | None = None,
) -> list[RunReport]:
    """Run several plans (same device count) one after another in one torchrun launch; the
    reports go to ``options.out_dir/<plan stem>/run_report.json``. See ``launch``."""
    rendezvous = rendezvous or Rendezvous()
    paths = [Path(p).resolve() for p in plan_paths]
    if not paths:
        raise LaunchError("no plan given", exit_code=2)
    nproc = _preflight(paths, options, rendezvous)
    out_dir = Path(options.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(out_dir.glob("errors/rank*.json")) + list(out_dir.glob("**/run_report.json")):
        stale.unlink()
    # Workers may start elsewhere (another cwd, another node): hand them absolute paths.
    options = replace(
        options, out_dir=str(out_dir),
        checkpoint_dir=str(Path(options.checkpoint_dir).resolve()) if options.checkpoint_dir else None,
    )
    options_path = out_dir / "run_options.json"
    options.to_json(options_path)
    cmd = torchrun_command([str(p) for p in paths], str(options_path), nproc, rendezvous)
    returncode = _run_subprocess(cmd, env or {}, options.wall_timeout_s)
    if returncode != 0:
        # Only a single-node launch sees every rank's error file.
        raise _failure_message(out_dir, returncode, nproc if rendezvous.is_standalone else None)
    report_dirs = [out_dir / p.stem for p in paths] if len(paths) > 1 else [out_dir]
    reports = []
    for d in report_dirs:
        path = d / "run_report.json"
        if path.exists():
            reports.append(RunReport.from_json(path))
        elif rendezvous.node_rank in (None, 0):
            raise LaunchError(f"the run finished but wrote no report at {path}")
    return reports


def launch(
    plan_path: str | Path,
    options: RunOptions,
    rendezvous: Rendezvous | None = None,
    env: dict[str, str] | None = None,
) -> RunReport | None:
    """Run ``plan_path`` with ``options``; returns the run report (``options.out_dir/
    run_report.json``), or None on nodes other than the first of a multi-node run.

    Raises LaunchError (exit_code 2: the plan does not match the model or the launch, or does
    not fit; 1: a rank failed or died during the run). ``env`` adds environment variables for
    the workers.
    """
    reports = launch_many([plan_path], options, rendezvous, env)
    return reports[0] if reports else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dartspar-run",
        description="Run a dartspar plan with torch.distributed (torchrun): pipeline stages, "
        "data/tensor parallelism, measured against the plan's predictions.",
    )
    p.add_argument("plans", nargs="+", metavar="PLAN.json",
                   help="plan file(s); several plans (same device count) run one after another")
    d = RunOptions()
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total")
    p.add_argument("--nproc", type=int, default=None, help="processes per node (default: plan devices / nodes)")
    p.add_argument("--out", default=d.out_dir, help="output directory (report, traces, logs)")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, help="process-group timeout")
    p.add_argument("--seed", type=int, default=d.seed, help="weight-initialization seed")
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--memory-limit-bytes", type=int, default=None)
    p.add_argument("--compute-precision", choices=("fp32", "bf16"), default=d.compute_precision)
    p.add_argument("--peak-flops-per-s", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--wall-timeout-s", type=float, default=None)
    p.add_argument("--nnodes", default=None, help="torchrun --nnodes (N or MIN:MAX)")
    p.add_argument("--node-rank", type=int, default=None)
    p.add_argument("--rdzv-endpoint", default=None)
    p.add_argument("--rdzv-id", default=None)
    p.add_argument("--rdzv-backend", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    """``dartspar-run`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        options = RunOptions(
            steps=args.steps, nproc=args.nproc, out_dir=args.out,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
            resume=args.resume, backend=args.backend, timeout_s=args.timeout_s, seed=args.seed,
            data_seed=args.data_seed, lr=args.lr, warmup_steps=args.warmup_steps,
            memory_limit_bytes=args.memory_limit_bytes, compute_precision=args.compute_precision,
            peak_flops_per_s=args.peak_flops_per_s, wall_timeout_s=args.wall_timeout_s,
        )
        rendezvous = Rendezvous(
            nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
            rdzv_id=args.rdzv_id, rdzv_backend=args.rdzv_backend,
        )
        reports = launch_many(args.plans, options, rendezvous)
    except ValueError as err:
        print(f"dartspar-run: error: {err}", file=sys.stderr)
        return 2
    except LaunchError as err:
        print(f"dartspar-run: error: {err}", file=sys.stderr)
        return err.exit_code
    for report in reports:
        loss = f"{report.losses[0]:.4f} -> {report.losses[-1]:.4f}" if report.losses else "n/a"
        print(
            f"{report.plan_path}: step {report.step_time_s * 1e3:.1f} ms (median), "
            f"{report.tokens_per_s:,.0f} tokens/s, loss {loss}, peak memory "
            f"{report.peak_memory_bytes_max / 2**20:.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
