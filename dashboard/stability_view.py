"""Figures and tables for the Stability page: pure functions of samlab.stability results, no streamlit.

The (B, σ) plane (Dexter et al., ICLR 2024): cells coloured by the theorem's sufficient condition
for divergence, the exact second-moment boundary B*(σ) and the theorem's boundary as lines, and
simulated majority divergence as markers. The model check: predicted against observed divergence
on an (η, B) grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from samlab import stability

THEOREM_COLOURS = ["rgba(99, 110, 250, 0.18)", "rgba(239, 85, 59, 0.45)"]  # stable-or-unknown, diverges
EXACT_COLOUR = "rgb(0, 160, 120)"
THEOREM_LINE_COLOUR = "rgb(239, 85, 59)"
SIMULATED_COLOUR = "rgba(128, 128, 128, 0.9)"


def grid_params(eta: float, n: int, lam_max: float, repeats: int = 10, steps: int = 1000, seed: int = 0) -> dict:
    """Params of the background grid for the page's sliders: B ∈ 1..n/2 − 1, σ ∈ 1..n/2 (the paper's
    49 × 50 grid at n = 100)."""
    half = max(n // 2, 2)
    return {
        "mode": "grid", "eta": float(eta), "n": int(n), "lam_max": float(lam_max),
        "Bs": list(range(1, half)), "sigmas": list(range(1, half + 1)),
        "repeats": int(repeats), "steps": int(steps), "seed": int(seed),
    }


def theorem_plane(lam_max: float, eta: float, n: int, Bs: Sequence[float], sigmas: Sequence[float]) -> np.ndarray:
    """[len(sigmas), len(Bs)] of 1.0 where the theorem predicts divergence, else 0.0."""
    return np.array([[float(stability.predicts_divergence(lam_max, s, eta, b, n)) for b in Bs] for s in sigmas])


def plane_figure(
    lam_max: float, eta: float, n: int, Bs: Sequence[float], sigmas: Sequence[float], *,
    grid: dict[str, Any] | None = None, marker: tuple[float, float] | None = None,
) -> go.Figure:
    """The (B, σ) plane: theorem colours for (λ_max, η, n); a grid result's exact boundary and simulation overlaid."""
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        x=list(Bs), y=list(sigmas), z=theorem_plane(lam_max, eta, n, Bs, sigmas), zmin=0, zmax=1,
        colorscale=[[0, THEOREM_COLOURS[0]], [0.5, THEOREM_COLOURS[0]], [0.5, THEOREM_COLOURS[1]], [1, THEOREM_COLOURS[1]]],
        showscale=False, name="theorem: divergence guaranteed (red)",
        hovertemplate="B = %{x}<br>σ = %{y}<br>theorem predicts divergence: %{z}<extra></extra>",
    ))
    fine = np.linspace(1.0, float(max(sigmas)), 200)
    fig.add_trace(go.Scatter(
        x=[stability.divergence_batch_size(lam_max, s, eta, n) for s in fine], y=fine, mode="lines",
        line={"color": THEOREM_LINE_COLOUR, "width": 2}, name="theorem boundary B = n / (1 + (σ/(ηλ))²)",
    ))
    if grid is not None and grid.get("rows"):
        rows, grid_bs, gp = grid["rows"], grid["params"]["Bs"], grid["params"]
        same = (gp["eta"], gp["n"], gp["lam_max"]) == (eta, n, lam_max)
        suffix = "" if same else f" (η = {gp['eta']:g}, n = {gp['n']}, λ_max = {gp['lam_max']:g})"
        exact_b = [r["exact_critical_batch"] if r["exact_critical_batch"] is not None else max(grid_bs) for r in rows]
        fig.add_trace(go.Scatter(
            x=exact_b, y=[r["sigma"] for r in rows], mode="lines+markers", marker={"size": 4},
            line={"color": EXACT_COLOUR, "width": 3}, name=f"exact boundary: ρ(second-moment map) = 1{suffix}",
            hovertemplate="σ = %{y}<br>B* = %{x:.2f}<extra></extra>",
        ))
        diverged = [(b, r["sigma"], f) for r in rows for b, f in zip(grid_bs, r["simulated_fraction"]) if f > 0.5]
        fig.add_trace(go.Scatter(
            x=[d[0] for d in diverged], y=[d[1] for d in diverged], mode="markers",
            marker={"symbol": "x-thin", "size": 6, "line": {"width": 1.5, "color": SIMULATED_COLOUR}},
            name=f"simulated: most runs diverged (‖w‖ × {gp['blowup']:g}){suffix}",
            customdata=[d[2] for d in diverged],
            hovertemplate="B = %{x}<br>σ = %{y}<br>diverged runs: %{customdata:.0%}<extra></extra>",
        ))
    if marker is not None:
        fig.add_trace(go.Scatter(
            x=[marker[0]], y=[marker[1]], mode="markers", name="slider (B, σ)",
            marker={"symbol": "circle-open", "size": 14, "line": {"width": 3}},
        ))
    fig.update_layout(
        xaxis={"title": "expected batch size B (samples)", "range": [0.5, max(Bs) + 0.5]},
        yaxis={"title": "coherence σ", "range": [0.5, max(sigmas) + 0.5]},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        height=560, margin={"t": 90},
        title={"text": f"SGD divergence in the (B, σ) plane · n = {n}, λ_max(H) = {lam_max:g}, η = {eta:g}"},
    )
    return fig


