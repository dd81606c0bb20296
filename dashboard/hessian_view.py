"""Figures and tables for the Hessian page: pure functions of `samlab.hessian` task results, no streamlit.

A result (see `samlab.tasks.hessian.run_task`) holds "eigenvalues" {"largest", "smallest"} (values
descending), "trace" {mean, stderr}, "density" {grid, density}, "per_layer" rows and the run's "lr";
a partial result lacks the stages not finished yet, and every builder draws what is there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from dashboard.figures import _PALETTE, empty_figure

DENSITY_FLOOR = 1e-8  # the log-scale density plot's floor (Gaussian tails underflow to 0)

Labelled = Sequence[tuple[str, dict[str, Any]]]  # (legend label, task result)


def request(checkpoint: str, *, k: int, n_samples: int, trace_samples: int, mode: str, seed: int,
            density: bool = True, per_layer: bool = True) -> dict[str, Any]:
    """Params of a "hessian" background run for the page's widgets (same subset seed for every run)."""
    return {"checkpoint": checkpoint, "k": int(k), "n_samples": int(n_samples), "trace_samples": int(trace_samples),
            "mode": mode, "seed": int(seed), "density": bool(density), "per_layer": bool(per_layer)}


def eigenvalue_figure(results: Labelled) -> go.Figure:
    """Top-k and bottom-k eigenvalues as grouped bars per run: λ₁ ≥ λ₂ ≥ … and the most negative λ_n."""
    fig = go.Figure()
    for index, (label, result) in enumerate(results):
        names, values = _eigen_bars(result)
        if values:
            fig.add_bar(x=names, y=values, name=label, marker_color=_PALETTE[index % len(_PALETTE)],
                        hovertemplate=f"<b>{_safe(label)}</b><br>%{{x}} = %{{y:.5g}}<extra></extra>")
    if not fig.data:
        return empty_figure("no eigenvalues yet")
    fig.add_hline(y=0, line_width=1, line_color="gray")
    fig.update_layout(barmode="group", yaxis_title="eigenvalue of the loss Hessian",
                      xaxis_title="largest → most negative", bargap=0.15, bargroupgap=0.05)
    legend_below(fig, len(fig.data))
    return fig


PLOT_HEIGHT = 340  # the plot area itself; the legend below it adds a row per run
LEGEND_ROW = 22
AXIS_TITLE_ROOM = 60  # pixels under the plot for the tick labels and the axis title, above the legend


def legend_below(fig: go.Figure, n_traces: int) -> None:
    """The legend in rows under the plot, not beside it: a legend of long run labels beside a plot
    squeezes the plot to a sliver when several runs are compared. The figure grows by one row per
    trace so the plot area keeps its size for 1–8 runs."""
    legend_height = LEGEND_ROW * max(n_traces, 1) + AXIS_TITLE_ROOM
    fig.update_layout(height=PLOT_HEIGHT + legend_height, legend_title="run", showlegend=True,
                      legend={"orientation": "h", "yanchor": "top", "y": -AXIS_TITLE_ROOM / (PLOT_HEIGHT - 40),
                              "xanchor": "left", "x": 0.0, "entrywidth": 1.0, "entrywidthmode": "fraction"},
                      margin={"t": 30, "l": 60, "r": 20, "b": legend_height + 10})


def _eigen_bars(result: dict[str, Any]) -> tuple[list[str], list[float]]:
    eig = result.get("eigenvalues", {})
    top = eig.get("largest", {}).get("values", [])
    bottom = eig.get("smallest", {}).get("values", [])
    names = [f"λ{i + 1}" for i in range(len(top))]
    n = len(bottom)
    names += [f"λn−{n - 1 - i}" if n - 1 - i else "λn" for i in range(n)]
    return names, list(top) + list(bottom)


def density_figure(results: Labelled, log_scale: bool = True) -> go.Figure:
    """Spectral density (stochastic Lanczos quadrature, Gaussian broadening) per run."""
    fig = go.Figure()
    for index, (label, result) in enumerate(results):
        density = result.get("density")
        if not density:
            continue
        values = np.asarray(density["density"], dtype=float)
        fig.add_scatter(x=density["grid"], y=np.maximum(values, DENSITY_FLOOR) if log_scale else values,
                        mode="lines", name=label, line={"color": _PALETTE[index % len(_PALETTE)]},
                        hovertemplate=f"<b>{_safe(label)}</b><br>λ = %{{x:.4g}}<br>density %{{y:.3g}}<extra></extra>")
    if not fig.data:
        return empty_figure("no spectral density yet")
    fig.update_layout(xaxis_title="eigenvalue λ", yaxis_title="density (log scale)" if log_scale else "density",
                      yaxis_type="log" if log_scale else "linear")
    legend_below(fig, len(fig.data))
    if log_scale:  # 10⁻⁶, not plotly's SI "1µ", for a density
        fig.update_yaxes(exponentformat="power", dtick=2)
    return fig


