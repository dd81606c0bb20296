"""Figures and tables for the Landscape page: pure functions of `samlab.landscape` task results.

A "2d" result holds `axes` = [xs, ys] and, per run, `loss[i][j]` at (xs[i], ys[j]) with None where a
point is not computed yet. The task computes the grid coarse to fine (every 4th point, every 2nd, the
rest), so a partial result already spans the whole grid: its missing points are drawn interpolated
(`samlab.landscape.interpolate_missing`), and the figure says so and marks the computed points.
Coordinates are in units of the filter-normalized directions (1 = each filter moved by its own norm).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboard.figures import _PALETTE
from samlab.landscape import interpolate_missing

AXIS_UNIT = "filter-normalized units"


def request(checkpoints: list[str], kind: str, *, span: float, points: int, seed: int, data: str,
            n_samples: int | None, directions: str = "random", trajectory: bool = False) -> dict[str, Any]:
    """Params of a "landscape" background run for the page's widgets (one grid for every run)."""
    params: dict[str, Any] = {"checkpoints": list(checkpoints), "kind": kind, "seed": int(seed), "data": data,
                              "n_samples": n_samples, "directions": directions, "trajectory": bool(trajectory)}
    if kind == "2d":
        params["grid"] = {"xmin": -span, "xmax": span, "nx": points, "ymin": -span, "ymax": span, "ny": points}
    elif kind == "1d":
        params["grid"] = {"min": -span, "max": span, "n": points}
    return params


def _values(rows: Any, log_scale: bool) -> np.ndarray:
    array = np.array(rows, dtype=float)  # None → nan
    return np.log10(np.maximum(array, 1e-12)) if log_scale else array


