"""Figures and captions of the m-sharpness pages (Sweeps and the lesson). Plotly only, no streamlit:
every builder takes plain rows / DataFrames from `samlab.sweeps`, `samlab.msharp`, `samlab.noise` and
`samlab.toy`, so the figures can be tested and reused outside a page."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures import empty_figure
from samlab.config import RunConfig

METHOD_NAMES = {"gd": "GD", "sgd": "SGD", "sam": "SAM", "nsam": "n-SAM", "msam": "m-SAM", "rwsam": "RW-SAM",
                "1sam": "1-SAM"}
REFERENCE_COLOURS = {"sgd": "#7f7f7f", "nsam": "#d62728", "rwsam": "#2ca02c"}

def parse_rhos_by_m(text: str) -> dict[int, list[float]]:
    """Per-m ρ grids from the Sweeps form: a JSON object m → list of ρ (empty text: none)."""
    raw = json.loads(text or "{}")
    if not isinstance(raw, dict):
        raise ValueError(f"rhos_by_m: a JSON object m → list of ρ, e.g. {{\"64\": [0.2, 0.4]}} (got {text!r})")
    grids = {}
    for key, rhos in raw.items():
        try:
            m = int(key)
        except ValueError:
            raise ValueError(f"rhos_by_m: keys are micro-batch sizes m (got {key!r})") from None
        if not isinstance(rhos, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                 for r in rhos):
            raise ValueError(f"rhos_by_m[{m}]: a list of numbers ρ > 0 (got {rhos!r})")
        grids[m] = [float(r) for r in rhos]
    return grids


# -- step 1: the 2-D toy --------------------------------------------------------------------------------
def toy_figure(grid: dict[str, list], path: Sequence[dict[str, Any]], upto: int,
               gd_path: Sequence[dict[str, Any]] | None = None) -> go.Figure:
    """Contours of the toy loss, the SAM iterates up to step `upto`, and step `upto`'s anatomy:
    the gradient direction, the ascent point w + ε and the descent step −lr ∇L(w + ε)."""
    fig = go.Figure(go.Contour(x=grid["x"], y=grid["y"], z=grid["z"], colorscale="Viridis", ncontours=30,
                               colorbar={"title": {"text": "loss L(w)"}}, name="loss",
                               hovertemplate="w₁ %{x:.3f}, w₂ %{y:.3f}<br>loss %{z:.4g}<extra></extra>"))
    if gd_path:
        xs = [p["w"][0] for p in gd_path] + [gd_path[-1]["next"][0]]
        ys = [p["w"][1] for p in gd_path] + [gd_path[-1]["next"][1]]
        # pink, not white: the legend's sample must read on the light theme's white background too
        fig.add_scatter(x=xs, y=ys, mode="lines", line={"color": "#e377c2", "dash": "dot", "width": 2.5},
                        name="gradient descent")
    shown = path[: upto + 1]
    fig.add_scatter(x=[p["w"][0] for p in shown], y=[p["w"][1] for p in shown], mode="lines+markers",
                    marker={"size": 4, "color": "orange"}, line={"color": "orange"}, name="SAM iterates")
    step = path[upto]
    w, ascent, nxt = step["w"], step["ascent"], step["next"]
    fig.add_scatter(x=[w[0], ascent[0]], y=[w[1], ascent[1]], mode="lines+markers", name="ascent w → w + ε",
                    line={"color": "red", "width": 3}, marker={"symbol": "arrow", "angleref": "previous", "size": 12})
    fig.add_scatter(x=[w[0], nxt[0]], y=[w[1], nxt[1]], mode="lines+markers", name="descent −lr ∇L(w + ε)",
                    line={"color": "cyan", "width": 3}, marker={"symbol": "arrow", "angleref": "previous", "size": 12})
    # equal scales so circles look round; the legend above the plot keeps clear of the w₁ title
    fig.update_layout(xaxis_title="weight w₁", yaxis_title="weight w₂", height=560, margin={"t": 60, "b": 50},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "center", "x": 0.5})
    fig.update_xaxes(range=[min(grid["x"]), max(grid["x"])], constrain="domain")
    fig.update_yaxes(range=[min(grid["y"]), max(grid["y"])], scaleanchor="x", scaleratio=1, constrain="domain")
    return fig


def toy_animation(grid: dict[str, list], path: Sequence[dict[str, Any]], gd_path: Sequence[dict[str, Any]],
                  *, max_frames: int = 60, frame_ms: int = 80) -> go.Figure:
    """`toy_figure` with plotly animation frames: the SAM and GD paths grow step by step, with the current
    SAM step's ascent and descent arrows; Play / Pause buttons and a step slider under the plot.
    At most `max_frames` frames (steps evenly spaced, the last one always included)."""
    fig = toy_figure(grid, path, 0, gd_path)
    count, frames_wanted = len(path), min(len(path), max_frames)
    shown = sorted({round(i * (count - 1) / max(1, frames_wanted - 1)) for i in range(frames_wanted)})
    frames = [go.Frame(name=str(t), data=_toy_traces(path, gd_path, t), traces=[1, 2, 3, 4]) for t in shown]
    fig.frames = frames
    play = {"label": "▶ play", "method": "animate",
            "args": [None, {"frame": {"duration": frame_ms, "redraw": False}, "fromcurrent": True,
                            "transition": {"duration": 0}}]}
    pause = {"label": "❚❚ pause", "method": "animate",
             "args": [[None], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate",
                               "transition": {"duration": 0}}]}
    fig.update_layout(
        updatemenus=[{"type": "buttons", "buttons": [play, pause], "direction": "left", "showactive": False,
                      "x": 0.0, "y": -0.08, "xanchor": "left", "yanchor": "top"}],
        sliders=[{"active": 0, "x": 0.2, "len": 0.8, "y": -0.06, "currentvalue": {"prefix": "step "},
                  "steps": [{"label": str(t), "method": "animate",
                             "args": [[str(t)], {"frame": {"duration": 0, "redraw": False}, "mode": "immediate"}]}
                            for t in shown]}],
        height=640, margin={"t": 60, "b": 120},
    )
    return fig


def _toy_traces(path, gd_path, t: int) -> list[go.Scatter]:
    """The four moving traces of `toy_animation` at step t: GD path, SAM iterates, ascent, descent."""
    gd = gd_path[: t + 1]
    sam = path[: t + 1]
    w, ascent, nxt = path[t]["w"], path[t]["ascent"], path[t]["next"]
    return [go.Scatter(x=[p["w"][0] for p in gd], y=[p["w"][1] for p in gd]),
            go.Scatter(x=[p["w"][0] for p in sam], y=[p["w"][1] for p in sam]),
            go.Scatter(x=[w[0], ascent[0]], y=[w[1], ascent[1]]),
            go.Scatter(x=[w[0], nxt[0]], y=[w[1], nxt[1]])]


# -- step 2: the diagonal linear network -----------------------------------------------------------------
def diag_table(result: dict[str, Any]) -> pd.DataFrame:
    rows = pd.DataFrame(result["rows"])
    rows["method"] = rows["method"].map(METHOD_NAMES)
    return rows[["method", "rho", "test_loss", "population_loss", "train_loss", "diverged"]]


def diag_best(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method, the ρ with the lowest held-out test loss among runs that did not diverge."""
    best: dict[str, dict[str, float]] = {}
    for row in result["rows"]:
        if row["diverged"]:
            continue
        if row["method"] not in best or row["test_loss"] < best[row["method"]]["test_loss"]:
            best[row["method"]] = {"rho": row["rho"], "test_loss": row["test_loss"]}
    return best


