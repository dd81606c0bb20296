"""The "tr V and m-sharpness against m" panel shared by the Sweeps and Lesson pages."""

from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard import common as ui
from dashboard import msharp_view as view
from samlab.checkpoints import checkpoint_of
from samlab.tasks.msharp import micro_batch_sizes

# One request for every model: S_m and the gradient-noise curve on a seeded 256-sample subset.
NOISE_REQUEST = {"ms": [256, 64, 16, 4, 1], "rho": 0.1, "n_samples": 256, "partitions": 4, "seed": 0}
NOISE_CAPTION = ("256 training samples (seeded subset), E‖∇L_I‖ over 4 random exact partitions (error bars: "
                 "spread between partitions), S_m by one SAM ascent step at ρ = 0.1, tr V with 1/n.")


def request_for(n_train: int | None) -> dict[str, Any]:
    """NOISE_REQUEST cut to a train set of n_train samples: all of them when fewer than its n_samples, and the
    micro-batch sizes that divide that many (so every m is an exact partition)."""
    n = min(NOISE_REQUEST["n_samples"], n_train or NOISE_REQUEST["n_samples"])
    if n == NOISE_REQUEST["n_samples"]:
        return dict(NOISE_REQUEST)
    return NOISE_REQUEST | {"n_samples": n, "ms": micro_batch_sizes(n)}


def noise_and_sharpness_panel(runs: dict[str, dict[str, Any]], key: str, *, rho: float | None = None) -> bool:
    """For each labelled finished run: a cached `msharp` background analysis (a button until it exists),
    then the tr V table, E‖∇L_I‖ with its prediction from ‖∇L‖ and tr V, and the S_m curve; with `rho`,
    also m-USAM's (ρ/2m) tr V at that ρ. Returns whether anything was drawn."""
    curves = {}
    for label, run in runs.items():
        checkpoint = checkpoint_of(run)
        request = request_for((run.get("params") or {}).get("data", {}).get("n_train"))
        task = ui.cached_or_submit("msharp", {"checkpoint": checkpoint, **request},
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
    if rho is not None:
        ui.show_figure(view.usam_regularizer_figure(curves, rho), key=f"{key}.usam")
    st.caption(NOISE_CAPTION + " Dashed: the prediction sqrt(‖∇L‖² + (n − m)/(m (n − 1)) tr V), exact for the "
               "mean square over micro-batches drawn without replacement and above the measured mean by Jensen's "
               "gap.")
    return True
