"""Heatmaps of the strategy matrix A: where the search puts each layer, and how that moves.

Two views of the layer-to-stage probabilities ``P(layer l in stage k)`` that the DARTS search
trains (one (L, p) matrix per snapshot):

- ``plot_stage_probabilities``: one panel per snapshot, layers down, stages across, so the
  sharpening of the softmax rows over the search is visible side by side;
- ``plot_stage_evolution``: one picture over all snapshots, layers down, steps across, the colour
  the layer's expected stage index ``sum_k k P(l in k)``: a converged search shows flat bands
  with sharp edges at the pipeline cuts.

Figures are drawn without pyplot (no GUI backend, safe in worker processes); ``figure_to_rgb``
turns one into the (H, W, 3) uint8 array an experiment logger takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_stage_probabilities",
    "plot_stage_evolution",
    "figure_to_rgb",
    "stage_probability_image",
    "save_figure",
]

_CMAP = "viridis"


def _as_matrix(probs, where: str) -> np.ndarray:
    matrix = np.asarray(probs, dtype=np.float64)
    if matrix.ndim != 2 or min(matrix.shape) < 1:
        raise ValueError(
            f"{where} has shape {matrix.shape}: expected a (layers, stages) matrix of probabilities"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"{where} holds non-finite values: the search diverged or A was not logged")
    return matrix


def _pick(snapshots: Sequence, max_panels: int) -> list:
    """At most ``max_panels`` snapshots, evenly spaced, always keeping the first and the last."""
    if len(snapshots) <= max_panels:
        return list(snapshots)
    index = np.unique(np.round(np.linspace(0, len(snapshots) - 1, max_panels)).astype(int))
    return [snapshots[i] for i in index]


def plot_stage_probabilities(
    snapshots: Sequence[tuple[int, np.ndarray]],
    layer_names: Sequence[str] | None = None,
    title: str | None = None,
    max_panels: int = 6,
) -> Figure:
    """One heatmap panel per snapshot of ``P(layer in stage)``.

    Args:
        snapshots: ``(step, probs)`` pairs; ``probs`` is (L, p) with rows summing to 1.
            Snapshots may differ in p (the panels then differ in width).
        layer_names: L labels for the layer axis (only drawn when L <= 40).
        title: figure title.
        max_panels: at most this many panels, evenly spaced over the snapshots.
    """
    if not snapshots:
        raise ValueError("snapshots is empty: nothing to draw")
    chosen = _pick(list(snapshots), max_panels)
    matrices = [_as_matrix(p, f"snapshot at step {s}") for s, p in chosen]
    num_layers = matrices[0].shape[0]
    for (step, _), m in zip(chosen, matrices):
        if m.shape[0] != num_layers:
            raise ValueError(
                f"snapshot at step {step} has {m.shape[0]} layers, the first has {num_layers}: "
                "all snapshots must be of the same model"
            )
    widths = [max(m.shape[1], 2) for m in matrices]
    fig = Figure(figsize=(1.2 + 0.5 * sum(widths) + 0.6 * len(matrices), 1.5 + min(0.18 * num_layers, 9)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(matrices), sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": widths})[0]
    image = None
    for ax, (step, _), m in zip(axes, chosen, matrices):
        image = ax.imshow(m, aspect="auto", cmap=_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xlabel("stage")
    axes[0].set_ylabel("layer")
    if layer_names is not None and num_layers <= 40:
        if len(layer_names) != num_layers:
            raise ValueError(f"layer_names has {len(layer_names)} names for {num_layers} layers")
        axes[0].set_yticks(range(num_layers))
        axes[0].set_yticklabels(layer_names, fontsize=7)
    fig.colorbar(image, ax=list(axes), label="P(layer in stage)", fraction=0.05)
    if title:
        fig.suptitle(title)
    return fig


def plot_stage_evolution(
    snapshots: Sequence[tuple[int, np.ndarray]],
    title: str | None = None,
) -> Figure:
    """Expected stage index of every layer (rows) at every snapshot's step (columns).

    All snapshots must share (L, p). Columns are placed at their steps (uneven spacing shows).
    """
    if not snapshots:
        raise ValueError("snapshots is empty: nothing to draw")
    steps = [int(s) for s, _ in snapshots]
    matrices = [_as_matrix(p, f"snapshot at step {s}") for s, p in snapshots]
    shape = matrices[0].shape
    for step, m in zip(steps, matrices):
        if m.shape != shape:
            raise ValueError(
                f"snapshot at step {step} has shape {m.shape}, the first has {shape}: the "
                "evolution view needs a fixed number of stages (plot one branch at a time)"
            )
    stage_index = np.arange(shape[1], dtype=np.float64)
    expected = np.stack([m @ stage_index for m in matrices], axis=1)  # (L, snapshots)
    edges = np.asarray(steps, dtype=np.float64)
    if len(edges) > 1:
        mids = (edges[1:] + edges[:-1]) / 2
        bounds = np.concatenate([[edges[0] - (mids[0] - edges[0])], mids, [edges[-1] + (edges[-1] - mids[-1])]])
    else:
        bounds = np.array([edges[0] - 0.5, edges[0] + 0.5])
    fig = Figure(figsize=(7.0, 1.5 + min(0.18 * shape[0], 9)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    mesh = ax.pcolormesh(bounds, np.arange(shape[0] + 1) - 0.5, expected, cmap=_CMAP,
                         vmin=0.0, vmax=max(shape[1] - 1, 1), shading="flat")
    ax.invert_yaxis()
    ax.set_xlabel("search step")
    ax.set_ylabel("layer")
    fig.colorbar(mesh, ax=ax, label="expected stage index")
    if title:
        ax.set_title(title)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` to an (H, W, 3) uint8 RGB array."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def stage_probability_image(probs: np.ndarray, step: int, title: str | None = None) -> np.ndarray:
    """One snapshot's heatmap as an RGB array (for per-step logging)."""
    return figure_to_rgb(plot_stage_probabilities([(step, probs)], title=title))


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Write ``fig`` (PNG, PDF or SVG by the suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
