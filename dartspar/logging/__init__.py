"""Experiment logging for the apps: a W&B backend (offline by default) and a no-op one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .base import ExperimentLogger, NullLogger
from .wandb_backend import WandbLogger, resolve_wandb_mode

__all__ = ["ExperimentLogger", "NullLogger", "WandbLogger", "resolve_wandb_mode", "make_logger"]


def make_logger(
    logger_cfg: Mapping[str, Any],
    config: Mapping[str, Any],
    run_dir: str | Path,
    name: str | None = None,
    group: str | None = None,
) -> ExperimentLogger:
    """The logger ``logger_cfg`` (a ``dartspar.config.LoggerConfig`` node) asks for.

    ``config`` is the resolved app config to record; ``run_dir`` is the default folder for the
    backend's files; ``name`` / ``group`` are used where the config leaves them null.
    """
    backend = logger_cfg.get("backend", "none")
    if backend == "none":
        return NullLogger()
    if backend != "wandb":
        raise ValueError(f"logger.backend={backend!r} must be 'wandb' or 'none'")
    return WandbLogger(
        config=config,
        dir=logger_cfg.get("dir") or run_dir,
        mode=logger_cfg.get("mode", "offline"),
        project=logger_cfg.get("project", "dartspar"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group") or group,
        name=logger_cfg.get("name") or name,
        tags=logger_cfg.get("tags") or (),
        init_timeout_s=logger_cfg.get("init_timeout_s", 30.0),
        system_stats=logger_cfg.get("system_stats", False),
    )
