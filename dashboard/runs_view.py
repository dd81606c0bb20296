"""One training run as a card: status, progress with ETA, live curves, cancel / resume, log tail, error.

Used by the Train page's live panel (inside a fragment that re-runs every few seconds).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import figures, tables
from samlab.optim.perturbations import METHOD_RULES

RESUMABLE = ("cancelled", "failed")


def run_card(run: dict[str, Any], label: str, now: datetime | None, *, expanded: bool) -> None:
    """Draw one run: header, progress, curves, buttons, log tail and error."""
    title = f"{ui.status_label(run['status'])} · {label} · `{run['id']}`"
    with st.expander(title, expanded=expanded):
        fraction, text = ui.progress_text(run, now)
        st.progress(fraction, text=text)
        if run.get("error") and run["status"] in ("failed", "diverged"):
            st.error(f"This run {run['status']}:\n\n```\n{_tail(run['error'])}\n```", icon=ui.ICON_ERROR)
        _buttons(run)
        _curves(run)
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


def _curves(run: dict[str, Any]) -> None:
    cfg = ui.run_config(run)
    metrics = ui.load_metrics([run["id"]], max_points=600)
    if metrics.empty or cfg is None:
        st.caption("no metrics yet" if run["status"] in ui.ACTIVE else "no metrics recorded")
        return
    spe = tables.steps_per_epoch(cfg)
    step = tables.wide_metrics(metrics, run["id"], "step", spe=spe)
    epoch = tables.wide_metrics(metrics, run["id"], "epoch", spe=spe)
    task = tables.data_task(cfg)
    perturbs = METHOD_RULES[cfg.optim.method] is not None  # SGD's sharpness proxy is 0 by definition
    ui.show_figure(figures.run_panel_figure(step, epoch, task=task, x="step", perturbs=perturbs),
                   key=f"panel.{run['id']}")


def _tail(text: str, n: int = 12) -> str:
    lines = str(text).strip().splitlines()
    return "\n".join(lines[-n:])
