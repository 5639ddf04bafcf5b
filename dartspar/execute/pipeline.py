"""The one adapter between dartspar and ``torch.distributed.pipelining`` (an alpha API).

Nothing else in the package imports ``torch.distributed.pipelining``: if its API moves, this file
changes and nothing else. Checked against torch 2.13 (``stage.py`` / ``schedules.py``):

- ``PipelineStage(submodule, stage_index, num_stages, device, input_args, output_args,
  group=...)``. Giving example inputs and outputs (meta tensors are fine) selects the static
  metadata mode: no metadata-inference forward and no pickled shape exchange at the first step.
- ``ScheduleGPipe`` / ``Schedule1F1B(stage, n_microbatches, loss_fn, scale_grads=True)``;
  ``ScheduleInterleaved1F1B(stages, ...)`` for several stages per rank (loop layout: stage ``s``
  on pp rank ``s mod P``). ``scale_grads=True`` divides gradients by the number of micro-batches,
  matching a loss that is a mean over each micro-batch.
- ``step(*inputs, target=..., losses=[...])``: the first stage passes inputs, the last the
  target; the batch is split into micro-batches along dim 0.
- For FSDP2-wrapped stages the schedule itself disables gradient sync during the micro-batches
  and runs the reduce-scatter after the last backward (``perform_reduce_grad``).

Timing wraps the stage's ``forward_one_chunk`` / ``backward_one_chunk`` (and, under FSDP,
``perform_reduce_grad``) on the instance (no global patching); everything else in a schedule
step — waiting for and moving activations and gradients, and the bubble — is pipeline wait time.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

from .measure import PhaseClock

__all__ = ["PipelineRunner"]

_SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


class PipelineRunner:
    """Runs one training step's forward and backward for this rank's stages.

    Args:
        modules: this rank's stage modules, in stage order (one unless interleaved).
        stage_indices: their global stage indices.
        num_stages: total stages of the pipeline.
        schedule: "gpipe", "1f1b" or "interleaved".
        num_microbatches: micro-batches per step.
        loss_fn: ``loss_fn(output, target) -> scalar`` mean loss of one micro-batch.
        example_inputs / example_outputs: per stage, the micro-batch input and output tensors
            (meta device is fine; dtype, shape and requires_grad matter).
        group: the pipeline-parallel process group (this rank's "pp" mesh dimension).
        device: compute device.
        clock: phase timers and trace events.
    """

    def __init__(
        self,
        modules: list[nn.Module],
        stage_indices: list[int],
        num_stages: int,
        schedule: str,
        num_microbatches: int,
        loss_fn: Callable,
        example_inputs: list[torch.Tensor],
        example_outputs: list[torch.Tensor],
        group,
        device: torch.device,
        clock: PhaseClock,
    ) -> None:
        self.clock = clock
        self.stages = []
        for module, index, x, y in zip(modules, stage_indices, example_inputs, example_outputs):
            stage = PipelineStage(
                module, index, num_stages, device, input_args=(x,), output_args=(y,), group=group
            )
            self._instrument(stage, index)
            self.stages.append(stage)
        self.is_first = any(s.is_first for s in self.stages)
        self.is_last = any(s.is_last for s in self.stages)
        timed_loss = clock.wrap(loss_fn, "loss", num_stages - 1, lambda a: "loss")
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(
                self.stages, num_microbatches, loss_fn=timed_loss, scale_grads=True
            )
        elif schedule in _SINGLE:
            if len(self.stages) != 1:
                raise ValueError(f"schedule {schedule!r} runs one stage per rank, got {len(self.stages)}")
            self.schedule = _SINGLE[schedule](
                self.stages[0], num_microbatches, loss_fn=timed_loss, scale_grads=True
            )
        else:
            raise ValueError(f"schedule {schedule!r} is not gpipe, 1f1b or interleaved")

    def _instrument(self, stage: PipelineStage, index: int) -> None:
        clock = self.clock
        stage.forward_one_chunk = clock.wrap(
            stage.forward_one_chunk, "forward", index, lambda a: f"F{a[0]}"
        )
        stage.backward_one_chunk = clock.wrap(
            stage.backward_one_chunk, "backward", index, lambda a: f"B{a[0]}"
        )
        stage.backward_weight_one_chunk = clock.wrap(
            stage.backward_weight_one_chunk, "backward", index, lambda a: f"W{a[0]}"
        )
        if isinstance(stage.submod, FSDPModule):
            # FSDP's reduce-scatter; without FSDP this call only divides by the micro-batches.
            stage.perform_reduce_grad = clock.wrap(
                stage.perform_reduce_grad, "dp_sync", index, lambda a: "reduce_grad"
            )

    def step(self, inputs: torch.Tensor | None, target: torch.Tensor | None) -> list[torch.Tensor]:
        """One forward+backward over all micro-batches; gradients accumulate into ``.grad``
        divided by the number of micro-batches. Returns the micro-batch losses on the rank that
        holds the last stage, ``[]`` elsewhere."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        kwargs = {"target": target, "losses": losses} if self.is_last else {}
        self.schedule.step(*args, return_outputs=False, **kwargs)
        return losses