def _filled(axes: list[list[float]], rows: Any, log_scale: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(values with missing points interpolated, mask of the interpolated points, a note for the title)."""
    filled, interpolated = interpolate_missing(axes, rows)
    values = np.log10(np.maximum(filled, 1e-12)) if log_scale else filled
    computed = int(interpolated.size - interpolated.sum())
    note = (f" — partial: {computed} of {interpolated.size} points computed, the rest interpolated"
            if interpolated.any() else "")
    return values, interpolated, note


def _loss_title(log_scale: bool, split: str = "train") -> str:
    return f"log₁₀ {split} loss" if log_scale else f"{split} loss (cross-entropy)"


def curves_1d_figure(result: dict[str, Any], log_scale: bool = False) -> go.Figure:
    """Loss along one random direction for every run, same α axis."""
    fig = go.Figure()
    alphas = result["axes"][0]
    notes = []
    for index, run in enumerate(result["runs"]):
        if "loss" not in run:
            continue
        values, interpolated, note = _filled(result["axes"], run["loss"], False)
        colour = _PALETTE[index % len(_PALETTE)]
        if not interpolated.any():
            fig.add_scatter(x=alphas, y=values, mode="lines+markers", name=run["label"], line={"color": colour})
            continue
        notes.append(note)  # partial: dashed interpolation through the computed points, shown as markers
        fig.add_scatter(x=alphas, y=values, mode="lines", name=f"{run['label']} (interpolated)",
                        line={"color": colour, "dash": "dash"})
        fig.add_scatter(x=np.asarray(alphas)[~interpolated], y=values[~interpolated], mode="markers",
                        name=f"{run['label']} (computed)", marker={"color": colour})
    fig.update_layout(xaxis_title=f"α ({AXIS_UNIT})", yaxis_title=_loss_title(False), legend_title="run",
                      yaxis_type="log" if log_scale else "linear", title=notes[0].lstrip(" —") if notes else None)
    return fig


def contour_figure(result: dict[str, Any], index: int, log_scale: bool = False,
                   zrange: tuple[float, float] | None = None) -> go.Figure:
    """Contours of one run's 2-D surface, with its projected training trajectory when there is one."""
    run = result["runs"][index]
    xs, ys = result["axes"]
    z, interpolated, note = _filled(result["axes"], run.get("loss", [[None] * len(ys)] * len(xs)), log_scale)
    z = z.T  # rows = y, columns = x
    fig = go.Figure()
    fig.add_contour(x=xs, y=ys, z=z, colorscale="Viridis", ncontours=30, name=run["label"],
                    zmin=zrange[0] if zrange else None, zmax=zrange[1] if zrange else None,
                    colorbar=_colorbar(log_scale), contours={"showlabels": True},
                    hovertemplate=f"δ %{{x:.3g}}, η %{{y:.3g}}<br>{_loss_title(log_scale)} %{{z:.4g}}<extra></extra>")
    trajectory = run.get("trajectory") or {}
    if trajectory.get("x"):
        fig.add_scatter(x=trajectory["x"], y=trajectory["y"], mode="lines+markers", name="trajectory",
                        text=[f"epoch {e}" for e in trajectory.get("epochs", [])], marker={"color": "white",
                        "line": {"color": "black", "width": 1}}, line={"color": "white"})
    if interpolated.any():
        i, j = np.nonzero(~interpolated)
        fig.add_scatter(x=np.asarray(xs)[i], y=np.asarray(ys)[j], mode="markers", name="computed points",
                        marker={"size": 3, "color": "black"}, hoverinfo="skip")
    fig.add_scatter(x=[0.0], y=[0.0], mode="markers", name="solution", marker={"symbol": "x", "size": 10,
                    "color": "red"})
    fig.update_layout(title=run["label"] + note, xaxis_title=f"δ ({AXIS_UNIT})", yaxis_title=f"η ({AXIS_UNIT})",
                      legend={"orientation": "h"}, height=480)
    return fig


def _colorbar(log_scale: bool) -> dict[str, Any]:
    # the title along the bar: written across the top it is wider than the bar and squeezes the plot
    return {"title": {"text": _loss_title(log_scale), "side": "right"}}


def surface_figure(result: dict[str, Any], index: int, log_scale: bool = False,
                   zrange: tuple[float, float] | None = None) -> go.Figure:
    """One run's 2-D surface in 3-D."""
    run = result["runs"][index]
    xs, ys = result["axes"]
    z, _, note = _filled(result["axes"], run.get("loss", [[None] * len(ys)] * len(xs)), log_scale)
    z = z.T
    fig = go.Figure(go.Surface(x=xs, y=ys, z=z, colorscale="Viridis", cmin=zrange[0] if zrange else None,
                               cmax=zrange[1] if zrange else None, colorbar=_colorbar(log_scale),
                               name=run["label"]))
    fig.update_layout(title=run["label"] + note, scene={"xaxis_title": f"δ ({AXIS_UNIT})",
                      "yaxis_title": f"η ({AXIS_UNIT})", "zaxis_title": _loss_title(log_scale)})
    return fig


def shared_zrange(result: dict[str, Any], log_scale: bool = False) -> tuple[float, float] | None:
    """One colour scale for every run, so minima are compared on the same axis scale."""
    values = [v for run in result["runs"] if "loss" in run for v in _values(run["loss"], log_scale).ravel()]
    finite = [v for v in values if math.isfinite(v)]
    return (min(finite), max(finite)) if finite else None


def interpolation_figure(result: dict[str, Any], log_scale: bool = False) -> go.Figure:
    """Train and test loss (left axis) and accuracy (right axis) along (1 − α) θ_a + α θ_b."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    alphas = result["alphas"]
    # colour = split, line style = quantity: loss solid on the left axis, accuracy dotted on the right
    for index, split in enumerate(("train", "test")):
        entry = result.get(split) or {}
        colour = _PALETTE[index]
        if "loss" in entry:
            fig.add_scatter(x=alphas, y=entry["loss"], name=f"{split} loss (left)", line={"color": colour, "width": 2.5},
                            hovertemplate=f"α %{{x:.3g}}<br>{split} loss %{{y:.4g}}<extra></extra>",
                            secondary_y=False)
            fig.add_scatter(x=alphas, y=[None if a is None else 100 * a for a in entry["accuracy"]],
                            name=f"{split} accuracy (right)", line={"color": colour, "dash": "dot", "width": 1.5},
                            hovertemplate=f"α %{{x:.3g}}<br>{split} accuracy %{{y:.2f}}%<extra></extra>",
                            secondary_y=True)
    labels = [run["label"] for run in result["runs"]]
    for alpha, label in zip((0.0, 1.0), labels):
        fig.add_vline(x=alpha, line={"dash": "dot", "color": "gray"}, annotation_text=label)
    fig.update_xaxes(title_text="α (0 = first run, 1 = second run)")
    fig.update_yaxes(title_text="loss (cross-entropy, nats)", type="log" if log_scale else "linear", secondary_y=False)
    # the right axis picks its own round ticks (synced ticks give values like 90.298) and draws no grid
    fig.update_yaxes(title_text="accuracy (%)", secondary_y=True, tickmode="auto", showgrid=False)
    # the legend above the plot: below it, it runs into the α title
    fig.update_layout(height=440, margin={"t": 80},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.08, "xanchor": "left", "x": 0.0})
    return fig


def flatness_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per run and radius: the loss increase, mean and max over directions and signs."""
    rows = []
    for run in result["runs"]:
        for r, mean, worst in zip(run.get("radii", []), run.get("mean_increase", []), run.get("max_increase", [])):
            rows.append({"run": run["label"], "radius (filter-normalized)": r, "loss at minimum": run["base_loss"],
                         "mean increase": mean, "max increase": worst})
    return pd.DataFrame(rows)


def flatness_figure(result: dict[str, Any]) -> go.Figure:
    fig = go.Figure()
    for run in result["runs"]:
        if run.get("radii"):
            fig.add_scatter(x=run["radii"], y=run["mean_increase"], mode="lines+markers", name=f"{run['label']} mean")
            fig.add_scatter(x=run["radii"], y=run["max_increase"], mode="lines", line={"dash": "dot"},
                            name=f"{run['label']} max")
    fig.update_layout(xaxis_title=f"radius r ({AXIS_UNIT})", yaxis_title="loss increase L(θ ± r d) − L(θ)",
                      legend_title="run")
    return fig