def summary_table(results: Labelled) -> pd.DataFrame:
    """One row per run: λ_max, λ_min found, trace ± stderr, and λ_max against the 2/η stability edge."""
    rows = []
    for label, result in results:
        eig = result.get("eigenvalues", {})
        top = eig.get("largest", {}).get("values") or [None]
        bottom = eig.get("smallest", {}).get("values") or [None]
        trace = result.get("trace", {})
        lr = result.get("lr")
        rows.append({
            "run": label,
            "λ_max": top[0],
            "most negative λ": bottom[-1],
            "trace": trace.get("mean"),
            "trace stderr": trace.get("stderr"),
            "2/η": 2 / lr if lr else None,
            "λ_max · η / 2": top[0] * lr / 2 if (lr and top[0] is not None) else None,
            "mode": result.get("mode"),
            "samples": result.get("n_samples"),
            "parameters": result.get("n_params"),
            "epoch": result.get("epoch"),
            "complete": result.get("complete"),
        })
    return pd.DataFrame(rows)


def layer_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per-layer top eigenvalue and trace (± stderr) of the layer's diagonal Hessian block."""
    columns = ["layer", "parameters", "λ_max (block)", "trace (block)", "trace stderr", "trace by"]
    rows = [dict(zip(columns, (r["layer"], r["n_params"], r["lambda_max"], r.get("trace"), r.get("trace_stderr"),
                               r.get("trace_method"))))
            for r in result.get("per_layer", [])]
    return pd.DataFrame(rows, columns=columns)


def layer_figure(results: Labelled) -> go.Figure:
    """Per-layer λ_max of the diagonal blocks, runs side by side (log scale: layers differ by decades)."""
    fig = go.Figure()
    for index, (label, result) in enumerate(results):
        rows = result.get("per_layer", [])
        if rows:
            fig.add_bar(x=[r["layer"] for r in rows], y=[max(r["lambda_max"], 1e-12) for r in rows], name=label,
                        marker_color=_PALETTE[index % len(_PALETTE)],
                        hovertemplate=f"<b>{_safe(label)}</b><br>%{{x}}: λ_max %{{y:.4g}}<extra></extra>")
    if not fig.data:
        return empty_figure("no per-layer spectra yet")
    fig.update_layout(barmode="group", height=360, yaxis_type="log", yaxis_title="λ_max of the layer's block",
                      xaxis_title="layer (its diagonal Hessian block)", legend_title="run", margin={"t": 40})
    fig.update_yaxes(dtick=1, exponentformat="power")  # one tick per decade, not "5, 2" between them
    return fig


def lambda_max_figure(metrics: pd.DataFrame, labels: dict[str, str]) -> go.Figure:
    """λ_max over training (step metric "lambda_max") with each run's 2/η as a dashed line (edge of
    stability, Cohen et al. 2021: under full-batch GD λ_max rises to 2/η and hovers there)."""
    fig = go.Figure()
    if metrics.empty or "lambda_max" not in set(metrics["name"]):
        return empty_figure("no λ_max measurements: train with 'λ_max every (steps)' > 0")
    top = 0.0  # the y range: every λ_max and the lowest 2/η of each run, not 2/η of a decayed lr (→ ∞)
    for index, run_id in enumerate(sorted(set(metrics["run_id"]), key=lambda r: labels.get(r, r))):
        colour = _PALETTE[index % len(_PALETTE)]
        label = labels.get(run_id, run_id)
        mine = metrics[metrics["run_id"] == run_id]
        lam = mine[mine["name"] == "lambda_max"].sort_values("step")
        if lam.empty:
            continue
        fig.add_scatter(x=lam["step"], y=lam["value"], mode="lines+markers", name=label, line={"color": colour},
                        hovertemplate=f"<b>{_safe(label)}</b><br>step %{{x}}<br>λ_max %{{y:.4g}}<extra></extra>")
        lr = mine[(mine["name"] == "lr") & (mine["value"] > 0)].sort_values("step")
        top = max(top, float(lam["value"].max()), 2 / float(lr["value"].max()) if not lr.empty else 0.0)
        if not lr.empty:
            fig.add_scatter(x=lr["step"], y=2 / lr["value"], mode="lines", name=f"2/η · {label}",
                            line={"color": colour, "dash": "dash"}, opacity=0.7,
                            hovertemplate=f"<b>2/η · {_safe(label)}</b><br>step %{{x}}<br>%{{y:.4g}}<extra></extra>")
    fig.update_layout(height=380, xaxis_title="optimizer step", yaxis_title="top Hessian eigenvalue λ_max",
                      legend_title="run", margin={"t": 40})
    if top > 0:
        fig.update_yaxes(range=[min(0.0, float(metrics.loc[metrics["name"] == "lambda_max", "value"].min())),
                                1.2 * top])
    return fig


def _safe(label: str) -> str:
    return label.replace("{", "(").replace("}", ")")  # "%{" would start a plotly placeholder
