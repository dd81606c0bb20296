"""The "tr V and m-sharpness against m" panel shared by the Sweeps and Lesson pages."""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import msharp_view as view
from samlab.checkpoints import checkpoint_of

# One request for every model: S_m and the gradient-noise curve on a seeded 256-sample subset.
NOISE_REQUEST = {"ms": [256, 64, 16, 4, 1], "rho": 0.1, "n_samples": 256, "partitions": 4, "seed": 0}
NOISE_CAPTION = ("256 training samples (seeded subset), E‖∇L_I‖ over 4 random exact partitions (error bars: "
                 "spread between partitions), S_m by one SAM ascent step at ρ = 0.1, tr V with 1/n.")


def noise_and_sharpness_panel(runs: dict[str, dict[str, Any]], key: str) -> bool:
    """For each labelled finished run: a cached `msharp` background analysis (a button until it exists),
    then the tr V table and the E‖∇L_I‖ and S_m curves. Returns whether anything was drawn."""
    curves = {}
    for label, run in runs.items():
        checkpoint = checkpoint_of(run)
        task = ui.cached_or_submit("msharp", {"checkpoint": checkpoint, **NOISE_REQUEST},
                                   label=f"Measure tr V and m-sharpness ({label})", key=f"{key}.{run['id']}")
        if task and task.get("result"):
            curves[label] = task["result"]
    if not curves:
        return False
    st.dataframe(view.trace_table(curves), hide_index=True)
    left, right = st.columns(2)
    with left:
        ui.show_figure(view.noise_figure(curves), key=f"{key}.noise")
    with right:
        ui.show_figure(view.sharpness_figure(curves), key=f"{key}.sharp")
    st.caption(NOISE_CAPTION)
    return True
