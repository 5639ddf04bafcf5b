"""Saving and resuming training state with torch.distributed.checkpoint (DCP).

Every rank saves its own shards (pipeline stage slices, FSDP and tensor-parallel shards) into one
checkpoint per step, ``<dir>/step_<N>``, under the whole model's parameter names
(``layers.<i>.<...>``), so DCP can reshard on load. ``<dir>/latest.json`` is written by rank 0
after the save completed (atomic rename): a run killed during a save resumes from the previous
checkpoint, never from a half-written one. The data order depends only on the step number
(``BatchStream``), so the step counter is all the training state besides weights and optimizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

__all__ = ["save_checkpoint", "latest_checkpoint_step", "load_checkpoint"]

_LATEST = "latest.json"
# Flattened optimizer state keys hyperparameters by parameter name ("param_groups.<fqn>.lr"), so
# the pipeline stages' different parameter groups do not collide under one key (as torchtitan).
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer, keep: int) -> None:
    """Collective: every rank calls it. ``step`` = optimizer steps completed."""
    root = Path(root)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "train": {"step": torch.tensor(step)}}
    dcp.save(state, checkpoint_id=str(_step_dir(root, step)))
    if dist.get_rank() == 0:
        tmp = root / (_LATEST + ".tmp")
        tmp.write_text(json.dumps({"step": step, "path": _step_dir(root, step).name}))
        os.replace(tmp, root / _LATEST)
        old = sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint_step(root: str | Path) -> int | None:
    """Step of the latest complete checkpoint in ``root``, None when there is none."""
    path = Path(root) / _LATEST
    if not path.exists():
        return None
    return int(json.loads(path.read_text())["step"])


def load_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer) -> None:
    """Collective: load the checkpoint of ``step`` into ``model`` and ``optimizer`` in place."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "train": {"step": torch.tensor(-1)}}
    dcp.load(state, checkpoint_id=str(_step_dir(Path(root), step)))
    saved = int(state["train"]["step"])
    if saved != step:
        raise RuntimeError(
            f"checkpoint {_step_dir(Path(root), step)} holds step {saved}, expected {step}: "
            f"{root}/{_LATEST} and the checkpoint disagree"
        )
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
        options=_OPTIONS,
    )
