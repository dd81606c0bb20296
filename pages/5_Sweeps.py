"""Sweeps: launch a grid of runs over m × ρ × seeds × methods, or an adaptive search of ρ per m (one
Optuna study per m), follow it as a whole, and read the aggregated m-sharpness views."""

from __future__ import annotations

import json

import streamlit as st

from dashboard import common as ui
from dashboard import msharp_view as view
from dashboard import search_panel
from dashboard.msharp_panel import noise_and_sharpness_panel
from samlab import sweeps
from samlab.config import PRESETS, preset
from samlab.runs import jobs
from samlab.runs import sweeps as sweep_runs
from samlab.runs.executors import backend_name

ui.page_setup(
    "Sweeps",
    "Groups of runs over m (samples per perturbation) × ρ × seeds × methods, run several to a process, "
    "aggregated with ρ tuned per m.",
)
params = ui.ViewParams(st.query_params, prefix="sweeps")
# Four ρ per m on one √2 ladder, shifted down as m shrinks (the best ρ of normalised m-SAM falls with m);
# m = 64 is SAM on the digits-cnn-msharp preset.
DEFAULT_RHOS_BY_M = {64: [0.2, 0.28, 0.4, 0.56], 32: [0.14, 0.2, 0.28, 0.4], 8: [0.1, 0.14, 0.2, 0.28],
                     2: [0.05, 0.07, 0.1, 0.14]}
store = ui.get_store()
mode = params.radio(st, "mode", "mode", ["grid", "adaptive search"], default="grid")


def results(group: str, *, grid: bool) -> None:
    """The best-ρ-per-m views of a group of runs (a grid sweep, or a search's trials)."""
    tables = sweeps.aggregate(store, group)
    first = store.get_run(tables.runs.iloc[0]["run_id"])
    config = ui.run_config(first)
    error = params.toggle(st, "show test error instead of accuracy", "error", default=False)
    st.subheader("Accuracy against m (best ρ per m)")
    ui.show_figure(view.accuracy_vs_m_figure(tables.best_by_m, tables.references, error=error), key="sweeps.acc")
    st.caption(view.seeds_caption(tables, config))
    st.markdown(view.trend_sentence(tables.best_by_m))
    paired = sweeps.paired_differences(tables)
    st.markdown(view.claims_sentence(paired, regression=tables.regression))
    if not paired.empty:
        st.caption("Paired by seed against the largest m (SAM), the ghost-BatchNorm control (diamonds: BatchNorm "
                   "per micro-batch, one perturbation) beside m-SAM: ghost-BN − SAM is the normalisation effect, "
                   "m-SAM − ghost-BN the perturbation effect.")
        ui.show_figure(view.paired_figure(paired, regression=tables.regression), key="sweeps.paired")
    c = st.columns(2) if grid else [st.container()]
    if grid:
        with c[0]:
            st.subheader("m × ρ")
            ui.show_figure(view.heatmap_figure(tables.heatmap), key="sweeps.heat")
    with c[-1]:
        st.subheader("Generalization gap against m")
        ui.show_figure(view.gap_figure(tables.best_by_m), key="sweeps.gap")
    with st.expander("tables"):
        st.markdown("**best ρ per m**")
        st.dataframe(tables.best_by_m, hide_index=True)
        st.markdown("**references**")
        st.dataframe(tables.references, hide_index=True)
        st.markdown("**paired by seed against the largest m** (mean ± SE of the per-seed differences)")
        st.dataframe(view.paired_se_table(paired, regression=tables.regression), hide_index=True)
        st.markdown("**runs**")
        st.dataframe(tables.runs, hide_index=True)
    # -- tr V and m-sharpness of the trained models
    st.subheader("tr V and m-sharpness against m")
    st.caption("Per trained model: gradient noise and S_m, measured by an `msharp` background run.")
    done = tables.runs[(tables.runs["status"] == "completed")]
    choices = {f"{r['method']} m={r['m']:g} ρ={r['rho']:g} seed={r['seed']}": r["run_id"] for _, r in done.iterrows()}
    picked = st.multiselect("models", list(choices), default=list(choices)[:2], key="sweeps.models")
    noise_and_sharpness_panel({label: store.get_run(choices[label]) for label in picked}, key="sweeps.msharp")


if mode == "adaptive search":
    search_panel.launch_form(params, "digits-cnn-msharp")  # accuracy is the objective: a classification preset
    search_id = search_panel.pick(params, store)
    if search_id is None:
        params.sync()
        st.stop()
    search_panel.live_panel(search_id, store)
    if store.list_runs(group=search_id, limit=1):
        results(search_id, grid=False)
    params.sync()
    st.stop()

