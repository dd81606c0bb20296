"""The Sweeps page's "adaptive search" mode: launch a search, pick one, follow it live."""

from __future__ import annotations

import json
from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import search_view
from samlab.config import PRESETS, preset
from samlab.runs import search as search_runs
from samlab.runs.store import Store
from samlab.search import SearchSpec, last_epoch_means, parse_range


def launch_form(params: ui.ViewParams, default_preset: str) -> None:
    """The form of a new search: base preset, m values, ranges, budget, seeds, trials in flight."""
    with st.expander("Launch an adaptive search", expanded=False):
        st.caption("One Optuna study per m (TPE sampler, seeded): each trial samples ρ log-uniformly (and the "
                   "learning rate / weight decay when a range is given) and trains one run per seed; a median "
                   "pruner stops trials whose mean test accuracy falls behind earlier trials at the same epoch.")
        c = st.columns(3)
        preset_name = params.selectbox(c[0], "base preset", "search_preset", sorted(PRESETS), default=default_preset)
        name = c[1].text_input("search name", value=f"{preset_name} search", key="search.name")
        overrides_text = c[2].text_input("overrides (JSON, dotted keys)", value="{}", key="search.overrides")
        c = st.columns(4)
        ms_text = c[0].text_input("m values", value="64, 8, 2", key="search.ms",
                                  help="one study each; m = the batch size is plain SAM")
        rho_text = c[1].text_input("ρ range (log-uniform)", value="0.01:1", key="search.rho")
        lr_text = c[2].text_input("learning-rate range (optional)", value="", key="search.lr")
        wd_text = c[3].text_input("weight-decay range (optional)", value="", key="search.wd")
        c = st.columns(5)
        trials = int(c[0].number_input("trials per m", min_value=1, max_value=1000, value=12, key="search.trials"))
        seeds = int(c[1].number_input("seeds per trial", min_value=1, max_value=32, value=1, key="search.seeds"))
        parallel = int(c[2].number_input("trials in flight", min_value=1, max_value=256, value=2,
                                         key="search.parallel"))
        sampler_seed = int(c[3].number_input("sampler seed", min_value=0, value=0, key="search.sampler_seed"))
        prune = c[4].toggle("median pruner", value=True, key="search.prune")
        error_slot = st.empty()
        try:
            spec = SearchSpec(preset(preset_name, json.loads(overrides_text or "{}")),
                              ms=[int(v) for v in ms_text.replace(",", " ").split()],
                              rho=parse_range("ρ range", rho_text), lr=parse_range("learning-rate range", lr_text),
                              weight_decay=parse_range("weight-decay range", wd_text), trials=trials,
                              seeds=list(range(seeds)), parallel=parallel, name=name, sampler_seed=sampler_seed,
                              prune=prune).validate()
            st.caption(f"at most {spec.trials * len(spec.ms) * len(spec.seeds)} runs "
                       f"({spec.trials} trials × {len(spec.ms)} m × {len(spec.seeds)} seeds).")
            if st.button("Launch the search", type="primary", key="search.launch"):
                st.session_state[params.key("search")] = search_runs.submit(spec, store=ui.get_store())
                st.rerun()
        except (ValueError, json.JSONDecodeError) as err:
            ui.field_error(error_slot, str(err))


def pick(params: ui.ViewParams, store: Store) -> str | None:
    """The search to show (from the URL, else the newest); None with an empty state when there is none."""
    searches = store.list_searches()
    if not searches:
        ui.empty_state("No adaptive searches yet: launch one above.")
        return None
    labels = {s["id"]: f"{s['name']} ({s['id']}, {s['status']})" for s in searches}
    return params.selectbox(st, "search", "search", list(labels), default=searches[0]["id"],
                            format_func=labels.get)


def live_panel(search_id: str, store: Store) -> None:
    """Progress, controls, the best ρ per m so far and the trial history; refreshed every 3 s while the
    search runs."""

    @ui.live_while_active(3.0, key=f"search.active.{search_id}")
    def panel() -> bool:
        state = search_runs.progress(search_id, store=store)
        _progress(state)
        _controls(search_id, state, store)
        history = state["history"]
        st.dataframe(search_view.best_table(state["best"]), hide_index=True)
        c = st.columns(2)
        with c[0]:
            st.markdown("**Objective against ρ, per m**")
            ui.show_figure(search_view.objective_vs_rho_figure(history, last_epoch_means(store, search_id)),
                           key="search.objective")
        with c[1]:
            st.markdown("**Best so far, per trial**")
            ui.show_figure(search_view.best_so_far_figure(history), key="search.best")
        with st.expander("trial history"):
            st.dataframe(history, hide_index=True)
        return not state["done"]

    panel()


def _progress(state: dict[str, Any]) -> None:
    counts = state["counts"]
    fraction = state["trials_finished"] / max(1, state["trials_budget"])
    st.progress(min(1.0, fraction), text=f"search {state['status']}: {state['trials_finished']} / "
                f"{state['trials_budget']} trials finished · runs: {counts['running']} running, "
                f"{counts['queued']} queued, {counts['completed']} completed, {counts['pruned']} pruned")
    if state["status"] == "running" and not state["driver_alive"]:
        st.warning("The search's driver is not running (its process ended or its heartbeat is stale): "
                   "resume it to continue.", icon=ui.ICON_WARNING)
    if state["error"]:
        st.error(state["error"].splitlines()[0], icon=ui.ICON_ERROR)


def _controls(search_id: str, state: dict[str, Any], store: Store) -> None:
    cols = st.columns(2)
    if state["status"] == "running" and cols[0].button("Cancel the search", key="search.cancel"):
        search_runs.cancel(search_id, store=store)
    resumable = state["status"] in ("cancelled", "failed") or not state["driver_alive"]
    if state["status"] != "completed" and resumable and cols[1].button(
            "Resume the search", key="search.resume", help="a new driver continues; finished trials are kept"):
        try:
            search_runs.resume(search_id, store=store)
        except ValueError as err:
            ui.show_exception(err, "Not resumed")
