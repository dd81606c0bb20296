"""Live panels that cost the runs nothing.

A live panel refreshes only what changes: it keeps the points of the runs it watches and asks the
store only for the rows written after the last one it has (`Store.new_metrics`), puts them into the figure
it already drew (`figures.refresh_run_panel`), refreshes slower while nothing changes (`Backoff`) and
stops when its run ends. Finished runs do not change, so their figures are built once per run and
cached by run id (`finished_run_figure` in `runs_view`).

A watched training run's card is refreshed without any script run (`FeedWriter`): a thread of the server
writes the run's feed — progress, figure, status — to a file next to the live chart's own files, and the
chart's frame fetches it by itself and redraws in place. A script run (a fragment's included) makes
Streamlit's frontend render the whole page again, which on 2 cores cost the watched run more than the
redraw; the frame asks the page to run again only when the run starts or ends, or when other runs do.
"""

from __future__ import annotations

import atexit
import bisect
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from samlab.runs import curves
from samlab.runs.store import ACTIVE

BASE_S = 2.0  # refresh interval of a panel whose run changes
MAX_S = 16.0  # the slowest refresh of a quiet panel
IDLE_TICKS = 3  # quiet refreshes before the interval doubles
WATCH_S = 3.0  # how often a page looks for runs that started or ended elsewhere (one small query)
LIVE_MAX_POINTS = 2000  # points per curve drawn by a live panel
TICK_S = 0.5  # how often the feed writer looks for feeds that are due
ENDED_KEEP_S = 120.0  # an ended run's last feed stays this long (a frame still polling reads the end)
FEED_THREAD = True  # the feed writer updates its feeds in a thread (tests step it by hand)
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


def _progress_state(run: dict[str, Any]) -> tuple:
    """What of a run its feed's progress line shows: status, progress and message."""
    return run["status"], run.get("progress"), run.get("progress_message")


@dataclass
class Feed:
    """One watched run's feed: its points, its figure, and what the feed file says (`payload`)."""

    run_id: str
    curves: LiveCurves
    backoff: Backoff = field(default_factory=Backoff)
    figure: Any = None  # the panel with the run's points (None before the first ones)
    spec: str | None = None  # the drawn figure as JSON, made again only when the figure changes
    seen: tuple | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    due: float = 0.0