def diag_figure(result: dict[str, Any]) -> go.Figure:
    """Test loss after training against ρ (log scale); GD (no ρ) as a horizontal line."""
    rows = [r for r in result["rows"] if not r["diverged"]]
    fig = go.Figure()
    for method in ("nsam", "1sam"):
        pts = sorted((r["rho"], r["test_loss"]) for r in rows if r["method"] == method)
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                            name=METHOD_NAMES[method])
    gd = [r["test_loss"] for r in rows if r["method"] == "gd"]
    if gd:
        fig.add_hline(y=gd[0], line_dash="dash", line_color=REFERENCE_COLOURS["sgd"], annotation_text="GD")
    fig.update_yaxes(type="log", title="test loss (1000 held-out samples)")
    fig.update_xaxes(title="ρ (unnormalised perturbation)")
    fig.update_layout(height=420)
    return fig


# -- step 3: the sweep ------------------------------------------------------------------------------------
def accuracy_vs_m_figure(best_by_m: pd.DataFrame, references: pd.DataFrame, *, error: bool = False) -> go.Figure:
    """Best-ρ test accuracy (or error, %) against m with ±1 std error bars over seeds, n seeds in the
    hover; SGD / n-SAM / RW-SAM as horizontal reference lines."""
    fig = go.Figure()
    if not best_by_m.empty:
        data = best_by_m.sort_values("m")
        y = _as_metric(data["test_acc_mean"], error)
        fig.add_scatter(
            x=data["m"], y=y, error_y={"type": "data", "array": 100 * data["test_acc_std"].fillna(0)},
            mode="lines+markers", name="SAM / m-SAM (best ρ per m)",
            customdata=list(zip(data["rho"], data["n_seeds"])),
            hovertemplate="m=%{x}<br>%{y:.2f}% (best ρ=%{customdata[0]}, %{customdata[1]} seeds)<extra></extra>",
        )
    for _, ref in references.iterrows():
        value = _as_metric(pd.Series([ref["test_acc_mean"]]), error).iloc[0]
        rho = "" if pd.isna(ref["rho"]) else f", ρ={ref['rho']:g}"
        fig.add_hline(y=value, line_dash="dash", line_color=REFERENCE_COLOURS.get(ref["method"], "black"),
                      annotation_text=f"{METHOD_NAMES.get(ref['method'], ref['method'])}{rho} "
                                      f"({int(ref['n_seeds'])} seeds)")
    _m_axis(fig, best_by_m)
    fig.update_yaxes(title="test error (%)" if error else "test accuracy (%)")
    # the legend names the curve even when it is the only trace (the references are labelled lines)
    fig.update_layout(height=420, showlegend=True, margin={"t": 40},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0.0})
    return fig


