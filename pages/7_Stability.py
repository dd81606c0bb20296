"""Stability: the coherence σ and the linear-stability condition of SGD (Dexter et al., ICLR 2024),
on the paper's synthetic problem and at the minimum of a trained model."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui
from dashboard import stability_view as view
from samlab import stability
from samlab.checkpoints import checkpoint_of

# An analysis that computes shows its progress in a frame that follows the run by itself (no script run
# meanwhile); the page runs again when it ends, or at most this often with the cells computed since.
LIVE_STAGES_S = 5.0

ui.page_setup(
    "Stability",
    "When does SGD leave a minimum? The coherence of per-sample Hessians and the batch size decide "
    "(Dexter et al., ICLR 2024).",
)

st.markdown(
    r"""
Near a minimum each sample's loss is a quadratic with Hessian $H_i$. The **coherence**
"""
)
st.latex(r"\sigma = \frac{\lambda_{\max}(S)}{\max_i \lambda_{\max}(H_i)}, \qquad S_{ij} = \sqrt{\operatorname{tr}(H_i H_j)}")
st.markdown(
    r"""
lies between 1 and $n$: **near 1** the per-sample curvatures point in different directions, so a small
batch sees only a little of the sharpness at a time; **near $n$** they agree, every sample carries the
full sharpness, and small batches behave like large ones. With Bernoulli sampling of expected batch
size $B$, SGD is guaranteed to diverge when
"""
)
st.latex(r"\lambda_{\max}(H) \;\ge\; \frac{\sigma}{\eta} \left(\frac{n}{B} - 1\right)^{-1/2}")
st.markdown(
    r"""
