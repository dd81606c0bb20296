"""Live panels that cost the runs nothing.

A live panel refreshes only what changes: it keeps the points of the runs it watches and asks the
store only for the rows written after the last one it has (`Store.new_metrics`), puts them into the figure
it already drew (`figures.refresh_run_panel`), refreshes slower while nothing changes (`Backoff`) and
stops when its run ends. Finished runs do not change, so their figures are built once per run and
cached by run id (`finished_run_figure` in `runs_view`).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from samlab.runs import curves

BASE_S = 2.0  # refresh interval of a panel whose run changes
MAX_S = 16.0  # the slowest refresh of a quiet panel
IDLE_TICKS = 3  # quiet refreshes before the interval doubles
WATCH_S = 3.0  # how often a page looks for runs that started or ended elsewhere (one small query)
LIVE_MAX_POINTS = 2000  # points per curve drawn by a live panel
COLUMNS = ["run_id", "kind", "name", "step", "value"]


@dataclass
class Backoff:
    """A refresh interval: the base one while things change, doubled after IDLE_TICKS quiet refreshes,
    up to MAX_S."""

    interval: float = BASE_S
    idle: int = 0

    def tick(self, changed: bool) -> float:
        if changed:
            self.interval, self.idle = BASE_S, 0
        else:
            self.idle += 1
            if self.idle >= IDLE_TICKS:
                self.interval, self.idle = min(2 * self.interval, MAX_S), 0
        return self.interval


@dataclass
class LiveCurves:
    """The points of one watched run, grown by incremental reads: each pull asks the store for the rows
    written after the last row id it got (`Store.new_metrics`), so a refresh with nothing new reads
    nothing, and one with news reads only those."""

    run_id: str
    cursor: tuple[int, float | None] | None = None  # where the last read ended
    points: dict[tuple[str, str], tuple[list[int], list[float]]] = field(default_factory=dict)  # (kind, name)

    def pull(self, store: Any) -> int:
        """Read the points written since the last pull; returns how many there were."""
        rows, self.cursor, replaced = store.new_metrics(self.run_id, self.cursor)
        if replaced:
            self.points = {}
        for kind, name, step, value in rows:
            steps, values = self.points.setdefault((kind, name), ([], []))
            if steps and step <= steps[-1]:  # a resumed run rewrote its tail: the new points replace it
                cut = bisect.bisect_left(steps, step)
                del steps[cut:], values[cut:]
            steps.append(step)
            values.append(value)
        return len(rows)

    def view(self, max_points: int = LIVE_MAX_POINTS, names: Iterable[str] | None = None,
             kind: str | None = None) -> pd.DataFrame:
        """The points to draw (of these curve names and kind, default all): each curve downsampled like
        the store's buckets when it is long."""
        parts, wanted = [], None if names is None else set(names)
        for (curve_kind, name), (steps, values) in self.points.items():
            if (wanted is not None and name not in wanted) or (kind is not None and curve_kind != kind):
                continue
            shown_steps, shown_values = curves.downsample_arrays(steps, values, max_points)
            parts.append(pd.DataFrame({"run_id": self.run_id, "kind": curve_kind, "name": name,
                                       "step": shown_steps, "value": shown_values}, columns=COLUMNS))
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