def _m_axis(fig: go.Figure, best_by_m: pd.DataFrame) -> None:
    """Log m axis, large m on the left (m falls to the right), one tick at each m of the sweep."""
    ms = sorted(best_by_m["m"].unique().tolist()) if not best_by_m.empty else None
    fig.update_xaxes(type="log", title="m (samples per perturbation, log scale)", autorange="reversed",
                     tickvals=ms, ticktext=[f"{m:g}" for m in ms] if ms else None)


def _as_metric(acc: pd.Series, error: bool) -> pd.Series:
    return 100 * (1 - acc) if error else 100 * acc


def heatmap_figure(heatmap: pd.DataFrame) -> go.Figure:
    """Mean test accuracy over seeds on the m × ρ grid."""
    if heatmap.empty:
        return empty_figure("no finished SAM / m-SAM runs yet")
    table = heatmap.pivot_table(index="m", columns="rho", values="test_acc_mean").sort_index(ascending=False)
    seeds = heatmap.pivot_table(index="m", columns="rho", values="n_seeds").reindex_like(table)
    fig = go.Figure(go.Heatmap(
        z=100 * table.values, x=[f"{c:g}" for c in table.columns], y=[f"{int(i)}" for i in table.index],
        text=seeds.values, colorscale="Viridis", colorbar={"title": "test acc. (%)"},
        hovertemplate="m=%{y} ρ=%{x}<br>%{z:.2f}% (%{text} seeds)<extra></extra>",
        texttemplate="%{z:.1f}",
    ))
    # categories: the grid's values evenly spaced (as numbers the cells would stretch over 0..80)
    fig.update_xaxes(type="category", title="ρ (perturbation radius)")
    fig.update_yaxes(type="category", title="m (samples per perturbation)")
    fig.update_layout(height=380, margin={"t": 30})
    return fig


def gap_figure(best_by_m: pd.DataFrame) -> go.Figure:
    """Generalization gap (train − test accuracy, %) of the best-ρ runs against m."""
    fig = go.Figure()
    if not best_by_m.empty:
        data = best_by_m.sort_values("m")
        fig.add_scatter(x=data["m"], y=100 * data["gap_mean"], mode="lines+markers",
                        error_y={"type": "data", "array": 100 * data["gap_std"].fillna(0)}, name="gap")
    _m_axis(fig, best_by_m)
    fig.update_yaxes(title="train − test accuracy (points)")
    fig.update_layout(height=380, margin={"t": 30})
    return fig