class FeedWriter:
    """The feeds of the watched runs: a file per run, written by a thread of the server.

    `watch(run)` starts watching a run (reading all its points so far at once) and returns its feed; the
    thread then brings each feed up to date when it is due — the new points only (`LiveCurves.pull`), the
    figure redrawn in place by `panel(run, curves, figure)`, on the panel's back-off (`Backoff`) — and
    writes it when something changed. A feed is a JSON object: the run's `status`, `progress`
    ({fraction, text}), the figure as plotly JSON (`spec`; before the run's first points `waiting(run)`'s;
    null without a `panel`), `stage(run)` (what of the run's result is published, null without `stage`),
    the ids of every active run of `kind` (`active`, sorted; null without a kind), a `version` that grows
    with every change, `next_s` (when the feed will next be looked at) and `final`. A run that ended gets
    its last feed and is no longer watched; with nothing watched the thread stops.
    """

    def __init__(self, store: Any, folder: Path, *, progress: Callable[[dict[str, Any], Any], tuple[float, str]],
                 panel: Callable[[dict[str, Any], LiveCurves, Any], Any] | None = None,
                 waiting: Callable[[dict[str, Any]], Any] | None = None, to_json: Callable[[Any], str] | None = None,
                 stage: Callable[[dict[str, Any]], Any] | None = None, kind: str | None = None):
        self.store, self.folder, self.kind, self.progress = store, Path(folder), kind, progress
        self.panel, self.waiting, self.to_json, self.stage = panel, waiting, to_json, stage
        self.feeds: dict[str, Feed] = {}
        self.ended: dict[str, float] = {}  # run id -> when its last feed file is removed
        self.lock = threading.RLock()
        self.thread: threading.Thread | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)

    def path(self, run_id: str) -> Path:
        """The feed file of a run (run ids are the store's hex ids; anything else is refused)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", run_id):
            raise ValueError(f"not a run id: {run_id!r}")
        return self.folder / f"{run_id}.json"

    def watch(self, run: dict[str, Any]) -> dict[str, Any]:
        """Watch `run` until it ends (the first call reads its points so far); its feed, brought up to
        date first when `run` (as the page read it) is newer than what the feed has seen."""
        with self.lock:
            feed = self.feeds.get(run["id"])
            if feed is None:
                feed = self.feeds[run["id"]] = Feed(run["id"], LiveCurves(run["id"]))
            if feed.seen is None or feed.seen[:3] != _progress_state(run):
                self.update(feed, time.monotonic(), self.active_ids(), self.store.server_now())
            if FEED_THREAD and self.feeds and self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="samlab-live-feeds", daemon=True)
                self.thread.start()
            return feed.payload

    def active_ids(self) -> list[str] | None:
        if self.kind is None:
            return None
        return sorted(r["id"] for r in self.store.list_runs(kind=self.kind, status=list(ACTIVE), limit=50))

    def step(self, now: float | None = None) -> int:
        """Bring every due feed up to date (one query for the active runs and one for the store's clock,
        then each run's news); returns how many feeds were due."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self._remove_ended(now)
            due = [feed for feed in self.feeds.values() if feed.due <= now]
            if due:
                active, clock = self.active_ids(), self.store.server_now()
                for feed in due:
                    self.update(feed, now, active, clock)
            return len(due)

    def update(self, feed: Feed, now: float, active: list[str] | None, clock: Any) -> None:
        """Read a run's news, redraw its figure in place when there are points, write its feed if changed
        (`clock`: the store's time, for the elapsed time and ETA)."""
        try:
            run = self.store.get_run(feed.run_id)
        except ValueError:  # deleted meanwhile: its last feed says so, and the page drops the card
            run = {"id": feed.run_id, "status": "deleted"}
        new = self._redraw(feed, run) if self.panel is not None and run["status"] != "deleted" else 0
        fraction, text = self.progress(run, clock)
        final = run["status"] not in ACTIVE
        stage = self.stage(run) if self.stage is not None and run["status"] != "deleted" else None
        seen = (*_progress_state(run), active, json.dumps(stage))
        changed = bool(new) or seen != feed.seen
        feed.seen = seen
        feed.due = now + feed.backoff.tick(changed)
        if changed or not feed.payload:
            feed.payload = {"run_id": feed.run_id, "status": run["status"], "active": active, "stage": stage,
                            "progress": {"fraction": fraction, "text": text}, "spec": feed.spec,
                            "version": feed.payload.get("version", 0) + 1, "final": final}
        feed.payload["next_s"] = feed.backoff.interval
        self._write(feed)
        if final:
            del self.feeds[feed.run_id]
            self.ended[feed.run_id] = now + ENDED_KEEP_S

    def _redraw(self, feed: Feed, run: dict[str, Any]) -> int:
        """Pull the run's new points into its figure (or the waiting one before any); how many came."""
        new = feed.curves.pull(self.store)
        if new or feed.figure is None:
            figure = self.panel(run, feed.curves, feed.figure)
            if figure is not None or feed.spec is None:
                shown = figure if figure is not None else self.waiting(run)
                feed.figure, feed.spec = figure, None if shown is None else self.to_json(shown)
        return new

    def _write(self, feed: Feed) -> None:
        target = self.path(feed.run_id)
        staging = target.with_suffix(".tmp")
        staging.write_text(json.dumps(feed.payload))
        os.replace(staging, target)  # a frame never reads half a feed

    def _remove_ended(self, now: float) -> None:
        for run_id, when in list(self.ended.items()):
            if when <= now and run_id not in self.feeds:
                self.path(run_id).unlink(missing_ok=True)
                del self.ended[run_id]

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self.lock:
                if not self.feeds:
                    self.thread = None
                    return
            try:
                self.step()
            except Exception:  # a store that is briefly unreachable: try again a little later
                logging.getLogger(__name__).exception("live feeds: update failed")
                time.sleep(BASE_S)
