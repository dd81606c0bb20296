"""Plotly figure builders for the dashboard: pure functions of data, no streamlit.

Every figure here has axis titles with units, a legend that names its traces, and hover values.
Colours come from the plotting theme (the pages draw with Streamlit's theme, which follows the
light or dark setting), so no builder hard-codes a background or a text colour; the few fixed
colours (reference lines) are mid-tone greys that read on both backgrounds.

Metric names follow the training engine: step metrics `train_loss`, `train_acc`, `perturbed_loss`,
`sharpness`, `grad_norm`, `lr`, `step_time`; epoch metrics `train_loss`, `train_acc`, `test_loss`,
`test_acc`, `epoch_time`; analyses may add others (`lambda_max`, `trace_v`, ...), which get a
generic title. Accuracies are stored as fractions and drawn in percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

REFERENCE_COLOR = "rgba(128, 128, 128, 0.8)"
# Low → high score in mid-tone colours: every line reads on a white and on a dark background
# (the dark end of Viridis vanishes on the dark theme).
SCORE_COLORSCALE = [[0.0, "#d62728"], [0.35, "#ff7f0e"], [0.65, "#2ca02c"], [1.0, "#1f77b4"]]

X_AXES: dict[str, str] = {
    "step": "optimizer step",
    "epoch": "epoch",
    "time": "wall time (s)",
}

LOSS_UNITS: dict[str, str] = {
    "classification": "cross-entropy, nats",
    "regression": "½·squared error",
}


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is named on an axis, its unit, and whether it is drawn in percent."""

    title: str
    unit: str = ""
    percent: bool = False
    is_loss: bool = False


METRICS: dict[str, MetricInfo] = {
    "train_loss": MetricInfo("train loss", is_loss=True),
    "test_loss": MetricInfo("test loss", is_loss=True),
    "perturbed_loss": MetricInfo("perturbed loss L(w+ε)", is_loss=True),
    "sharpness": MetricInfo("sharpness proxy L(w+ε) − L(w)", is_loss=True),
    "train_acc": MetricInfo("train accuracy", "%", percent=True),
    "test_acc": MetricInfo("test accuracy", "%", percent=True),
    "grad_norm": MetricInfo("gradient norm ‖∇L‖", "L2 norm"),
    "lr": MetricInfo("learning rate", "per step"),
    "step_time": MetricInfo("step time", "s"),
    "epoch_time": MetricInfo("epoch time", "s"),
    "lambda_max": MetricInfo("top Hessian eigenvalue λ_max", "loss / weight²"),
    "trace_v": MetricInfo("gradient-noise trace tr V", "squared gradient norm"),
}


def metric_info(name: str) -> MetricInfo:
    return METRICS.get(name, MetricInfo(name.replace("_", " ")))


def metric_axis_title(name: str, task: str | None = None) -> str:
    """Axis title with the unit, e.g. 'test accuracy (%)' or 'train loss (cross-entropy, nats)'."""
    info = metric_info(name)
    unit = info.unit
    if info.is_loss:
        unit = LOSS_UNITS.get(task or "", "mean per sample")
    return f"{info.title} ({unit})" if unit else info.title


def x_axis_title(x: str) -> str:
    if x not in X_AXES:
        raise ValueError(f"x: must be one of {', '.join(X_AXES)} (got {x!r})")
    return X_AXES[x]


