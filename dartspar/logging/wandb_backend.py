"""Weights & Biases backend: offline unless the user opts in, and never fatal.

W&B must not decide whether a search or a run succeeds: without network or API key it has to
neither crash nor hang. So ``wandb.init`` is time-boxed (``init_timeout``), prompts and console
capture are off, an online start that fails falls back to an offline run, and a backend that
cannot start at all degrades to recording nothing, each time with a line on stderr saying so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["WandbLogger", "resolve_wandb_mode"]

_WANDB_MODES = ("online", "offline", "disabled")


def resolve_wandb_mode(requested: str, environ: Mapping[str, str] | None = None) -> str:
    """The W&B mode to start in.

    ``offline`` and ``disabled`` are taken as they are, whatever ``WANDB_MODE`` says (a stray
    ``WANDB_MODE=online`` in a shell must not make a run go to the network). ``online`` is the
    opt-in: then ``WANDB_MODE`` from ``environ`` (default ``os.environ``), if set, decides.
    """
    if requested not in _WANDB_MODES:
        raise ValueError(f"logger.mode={requested!r} must be one of {_WANDB_MODES}")
    if requested != "online":
        return requested
    environ = os.environ if environ is None else environ
    mode = environ.get("WANDB_MODE", "online")
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode not in _WANDB_MODES:
        raise ValueError(
            f"WANDB_MODE={mode!r} (honoured because logger.mode=online) must be one of "
            f"{_WANDB_MODES}; unset it or fix its value"
        )
    return mode


def _warn(message: str) -> None:
    print(f"[dartspar.logging] {message}", file=sys.stderr, flush=True)


class WandbLogger:
    """An ``ExperimentLogger`` writing one W&B run.

    Args:
        config: the resolved app config (logged as the run's config).
        dir: folder for W&B's ``wandb/`` directory (created if absent).
        mode: "offline", "online" or "disabled" (see ``resolve_wandb_mode``).
        project, entity, group, name, tags: W&B run identity.
        init_timeout_s: upper bound on ``wandb.init`` in seconds.
        system_stats: let W&B sample system statistics.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        dir: str | Path,
        mode: str = "offline",
        project: str = "dartspar",
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: Sequence[str] = (),
        init_timeout_s: float = 30.0,
        system_stats: bool = False,
    ) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self._wandb = wandb
        self.files_dir: Path | None = None
        self._run = None
        self.mode = resolve_wandb_mode(mode)
        Path(dir).mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=project, entity=entity, group=group, name=name, tags=list(tags) or None,
            dir=str(dir), config=dict(config),
        )
        settings = dict(
            init_timeout=float(init_timeout_s), x_disable_stats=not system_stats,
            disable_git=True, save_code=False, console="off", silent=True,
            reinit="finish_previous",
        )
        self._run = self._start(kwargs, settings)

    def _start(self, kwargs: dict, settings: dict):
        try:
            return self._init(kwargs, settings, self.mode)
        except Exception as err:  # noqa: BLE001 - logging must never fail the run
            if self.mode == "online":
                _warn(f"W&B online start failed ({type(err).__name__}: {err}); logging offline to "
                      f"{kwargs['dir']} instead (upload later with `wandb sync`)")
                self.mode = "offline"
                try:
                    return self._init(kwargs, settings, "offline")
                except Exception as err2:  # noqa: BLE001
                    err = err2
            _warn(f"W&B could not start ({type(err).__name__}: {err}); nothing will be logged to W&B")
            self.mode = "failed"
            return None

    def _init(self, kwargs: dict, settings: dict, mode: str):
        run = self._wandb.init(mode=mode, settings=self._wandb.Settings(**settings), **kwargs)
        if mode != "disabled" and run is not None and getattr(run, "dir", None):
            # run.dir is .../wandb/<offline-run-...>/files; its parent holds the run's record.
            self.files_dir = Path(run.dir).parent
        return run

    @property
    def active(self) -> bool:
        """Whether a W&B run is open (False after a failed start or ``finish``)."""
        return self._run is not None

    def _log(self, data: dict, step: int | None) -> None:
        if self._run is None:
            return
        try:
            self._run.log(data, step=step)
        except Exception as err:  # noqa: BLE001
            _warn(f"W&B log of {sorted(data)} failed ({type(err).__name__}: {err})")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._log({k: float(v) for k, v in metrics.items()}, step)

    def log_image(self, key: str, image: np.ndarray, step: int | None = None,
                  caption: str | None = None) -> None:
        if self._run is None:
            return
        self._log({key: self._wandb.Image(np.asarray(image), caption=caption)}, step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if self._run is None:
            return
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self._log({key: table}, None)

    def log_artifact(self, path: str | Path, name: str, kind: str) -> None:
        if self._run is None:
            return
        try:
            artifact = self._wandb.Artifact(name=name, type=kind)
            artifact.add_file(str(path))
            self._run.log_artifact(artifact)
        except Exception as err:  # noqa: BLE001
            _warn(f"W&B artifact {name!r} from {path} failed ({type(err).__name__}: {err})")

    def set_summary(self, values: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        for key, value in values.items():
            self._run.summary[key] = value

    def finish(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish()
        except Exception as err:  # noqa: BLE001
            _warn(f"W&B finish failed ({type(err).__name__}: {err})")