# -- launch ------------------------------------------------------------------------------------------------
with st.expander("Launch a sweep", expanded=False):
    c = st.columns(3)
    preset_name = params.selectbox(c[0], "base preset", "preset", sorted(PRESETS), default=sweeps.CONTROL_PRESET)
    name = c[1].text_input("sweep name", value=f"{preset_name} sweep", key="sweeps.name")
    overrides_text = c[2].text_input("overrides (JSON, dotted keys)", value="{}", key="sweeps.overrides",
                                     help='e.g. {"epochs": 5, "data.label_noise": 0.1}')
    c = st.columns(4)
    methods = c[0].multiselect("methods", list(sweeps.SWEEP_METHODS), default=["sgd", "sam", "msam", "nsam"],
                               key="sweeps.methods",
                               help="ghostbn: the BatchNorm control, statistics per micro-batch of m with SAM's "
                                    "single perturbation (runs at each m, on SAM's ρ grid)")
    ms_text = c[1].text_input("m values (msam, ghostbn)", value="32, 8, 2", key="sweeps.ms")
    rhos_text = c[2].text_input("ρ values", value="0.1, 0.2, 0.4, 0.8", key="sweeps.rhos",
                                help="for n-SAM, RW-SAM and every m without its own grid below")
    seeds = int(c[3].number_input("seeds", min_value=1, max_value=32, value=5, key="sweeps.seeds"))
    c = st.columns([3, 1])
    rhos_by_m_text = c[0].text_input(
        "ρ per m (JSON: m → list of ρ; m = the batch size is SAM)", key="sweeps.rhos_by_m",
        value=json.dumps({str(m): r for m, r in DEFAULT_RHOS_BY_M.items()}),
        help="the best ρ falls as m shrinks: give each m a grid around its own optimum ({} for none)")
    lam = c[1].number_input("RW-SAM λ", min_value=0.0, value=5.0, key="sweeps.lam")
    error_slot = st.empty()
    try:
        base = preset(preset_name, json.loads(overrides_text or "{}"))
        spec = sweeps.SweepSpec(base, ms=[int(v) for v in ms_text.replace(",", " ").split()],
                                rhos=[float(v) for v in rhos_text.replace(",", " ").split()],
                                seeds=list(range(seeds)), methods=methods, lam=lam, name=name,
                                rhos_by_m=view.parse_rhos_by_m(rhos_by_m_text))
        configs = sweeps.sweep_configs(spec)
        st.caption(f"{len(configs)} runs; m = {base.batch_size} (the batch) is plain SAM.")
        if st.button("Launch", type="primary", key="sweeps.launch"):
            group = sweep_runs.submit(spec, store=store)
            st.query_params["sweeps.group"] = group
            st.rerun()
    except (ValueError, json.JSONDecodeError) as err:
        ui.field_error(error_slot, str(err))

# -- pick a sweep ------------------------------------------------------------------------------------------
searches = {s["id"] for s in store.list_searches()}  # shown in the adaptive-search mode
groups = {gid: label for gid, label in jobs.sweeps(store).items() if gid not in searches}
if not groups:
    ui.empty_state("No sweeps yet: launch one above.")
    st.stop()
labels = {gid: f"{label} ({gid})" for gid, label in groups.items()}
default = st.query_params.get("sweeps.group", next(iter(groups)))
group = st.selectbox("sweep", list(groups), index=list(groups).index(default) if default in groups else 0,
                     format_func=labels.get, key="sweeps.group_pick")


@ui.live_while_active(3.0, key=f"sweeps.active.{group}")
def progress_panel() -> bool:
    state = sweep_runs.progress(group, store=store)
    st.progress(state["fraction"], text=f"{state['finished']} / {state['total']} runs finished · "
                                         f"{state['counts']['running']} running · {state['counts']['queued']} queued")
    if state["finished"] and state["runs_per_minute"] == state["runs_per_minute"]:
        st.caption(f"{state['runs_per_minute']:.1f} runs per minute so far · failed {state['counts']['failed']}, "
                   f"diverged {state['counts']['diverged']}, cancelled {state['counts']['cancelled']}")
    if not state["done"]:
        cols = st.columns(2)
        if cols[0].button("Cancel the sweep", key="sweeps.cancel"):
            sweep_runs.cancel(group, store=store)
        if backend_name() == "local" and cols[1].button(
            "Start sweep workers", key="sweeps.workers",
            help="for queued runs whose workers are gone (e.g. after a restart)",
        ):
            sweep_runs.start_workers(group, store=store)
    return not state["done"]


progress_panel()

results(group, grid=True)
params.sync()