def grid_summary(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Counts over cells: theorem, exact and simulated divergence and where they disagree."""
    cells = [(p, e, s) for r in rows for p, e, s in zip(r["predicted"], r["exact"], r["simulated"])]
    return {
        "cells": len(cells),
        "theorem diverges": sum(p for p, _, _ in cells),
        "exact diverges": sum(e for _, e, _ in cells),
        "simulated diverges": sum(s for _, _, s in cells),
        "theorem without exact (must be 0)": sum(p and not e for p, e, _ in cells),
        "exact and simulated differ": sum(e != s for _, e, s in cells),
    }


def model_batch_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per B: the theorem's divergence learning rate and the largest η the analysis allows."""
    return pd.DataFrame([
        {"B": r["B"], "theorem divergence η ≥": r["theorem_lr"], "GD limit 2/λ_max": result["gd_lr_limit"],
         "largest possibly stable η": r["max_stable_lr"]}
        for r in result["per_batch"]
    ])


def model_check_figure(result: dict[str, Any]) -> go.Figure:
    """(B, η) grid: observed fraction diverged as colour, predicted-divergence boundary as a line."""
    cells = pd.DataFrame(result["cells"])
    bs = sorted(cells["B"].unique())
    etas = sorted(cells["eta"].unique())
    z = cells.pivot(index="eta", columns="B", values="observed_fraction").loc[etas, bs].to_numpy()
    fig = go.Figure(go.Heatmap(
        x=[str(b) for b in bs], y=[f"{e:.3g}" for e in etas], z=z, zmin=0, zmax=1, colorscale="Reds",
        colorbar={"title": "diverged runs (fraction)"},
        hovertemplate="B = %{x}<br>η = %{y}<br>diverged: %{z:.0%}<extra></extra>", name="observed",
    ))
    predicted = cells[cells["predicted_diverges"]]
    fig.add_trace(go.Scatter(
        x=[str(b) for b in predicted["B"]], y=[f"{e:.3g}" for e in predicted["eta"]], mode="markers",
        marker={"symbol": "x-thin", "size": 12, "line": {"width": 2, "color": SIMULATED_COLOUR}},
        name="predicted to diverge (theorem or η ≥ 2/λ_max)",
    ))
    fig.update_layout(
        xaxis={"title": "expected batch size B (samples)", "type": "category"},
        yaxis={"title": "learning rate η", "type": "category"},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0},
        height=440, margin={"t": 80},
    )
    return fig
