"""The training loop of one rank: batches, pipeline step, gradient sync, optimizer, checkpoints,
timing. Every rank runs it in lockstep (the pipeline schedule and the collectives keep them so).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data import BatchStream, make_dataset_for_model
from ..plan import Plan
from .assemble import RankRuntime, assemble
from .checkpoint import latest_checkpoint_step, load_checkpoint, save_checkpoint
from .checks import ExecutorError, model_spec
from .options import FAULT_ENV, RunOptions
from .results import StepHistory, write_outputs

__all__ = ["local_batch", "train"]


def local_batch(batch: torch.Tensor, num_microbatches: int, dp: int, dp_rank: int) -> torch.Tensor:
    """This replica's samples of a global batch (B, ...): micro-batch ``j`` is samples
    ``[j*mbs, (j+1)*mbs)`` and replica ``d`` takes the ``d``-th ``mbs/dp`` of each, so the
    pipeline schedule's split of the local batch into ``num_microbatches`` chunks lines up."""
    mbs = batch.shape[0] // num_microbatches
    k = mbs // dp
    shaped = batch.view(num_microbatches, mbs, *batch.shape[1:])
    return shaped[:, dp_rank * k : (dp_rank + 1) * k].reshape(num_microbatches * k, *batch.shape[1:])


def _fault_step(rank: int) -> int | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    fault_rank, _, step = spec.partition(":")
    return int(step) if int(fault_rank) == rank else None


def _dump_first_step(r: RankRuntime, loss: float | None, out_dir: Path) -> None:
    """Loss and full (unsharded) gradients by parameter name, for tests and debugging.
    Collective over the stage's dp x tp ranks (DTensor gathers)."""
    grads = {}
    for module in r.modules:
        for name, p in module.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.detach().cpu()
    if r.coords[1:] == (0, 0):
        torch.save({"loss": loss, "grads": grads, "stages": list(r.stage_indices)},
                   out_dir / f"first_step_rank{r.rank}.pt")


def _resume_step(r: RankRuntime, options: RunOptions) -> int:
    if not options.resume:
        return 0
    latest = latest_checkpoint_step(options.checkpoint_dir)
    if latest is None:
        if r.rank == 0:
            print(f"[dartspar] no checkpoint in {options.checkpoint_dir}: starting at step 0",
                  file=sys.stderr)
        return 0
    if latest >= options.steps:
        raise ExecutorError(
            f"the checkpoint in {options.checkpoint_dir} is at step {latest}, not below "
            f"--steps {options.steps}: nothing left to run; raise --steps"
        )
    load_checkpoint(options.checkpoint_dir, latest, r.state_model, r.optimizer)
    return latest


def _mean_loss(r: RankRuntime, micro_losses: list[torch.Tensor]) -> float | None:
    """Mean over micro-batches and data-parallel replicas = the global batch's mean loss."""
    if not micro_losses:
        return None
    loss = torch.stack([l.detach().float() for l in micro_losses]).mean()
    if r.layout.dp > 1:
        dist.all_reduce(loss, group=r.dp_group)
        loss /= r.layout.dp
    return float(loss)


def train(plan: Plan, plan_path: str, options: RunOptions, device: torch.device, out_dir: Path) -> None:
    """Run ``options.steps`` steps of ``plan`` on this rank (collective) and write the outputs."""
    r = assemble(plan, options, device)
    clock = r.runner.clock
    dp_rank = r.coords[1]
    start_step = _resume_step(r, options)
    stream = None
    if r.runner.is_first or r.runner.is_last:
        name, config = model_spec(plan)
        data = make_dataset_for_model(name, config, options.num_train, options.num_val,
                                      options.data_seed)
        stream = BatchStream((data.train_inputs, data.train_targets), plan.global_batch_size,
                             options.data_seed)
    fault_step = _fault_step(r.rank)
    trace_from = start_step + options.warmup_steps
    trace_to = trace_from + options.trace_steps
    history = StepHistory()
    logs_loss = r.runner.is_last and r.coords[1:] == (0, 0)
    step_log = open(out_dir / "steps.jsonl", "a") if logs_loss else None
    loop_start = None
    tid = r.stage_indices[0]
    for step in range(start_step, options.steps):
        if step == fault_step:
            sys.stderr.write(f"[dartspar] {FAULT_ENV}: rank {r.rank} exits abruptly at step {step}\n")
            sys.stderr.flush()
            os._exit(17)
        if step == trace_from:
            loop_start = time.perf_counter()
        clock.tracing = trace_from <= step < trace_to
        clock.reset()
        inputs = targets = None
        if stream is not None:
            x, y = stream.batch(step)
            if r.runner.is_first:
                inputs = local_batch(x, plan.num_microbatches, r.layout.dp, dp_rank).to(device)
            if r.runner.is_last:
                targets = local_batch(y, plan.num_microbatches, r.layout.dp, dp_rank).to(device)
        t0 = clock.sync_now()
        cpu0 = time.process_time()
        r.optimizer.zero_grad(set_to_none=True)
        try:
            micro_losses = r.runner.step(inputs, targets)
        except torch.OutOfMemoryError as err:
            raise ExecutorError(
                f"plan does not fit: rank {r.rank} (stages {list(r.stage_indices)}) ran out of "
                f"device memory at step {step}: {str(err).splitlines()[0]}; use more "
                "micro-batches, recompute, data_parallel='fsdp' or more stages"
            ) from None
        t1 = clock.sync_now()
        if r.grad_sync is not None:
            with clock.span("dp_sync", "dp_sync", tid):
                r.grad_sync.sync()
        loss = _mean_loss(r, micro_losses)
        if options.dump_first_step and step == start_step:
            _dump_first_step(r, loss, out_dir)
        with clock.span("optimizer", "optimizer", tid):
            r.optimizer.step()
        t2 = clock.sync_now()
        clock.flush()
        if clock.tracing:
            clock.add("step", t0, t2, f"step {step + 1}", -1, {})
        history.record(t2 - t0, time.process_time() - cpu0, t1 - t0, clock.totals, loss)
        if step_log is not None and loss is not None:
            step_log.write(json.dumps({"step": step + 1, "loss": loss, "step_time_s": t2 - t0}) + "\n")
            step_log.flush()
        done = step + 1
        if options.checkpoint_dir and (
            (options.checkpoint_every and done % options.checkpoint_every == 0)
            or done == options.steps
        ):
            save_checkpoint(options.checkpoint_dir, done, r.state_model, r.optimizer,
                            options.keep_checkpoints)
    if step_log is not None:
        step_log.close()
    timed = options.steps - trace_from
    loop_per_step = (time.perf_counter() - loop_start) / timed if loop_start is not None else float("nan")
    write_outputs(plan, plan_path, options, device, out_dir, r, start_step, history, loop_per_step)
