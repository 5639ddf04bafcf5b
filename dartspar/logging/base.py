"""The experiment-logger interface the apps write to, and the logger that records nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

__all__ = ["ExperimentLogger", "NullLogger"]


class ExperimentLogger(Protocol):
    """Where a search or a run reports what it does.

    ``step`` is the search step / training step the values belong to; steps must not decrease
    from one call to the next (W&B drops values logged at an earlier step).
    """

    #: folder the backend writes its own files to, or None when it writes nothing.
    files_dir: Path | None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalars (seconds, bytes, nats, ...) under their names."""

    def log_image(self, key: str, image: np.ndarray, step: int | None = None,
                  caption: str | None = None) -> None:
        """An (H, W, 3) uint8 RGB image."""

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A table of rows (one value per column)."""

    def log_artifact(self, path: str | Path, name: str, kind: str) -> None:
        """A file kept with the run (e.g. plan.json, ``kind="plan"``)."""

    def set_summary(self, values: Mapping[str, Any]) -> None:
        """Final figures of the run (best step time, wall time, ...)."""

    def finish(self) -> None:
        """Flush and close; the logger is unusable afterwards."""


class NullLogger:
    """``logger=none``: accepts everything, records nothing."""

    files_dir: Path | None = None

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_image(self, key, image, step=None, caption=None) -> None:
        pass

    def log_table(self, key, columns, rows) -> None:
        pass

    def log_artifact(self, path, name, kind) -> None:
        pass

    def set_summary(self, values) -> None:
        pass

    def finish(self) -> None:
        pass
