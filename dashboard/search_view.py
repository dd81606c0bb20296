"""Figures of an adaptive search (Sweeps page, "adaptive search" mode). Plotly only, no streamlit: each
builder takes the trial history of `samlab.search.trial_history`."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from dashboard.figures import _palette, empty_figure

STATUS_SYMBOLS = {"completed": "circle", "pruned": "x", "running": "circle-open", "failed": "triangle-down",
                  "cancelled": "square-open", "diverged": "triangle-down"}


def _ms(history: pd.DataFrame) -> list[int]:
    return sorted(history["m"].unique().tolist(), reverse=True)


def objective_vs_rho_figure(history: pd.DataFrame, last_epoch: dict[tuple[int, int], float]) -> go.Figure:
    """Per m, each trial's objective (mean final test accuracy, %) against its ρ on a log axis; a
    pruned or running trial sits at its last mean test accuracy (hollow / cross marker); the best
    trial of each m is ringed."""
    if history.empty:
        return empty_figure("no trials yet")
    fig = go.Figure()
    for i, m in enumerate(_ms(history)):
        rows = history[history["m"] == m]
        y = [row["objective"] if row["objective"] == row["objective"] else
             last_epoch.get((int(row["m"]), int(row["trial"])), float("nan")) for _, row in rows.iterrows()]
        fig.add_scatter(
            x=rows["rho"], y=[100 * v for v in y], mode="markers", name=f"m={m}",
            marker={"color": _palette(i), "size": 9, "symbol": [STATUS_SYMBOLS.get(s, "circle") for s in rows["status"]],
                    "line": {"width": [3 if b else 0 for b in rows["is_best"]], "color": "black"}},
            customdata=list(zip(rows["trial"], rows["status"])),
            hovertemplate="ρ=%{x:.4g}<br>%{y:.2f}%<br>trial %{customdata[0]} (%{customdata[1]})<extra></extra>",
        )
    fig.update_xaxes(type="log", title="ρ (log scale)")
    fig.update_yaxes(title="mean test accuracy over seeds (%)")
    fig.update_layout(height=400, margin={"t": 30}, legend={"title": {"text": "× pruned, ○ running"}})
    return fig


def best_so_far_figure(history: pd.DataFrame) -> go.Figure:
    """Per m, the best objective so far (%) against the trial number: how fast each study converges."""
    done = history.dropna(subset=["best_so_far"]) if not history.empty else history
    if done.empty:
        return empty_figure("no completed trial yet")
    fig = go.Figure()
    for i, m in enumerate(_ms(done)):
        rows = done[done["m"] == m]
        fig.add_scatter(x=rows["trial"], y=100 * rows["best_so_far"], mode="lines+markers", name=f"m={m}",
                        line={"shape": "hv", "color": _palette(i)},
                        hovertemplate="trial %{x}<br>best so far %{y:.2f}%<extra></extra>")
    fig.update_xaxes(title="trial number (per m)")
    fig.update_yaxes(title="best mean test accuracy so far (%)")
    fig.update_layout(height=400, margin={"t": 30})
    return fig


def best_table(best: pd.DataFrame) -> pd.DataFrame:
    """The live best-ρ-per-m table, accuracy in %."""
    out = best.copy()
    out["best_objective"] = 100 * out["best_objective"]
    return out.rename(columns={"best_rho": "best ρ", "best_objective": "best test acc (%)",
                               "best_trial": "trial", "finished": "trials finished"})
