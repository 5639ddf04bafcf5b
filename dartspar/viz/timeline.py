"""Gantt charts of pipeline steps: one row per stage, forwards and backwards in their own colours.

The same drawing serves the simulator (``dartspar.sim.SimEvent``) and a measured trace, so that
the paper can show the executor's timeline next to the simulated one with identical styling.

Accepted event forms (they may be mixed):
- ``SimEvent`` or any 5-tuple ``(stage, microbatch, kind, start_s, end_s)``;
- a dict with ``stage`` (or ``rank``), ``start_s``, ``end_s`` and either ``kind``
  ("F", "B", "send_F", "send_B", or anything else, drawn grey) with an optional ``microbatch``,
  or a ``name``. Names are read as torch's profiler labels: "Forward 3" / "F3" is a forward of
  micro-batch 3, "Backward 3" / "B3" a backward; any other name is drawn grey under its own text.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = ["plot_timeline", "plot_timelines"]

_COLOURS = {"F": "#4C72B0", "B": "#DD8452", "send_F": "#8FAADC", "send_B": "#F4B183"}
_OTHER_COLOUR = "#9E9E9E"
_LEGEND = {"F": "forward", "B": "backward", "send_F": "send activation", "send_B": "send gradient"}
_NAME = re.compile(r"^\s*(F|B|Forward|Backward)\s*(\d+)\s*$", re.IGNORECASE)
_COMPUTE_H, _SEND_H = 0.6, 0.18  # bar heights in row units; sends run in a strip under the stage


class _Bar(NamedTuple):
    lane: int
    kind: str
    label: str
    start_s: float
    end_s: float


def plot_timeline(events: Iterable[Any], path: str | Path, title: str | None = None) -> Path:
    """Draw one pipeline timeline and save it (format from the suffix, e.g. .png, .pdf).

    Args:
        events: simulator events or trace dicts (see the module docstring); times in seconds.
        path: output file; parent folders are created.
        title: axes title.
    Returns:
        The path written.
    """
    return plot_timelines([(title, events)], path)


def plot_timelines(
    panels: Sequence[tuple[str | None, Iterable[Any]]],
    path: str | Path,
    vertical: bool = False,
    share_time: bool = True,
) -> Path:
    """Draw several timelines side by side (or stacked with ``vertical``) and save them.

    Args:
        panels: (title, events) per panel, e.g. [("executor", trace), ("simulated", sim.events)].
        path: output file; parent folders are created.
        vertical: stack panels top to bottom instead of left to right.
        share_time: one time axis for all panels, so their lengths compare at a glance.
    Returns:
        The path written.
    """
    if not panels:
        raise ValueError("panels is empty: give at least one (title, events) pair")
    bars = [[_to_bar(e, k, t) for k, e in enumerate(evs)] for t, evs in panels]
    for (title, _), b in zip(panels, bars):
        if not b:
            raise ValueError(f"panel {title!r} has no events to draw")
    rows, cols = (len(panels), 1) if vertical else (1, len(panels))
    lanes = max(bar.lane for b in bars for bar in b) + 1
    fig = Figure(figsize=(7.0 * cols, max(1.6, 0.55 * lanes + 1.2) * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=share_time).ravel()
    t_max = max(bar.end_s for b in bars for bar in b)
    seen: set[str] = set()
    for ax, (title, _), b in zip(axes, panels, bars):
        _draw(ax, b, lanes, t_max if share_time else max(bar.end_s for bar in b))
        seen.update(bar.kind for bar in b)
        if title:
            ax.set_title(title)
    if vertical and share_time:
        for ax in axes[:-1]:
            ax.set_xlabel("")  # the shared axis is labelled once, at the bottom
    handles = [Patch(color=_COLOURS[k], label=_LEGEND[k]) for k in _COLOURS if k in seen]
    if seen - set(_COLOURS):
        handles.append(Patch(color=_OTHER_COLOUR, label="other"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return out


def _draw(ax, bars: list[_Bar], lanes: int, t_max: float) -> None:
    # Text fits when the box is at least this share of the axis width per character.
    min_share_per_char = 0.012
    for bar in bars:
        width = bar.end_s - bar.start_s
        if width <= 0:
            continue  # zero-length transfers (free links) have nothing to show
        compute = not bar.kind.startswith("send_")
        height = _COMPUTE_H if compute else _SEND_H
        y = bar.lane - _COMPUTE_H / 2 if compute else bar.lane + _COMPUTE_H / 2
        colour = _COLOURS.get(bar.kind, _OTHER_COLOUR)
        ax.broken_barh([(bar.start_s, width)], (y, height), facecolors=colour,
                       edgecolor="white", linewidth=0.5)
        if compute and bar.label and t_max > 0 and width / t_max >= min_share_per_char * len(bar.label):
            ax.text(bar.start_s + width / 2, bar.lane, bar.label, ha="center", va="center",
                    fontsize=7, color="white")
    ax.set_ylim(lanes - 0.5 + _SEND_H, -0.5 - 0.05)
    ax.set_yticks(range(lanes), [f"stage {s}" for s in range(lanes)])
    ax.set_xlim(0, t_max * 1.01 if t_max > 0 else 1)
    ax.set_xlabel("time (s)")


def _to_bar(event: Any, index: int, panel: str | None) -> _Bar:
    where = f"panel {panel!r} event {index}"
    if isinstance(event, dict):
        lane = event.get("stage", event.get("rank"))
        if lane is None:
            raise ValueError(f"{where} has neither 'stage' nor 'rank': {event!r}")
        try:
            start, end = float(event["start_s"]), float(event["end_s"])
        except KeyError as err:
            raise ValueError(f"{where} lacks {err.args[0]!r} (seconds): {event!r}") from None
        if "kind" in event:
            kind = str(event["kind"])
            mb = event.get("microbatch")
            label = "" if mb is None else str(mb)
        elif "name" in event:
            match = _NAME.match(str(event["name"]))
            if match:
                kind, label = match.group(1)[0].upper(), match.group(2)
            else:
                kind, label = "other", str(event["name"])
        else:
            raise ValueError(f"{where} has neither 'kind' nor 'name': {event!r}")
    else:
        try:
            lane, mb, kind, start, end = event
        except (TypeError, ValueError):
            raise ValueError(
                f"{where} is {event!r}: give (stage, microbatch, kind, start_s, end_s) or a dict"
            ) from None
        label, start, end = str(mb), float(start), float(end)
    if isinstance(lane, bool) or int(lane) != lane or lane < 0:
        raise ValueError(f"{where} has stage/rank={lane!r}: must be an int >= 0")
    if not end >= start:
        raise ValueError(f"{where} ends at {end} s before it starts at {start} s")
    return _Bar(int(lane), kind, label, start, end)
