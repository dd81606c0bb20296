"""Landscape: filter-normalized 1-D and 2-D loss surfaces of trained runs, interpolation between two
solutions and a flatness readout (Li et al., NeurIPS 2018)."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui
from dashboard import landscape_view as view
from samlab.checkpoints import checkpoint_of

# An analysis that computes shows its progress in a frame that follows the run by itself (no script run
# meanwhile); the page runs again when it ends, or at most this often with the surface's next, finer grid.
LIVE_STAGES_S = 5.0

ui.page_setup(
    "Landscape",
    "Loss surfaces around trained solutions along filter-normalized random directions "
    "(Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018).",
)
st.markdown(
    """
A random direction d is rescaled **filter by filter** to the norm of the matching filter of the weights
(biases and normalization layers stay put), so a step of 1 moves every filter by its own size and
minima of differently scaled networks can be compared. Every run gets the **same random seed and the
same axes**; each direction is normalized to that run's own weights.
"""
)

params = ui.ViewParams(st.query_params, prefix="landscape")
run_ids = ui.run_picker("runs to compare", key="landscape.runs", multi=True,
                        help="SGD, SAM, mSAM, RW-SAM solutions side by side")
if not run_ids:
    st.info("Pick one or more completed training runs.", icon=ui.ICON_INFO)
    st.stop()
store = ui.get_store()
runs = [store.get_run(i) for i in run_ids]
labels = ui.run_labels(runs)
checkpoints = [checkpoint_of(r) for r in runs]

cols = st.columns(6)
kind = params.radio(cols[0], "slice", "kind", ["2d", "1d"], default="2d")
span = params.slider(cols[1], "half-width (filter-normalized units)", "span", 0.1, 2.0, default=1.0, step=0.1)
points = int(params.slider(cols[2], "points per axis", "points", 5.0, 61.0, default=21.0, step=2.0))
seed = int(params.slider(cols[3], "directions seed", "seed", 0.0, 99.0, default=0.0, step=1.0))
split = params.radio(cols[4], "data", "data", ["train", "test"], default="train")
n_samples = int(params.slider(cols[5], "samples", "n_samples", 128.0, 4096.0, default=1024.0, step=128.0))
cols = st.columns(3)
directions = params.radio(cols[0], "directions", "directions", ["random", "pca"], default="random")
trajectory = params.toggle(cols[1], "overlay the training trajectory", "trajectory", default=False)
log_scale = params.toggle(cols[2], "log scale", "log", default=False)
params.sync()
if directions == "pca":
    st.caption("PCA directions: the top two principal directions of the run's saved snapshots minus the final "
               "weights (Li et al. §7); the trajectory then lies close to the plane.")

compute_all_slot = st.empty()  # filled at the end, once every request on the page is known
request = view.request(checkpoints, kind, span=span, points=points, seed=seed, data=split,
                       n_samples=n_samples, directions=directions, trajectory=trajectory)
surface_run = ui.cached_or_submit("landscape", request, label="Compute the surfaces", key="landscape.surface")
page_requests = [request]


def surface_panel() -> None:
    result = ui.task_result(surface_run, live_every_s=LIVE_STAGES_S)
    if not result or "runs" not in result:
        return
    for entry, run_id in zip(result["runs"], run_ids):
        entry["label"] = labels.get(run_id, entry["label"])
    if result["kind"] == "1d":
        ui.show_figure(view.curves_1d_figure(result, log_scale), key="landscape.curves")
        return
    zrange = view.shared_zrange(result, log_scale)
    style = st.radio("view", ["contour", "3-D surface"], horizontal=True, key="landscape.style")
    columns = st.columns(min(len(result["runs"]), 2))
    for index in range(len(result["runs"])):
        with columns[index % len(columns)]:
            figure = (view.contour_figure if style == "contour" else view.surface_figure)(
                result, index, log_scale, zrange)
            ui.show_figure(figure, key=f"landscape.surface.{index}")
            explained = result["runs"][index].get("explained_variance")
            if explained:
                st.caption("variance explained by the two PCA directions: "
                           + ", ".join(f"{100 * v:.1f}%" for v in explained))


surface_panel()

# -- interpolation --------------------------------------------------------------------------------------
st.subheader("Interpolation between two solutions")
st.caption("Train and test loss along (1 − α) θ_a + α θ_b for α ∈ [−0.5, 1.5]; BatchNorm statistics are "
           "interpolated too, so α = 0 and α = 1 reproduce the two runs.")
if len(run_ids) < 2:
    ui.empty_state("Pick two runs above to interpolate between their solutions.")
else:
    c = st.columns(3)
    first = c[0].selectbox("from (α = 0)", run_ids, format_func=labels.get, key="landscape.from")
    second = c[1].selectbox("to (α = 1)", [i for i in run_ids if i != first], format_func=labels.get,
                            key="landscape.to")
    steps = int(c[2].slider("points", 11, 81, 41, step=10, key="landscape.interp_points"))
    interp_request = {"checkpoints": [checkpoints[run_ids.index(first)], checkpoints[run_ids.index(second)]],
                      "kind": "interpolation", "n_samples": n_samples,
                      "grid": {"min": -0.5, "max": 1.5, "n": steps}}
    page_requests.append(interp_request)
    interp_run = ui.cached_or_submit("landscape", interp_request, label="Interpolate", key="landscape.interp")

    def interpolation_panel() -> None:
        result = ui.task_result(interp_run, live_every_s=LIVE_STAGES_S)
        if result and "alphas" in result:
            for entry, run_id in zip(result["runs"], (first, second)):
                entry["label"] = labels.get(run_id, entry["label"])
            ui.show_figure(view.interpolation_figure(result, log_scale), key="landscape.interpolation")

    interpolation_panel()

# -- flatness -----------------------------------------------------------------------------------------------
st.subheader("Flatness")
st.caption("Loss increase L(θ ± r d) − L(θ) at a few radii r along filter-normalized random directions "
           "(mean and max over directions and both signs): lower means flatter.")
c = st.columns(2)
n_directions = int(c[0].slider("random directions", 1, 16, 4, key="landscape.flat_dirs"))
radii = c[1].multiselect("radii", [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0], default=[0.05, 0.1, 0.2, 0.5],
                         key="landscape.radii")
if radii:
    flat_request = {"checkpoints": checkpoints, "kind": "flatness", "radii": sorted(radii), "seed": seed,
                    "n_directions": n_directions, "data": split, "n_samples": n_samples}
    page_requests.append(flat_request)
    flat_run = ui.cached_or_submit("landscape", flat_request, label="Measure flatness", key="landscape.flat")

    def flatness_panel() -> None:
        result = ui.task_result(flat_run, live_every_s=LIVE_STAGES_S)
        if result and any("radii" in r for r in result.get("runs", [])):
            for entry, run_id in zip(result["runs"], run_ids):
                entry["label"] = labels.get(run_id, entry["label"])
            ui.show_figure(view.flatness_figure(result), key="landscape.flatness")
            st.dataframe(view.flatness_table(result), hide_index=True)

    flatness_panel()
else:
    st.caption("Pick at least one radius.")

ui.compute_all([("landscape", r) for r in page_requests], key="landscape.submit_all", where=compute_all_slot)
