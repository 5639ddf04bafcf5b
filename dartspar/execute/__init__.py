"""The torch.distributed executor: runs a Plan with pipeline stages (torch.distributed.pipelining),
data parallelism (FSDP2 or replicated with one all-reduce per step), tensor parallelism (DTensor)
and activation checkpointing, measures it, and writes a run report next to the plan's predictions.

Entry points: ``launch(plan_path, RunOptions(...))`` and the ``dartspar-run`` console script
(``launch.main``). ``worker`` is what torchrun starts on every rank.
"""

from .build import init_layer
from .checks import ExecutorError, RankLayout, check_plan
from .launch import LaunchError, launch, launch_many, main
from .options import RunOptions, Rendezvous
from .reference import reference_first_step, reference_model, reference_train
from .report import RunReport

__all__ = [
    "launch", "launch_many", "main", "RunOptions", "Rendezvous", "RunReport", "LaunchError",
    "ExecutorError", "RankLayout", "check_plan", "init_layer",
    "reference_model", "reference_first_step", "reference_train",
]