— a sufficient condition; the exact boundary is where the spectral radius of the second-moment map
"""
)
st.latex(r"M \;\mapsto\; (I - \eta H)\, M\, (I - \eta H) + \eta^2 \left(\frac{1}{nB} - \frac{1}{n^2}\right) "
         r"\sum_i H_i M H_i")
st.markdown("crosses 1.")

params = ui.ViewParams(st.query_params, prefix="stability")

# -- theorem calculator --------------------------------------------------------------------------------
st.subheader("The condition")
cols = st.columns(5)
eta = params.slider(cols[0], "learning rate η", "eta", 0.05, 2.0, default=0.8, step=0.05)
n = int(params.slider(cols[1], "samples n", "n", 10.0, 200.0, default=100.0, step=2.0))
B = params.slider(cols[2], "expected batch size B", "B", 1.0, float(n), default=min(10.0, float(n)), step=1.0)
sigma = params.slider(cols[3], "coherence σ", "sigma", 1.0, float(n), default=min(10.0, float(n)), step=0.5)
lam_max = params.slider(cols[4], "λ_max(H)", "lam", 0.1, 10.0, default=2.0, step=0.1)

try:
    diverges = stability.predicts_divergence(lam_max, sigma, eta, B, n)
    m = st.columns(4)
    m[0].metric("theorem", "diverges" if diverges else "no guarantee",
                help=r"True when $\lambda_{\max}(H) \ge (\sigma/\eta)(n/B - 1)^{-1/2}$; silent (not 'stable') otherwise.")
    lr = stability.divergence_lr(lam_max, sigma, B, n)
    m[1].metric("divergence guaranteed for η ≥", "— (full batch)" if lr == float("inf") else f"{lr:.4g}")
    m[2].metric("… and for B ≤", f"{stability.divergence_batch_size(lam_max, sigma, eta, n):.4g}")
    m[3].metric("full-batch GD", "stable" if stability.gd_stable(lam_max, eta) else "unstable",
                help=f"GD is stable iff η < 2/λ_max = {2 / lam_max:.4g}")
except ValueError as err:
    ui.show_exception(err, "Invalid settings")
    st.stop()

# -- the paper's plane --------------------------------------------------------------------------------
st.subheader("The (B, σ) plane on the paper's construction")
st.caption(
    "n rank-one per-sample Hessians with λ_max(H) fixed and the coherence exactly σ; red cells: the "
    "theorem guarantees divergence. The exact boundary and the simulated SGD runs (majority of repeats "
    "whose ‖w‖ grows 1000×) come from a background run for the η, n and λ_max above."
)
with st.expander("simulation settings"):
    c = st.columns(3)
    repeats = int(params.slider(c[0], "repeats per cell", "repeats", 1.0, 20.0, default=10.0, step=1.0))
    steps = int(params.slider(c[1], "SGD steps", "steps", 100.0, 2000.0, default=1000.0, step=100.0))
    seed = int(params.slider(c[2], "seed", "seed", 0.0, 99.0, default=0.0, step=1.0))

grid_request = view.grid_params(eta, n, lam_max, repeats=repeats, steps=steps, seed=seed)
grid_run = ui.cached_or_submit("stability", grid_request, label="Compute the exact boundary and simulate SGD",
                               key="stability.grid")
plane_bs, plane_sigmas = grid_request["Bs"], grid_request["sigmas"]


def grid_panel() -> None:
    result = ui.task_result(grid_run, live_every_s=LIVE_STAGES_S)
    ui.show_figure(view.plane_figure(lam_max, eta, n, plane_bs, plane_sigmas, grid=result, marker=(B, sigma)),
                   key="stability.plane")
    if result and result.get("rows"):
        st.dataframe([view.grid_summary(result["rows"])], hide_index=True)


grid_panel()

# -- a trained model ----------------------------------------------------------------------------------
st.subheader("A trained model")
st.caption(
    "σ and λ_max(H) at the end of a training run (per-sample Hessians of the first train samples), the "
    "largest learning rate the analysis leaves possibly stable for each B, and SGD restarted from a small "
    "perturbation of the minimum on an (η, B) grid. Train a small model to near-zero loss first, e.g. the "
    "digits MLP preset."
)
params.sync()
run_id = ui.run_picker("trained run", key="stability.run")
if run_id is None:
    st.stop()
train_run = ui.get_store().get_run(run_id)
checkpoint = checkpoint_of(train_run)
c = st.columns(4)
n_samples = int(params.slider(c[0], "samples n", "model_n", 16.0, 512.0, default=128.0, step=16.0))
method = params.radio(c[1], "per-sample Hessians", "method", ["matrix_free", "exact"], default="matrix_free")
model_steps = int(params.slider(c[2], "SGD steps", "model_steps", 50.0, 1000.0, default=300.0, step=50.0))
model_repeats = int(params.slider(c[3], "repeats", "model_repeats", 1.0, 8.0, default=3.0, step=1.0))
params.sync()

model_request = {
    "mode": "model", "checkpoint": checkpoint, "n_samples": n_samples, "method": method,
    "steps": model_steps, "repeats": model_repeats, "eta_scale": "gd_limit",
    "etas": [0.1, 0.25, 0.5, 0.75, 1.0, 1.25], "Bs": [b for b in (1, 2, 4, 8, 16, 32, 64) if b < n_samples],
}
model_run = ui.cached_or_submit("stability", model_request, label="Measure σ and restart SGD", key="stability.model")


def model_panel() -> None:
    if model_run is None:
        return
    result = ui.task_result(model_run, live_every_s=LIVE_STAGES_S) or {}
    curvature = result.get("coherence")
    if curvature:
        m = st.columns(4)
        m[0].metric("coherence σ", f"{curvature['sigma']:.3g}", help=f"between 1 and n = {curvature['n']}")
        m[1].metric("λ_max(H)", f"{curvature['lam_max']:.4g}")
        m[2].metric("max_i λ_max(H_i)", f"{curvature['max_sample_lam_max']:.4g}")
        negative = curvature.get("negative_curvature")
        m[3].metric("negative curvature removed", "—" if negative is None else f"{negative:.2%}",
                    help="max_i |λ_min(H_i)| / max_i λ_max(H_i): how far the H_i are from the PSD the theorem assumes")
    if result.get("cells"):
        st.dataframe(view.model_batch_table(result), hide_index=True)
        ui.show_figure(view.model_check_figure(result), key="stability.model_check")
        st.caption(
            f"cells where the theorem predicts divergence but most restarts stayed: {result['false_alarms']} "
            "(the theorem assumes PSD per-sample Hessians at an exact minimum; large negative curvature or a "
            "non-zero gradient at the trained point break that assumption)"
        )


model_panel()
