"""Figures: pipeline timelines (simulated or measured) and the strategy matrix A as heatmaps."""

from .heatmap import (
    figure_to_rgb, plot_stage_evolution, plot_stage_probabilities, save_figure,
    stage_probability_image,
)
from .timeline import plot_timeline, plot_timelines

__all__ = [
    "plot_timeline", "plot_timelines", "figure_to_rgb", "plot_stage_evolution",
    "plot_stage_probabilities", "save_figure", "stage_probability_image",
]