def seeds_caption(tables: Any, config: RunConfig | None) -> str:
    """How the sweep numbers were measured: runs, seeds, data, selection."""
    runs = tables.runs
    done = int((runs["status"] == "completed").sum())
    seeds = sorted(runs["seed"].unique().tolist())
    data = ""
    if config is not None:
        d = config.data
        data = (f" Data: {d.name}, {d.n_train or 'all'} training samples, label noise {d.label_noise:g}; model "
                f"{config.model.name} (width {config.model.width}); {config.epochs} epochs, batch {config.batch_size}.")
        if d.label_noise > 0:
            data += (" Train accuracy (and so the gap) is measured against the noisy training labels, so "
                     "a model that does not fit the noise has a negative gap.")
    return (f"{done} of {len(runs)} runs completed; seeds {seeds} (training seed: initialisation and batch "
            f"order; the data split is fixed). Mean ± std over seeds of the final {tables.score_name}; where a cell "
            f"has several ρ, the one with the best mean {tables.score_name} is used (no separate validation "
            f"split).{data}")


def trend_sentence(best_by_m: pd.DataFrame) -> str:
    """Whether the smallest m beats the largest m by more than the seed spread, in words, from the data."""
    rows = best_by_m.dropna(subset=["test_acc_mean"]).sort_values("m")
    if len(rows) < 2:
        return "Not enough finished cells to compare m values yet."
    small, large = rows.iloc[0], rows.iloc[-1]
    diff = small["test_acc_mean"] - large["test_acc_mean"]
    spread = max(_zero_if_nan(small["test_acc_std"]), _zero_if_nan(large["test_acc_std"]))
    verdict = ("larger than" if abs(diff) > spread else "within")
    return (f"Best-ρ test accuracy at m = {int(small['m'])}: {100 * small['test_acc_mean']:.2f} ± "
            f"{100 * _zero_if_nan(small['test_acc_std']):.2f} % ({int(small['n_seeds'])} seeds) against "
            f"{100 * large['test_acc_mean']:.2f} ± {100 * _zero_if_nan(large['test_acc_std']):.2f} % at m = "
            f"{int(large['m'])}: a difference of {100 * diff:+.2f} points, {verdict} the seed spread "
            f"({100 * spread:.2f}).")


def _cell_name(row: pd.Series) -> str:
    if row["method"] in ("sam", "msam"):
        return f"m = {int(row['m'])}"
    if row["method"] == "ghostbn":
        return f"ghost-BN m = {int(row['m'])}"
    return METHOD_NAMES.get(row["method"], row["method"])


def _display_scale(regression: bool) -> tuple[float, str]:
    """Paired differences for display: points of accuracy, or test loss (reference − cell) for regression."""
    return (1.0, "test loss below the reference's") if regression else (100.0, "points of test accuracy")


def paired_figure(paired: pd.DataFrame, *, regression: bool) -> go.Figure:
    """The m-curve as paired differences against the largest m (SAM): mean ± 1 SE of the per-seed difference
    for every m (line), the ghost-BatchNorm control at its m (diamonds), and SGD / RW-SAM as dashed lines
    with their ± SE in the label. Above zero is better than SAM."""
    scale, unit = _display_scale(regression)
    fig = go.Figure()
    sharp = paired[paired["method"].isin(["sam", "msam"])].sort_values("m")
    if not sharp.empty:
        fig.add_scatter(x=sharp["m"], y=scale * sharp["diff_mean"], mode="lines+markers", name="SAM / m-SAM",
                        error_y={"type": "data", "array": scale * sharp["diff_se"].fillna(0)},
                        customdata=list(zip(sharp["rho"], sharp["n_pairs"], sharp["z"].fillna(0))),
                        hovertemplate="m=%{x}<br>%{y:.4g} ± SE (ρ=%{customdata[0]}, %{customdata[1]} seeds, "
                                      "z=%{customdata[2]:.1f})<extra></extra>")
    ghost = paired[paired["method"] == "ghostbn"]
    if not ghost.empty:
        fig.add_scatter(x=ghost["m"], y=scale * ghost["diff_mean"], mode="markers", name="ghost-BN control",
                        marker={"symbol": "diamond", "size": 11, "color": "#9467bd"},
                        error_y={"type": "data", "array": scale * ghost["diff_se"].fillna(0)})
    for _, row in paired[paired["method"].isin(["sgd", "nsam", "rwsam"])].iterrows():
        rho = "" if pd.isna(row["rho"]) else f", ρ={row['rho']:g}"
        fig.add_hline(y=scale * row["diff_mean"], line_dash="dash",
                      line_color=REFERENCE_COLOURS.get(row["method"], "black"),
                      annotation_text=f"{_cell_name(row)}{rho}: {scale * row['diff_mean']:+.3g} ± "
                                      f"{scale * _zero_if_nan(row['diff_se']):.2g}")
    fig.add_hline(y=0.0, line_color="#444", line_width=1)
    _m_axis(fig, pd.concat([sharp, ghost]) if not ghost.empty else sharp)
    fig.update_yaxes(title=f"paired difference vs SAM ({unit})")
    fig.update_layout(height=440, showlegend=True, margin={"t": 40},
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0.0})
    return fig


