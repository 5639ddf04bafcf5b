"""Run options of the executor: what ``dartspar-run`` flags (or a Hydra config) set."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["RunOptions", "Rendezvous", "FAULT_ENV"]

# Test hook: "RANK:STEP" makes that rank exit abruptly (os._exit(17)) when it reaches STEP,
# to exercise failure detection and checkpoint resume. Never set in normal runs.
FAULT_ENV = "DARTSPAR_FAULT_INJECT"


@dataclass(frozen=True)
class RunOptions:
    """How to run a plan (the plan itself says how to parallelize).

    Attributes:
        steps: optimizer steps to run in total (a resumed run continues up to this number).
        nproc: processes per node; None = the plan's device count divided by the node count.
        out_dir: where the run report, traces, step log and error files go.
        checkpoint_dir: torch.distributed.checkpoint directory; None disables checkpointing.
        checkpoint_every: save every N steps (0 = only at the end when checkpoint_dir is set).
        resume: continue from the latest checkpoint in checkpoint_dir (fresh start if none).
        backend: "auto" (nccl on GPUs, gloo on CPU), "gloo" or "nccl".
        timeout_s: process-group timeout: a collective or transfer waiting longer fails the run.
        seed: weight-initialization seed (layer i uses seed + i).
        data_seed: data set and batch-order seed.
        num_train / num_val: data set sizes in samples.
        lr, weight_decay: AdamW settings.
        warmup_steps: steps left out of timing medians (allocator and communicator warm-up).
        trace_steps: steps after warm-up recorded in the Chrome trace.
        memory_limit_bytes: per-rank memory budget for the pre-flight check; None = the device's
            memory (GPU) or available RAM divided by the local processes (CPU).
        int8_error_feedback: carry int8 gradient quantization error into the next step.
        compute_precision: "fp32" or "bf16" (autocast inside each stage).
        peak_flops_per_s: per-device peak for MFU when the device is not in the built-in table.
        dump_first_step: write the first step's loss and full gradients (tests, debugging).
        keep_checkpoints: how many most recent checkpoints to keep.
        wall_timeout_s: the launcher kills the run after this many seconds (None = no limit).
    """

    steps: int = 20
    nproc: int | None = None
    out_dir: str = "runs/latest"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    backend: str = "auto"
    timeout_s: float = 300.0
    seed: int = 0
    data_seed: int = 0
    num_train: int = 4096
    num_val: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 2
    trace_steps: int = 2
    memory_limit_bytes: int | None = None
    int8_error_feedback: bool = True
    compute_precision: str = "fp32"
    peak_flops_per_s: float | None = None
    dump_first_step: bool = False
    keep_checkpoints: int = 2
    wall_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RunOptions.steps={self.steps} must be >= 1")
        if self.nproc is not None and self.nproc < 1:
            raise ValueError(f"RunOptions.nproc={self.nproc} must be >= 1")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"RunOptions.backend={self.backend!r} is not auto, gloo or nccl")
        if self.timeout_s <= 0:
            raise ValueError(f"RunOptions.timeout_s={self.timeout_s} must be > 0")
        if self.checkpoint_every < 0:
            raise ValueError(f"RunOptions.checkpoint_every={self.checkpoint_every} must be >= 0")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("RunOptions.checkpoint_every is set but checkpoint_dir is not: give both")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("RunOptions.resume needs checkpoint_dir: where should it resume from?")
        if self.compute_precision not in ("fp32", "bf16"):
            raise ValueError(f"RunOptions.compute_precision={self.compute_precision!r} is not fp32 or bf16")
        if self.warmup_steps < 0 or self.trace_steps < 0:
            raise ValueError("RunOptions.warmup_steps and trace_steps must be >= 0")
        if self.keep_checkpoints < 1:
            raise ValueError(f"RunOptions.keep_checkpoints={self.keep_checkpoints} must be >= 1")

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "RunOptions":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"run options {path} have unknown fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's multi-node flags, passed through unchanged (None = torchrun's default).

    A single-node launch without any of them uses ``--standalone`` (a free local port).
    """

    nnodes: str | None = None
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    rdzv_backend: str | None = None

    @property
    def is_standalone(self) -> bool:
        return all(v is None for v in asdict(self).values()) or (
            self.nnodes in (None, "1", "1:1") and self.rdzv_endpoint is None
        )

    def fixed_nnodes(self) -> int | None:
        """The node count when it is fixed ("2" or "2:2"), None for elastic ranges."""
        if self.nnodes is None:
            return 1
        lo, _, hi = str(self.nnodes).partition(":")
        if hi and hi != lo:
            return None
        return int(lo)
