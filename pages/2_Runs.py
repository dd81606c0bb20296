"""Runs: filter and select runs, overlay their curves, compare them in a table and in parallel
coordinates, export their metrics, delete them. The view (selection, metric, axes) lives in the URL."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui
from dashboard import figures, plots, tables

ui.page_setup("Runs", "Compare training runs: curves on shared axes, final scores, hyperparameters.")

X_OPTIONS = list(figures.X_AXES)
DEFAULT_METRIC = "epoch.test_acc"
MAX_DEFAULT_SELECTION = 5

params = ui.ViewParams(st.query_params, prefix="runs")

all_runs = ui.list_runs(kind="train", limit=5000)
if not all_runs:
    ui.empty_state("No runs yet — launch one on the Train page.", page=ui.TRAIN_PAGE, link_label="Go to Train")
    st.stop()

table = tables.summary_table(
    [{**r, "config": ui.run_config(r) or r["params"], "group": r.get("group_id")} for r in all_runs]
)
labels = ui.run_labels(all_runs)
table.insert(1, "label", table["id"].map(labels))
table["config"] = table["id"].map(ui.run_details(all_runs))  # the full config behind the short label

# -- filters ------------------------------------------------------------------------------------------
with st.container(border=True):
    cols = st.columns([2, 2, 2, 2, 3])
    status = params.multiselect(cols[0], "status", "status", sorted(table["status"].unique()))
    method = params.multiselect(cols[1], "method", "method", sorted(table["method"].dropna().unique()))
    dataset = params.multiselect(cols[2], "dataset", "dataset", sorted(table["dataset"].dropna().unique()))
    group = params.multiselect(cols[3], "group", "group", sorted(g for g in table["group"].unique() if g))
    text = params.text_input(cols[4], "search (name, id, any config value)", "q")

filtered = table
for column, chosen in (("status", status), ("method", method), ("dataset", dataset), ("group", group)):
    if chosen:
        filtered = filtered[filtered[column].isin(chosen)]
if text:
    matching = {r["id"] for r in ui.list_runs(kind="train", text=text, limit=5000)}
    filtered = filtered[filtered["id"].isin(matching) | filtered["label"].str.contains(text, case=False, regex=False)]

if filtered.empty:
    st.info("No run matches these filters — clear some of them.", icon=ui.ICON_INFO)
    st.stop()

# -- selection ----------------------------------------------------------------------------------------
ids = filtered["id"].tolist()
default_ids = [i for i in ids if i in set(filtered[filtered["status"] == "completed"]["id"])][:MAX_DEFAULT_SELECTION]
selected = params.multiselect(st, "runs to compare", "runs", ids, default=default_ids or ids[:1],
                              format_func=labels.get)
st.caption(ui.LABEL_HELP)
selected_runs = [r for r in all_runs if r["id"] in selected]

# -- overlay ------------------------------------------------------------------------------------------
st.subheader("Curves")
if not selected:
    st.info("Select runs above to overlay their curves.", icon=ui.ICON_INFO)
else:
    names = ui.get_store().metric_names(selected)
    choices = tables.metric_choices(names)
    if not choices:
        st.info("The selected runs have no metrics yet.", icon=ui.ICON_INFO)
    else:
        cols = st.columns([3, 2, 2, 1, 1])
        metric = params.selectbox(cols[0], "metric", "metric", choices,
                                  default=DEFAULT_METRIC if DEFAULT_METRIC in choices else choices[0],
                                  format_func=tables.metric_choice_label)
        x = params.radio(cols[1], "x axis", "x", X_OPTIONS, default="epoch")
        smoothing = params.slider(cols[2], "smoothing (EMA weight)", "smooth", 0.0, 0.99, default=0.0, step=0.01)
        log_y = params.toggle(cols[3], "log y", "log")
        grouped = params.toggle(cols[4], "group seeds", "group_seeds",
                                help="runs that differ only in seed: their mean ± std band and seed count")
        kind, name = tables.split_metric_key(metric)
        metrics = ui.load_run_metrics(selected_runs, names=[name], kind=kind, max_points=2000)
        times = ui.metric_times(selected) if x == "time" else None
        curves, task = plots.run_curves(selected_runs, metrics, metric, x, labels=ui.run_labels(selected_runs),
                                        times=times)
        if curves and grouped:
            configs = {i: ui.run_config(r) for r in selected_runs if (i := r["id"]) in curves}
            details = ui.run_details(selected_runs)
            bands = figures.seed_bands(tables.seed_groups(configs), curves, details)
            ui.show_figure(figures.band_figure(bands, metric=name, x=x, log_y=log_y, task=task), key="runs.bands")
            st.caption("Runs that differ only in seed form one group: the line is their mean, the band ± one sample "
                       "standard deviation across seeds, the legend gives the seed count.")
        elif curves:
            ui.show_figure(figures.curves_figure(list(curves.values()), metric=name, x=x, smoothing=smoothing,
                                                 log_y=log_y, task=task), key="runs.curves")
        else:
            st.info(f"No {metric} values for the selected runs on this axis yet.", icon=ui.ICON_INFO)

# -- summary table -------------------------------------------------------------------------------------
st.subheader("Summary")
st.caption("Click a column header to sort. Accuracies in %, gap = final train − test accuracy (points).")
column_config = {
    "id": st.column_config.TextColumn("id", width="small"),
    "label": st.column_config.TextColumn("run", width="medium", help=ui.LABEL_HELP),
    "config": st.column_config.TextColumn("config", width="large", help="every hyperparameter of the run"),
    **{key: st.column_config.NumberColumn(title, format="%.2f")
       for key, title in figures.COLUMN_TITLES.items() if key != "wall_time"},
    "wall_time": st.column_config.NumberColumn("wall time (s)", format="%.1f"),
    "final_test_loss": st.column_config.NumberColumn("final test loss", format="%.4f"),
    "gap_loss": st.column_config.NumberColumn("gap test−train loss", format="%.4f"),
}
shown = filtered.drop(columns=[c for c in ("name",) if c in filtered.columns])
st.dataframe(shown, hide_index=True, column_config=column_config, key="runs.table")

# -- parallel coordinates -------------------------------------------------------------------------------
st.subheader("Hyperparameters against final test accuracy")
scored = filtered[filtered["final_test_acc"].notna()]
if len(scored) < 2:
    st.info("Needs at least two finished runs with a test accuracy among the filtered runs.", icon=ui.ICON_INFO)
else:
    dims = ["method", "dataset", "model", "rho", "m", "lam", "lr", "batch_size", "label_noise", "n_train",
            "weight_decay", "width", "epochs", "seed"]
    ui.show_figure(figures.parallel_coordinates_figure(scored, dims, color="final_test_acc"), key="runs.parcoords")

# -- export and delete ----------------------------------------------------------------------------------
st.subheader("Export and delete")
cols = st.columns(2, gap="large")
with cols[0]:
    if selected:
        st.download_button("Download metrics of the selected runs (CSV)", ui.metrics_csv(selected, labels),
                           file_name="samlab-metrics.csv", mime="text/csv")
        st.download_button("Download the summary table (CSV)",
                           shown[shown["id"].isin(selected)].to_csv(index=False),
                           file_name="samlab-summary.csv", mime="text/csv")
    else:
        st.caption("Select runs to export their metrics.")
with cols[1]:
    deletable = [i for i in selected if table.set_index("id").at[i, "status"] not in ui.ACTIVE]
    if not deletable:
        st.caption("Select finished runs to delete them (cancel active runs first).")
    else:
        st.markdown(f"Delete the {len(deletable)} selected finished run(s) and their files "
                    "(checkpoints, logs)?")
        confirm = st.checkbox("Yes, delete them permanently", key="runs.confirm_delete")
        if st.button("Delete", type="primary", disabled=not confirm, key="runs.delete"):
            removed = []
            for run_id in deletable:
                try:
                    ui.delete_run(run_id)
                    removed.append(run_id)
                except ValueError as err:
                    ui.show_exception(err, f"Delete {run_id}")
            del st.session_state["runs.confirm_delete"]
            st.success(f"Deleted {len(removed)} run(s).")
            st.rerun()

params.sync()
