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
redraw; the page runs again only when a run starts or ends, which the next feed tells.

Which runs are active is a feed of its own (`FeedWriter.watch_active`), read every TICK_S by the same
thread (one small query) and followed by a frame with nothing to draw: a run started elsewhere (a CLI,
another tab) is on the page within a second, while its worker is still starting. A page that found it
only seconds later (a fragment that ran every 3 s) drew the new card while the run trained: on 2 cores
that cost the run 25 % of its wall time, against 5 % for a run launched from the page itself.
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
ACTIVE_LEASE_S = 600.0  # a page's watch of the active runs lasts this long after its last script run
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


@dataclass
class ActiveWatch:
    """The feed of which runs are active: `watch_active`'s lease (renewed by each page run that draws it) and
    what its file says."""

    file: str
    until: float
    payload: dict[str, Any] = field(default_factory=dict)


class FeedWriter:
    """The feeds of the watched runs: a file per run, written by a thread of the server.

    `watch(run)` starts watching a run (reading all its points so far at once) and returns its feed; the
    thread then brings each feed up to date when it is due — the new points only (`LiveCurves.pull`), the
    figure redrawn in place by `panel(run, curves, figure)`, on the panel's back-off (`Backoff`) — and
    writes it when something changed. A feed is a JSON object: the run's `status`, `progress`
    ({fraction, text}), the figure as plotly JSON (`spec`; before the run's first points `waiting(run)`'s;
    null without a `panel`), `stage(run)` (what of the run's result is published, null without `stage`),
    its `file`, a `version` that grows with every change, `next_s` (when the feed will next be looked at)
    and `final`. A run that ended gets its last feed and is no longer watched.

    `watch_active()` (with a `kind`) starts or renews the feed of which runs of that kind are active:
    `active` (their ids, sorted), `file`, `version`, `next_s` (TICK_S) and `final`, brought up to date at
    every tick until ACTIVE_LEASE_S after the last call; then its last feed is final (its frame asks the
    page to run again, which renews it under a new file). With nothing watched the thread stops.
    """

    def __init__(self, store: Any, folder: Path, *, progress: Callable[[dict[str, Any], Any], tuple[float, str]],
                 panel: Callable[[dict[str, Any], LiveCurves, Any], Any] | None = None,
                 waiting: Callable[[dict[str, Any]], Any] | None = None, to_json: Callable[[Any], str] | None = None,
                 stage: Callable[[dict[str, Any]], Any] | None = None, kind: str | None = None):
        self.store, self.folder, self.kind, self.progress = store, Path(folder), kind, progress
        self.panel, self.waiting, self.to_json, self.stage = panel, waiting, to_json, stage
        self.feeds: dict[str, Feed] = {}
        self.active: ActiveWatch | None = None
        self.leases = 0  # active-runs feeds started so far (each has its own file)
        self.ended: dict[str, float] = {}  # an ended feed's file name -> when the file is removed
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
                self.update(feed, time.monotonic(), self.store.server_now())
            self._start_thread()
            return feed.payload

    def watch_active(self, now: float | None = None) -> dict[str, Any]:
        """Watch which runs of the writer's kind are active for ACTIVE_LEASE_S more (a new feed, read now,
        when there is none); its feed."""
        if self.kind is None:
            raise ValueError("watch_active: this feed writer has no kind of run to watch")
        now = time.monotonic() if now is None else now
        with self.lock:
            if self.active is None:
                self.leases += 1
                self.active = ActiveWatch(f"active-{self.leases}.json", now + ACTIVE_LEASE_S)
                self._update_active(now)
            self.active.until = now + ACTIVE_LEASE_S
            self._start_thread()
            return self.active.payload

    def _update_active(self, now: float) -> None:
        watch = self.active
        final = now >= watch.until
        ids = sorted(r["id"] for r in self.store.list_runs(kind=self.kind, status=list(ACTIVE), limit=50))
        if watch.payload.get("active") != ids or final:
            watch.payload = {"file": watch.file, "active": ids, "version": watch.payload.get("version", 0) + 1,
                             "next_s": TICK_S, "final": final}
            self._write_file(watch.file, watch.payload)
        if final:
            self.active = None
            self.ended[watch.file] = now + ENDED_KEEP_S

    def step(self, now: float | None = None) -> int:
        """Bring every due feed up to date (the active runs, one query; the store's clock, one query; then
        each run's news); returns how many run feeds were due."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self._remove_ended(now)
            if self.active is not None:
                self._update_active(now)
            due = [feed for feed in self.feeds.values() if feed.due <= now]
            if due:
                clock = self.store.server_now()
                for feed in due:
                    self.update(feed, now, clock)
            return len(due)

    def update(self, feed: Feed, now: float, clock: Any) -> None:
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
        seen = (*_progress_state(run), json.dumps(stage))
        changed = bool(new) or seen != feed.seen
        feed.seen = seen
        feed.due = now + feed.backoff.tick(changed)
        if changed or not feed.payload:
            feed.payload = {"run_id": feed.run_id, "file": self.path(feed.run_id).name, "status": run["status"],
                            "stage": stage, "progress": {"fraction": fraction, "text": text}, "spec": feed.spec,
                            "version": feed.payload.get("version", 0) + 1, "final": final}
        feed.payload["next_s"] = feed.backoff.interval
        self._write_file(feed.payload["file"], feed.payload)
        if final:
            del self.feeds[feed.run_id]
            self.ended[feed.payload["file"]] = now + ENDED_KEEP_S

    def _redraw(self, feed: Feed, run: dict[str, Any]) -> int:
        """Pull the run's new points into its figure (or the waiting one before any); how many came."""
        new = feed.curves.pull(self.store)
        if new or feed.figure is None:
            figure = self.panel(run, feed.curves, feed.figure)
            if figure is not None or feed.spec is None:
                shown = figure if figure is not None else self.waiting(run)
                feed.figure, feed.spec = figure, None if shown is None else self.to_json(shown)
        return new

    def _write_file(self, name: str, payload: dict[str, Any]) -> None:
        target = self.folder / name
        staging = target.with_suffix(".tmp")
        staging.write_text(json.dumps(payload))
        os.replace(staging, target)  # a frame never reads half a feed

    def _remove_ended(self, now: float) -> None:
        for name, when in list(self.ended.items()):
            if when <= now and name.removesuffix(".json") not in self.feeds:
                (self.folder / name).unlink(missing_ok=True)
                del self.ended[name]

    def _start_thread(self) -> None:
        if FEED_THREAD and (self.feeds or self.active) and self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="samlab-live-feeds", daemon=True)
            self.thread.start()

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self.lock:
                if not self.feeds and self.active is None:
                    self.thread = None
                    return
            try:
                self.step()
            except Exception:  # a store that is briefly unreachable: try again a little later
                logging.getLogger(__name__).exception("live feeds: update failed")
                time.sleep(BASE_S)