def display_values(name: str, values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Values as drawn: accuracies in percent, everything else unchanged."""
    arr = np.asarray(values, dtype=float)
    return arr * 100.0 if metric_info(name).percent else arr


def smooth_ema(values: Sequence[float] | np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average s_t = w s_{t-1} + (1 - w) y_t, divided by 1 - w^t.

    `weight` in [0, 1): 0 returns the values unchanged. NaNs are skipped (they stay NaN and do not
    enter the average), so curves with gaps smooth as if the gaps were absent.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing: must be in [0, 1) (got {weight!r})")
    arr = np.asarray(values, dtype=float)
    if weight == 0.0:
        return arr.copy()
    out = np.full_like(arr, np.nan)
    acc, norm = 0.0, 0.0
    for i, y in enumerate(arr):
        if math.isnan(y):
            continue
        acc = weight * acc + (1.0 - weight) * y
        norm = weight * norm + (1.0 - weight)
        out[i] = acc / norm
    return out


@dataclass
class Curve:
    """One line: a run's metric against an x coordinate."""

    label: str
    x: np.ndarray
    y: np.ndarray
    hover: dict[str, str] = field(default_factory=dict)


def curves_figure(
    curves: Sequence[Curve],
    *,
    metric: str,
    x: str,
    smoothing: float = 0.0,
    log_y: bool = False,
    task: str | None = None,
    title: str | None = None,
    height: int = 420,
) -> go.Figure:
    """Overlay of several runs' curves of one metric on shared axes.

    With smoothing > 0 the raw values are drawn faintly under the smoothed line, in the same
    colour and legend group, so the smoothing never hides the data.
    """
    fig = go.Figure()
    y_title = metric_axis_title(metric, task)
    for index, curve in enumerate(curves):
        y = display_values(metric, curve.y)
        colour = _palette(index)
        hover = _hovertemplate(curve.label, x_axis_title(x), y_title, curve.hover)
        if smoothing > 0:
            fig.add_trace(
                go.Scatter(
                    x=curve.x, y=y, mode="lines", name=curve.label, legendgroup=curve.label,
                    showlegend=False, opacity=0.25, line={"color": colour, "width": 1},
                    hovertemplate=hover.replace("<extra>", " (raw)<extra>"),
                )
            )
            y = smooth_ema(y, smoothing)
        fig.add_trace(
            go.Scatter(
                x=curve.x, y=y, mode="lines+markers" if len(curve.x) <= 30 else "lines",
                name=curve.label, legendgroup=curve.label, line={"color": colour, "width": 2},
                marker={"size": 5}, hovertemplate=hover,
            )
        )
    _finish_layout(fig, x_title=x_axis_title(x), y_title=y_title, title=title, height=height)
    fig.update_layout(showlegend=True)  # name the run even when there is only one
    if _few_whole_numbers([c.x for c in curves]):
        fig.update_xaxes(dtick=1)  # epochs 1, 2, 3 — not ticks at 1.2, 1.4, …
    if log_y:
        fig.update_yaxes(type="log")
    return fig


@dataclass
class Band:
    """One group of runs that differ only in seed: the mean curve, ± one standard deviation, the count."""

    label: str
    x: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: int
    hover: dict[str, str] = field(default_factory=dict)


def seed_band(curves: Sequence[tuple[Any, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single curve) of several seeds' (x, y) curves.

    Seeds of one config log the same x values, and the statistics are taken at the x values every curve
    has; when they share fewer than two (downsampled curves), each curve is interpolated onto the x
    values of the first one inside the range they all cover."""
    pairs = []
    for x, y in curves:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if len(x):
            order = np.argsort(x, kind="stable")
            pairs.append((x[order], y[order]))
    if not pairs:
        return np.array([]), np.array([]), np.array([])
    grid = pairs[0][0]
    for x, _ in pairs[1:]:
        grid = np.intersect1d(grid, x)
    if len(grid) < 2 and len(pairs) > 1:
        lo, hi = max(x[0] for x, _ in pairs), min(x[-1] for x, _ in pairs)
        grid = pairs[0][0][(pairs[0][0] >= lo) & (pairs[0][0] <= hi)]
    values = np.stack([np.interp(grid, x, y) for x, y in pairs])  # exact at x values a curve has
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    return grid, values.mean(axis=0), std


def seed_bands(groups: dict[str, list[str]], curves: dict[str, Curve],
               details: dict[str, str] | None = None) -> list[Band]:
    """One Band per group of run ids (`tables.seed_groups`) from the runs' curves; the hover lists the
    runs' full configs without their seeds' differences."""
    bands = []
    for label, ids in groups.items():
        members = [curves[i] for i in ids if i in curves]
        if not members:
            continue
        grid, mean, std = seed_band([(c.x, c.y) for c in members])
        hover = {"config": (details or {}).get(ids[0], "").rsplit(" seed=", 1)[0]} if details else {}
        bands.append(Band(label, grid, mean, std, len(members), hover))
    return bands


def band_figure(bands: Sequence[Band], *, metric: str, x: str, log_y: bool = False, task: str | None = None,
                height: int = 420) -> go.Figure:
    """Each group's mean curve with a shaded ± std band (sample std over its seeds); the legend names the
    group and its seed count."""
    fig = go.Figure()
    y_title = metric_axis_title(metric, task)
    for index, band in enumerate(bands):
        colour = _palette(index)
        mean, std = display_values(metric, band.mean), display_values(metric, band.std)
        if band.n > 1:
            fig.add_trace(go.Scatter(
                x=np.concatenate([band.x, band.x[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]),
                fill="toself", fillcolor=_with_alpha(colour, 0.2), line={"width": 0}, hoverinfo="skip",
                legendgroup=band.label, showlegend=False, name=f"{band.label} ± std"))
        hover = _hovertemplate(band.label, x_axis_title(x), f"mean {y_title}",
                               {"± std": "%{customdata:.3g}", **band.hover})
        fig.add_trace(go.Scatter(
            x=band.x, y=mean, customdata=std, mode="lines+markers" if len(band.x) <= 30 else "lines",
            name=band.label, legendgroup=band.label, line={"color": colour, "width": 2}, marker={"size": 5},
            hovertemplate=hover.replace("%(customdata:.3g)", "%{customdata:.3g}")))
    _finish_layout(fig, x_title=x_axis_title(x), y_title=f"{y_title} (mean ± std over seeds)", title=None,
                   height=height)
    fig.update_layout(showlegend=True)
    if _few_whole_numbers([b.x for b in bands]):
        fig.update_xaxes(dtick=1)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def _with_alpha(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


def run_panel_figure(
    step_metrics: pd.DataFrame,
    epoch_metrics: pd.DataFrame,
    *,
    task: str | None = None,
    x: str = "step",
    height: int = 580,
    perturbs: bool = True,
) -> go.Figure:
    """The live training panel of one run: loss, accuracy, sharpness proxy and learning rate.

    `step_metrics` and `epoch_metrics` are frames with the x column (`step`, `epoch` or `time`) and
    metric columns; missing columns are skipped, so a run that has not evaluated yet still draws.
    With perturbs=False (SGD: no perturbation, so L(w+ε) − L(w) is 0 by definition) the sharpness
    panel is left out and the learning rate spans the bottom row.
    """
    if perturbs:
        fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.26,
                            subplot_titles=("loss", "accuracy", "sharpness proxy", "learning rate"))
    else:
        fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.26,
                            specs=[[{}, {}], [{"colspan": 2}, None]],
                            subplot_titles=("loss", "accuracy", "learning rate"))
    shown_labels: set[str] = set()
    for row, col, name, label, is_step, xs, values, axis_metric in _run_panel_series(step_metrics, epoch_metrics, x,
                                                                                       perturbs):
        fig.add_trace(
            go.Scatter(
                x=xs, y=values, name=label, legendgroup=label, meta=name,
                showlegend=label not in shown_labels,
                mode=_run_panel_mode(is_step, len(xs)),
                opacity=0.8 if is_step and axis_metric in ("train_loss", "test_acc") else 1.0,
                line={"color": _SERIES_COLOURS.get(label, _palette(0)), "width": 1.5 if is_step else 2.5},
                marker={"size": 6},
                hovertemplate=_hovertemplate(label, x_axis_title(x), metric_axis_title(name, task)),
            ),
            row=row, col=col,
        )
        shown_labels.add(label)
    for row, col, _, axis_metric in _run_panels(perturbs):
        fig.update_xaxes(title_text=x_axis_title(x), row=row, col=col)
        fig.update_yaxes(title_text=_short_axis_title(axis_metric, task), row=row, col=col)
    _finish_layout(fig, x_title=None, y_title=None, title=None, height=height)
    fig.update_layout(legend={"y": 1.1}, margin={"t": 90})  # above the subplot titles
    return fig


def waiting_run_panel_figure(*, task: str | None = None, perturbs: bool = True, height: int = 580) -> go.Figure:
    """`run_panel_figure` before the run's first metrics: every panel's titled axes, no data, and a note."""
    fig = run_panel_figure(pd.DataFrame(), pd.DataFrame(), task=task, perturbs=perturbs, height=height)
    for row, col, _, _ in _run_panels(perturbs):  # a subplot without a trace would draw no axes
        fig.add_trace(go.Scatter(x=[], y=[], showlegend=False, hoverinfo="skip"), row=row, col=col)
    fig.add_annotation(text="no metrics yet", showarrow=False, x=0.5, y=1.0, xref="paper", yref="paper",
                       yshift=60, font={"size": 14})
    return fig


def refresh_run_panel(fig: go.Figure, step_metrics: pd.DataFrame, epoch_metrics: pd.DataFrame, *,
                      x: str = "step", perturbs: bool = True) -> bool:
    """Put newer data into a figure made by `run_panel_figure` from the same run, keeping its layout
    (a few ms instead of rebuilding the subplots). False, and `fig` untouched, when the new data has
    other series (a metric appeared): then build the figure again."""
    series = _run_panel_series(step_metrics, epoch_metrics, x, perturbs)
    if [(label, name) for _, _, name, label, *_ in series] != [(t.name, t.meta) for t in fig.data]:
        return False
    with fig.batch_update():
        for trace, (_, _, _, _, is_step, xs, values, _) in zip(fig.data, series):
            trace.x, trace.y, trace.mode = xs, values, _run_panel_mode(is_step, len(xs))
    return True


_RUN_PANELS = (  # (row, col, series (metric, which frame, label), the metric naming the y axis)
    (1, 1, [("train_loss", "step", "train (per step)"), ("train_loss", "epoch", "train (epoch)"),
            ("test_loss", "epoch", "test (epoch)")], "train_loss"),
    (1, 2, [("train_acc", "step", "train (per step)"), ("train_acc", "epoch", "train (epoch)"),
            ("test_acc", "epoch", "test (epoch)")], "test_acc"),
    (2, 1, [("sharpness", "step", "L(w+ε) − L(w)")], "sharpness"),
    (2, 2, [("lr", "step", "learning rate")], "lr"),
)


def _run_panels(perturbs: bool) -> tuple:
    """The panels of a run: without a perturbation (SGD) no sharpness proxy, the learning rate below."""
    return _RUN_PANELS if perturbs else (*_RUN_PANELS[:2], (2, 1, [("lr", "step", "learning rate")], "lr"))


def _run_panel_mode(is_step: bool, n: int) -> str:
    return "lines" if is_step and n > 30 else "lines+markers"


def _run_panel_series(step_metrics: pd.DataFrame, epoch_metrics: pd.DataFrame, x: str,
                      perturbs: bool = True) -> list[tuple]:
    """(row, col, metric, label, is_step, x values, y values, axis metric) of every series with data."""
    out = []
    for row, col, series, axis_metric in _run_panels(perturbs):
        for name, which, label in series:
            frame = step_metrics if which == "step" else epoch_metrics
            if frame is None or name not in frame.columns or x not in frame.columns:
                continue
            rows = frame[[x, name]].dropna()
            if rows.empty:
                continue
            out.append((row, col, name, label, which == "step", rows[x].to_numpy(),
                        display_values(name, rows[name].to_numpy()), axis_metric))
    return out


def parallel_coordinates_figure(
    table: pd.DataFrame,
    dimensions: Sequence[str],
    *,
    color: str = "final_test_acc",
    height: int = 440,
) -> go.Figure:
    """Hyperparameters (one axis each) against a score, one line per run, coloured by the score.

    Categorical columns (method, dataset, ...) become axes with their category names as ticks;
    numeric ones keep their values. Columns that are absent or constant are left out because an
    axis with one value carries no information. The score axis is drawn last.
    """
    dims = []
    for name in dimensions:
        if name not in table.columns or name == color:
            continue
        column = table[name]
        if column.nunique(dropna=False) < 2:
            continue
        dims.append(_parcoords_dimension(name, column))
    if color in table.columns:
        dims.append(_parcoords_dimension(color, table[color]))
    score = pd.to_numeric(table[color], errors="coerce") if color in table.columns else None
    line: dict = {}
    if score is not None and score.notna().any():
        line = {
            "color": score.fillna(score.min()).to_numpy(),
            "colorscale": SCORE_COLORSCALE,
            "showscale": True,
            "colorbar": {"title": {"text": _column_title(color)}},
        }
    fig = go.Figure(go.Parcoords(dimensions=dims, line=line, labelfont={"size": 13}, tickfont={"size": 11},
                                 labelangle=0))
    fig.update_layout(height=height, margin={"l": 70, "r": 70, "t": 60, "b": 30})
    # a parcoords trace has no cartesian axes; hide the empty ones a theme template would draw
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def empty_figure(message: str, height: int = 300) -> go.Figure:
    """A figure with a centred message instead of data (e.g. 'no metrics yet')."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 15})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=height)
    return fig


# -- column titles shared with the tables --------------------------------------------------------
COLUMN_TITLES: dict[str, str] = {
    "final_test_acc": "final test acc (%)",
    "best_test_acc": "best test acc (%)",
    "final_train_acc": "final train acc (%)",
    "gap_acc": "gap train−test acc (pp)",
    "final_test_loss": "final test loss",
    "gap_loss": "gap test−train loss",
    "wall_time": "wall time (s)",
}


# Hyperparameter axes of the parallel-coordinates plot (summary-table column → axis title).
HYPERPARAMETER_TITLES: dict[str, str] = {
    "rho": "ρ",
    "m": "m (micro-batch)",
    "lam": "λ (RW-SAM)",
    "lr": "learning rate",
    "batch_size": "batch size",
    "label_noise": "label noise",
    "n_train": "train samples",
    "weight_decay": "weight decay",
}
NOT_SET = "none"  # the tick of a run that has no value for a hyperparameter (m of an SGD run)


def _column_title(name: str) -> str:
    return COLUMN_TITLES.get(name) or HYPERPARAMETER_TITLES.get(name, name.replace("_", " "))


def _parcoords_dimension(name: str, column: pd.Series) -> dict:
    """A numeric axis when every run has a number; otherwise one tick per value, so that a run
    without a value (plotly drops a line with a NaN on any axis) is still drawn, at `none`."""
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.notna().all():
        return {"label": _column_title(name), "values": numeric.to_numpy()}
    if numeric.notna().sum() == column.notna().sum():  # numbers and gaps: numeric order, gaps first
        labels = numeric.map(lambda v: NOT_SET if pd.isna(v) else f"{v:g}")
        categories = [NOT_SET] * bool(numeric.isna().any()) + [f"{v:g}" for v in sorted(numeric.dropna().unique())]
    else:
        labels = column.map(lambda v: NOT_SET if pd.isna(v) else str(v))
        categories = sorted(labels.unique())
    codes = labels.map({c: i for i, c in enumerate(categories)}).to_numpy()
    return {"label": _column_title(name), "values": codes, "tickvals": list(range(len(categories))),
            "ticktext": categories}


# Fixed meaning across the panel's subplots: the same colour is the same series everywhere.
_SERIES_COLOURS = {
    "train (per step)": "#6baed6",  # lighter than the epoch curve: reads on dark too
    "train (epoch)": "#1f77b4",
    "test (epoch)": "#ff7f0e",
    "L(w+ε) − L(w)": "#2ca02c",
    "learning rate": "#9467bd",
}
# A palette with enough contrast on white and on a dark background (Tableau 10).
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf"]


def _palette(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _short_axis_title(metric: str, task: str | None) -> str:
    unit = LOSS_UNITS.get(task or "", "mean per sample")
    if metric in ("train_loss", "test_loss"):
        return f"loss ({unit})"
    if metric in ("train_acc", "test_acc"):
        return "accuracy (%)"
    if metric == "sharpness":
        return f"L(w+ε) − L(w) ({unit})"
    return metric_axis_title(metric, task)


def _few_whole_numbers(xs: Sequence[np.ndarray], most: int = 20) -> bool:
    """True when every x is a whole number and they span at most `most` units (a short run by epoch)."""
    values = np.concatenate([np.asarray(x, dtype=float) for x in xs]) if xs else np.array([])
    values = values[np.isfinite(values)]
    return bool(values.size) and bool(np.all(values == np.round(values))) and values.max() - values.min() <= most


def _hovertemplate(label: str, x_title: str, y_title: str, extra: dict[str, str] | None = None) -> str:
    lines = "".join(f"<br><span style='font-size:11px'>{_safe(k)}: {_wrap(_safe(v))}</span>"
                    for k, v in (extra or {}).items())
    return f"<b>{_safe(label)}</b><br>{x_title}: %{{x:.4g}}<br>{y_title}: %{{y:.4g}}{lines}<extra></extra>"


def _safe(text: str) -> str:
    return str(text).replace("{", "(").replace("}", ")")  # "%{" would start a plotly placeholder


def _wrap(text: str, width: int = 70) -> str:
    """Break a long hover line at spaces (plotly does not wrap hover text)."""
    lines, current = [], ""
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return "<br>".join([*lines, current])


def _finish_layout(fig: go.Figure, *, x_title: str | None, y_title: str | None, title: str | None,
                   height: int) -> None:
    fig.update_layout(
        height=height,
        hovermode="closest",
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0.0},
        margin={"l": 60, "r": 20, "t": 70 if title else 50, "b": 50},
        title={"text": title} if title else None,
    )
    if x_title is not None:
        fig.update_xaxes(title_text=x_title)
    if y_title is not None:
        fig.update_yaxes(title_text=y_title)