def paired_se_table(paired: pd.DataFrame, *, regression: bool) -> pd.DataFrame:
    """One row per cell: ρ, paired difference against the reference ± SE, z = mean / SE, seeds better."""
    scale, _ = _display_scale(regression)
    return pd.DataFrame({
        "cell": [_cell_name(row) for _, row in paired.iterrows()],
        "rho": paired["rho"],
        "difference": scale * paired["diff_mean"],
        "SE": scale * paired["diff_se"],
        "z": paired["z"],
        "better": [f"{int(b)} of {int(n)}" for b, n in zip(paired["n_better"], paired["n_pairs"])],
    })


def claims_sentence(paired: pd.DataFrame, *, regression: bool) -> str:
    """Which cells differ from the reference by at least 3 paired standard errors, in words, from the data."""
    scale, unit = _display_scale(regression)
    others = paired[(paired["n_pairs"] >= 2) & ~((paired["m"] == paired["reference_m"]) &
                                                 paired["method"].isin(["sam", "msam"]))]
    if others.empty:
        return "Not enough seeds finished in two cells to pair them yet."
    ref = paired.iloc[0]
    parts = []
    for _, row in others.iterrows():
        z = row["z"]
        verdict = "≥ 3 SE" if z == z and abs(z) >= 3 else "< 3 SE"
        parts.append(f"{_cell_name(row)} {scale * row['diff_mean']:+.3g} ± {scale * _zero_if_nan(row['diff_se']):.2g} "
                     f"(z = {_zero_if_nan(z):.1f}, {verdict}; {int(row['n_better'])} of {int(row['n_pairs'])} "
                     "seeds better)")
    return (f"Paired by seed against m = {int(ref['reference_m'])} (SAM) at ρ = {ref['reference_rho']:g}, in "
            f"{unit}, mean ± standard error of the per-seed differences: " + "; ".join(parts) + ".")


def _zero_if_nan(value: float) -> float:
    return 0.0 if value is None or value != value else float(value)


# -- step 4: noise and m-sharpness against m --------------------------------------------------------------
def noise_figure(curves: dict[str, dict[str, Any]]) -> go.Figure:
    """E‖∇L_I‖ against m for each model (label → msharp task result), measured (markers, ± spread between
    partitions) with the prediction sqrt(‖∇L‖² + (n − m)/(m (n − 1)) tr V) drawn over it (dashed, same
    colour): exact for the mean square, an upper bound for the mean by Jensen's inequality."""
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (label, result) in enumerate(curves.items()):
        colour = palette[i % len(palette)]
        rows = sorted(result["noise_curve"], key=lambda r: r["m"])
        fig.add_scatter(x=[r["m"] for r in rows], y=[r["mean"] for r in rows], mode="markers", name=label,
                        marker={"color": colour, "size": 8},
                        error_y={"type": "data", "array": [r["std_over_partitions"] for r in rows]})
        predicted = predicted_noise_curve(result)
        if predicted:
            fig.add_scatter(x=[p["m"] for p in predicted], y=[p["mean"] for p in predicted], mode="lines",
                            line={"color": colour, "dash": "dash"}, name=f"{label}: predicted from ‖∇L‖, tr V")
    fig.update_xaxes(type="log", title="m (micro-batch size)")
    fig.update_yaxes(title="E‖∇L_I(w)‖")
    fig.update_layout(height=400)
    return fig


def predicted_noise_curve(result: dict[str, Any], points: int = 40) -> list[dict[str, float]]:
    """The prediction for E‖∇L_I‖ on a fine grid of m from 1 to n (from the result's ‖∇L‖ and tr V)."""
    from samlab.noise import predicted_microbatch_grad_norm

    n = int(result["n"])
    noise = result["noise"]
    ms = sorted({max(1, min(n, round(n ** (i / (points - 1))))) for i in range(points)})
    return [predicted_microbatch_grad_norm(full_grad_norm=noise["full_grad_norm"], trace_v=noise["trace_v"], m=m, n=n)
            for m in ms]


