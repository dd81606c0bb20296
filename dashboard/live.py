"""Live panels that cost the runs nothing.

A live panel refreshes only what changes: it keeps the points of the runs it watches and asks the
store only for those after the last step it has (`Store.metrics(after=…)`), puts them into the figure
it already drew (`figures.refresh_run_panel`), refreshes slower while nothing changes (`Backoff`) and
stops when its run ends. Finished runs do not change, so their figures are built once per run and
cached by run id (`finished_run_figure` in `runs_view`).
"""

from __future__ import annotations

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
    """The points of one watched run, grown by incremental reads."""

    run_id: str
    frame: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COLUMNS))
    last: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, name) -> the last step read

    def pull(self, store: Any) -> int:
        """Read the points written since the last pull; returns how many there were."""
        new = store.metrics([self.run_id], after=dict(self.last) or None)
        if new.empty:
            return 0
        self.frame = new if self.frame.empty else pd.concat([self.frame, new], ignore_index=True)
        for curve, step in new.groupby(["kind", "name"])["step"].max().items():
            self.last[curve] = max(int(step), self.last.get(curve, -1))
        return len(new)

    def view(self, max_points: int = LIVE_MAX_POINTS) -> pd.DataFrame:
        """The points to draw: each curve downsampled like the store's buckets when it is long."""
        parts = []
        for (kind, name), curve in self.frame.groupby(["kind", "name"], sort=False):
            if len(curve) <= max_points:
                parts.append(curve)
                continue
            points = curves.downsample(list(zip(curve["step"].tolist(), curve["value"].tolist())), max_points)
            parts.append(pd.DataFrame([(self.run_id, kind, name, s, v) for s, v in points], columns=COLUMNS))
        return pd.concat(parts, ignore_index=True) if parts else self.frame
