"""Hessian: top and most negative eigenvalues, trace, spectral density and per-layer curvature of trained
runs side by side, and λ_max over training against the 2/η edge of stability."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui
from dashboard import hessian_view as view
from samlab.checkpoints import checkpoint_of

LIVE_STAGES_S = 30.0  # an analysis that computes: its partial result is drawn again at most this often

ui.page_setup(
    "Hessian",
    "Curvature of the training loss at the solutions SGD, SAM, mSAM and RW-SAM find: Lanczos eigenvalues, "
    "Hutch++ trace and stochastic Lanczos quadrature (PyHessian, Yao et al. 2020).",
)
st.markdown(
    r"""
The **top eigenvalue** $\lambda_{\max}$ is the sharpest direction of the loss; the **trace** sums the curvature of
all directions; the **spectral density** shows how it is spread (a bulk near zero and a few outliers is
typical). Negative eigenvalues mean the point is not a minimum along those directions. Every run is
measured on the **same seeded subset** of its train set, in eval mode (BatchNorm running statistics) unless
you pick train mode.
"""
)

params = ui.ViewParams(st.query_params, prefix="hessian")
run_ids = ui.run_picker("runs to compare", key="hessian.runs", multi=True,
                        help="e.g. SGD, SAM, mSAM and RW-SAM solutions of the same problem")
cols = st.columns(6)
k = int(params.slider(cols[0], "top-k eigenvalues", "k", 1.0, 20.0, default=5.0, step=1.0))
n_samples = int(params.slider(cols[1], "samples", "n_samples", 64.0, 4096.0, default=512.0, step=64.0))
trace_samples = int(params.slider(cols[2], "trace vectors (Hutch++)", "trace", 12.0, 300.0, default=99.0, step=3.0))
mode = params.radio(cols[3], "model mode", "mode", ["eval", "train"], default="eval")
seed = int(params.slider(cols[4], "seed", "seed", 0.0, 99.0, default=0.0, step=1.0))
per_layer = params.toggle(cols[5], "per-layer table", "per_layer", default=True)
log_density = params.toggle(st, "log-scale density", "log", default=True)
params.sync()

if not run_ids:
    st.info("Pick one or more completed training runs to measure their curvature.", icon=ui.ICON_INFO)
else:
    store = ui.get_store()
    runs = [store.get_run(i) for i in run_ids]
    labels = ui.run_labels(runs)
    requests = {run["id"]: view.request(checkpoint_of(run), k=k, n_samples=n_samples, trace_samples=trace_samples,
                                        mode=mode, seed=seed, per_layer=per_layer) for run in runs}
    ui.compute_all([("hessian", request) for request in requests.values()], key="hessian.submit_all")
    analyses: dict[str, dict | None] = {
        run_id: ui.cached_or_submit("hessian", request, label=f"Compute the spectrum of {labels[run_id]}",
                                    key=f"hessian.submit.{run_id}")
        for run_id, request in requests.items()
    }

    # An analysis that computes shows its progress in a frame that follows the run by itself (no script
    # run meanwhile); the page runs again when it ends, or at most every LIVE_STAGES_S with its partial result.
    def spectra_panel() -> None:
        results, versions = [], []
        for run_id, analysis in analyses.items():
            if analysis is None:
                continue
            if analysis["status"] != "completed":
                st.caption(labels[run_id])
                ui.task_progress(analysis, live_every_s=LIVE_STAGES_S)
            if analysis.get("result"):
                results.append((labels[run_id], analysis["result"]))
            versions.append((analysis["id"], analysis["status"], ui.result_digest(analysis)))
        if not results:
            return
        st.dataframe(view.summary_table(results), hide_index=True)
        st.caption(r"$\lambda_{\max}\,\eta / 2 \ge 1$ means full-batch gradient descent at the run's base learning rate would be "
                   "unstable at this point (Cohen et al. 2021). The trace's ± is the Hutch++ standard error.")
        # figures are rebuilt only when a result changed (a refresh without news redraws the same ones)
        memo = st.session_state.setdefault("hessian.figures", {})
        signature = (tuple(versions), log_density, per_layer)
        if memo.get("signature") != signature:
            memo.update(signature=signature, eigen=view.eigenvalue_figure(results),
                        density=view.density_figure(results, log_density),
                        layers=view.layer_figure(results) if per_layer else None)
        # side by side for one or two runs; stacked at full width beyond, where each legend has a row per run
        left, right = st.columns(2) if len(results) <= 2 else (st.container(), st.container())
        with left:
            ui.show_figure(memo["eigen"], key="hessian.eigenvalues")
        with right:
            ui.show_figure(memo["density"], key="hessian.density")
        if per_layer:
            ui.show_figure(memo["layers"], key="hessian.layers")
            for label, result in results:
                with st.expander(f"per-layer table · {label}"):
                    st.dataframe(view.layer_table(result), hide_index=True)

    spectra_panel()

# -- λ_max during training -----------------------------------------------------------------------------
st.subheader("λ_max during training")
st.caption("The top eigenvalue measured every N steps on a fixed subset (Train page: 'λ_max every (steps)'), "
           r"with $2/\eta(\text{step})$ dashed: under full-batch gradient descent $\lambda_{\max}$ rises to $2/\eta$ and hovers there "
           "(edge of stability, Cohen et al. 2021); SAM and small m keep it lower.")
# the trajectory picker follows the runs compared above until the user changes it
followed = st.session_state.get("hessian.trajectory_followed")
if run_ids and st.session_state.get("hessian.trajectory_runs") in (None, [], followed):
    st.session_state["hessian.trajectory_runs"] = st.session_state["hessian.trajectory_followed"] = list(run_ids)
TRAJECTORY_STATUSES = ("completed", "running", "cancelled")
trajectory_ids = ui.run_picker("runs", key="hessian.trajectory_runs", multi=True, statuses=TRAJECTORY_STATUSES,
                               default=run_ids or None)
if not trajectory_ids:
    if ui.list_runs(status=list(TRAJECTORY_STATUSES), limit=1):  # else the picker's empty state said it
        st.info("Pick runs to draw their λ_max over training; only runs trained with 'λ_max every (steps)' > 0 "
                "have these measurements.", icon=ui.ICON_INFO)
else:
    trajectory_runs = [ui.get_store().get_run(i) for i in trajectory_ids]
    trajectory_labels = ui.run_labels(trajectory_runs)
    running = any(r["status"] in ui.ACTIVE for r in trajectory_runs)

    @ui.live(5.0 if running else None)  # finished runs' curves do not change: drawn once
    def trajectory_panel() -> None:
        # finished runs' curves come from a cache, a training run's only rows new since the last refresh
        metrics = ui.load_run_metrics(trajectory_runs, names=["lambda_max", "lr"], kind="step",
                                      live_key="hessian.trajectory_curves")
        ui.show_figure(view.lambda_max_figure(metrics, trajectory_labels), key="hessian.trajectory")

    trajectory_panel()