def usam_regularizer_figure(curves: dict[str, dict[str, Any]], rho: float) -> go.Figure:
    """m-USAM's implicit regularizer against m for each model: the 1/m law (ρ / 2m) tr V of the SDE account
    (micro-batches drawn with replacement) from the measured tr V (dashed), and as markers the measured
    noise part (ρ/2)(E‖∇L_I‖² − ‖∇L‖²) over disjoint micro-batches, which follows the same law times the
    finite-population factor (n − m)/(n − 1) (zero at m = n, so not drawn there on the log axis)."""
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (label, result) in enumerate(curves.items()):
        colour = palette[i % len(palette)]
        n, noise = int(result["n"]), result["noise"]
        ms = sorted({max(1, round(n ** (j / 39))) for j in range(40)})
        fig.add_scatter(x=ms, y=[rho / (2 * m) * noise["trace_v"] for m in ms], mode="lines",
                        line={"color": colour, "dash": "dash"}, name=f"{label}: (ρ/2m) tr V")
        rows = [r for r in sorted(result["noise_curve"], key=lambda r: r["m"]) if r["m"] < n]
        fig.add_scatter(x=[r["m"] for r in rows],
                        y=[rho / 2 * (r["mean_sq"] - noise["full_grad_norm"] ** 2) for r in rows],
                        mode="markers", marker={"color": colour, "size": 8},
                        name=f"{label}: (ρ/2)(E‖∇L_I‖² − ‖∇L‖²) measured")
    fig.update_xaxes(type="log", title="m (micro-batch size)")
    fig.update_yaxes(type="log", title=f"noise regularizer at ρ = {rho:g}")
    fig.update_layout(height=400)
    return fig


def sharpness_figure(curves: dict[str, dict[str, Any]]) -> go.Figure:
    """Measured m-sharpness S_m against m for each model."""
    fig = go.Figure()
    for label, result in curves.items():
        rows = sorted(result["sharpness_curve"], key=lambda r: r["m"])
        if rows:
            fig.add_scatter(x=[r["m"] for r in rows], y=[r["sharpness"] for r in rows], mode="lines+markers",
                            name=label)
    fig.update_xaxes(type="log", title="m (micro-batch size)")
    fig.update_yaxes(title="m-sharpness S_m")
    fig.update_layout(height=380)
    return fig


def trace_table(curves: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([
        {"model": label, "tr V": r["noise"]["trace_v"], "‖∇L‖": r["noise"]["full_grad_norm"],
         "mean ‖∇f_i‖": r["noise"]["mean_sample_grad_norm"], "samples": r["n"],
         "partitions": r["params"]["partitions"], "ρ for S_m": r["params"]["rho"]}
        for label, r in curves.items()
    ])


# -- step 5: RW-SAM ------------------------------------------------------------------------------------------
def weights_figure(weights: dict[str, Any]) -> go.Figure:
    """RW-SAM weights n·p_i sorted (1 = uniform, i.e. SAM) and the per-sample gradient-norm scores."""
    order = sorted(range(len(weights["weights"])), key=lambda i: -weights["weights"][i])
    n = len(order)
    fig = go.Figure()
    # log scale: at large λ a few samples take almost all the weight and the rest fall by decades
    fig.add_bar(x=list(range(n)), y=[max(n * weights["weights"][i], WEIGHT_FLOOR) for i in order], name="n · p_i",
                hovertemplate="rank %{x}<br>n · p_i = %{y:.3g}<extra></extra>")
    fig.add_hline(y=1.0, line_dash="dash", line_color=REFERENCE_COLOURS["sgd"], annotation_text="uniform (SAM)")
    fig.update_layout(xaxis_title="samples, ranked by weight", yaxis_title="n · p_i (1 = uniform, log scale)",
                      height=340, margin={"t": 30})
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


WEIGHT_FLOOR = 1e-12  # weights below this are drawn at it (a log axis has no zero)


def norms_histogram(norms: Sequence[float]) -> go.Figure:
    fig = go.Figure(go.Histogram(x=list(norms), nbinsx=40,
                                 hovertemplate="‖∇f_i‖ %{x}<br>%{y} samples<extra></extra>"))
    fig.update_layout(xaxis_title="per-sample gradient norm ‖∇f_i(w)‖", yaxis_title="samples (count)", height=340,
                      margin={"t": 30})
    return fig


def format_float(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"
