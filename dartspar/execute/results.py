"""From per-rank measurements to the run report, the traces and the predicted-vs-measured table.

Each rank summarizes its own step history; rank 0 gathers the summaries (one collective at the
end of the run, none during it) and writes ``run_report.json`` and the merged trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..plan import Plan
from .assemble import RankRuntime
from .checks import model_spec
from .measure import (
    merge_chrome_traces,
    peak_flops_per_s_for,
    peak_rss_bytes,
    tensor_state_bytes,
    write_chrome_trace,
)
from .options import RunOptions
from .report import RankStats, RunReport, compare_with_predicted, median_after_warmup, stage_stats

__all__ = ["StepHistory", "write_outputs"]

_PHASES = ("forward", "backward", "loss", "dp_sync", "optimizer")


@dataclass
class StepHistory:
    """Per-step seconds of one rank: the whole step, the schedule call, and the timed phases."""

    step: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    schedule: list = field(default_factory=list)
    phases: dict = field(default_factory=lambda: {k: [] for k in _PHASES})
    losses: list = field(default_factory=list)

    def record(self, step_s: float, cpu_s: float, schedule_s: float, totals: dict,
               loss: float | None) -> None:
        self.step.append(step_s)
        self.cpu.append(cpu_s)
        self.schedule.append(schedule_s)
        for k in _PHASES:
            self.phases[k].append(totals[k])
        if loss is not None:
            self.losses.append(loss)


def _rank_stats(plan: Plan, r: RankRuntime, history: StepHistory, warmup: int, device) -> RankStats:
    med = {k: median_after_warmup(v, warmup) for k, v in history.phases.items()}
    schedule = median_after_warmup(history.schedule, warmup)
    wait = schedule - med["forward"] - med["backward"] - med["loss"]
    if plan.data_parallel == "fsdp":
        wait -= med["dp_sync"]  # FSDP's reduce-scatter runs inside the schedule step
    wait = max(0.0, wait)
    pp, dp, tp = r.coords
    cuda = device.type == "cuda"
    return RankStats(
        rank=r.rank, stages=tuple(r.stage_indices), pp=pp, dp=dp, tp=tp,
        forward_s=med["forward"], backward_s=med["backward"], loss_s=med["loss"],
        pipeline_wait_s=wait, dp_sync_s=med["dp_sync"], optimizer_s=med["optimizer"],
        comm_s=wait + med["dp_sync"], step_time_s=median_after_warmup(history.step, warmup),
        cpu_time_s=median_after_warmup(history.cpu, warmup),
        peak_rss_bytes=peak_rss_bytes(),
        model_state_bytes=tensor_state_bytes(r.modules, r.optimizer),
        cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(device) if cuda else None,
        cuda_max_reserved_bytes=torch.cuda.max_memory_reserved(device) if cuda else None,
    )


def write_outputs(
    plan: Plan, plan_path: str, options: RunOptions, device: torch.device, out_dir: Path,
    r: RankRuntime, start_step: int, history: StepHistory, loop_time_per_step_s: float,
) -> None:
    """Every rank writes its trace; rank 0 gathers and writes the report and merged trace."""
    stats = _rank_stats(plan, r, history, options.warmup_steps, device)
    names = {s: f"stage {s}" for s in r.stage_indices}
    names[-1] = "steps"
    events = r.runner.clock.events
    trace_path = out_dir / f"trace_rank{r.rank}.json"
    write_chrome_trace(trace_path, events, r.rank, names)
    payload = {
        "stats": stats, "steps": history.step, "trace": str(trace_path), "events": events,
        "names": names, "loop_s": loop_time_per_step_s,
        "losses": history.losses if r.coords[1:] == (0, 0) else [],
    }
    gathered = [None] * dist.get_world_size() if r.rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    if r.rank != 0:
        return

    ranks = [g["stats"] for g in gathered]
    per_step = [max(values) for values in zip(*(g["steps"] for g in gathered))]
    step_time = median_after_warmup(per_step, options.warmup_steps)
    traces = []
    for g, s in zip(gathered, ranks):
        path = Path(g["trace"])
        if not path.exists():  # another node's file system: rewrite it here from its events
            write_chrome_trace(path, g["events"], s.rank, g["names"])
        traces.append(path)
    merged = out_dir / "trace.json"
    merge_chrome_traces(traces, merged)
    peak, peak_note = peak_flops_per_s_for(device, options.peak_flops_per_s)
    achieved = r.model_flops_per_step / step_time if step_time > 0 else float("nan")
    mfu = achieved / (peak * dist.get_world_size()) if peak else None
    tokens_per_s = r.tokens_per_step / step_time if step_time > 0 else float("nan")
    peak_max = max(s.peak_memory_bytes for s in ranks)
    measured = {"step_time_s": step_time, "peak_bytes": peak_max, "peak_memory_bytes": peak_max,
                "tokens_per_s": tokens_per_s, "mfu": mfu}
    name, config = model_spec(plan)
    layer_ranges = [(s.layer_start, s.layer_end) for s in plan.stages]
    report = RunReport(
        plan_path=str(plan_path), model={"name": name, "config": config},
        world_size=dist.get_world_size(), backend=dist.get_backend(), device=device.type,
        schedule=plan.schedule, num_stages=plan.num_stages,
        mesh_shape={"pp": r.layout.pp, "dp": r.layout.dp, "tp": r.layout.tp},
        num_microbatches=plan.num_microbatches, micro_batch_size=plan.micro_batch_size,
        global_batch_size=plan.global_batch_size, tokens_per_step=r.tokens_per_step,
        start_step=start_step, end_step=options.steps, warmup_steps=options.warmup_steps,
        step_time_s=step_time, step_times_s=per_step,
        loop_time_per_step_s=max(g["loop_s"] for g in gathered),
        cpu_time_per_step_s=sum(s.cpu_time_s for s in ranks),
        tokens_per_s=tokens_per_s, model_flops_per_step=r.model_flops_per_step,
        achieved_flops_per_s=achieved, mfu=mfu, mfu_note=peak_note,
        losses=next((g["losses"] for g in gathered if g["losses"]), []),
        ranks=[dict(vars(s), peak_memory_bytes=s.peak_memory_bytes) for s in ranks],
        stages=[vars(s) for s in stage_stats(ranks, layer_ranges)],
        peak_memory_bytes_max=peak_max, predicted=dict(plan.predicted),
        predicted_vs_measured=compare_with_predicted(dict(plan.predicted), measured),
        trace_files=[str(p) for p in traces], merged_trace=str(merged),
        checkpoint={"dir": options.checkpoint_dir,
                    "resumed_from_step": start_step if options.resume else None},
    )
    report.to_json(out_dir / "run_report.json")
