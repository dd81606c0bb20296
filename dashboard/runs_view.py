"""Training runs as cards: status, progress with ETA, curves, cancel / resume, log tail, error.

The Train page's runs panel: an active run's progress and curves follow the run's live feed in their
frame (`live.FeedWriter`: the server reads only the new points, backs off while nothing changes and stops
when the run ends; no script runs meanwhile); a finished run's card is drawn once, its figure cached by
run id; the page runs again when the feed of the active runs (`FeedWriter.watch_active`) changes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import figures, live, plots, tables

RESUMABLE = ("cancelled", "failed")
LIVE_LABEL = ":blue[:material/sensors: live]"  # an active run's card title


def runs_panel(active: list[dict[str, Any]], finished: list[dict[str, Any]]) -> None:
    """The active runs (live), then the most recent finished ones, each newest first (as the store lists
    them). The page runs again when a run starts or ends, here or elsewhere (a CLI, another tab): a frame
    follows the feed of the active runs."""
    _watch_active([r["id"] for r in active])
    if not active and not finished:
        ui.empty_state("No runs yet — fill the form above and press Launch.")
        return
    labels = ui.run_labels(active + finished)
    now = ui.get_store().server_now()
    st.caption(f"{len(active)} active · the {len(finished)} most recent finished · active runs refresh "
               f"every {live.BASE_S:g}–{live.MAX_S:g} s, slower while nothing changes")
    # Each card is keyed by its run: when a card is added or removed, the browser keeps the others (their
    # charts are not drawn again). The active and the finished cards are in two containers, so that no
    # card ever moves among its siblings: a chart frame moved in the page is loaded again with a window
    # that Streamlit never listens to (it registers a frame's window once), and stays blank. A run that
    # ends leaves one container and gets a new card in the other.
    for group, runs, first in (("active", active, 0), ("finished", finished, len(active))):
        with st.container(key=f"train-{group}-cards"):
            for index, run in enumerate(runs, start=first):
                with st.container(key=f"run-card-{run['id']}"):
                    run_card(run, labels[run["id"]], now, expanded=index < 2 or group == "active")


def _watch_active(active_ids: list[str]) -> None:
    """A frame with nothing to draw that runs the page again when the active runs are no longer these."""
    writer = feed_writer(ui.store_url())
    ui.show_live_feed(writer.watch_active(), writer.folder, key="train-active-runs", active=sorted(active_ids))


def run_card(run: dict[str, Any], label: str, now: datetime | None, *, expanded: bool) -> None:
    """Draw one run: header, progress, curves, buttons, log tail and error."""
    # an active card's status (queued, running) is in its live frame, which changes it without a script run
    status = LIVE_LABEL if run["status"] in ui.ACTIVE else ui.status_label(run["status"])
    title = f"{status} · {label} · `{run['id']}`"
    with st.expander(title, expanded=expanded):
        # the chart's frame, with the progress line in it, comes first in both states: a card looks the same
        # live and finished
        if run["status"] in ui.ACTIVE:
            _live_progress_and_curves(run)
        else:
            _finished_progress_and_curves(run, now)
        if run.get("error") and run["status"] in ("failed", "diverged"):
            st.error(f"This run {run['status']}:\n\n```\n{_tail(run['error'])}\n```", icon=ui.ICON_ERROR)
        _buttons(run)
        with st.popover("log tail", use_container_width=False):
            st.code(ui.log_tail(run, lines=30), language=None)


def _buttons(run: dict[str, Any]) -> None:
    cols = st.columns([1, 1, 6])
    cancel = run["status"] in ui.ACTIVE and cols[0].button(
        "Cancel", key=f"cancel.{run['id']}", help="graceful stop: checkpoint, then status cancelled")
    resume = run["status"] in RESUMABLE and cols[1].button(
        "Resume", key=f"resume.{run['id']}", help="continue from the last checkpoint")
    if cancel:
        _act(lambda: ui.cancel_run(run["id"]), "Cancel")
    if resume:
        _act(lambda: ui.resume_run(run["id"]), "Resume")


def _act(action, what: str) -> None:
    try:
        message = action()
    except ValueError as err:
        ui.show_exception(err, what)
        return
    st.toast(message or f"{what}: done")


def _live_progress_and_curves(run: dict[str, Any]) -> None:
    """The part of an active run's card that changes — status, progress and curves — in a frame that
    follows the run's feed by itself (`live.FeedWriter`), with no script run until the run ends."""
    writer = feed_writer(ui.store_url())
    # the active runs' frame runs the page again when the run ends
    ui.show_live_feed(writer.watch(run), writer.folder, key=f"run-panel.{run['id']}", rerun_at_end=False)


@st.cache_resource(show_spinner=False)
def feed_writer(store_url: str) -> live.FeedWriter:
    """The server's writer of the Train page's live feeds (one per store, shared by every session)."""
    from dashboard import live_chart

    store = ui.get_store()
    return live.FeedWriter(store, live_chart.feeds_folder(), progress=ui.feed_progress(store), panel=_feed_panel,
                           waiting=plots.waiting_panel_figure, to_json=live_chart.figure_json, kind="train")


def _feed_panel(run: dict[str, Any], curves: live.LiveCurves, figure):
    return panel_figure(run, curves.view(), figure)


def panel_figure(run: dict[str, Any], metrics, figure=None):
    """A train run's panel figure (`plots.panel_figure`); `figure`, the one drawn before for the same
    run, gets the new data in place when it can. None without metrics or a config."""
    cfg = tables.run_config(run)
    if figure is not None and cfg is not None and not metrics.empty:
        spe = tables.steps_per_epoch(cfg)
        if figures.refresh_run_panel(figure, tables.wide_metrics(metrics, run["id"], "step", spe=spe),
                                     tables.wide_metrics(metrics, run["id"], "epoch", spe=spe), x="step",
                                     perturbs=plots.perturbs(cfg)):
            return figure
    return plots.panel_figure(run, metrics, x="step")


@st.cache_resource(max_entries=64, show_spinner=False)
def finished_run_figure(run_id: str, finished_at: datetime | None, attempts: int):
    """The figure of a finished run, built once: finished runs never change (a resumed run is
    another attempt, so another cache entry)."""
    run = ui.get_store().get_run(run_id)
    return panel_figure(run, ui.load_metrics([run_id], max_points=plots.PANEL_MAX_POINTS))


def _finished_progress_and_curves(run: dict[str, Any], now: datetime | None) -> None:
    fraction, text = ui.progress_text(run, now)
    figure = finished_run_figure(run["id"], run.get("finished_at"), int(run.get("attempts") or 0))
    if figure is None:
        st.progress(fraction, text=text)
        st.caption("no metrics recorded")
        return
    # the same frame as the live card's, with its progress line: the browser has plotly.js loaded once
    ui.show_live_figure(figure, key=f"run-panel.{run['id']}", progress={"fraction": fraction, "text": text})


def _tail(text: str, n: int = 12) -> str:
    lines = str(text).strip().splitlines()
    return "\n".join(lines[-n:])
