"""Figures of stored runs and analyses: read the store, call the dashboard's builders. No streamlit, so
a notebook draws exactly what the pages draw:

    curves(run_ids, metric="epoch.test_acc", *, x="epoch", smoothing=0.0, log_y=False, store=None)
        the Runs page's overlay (metric = "epoch.<name>" or "step.<name>", x = step | epoch | time)
    run_panel(run_id, *, x="step", store=None)    the Train page's live panel of one run
    live(run_id, seconds, *, every=2.0, store=None) -> status
        redraw a run's panel in a notebook cell until it finishes or `seconds` pass, whichever is first
    hessian_spectrum(analysis_ids, *, store=None), hessian_density(analysis_ids, *, log_scale=True, store=None)
    landscape(analysis_id, *, index=0, style="contour", log_scale=False, store=None)
    m_sharpness(analysis_ids, *, store=None)     S_m against m of "msharp" analyses
    stability_plane(analysis_id, *, marker=None, store=None)   the (B, σ) plane of a "stability" grid

`run_ids` / `analysis_ids` are one id, several, a unique prefix of each, or a `samlab.runs_table` frame.
An analysis is a background run of that kind (`samlab.submit(params, kind="hessian")`, ...); a partial
result draws what is there. Analyses are labelled like the pages label them: by the hyperparameters that
tell their trained runs apart. `run_curves` and `panel_figure` are the pure steps the pages share.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from dashboard import figures, hessian_view, landscape_view, msharp_view, stability_view, tables
from samlab.checkpoints import checkpoint_of
from samlab.config import RunConfig
from samlab.notebook import DASHBOARD_MAX_POINTS, resolve_ids
from samlab.optim.perturbations import METHOD_RULES
from samlab.runs.store import FINAL, Store, open_store

PANEL_MAX_POINTS = 600  # points per curve of a run's live panel
LANDSCAPE_STYLES = ("contour", "surface")

Ids = str | Sequence[str] | pd.DataFrame


# -- training curves ------------------------------------------------------------------------------------
def run_curves(runs: Sequence[Mapping[str, Any]], metrics: pd.DataFrame, key: str, x: str, *,
               labels: Mapping[str, str], times: pd.DataFrame | None = None
               ) -> tuple[dict[str, figures.Curve], str | None]:
    """The curves of `key` ("epoch.test_acc") of train runs against x, and their common task (None when
    they mix classification and regression); runs without a config or without values are left out."""
    curves, details = {}, tables.run_details(runs)
    for run in runs:
        cfg = tables.run_config(run)
        if cfg is None:
            continue
        cx, cy = tables.curve_xy(metrics, run["id"], key, x, spe=tables.steps_per_epoch(cfg), times=times)
        if len(cx):
            curves[run["id"]] = figures.Curve(labels[run["id"]], cx, cy, {"config": details[run["id"]]})
    task_names = {tables.data_task(cfg) for run in runs if (cfg := tables.run_config(run)) is not None}
    return curves, (task_names.pop() if len(task_names) == 1 else None)


def curves(run_ids: Ids, metric: str = "epoch.test_acc", *, x: str = "epoch", smoothing: float = 0.0,
           log_y: bool = False, store: Store | str | None = None,
           max_points: int | None = DASHBOARD_MAX_POINTS) -> go.Figure:
    """Several runs' curves of one metric on shared axes, as on the Runs page."""
    st = open_store(store)
    runs = [st.get_run(i) for i in resolve_ids(run_ids, st)]
    kind, name = tables.split_metric_key(metric)
    figures.x_axis_title(x)  # ValueError naming x before any query
    ids = [r["id"] for r in runs]
    metrics = st.metrics(ids, names=[name], kind=kind, max_points=max_points)
    times = st.metric_times(ids) if x == "time" else None
    found, task = run_curves(runs, metrics, metric, x, labels=tables.run_labels(runs), times=times)
    if not found:
        return figures.empty_figure(f"no {metric} values for these runs yet")
    return figures.curves_figure(list(found.values()), metric=name, x=x, smoothing=smoothing, log_y=log_y,
                                 task=task)


def panel_figure(run: Mapping[str, Any], metrics: pd.DataFrame, *, x: str = "step") -> go.Figure | None:
    """One train run's loss / accuracy / sharpness / learning-rate panel; None without metrics or config."""
    cfg = tables.run_config(run)
    if metrics.empty or cfg is None:
        return None
    spe = tables.steps_per_epoch(cfg)
    step = tables.wide_metrics(metrics, run["id"], "step", spe=spe)
    epoch = tables.wide_metrics(metrics, run["id"], "epoch", spe=spe)
    return figures.run_panel_figure(step, epoch, task=tables.data_task(cfg), x=x, perturbs=perturbs(cfg))


def waiting_panel_figure(run: Mapping[str, Any]) -> go.Figure | None:
    """A train run's panel before its first metrics (`figures.waiting_run_panel_figure`). A live card draws
    its chart with it at once, so the chart is set up in the browser while the run's worker starts (not
    while it trains). None without a config."""
    cfg = tables.run_config(run)
    if cfg is None:
        return None
    return figures.waiting_run_panel_figure(task=tables.data_task(cfg), perturbs=perturbs(cfg))


def perturbs(cfg: RunConfig) -> bool:
    """Whether a run's method perturbs the weights (SGD's sharpness proxy is 0 by definition)."""
    return METHOD_RULES[cfg.optim.method] is not None


def run_panel(run_id: str, *, x: str = "step", store: Store | str | None = None) -> go.Figure:
    """The live panel of one train run, from what the store holds now."""
    st = open_store(store)
    run = st.get_run(run_id)
    fig = panel_figure(run, st.metrics([run["id"]], max_points=PANEL_MAX_POINTS), x=x)
    if fig is None:
        return figures.empty_figure(f"run {run['id']} ({run['status']}): no metrics yet")
    fig.update_layout(title=f"{run.get('name') or run['id']} · {run['status']}")
    return fig


