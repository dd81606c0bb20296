"""Training runs as cards: status, progress with ETA, curves, cancel / resume, log tail, error.

The Train page's runs panel: an active run's card refreshes only its progress and curves (a fragment
that reads the new points, backs off while nothing changes and stops when the run ends); a finished
run's card is drawn once, its figure cached by run id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import figures, live, plots, tables

RESUMABLE = ("cancelled", "failed")


def runs_panel(active: list[dict[str, Any]], finished: list[dict[str, Any]]) -> None:
    """Active runs first (live), then the most recent finished ones. The page re-runs when a run starts or
    ends elsewhere (a CLI, another tab): the first active card's refresh looks, or with no active run a
    small watcher (one fragment run fewer per refresh while a run is watched)."""
    active_ids = {r["id"] for r in active}
    if not active:
        _watch(active_ids)
    runs = active + finished
    if not runs:
        ui.empty_state("No runs yet — fill the form above and press Launch.")
        return
    labels = ui.run_labels(runs)
    now = ui.get_store().server_now()
    st.caption(f"{len(active)} active · the {len(finished)} most recent finished · active runs refresh "
               f"every {live.BASE_S:g}–{live.MAX_S:g} s, slower while nothing changes")
    for index, run in enumerate(runs):
        # keyed by run: when a card is added above or removed, the browser keeps the others (their charts
        # are not drawn again); unkeyed, every card below the change would be rebuilt from scratch
        with st.container(key=f"run-card-{run['id']}"):
            run_card(run, labels[run["id"]], now, expanded=index < 2 or run["status"] in ui.ACTIVE,
                     watch=active_ids if index == 0 else None)


def _runs_changed(active_ids: set[str]) -> bool:
    """Whether the active runs are no longer `active_ids` (one small query)."""
    return {r["id"] for r in ui.list_runs(kind="train", status=list(ui.ACTIVE), limit=50)} != active_ids


def _watch(active_ids: set[str]) -> None:
    @st.fragment(run_every=live.WATCH_S)
    def watcher() -> None:
        if _runs_changed(active_ids):
            st.rerun()

    watcher()


def run_card(run: dict[str, Any], label: str, now: datetime | None, *, expanded: bool,
             watch: set[str] | None = None) -> None:
    """Draw one run: header, progress, curves, buttons, log tail and error. An active card with `watch`
    (the active run ids the page was drawn with) also re-runs the page when they change."""
    title = f"{ui.status_label(run['status'])} · {label} · `{run['id']}`"
    with st.expander(title, expanded=expanded):
        if run["status"] in ui.ACTIVE:
            _live_progress_and_curves(run, watch)
        else:
            fraction, text = ui.progress_text(run, now)
            st.progress(fraction, text=text)
        if run.get("error") and run["status"] in ("failed", "diverged"):
            st.error(f"This run {run['status']}:\n\n```\n{_tail(run['error'])}\n```", icon=ui.ICON_ERROR)
        _buttons(run)
        if run["status"] not in ui.ACTIVE:
            _finished_curves(run)
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


def _live_progress_and_curves(run: dict[str, Any], watch: set[str] | None) -> None:
    """The part of an active run's card that changes: a fragment that reads only what is new."""
    key = f"live.{run['id']}.{run.get('attempts', 0)}"
    state = st.session_state.setdefault(key, {"curves": live.LiveCurves(run["id"]), "backoff": live.Backoff(),
                                              "figure": None, "waiting": None, "seen": None})

    @st.fragment(run_every=state["backoff"].interval)
    def refresh() -> None:
        store = ui.get_store()
        current = store.get_run(run["id"])
        if current["status"] != run["status"] or (watch is not None and _runs_changed(watch)):
            st.rerun()  # started or ended: the page redraws the card (an ended run stops refreshing)
        new = state["curves"].pull(store)
        fraction, text = ui.progress_text(current, store.server_now())
        st.progress(fraction, text=text)
        if new or state["figure"] is None:
            state["figure"] = panel_figure(current, state["curves"].view(), state["figure"])
        if state["figure"] is None and state["waiting"] is None:
            # before the first metrics, the panel's empty axes: the chart is set up while the worker starts
            state["waiting"] = plots.waiting_panel_figure(current)
        shown = state["figure"] or state["waiting"]
        if shown is None:
            st.caption("no metrics yet")
        else:
            ui.show_live_figure(shown, key=f"run-panel.{run['id']}")
        seen = (current.get("progress"), current.get("progress_message"))
        changed = bool(new) or seen != state["seen"]
        state["seen"] = seen
        interval = state["backoff"].interval
        if state["backoff"].tick(changed) != interval:
            st.rerun()  # the page defines the fragment again with the new interval

    refresh()


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


def _finished_curves(run: dict[str, Any]) -> None:
    figure = finished_run_figure(run["id"], run.get("finished_at"), int(run.get("attempts") or 0))
    if figure is None:
        st.caption("no metrics recorded")
        return
    # the same chart as a live card's: the browser has plotly.js loaded once for all the page's cards
    ui.show_live_figure(figure, key=f"run-panel.{run['id']}")


def _tail(text: str, n: int = 12) -> str:
    lines = str(text).strip().splitlines()
    return "\n".join(lines[-n:])