def live(run_id: str, seconds: float, *, every: float = 2.0, x: str = "step",
         store: Store | str | None = None) -> str:
    """Redraw a run's panel in this notebook cell every `every` seconds until the run reaches a final
    status or `seconds` have passed; returns the run's status then. The cell blocks for at most
    `seconds` plus one redraw; the run itself goes on in its own process either way."""
    from IPython.display import display

    if not seconds >= 0 or not every > 0:
        raise ValueError(f"seconds, every: need seconds ≥ 0 and every > 0 (got {seconds!r}, {every!r})")
    st = open_store(store)
    full = st.resolve_id(run_id)
    deadline = time.monotonic() + seconds
    handle = display(run_panel(full, x=x, store=st), display_id=True)
    while True:
        status = st.get_run(full)["status"]
        remaining = deadline - time.monotonic()
        if status in FINAL or remaining <= 0:
            break
        time.sleep(min(every, remaining))
        if handle is not None:  # None outside IPython: nothing to redraw in place
            handle.update(run_panel(full, x=x, store=st))
    if handle is not None:
        handle.update(run_panel(full, x=x, store=st))
    return status


# -- analyses ---------------------------------------------------------------------------------------------
def analysis_results(analysis_ids: Ids, store: Store | str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(label, result) of each analysis run that has published a result, labelled by its trained run(s)."""
    st = open_store(store)
    analyses = [st.get_run(i) for i in resolve_ids(analysis_ids, st)]
    labels = _checkpoint_labels(st, [c for a in analyses for c in _checkpoints(a)])
    found = []
    for analysis in analyses:
        if analysis.get("result"):
            names = [labels.get(c, c) for c in _checkpoints(analysis)]
            found.append((" vs ".join(names) or analysis["name"], analysis["result"]))
    return found


def hessian_spectrum(analysis_ids: Ids, *, store: Store | str | None = None) -> go.Figure:
    """Top-k and most negative eigenvalues of "hessian" analyses, grouped by run (the Hessian page)."""
    return hessian_view.eigenvalue_figure(analysis_results(analysis_ids, store))


def hessian_density(analysis_ids: Ids, *, log_scale: bool = True, store: Store | str | None = None) -> go.Figure:
    """The spectral densities of "hessian" analyses (stochastic Lanczos quadrature)."""
    return hessian_view.density_figure(analysis_results(analysis_ids, store), log_scale)


def landscape(analysis_id: str, *, index: int = 0, style: str = "contour", log_scale: bool = False,
              store: Store | str | None = None) -> go.Figure:
    """A "landscape" analysis: every run's 1-D curve, or run `index`'s 2-D contour or 3-D surface."""
    if style not in LANDSCAPE_STYLES:
        raise ValueError(f"style: must be one of {', '.join(LANDSCAPE_STYLES)} (got {style!r})")
    st = open_store(store)
    analysis = st.get_run(resolve_ids(analysis_id, st)[0])
    result = analysis.get("result")
    if not result or "runs" not in result:
        return figures.empty_figure(f"landscape {analysis['id']} ({analysis['status']}): no surface yet")
    labels = _checkpoint_labels(st, [entry["checkpoint"] for entry in result["runs"]])
    for entry in result["runs"]:
        entry["label"] = labels.get(entry["checkpoint"], entry["label"])
    if result["kind"] == "1d":
        return landscape_view.curves_1d_figure(result, log_scale)
    if not 0 <= index < len(result["runs"]):
        raise ValueError(f"index: must be in [0, {len(result['runs']) - 1}] (got {index!r})")
    builder = landscape_view.contour_figure if style == "contour" else landscape_view.surface_figure
    return builder(result, index, log_scale, landscape_view.shared_zrange(result, log_scale))


def m_sharpness(analysis_ids: Ids, *, store: Store | str | None = None) -> go.Figure:
    """Measured m-sharpness S_m against m of "msharp" analyses (the Sweeps and Lesson pages' panel)."""
    found = analysis_results(analysis_ids, store)
    if not found:
        return figures.empty_figure("no m-sharpness results yet")
    return msharp_view.sharpness_figure(dict(found))


def stability_plane(analysis_id: str, *, marker: tuple[float, float] | None = None,
                    store: Store | str | None = None) -> go.Figure:
    """The (B, σ) plane of a "stability" grid analysis: theorem colours, exact boundary, simulation."""
    st = open_store(store)
    analysis = st.get_run(resolve_ids(analysis_id, st)[0])
    p = analysis["params"]
    if p.get("mode") != "grid":
        raise ValueError(f"analysis_id: run {analysis['id']} is not a stability grid (mode {p.get('mode')!r})")
    return stability_view.plane_figure(p["lam_max"], p["eta"], p["n"], p["Bs"], p["sigmas"],
                                       grid=analysis.get("result"), marker=marker)


def _checkpoints(analysis: Mapping[str, Any]) -> list[str]:
    params = analysis.get("params") or {}
    return [params["checkpoint"]] if "checkpoint" in params else list(params.get("checkpoints") or [])


def _checkpoint_labels(store: Store, checkpoints: Sequence[str]) -> dict[str, str]:
    """checkpoint path → the legend label of the train run that wrote it (as the pages label runs)."""
    wanted = set(checkpoints)
    if not wanted:
        return {}
    trained = [r for r in store.list_runs(kind="train", limit=100_000) if checkpoint_of(r) in wanted]
    labels = tables.run_labels(trained)
    return {checkpoint_of(r): labels[r["id"]] for r in trained}
