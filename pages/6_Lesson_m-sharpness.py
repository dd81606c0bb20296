"""Lesson: why does smaller m generalize better? Five steps, each measured live or read from runs the
page launches itself."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from dashboard import common as ui
from dashboard import msharp_view as view
from dashboard.msharp_panel import noise_and_sharpness_panel
from samlab import sweeps, toy
from samlab.checkpoints import checkpoint_of
from samlab.runs import sweeps as sweep_runs

ui.page_setup(
    "Lesson: m-sharpness",
    "Why does SAM generalize better when each perturbation sees fewer samples? Five steps, every "
    "number measured here.",
)
params = ui.ViewParams(st.query_params, prefix="lesson")

# -- step 1 ------------------------------------------------------------------------------------------------
st.header("1 · One SAM step, drawn")
st.markdown(
    "SAM (Foret et al., ICLR 2021) replaces the gradient at $w$ by the gradient at the worst nearby point: "
    r"$g = \nabla L(w)$, $\varepsilon = \rho\, g / \lVert g \rVert$ (the ascent step), then "
    r"$w \leftarrow w - \text{lr}\, \nabla L(w + \varepsilon)$ (the descent step). "
    "Below, a 2-D loss with a narrow deep dip on the slope of a wide basin."
)
c = st.columns(4)
rho = params.slider(c[0], "ρ", "toy_rho", 0.0, 0.8, default=0.4, step=0.05)
lr = params.slider(c[1], "learning rate", "toy_lr", 0.005, 0.05, default=0.02, step=0.005)
steps = int(params.slider(c[2], "steps", "toy_steps", 10.0, 400.0, default=300.0, step=10.0))
surface = toy.ToyLoss2D()
start = (-0.5, 0.3)
path = toy.sam_path(surface, start, lr=lr, rho=rho, steps=steps)
gd_path = toy.sam_path(surface, start, lr=lr, rho=0.0, steps=steps)
upto = int(params.slider(c[3], "show step", "toy_step", 0.0, float(steps - 1), default=0.0, step=1.0))
ui.show_figure(view.toy_figure(surface.grid(), path, upto, gd_path), key="lesson.toy")
end, gd_end = path[-1], gd_path[-1]
st.caption(
    f"From w₀ = {start}, {steps} steps of lr = {lr:g}: gradient descent ends at loss {gd_end['loss']:.3f} "
    f"(the dip's bottom is {float(surface(torch.tensor(surface.sharp_centre))):.3f}), SAM with "
    f"ρ = {rho:g} at loss {end['loss']:.3f}, the worst loss within ρ there being {end['ascent_loss']:.3f}. "
    "SAM cannot settle where a ρ-step uphill climbs steeply: it leaves dips narrower than ρ."
)

# -- step 2 ------------------------------------------------------------------------------------------------
st.header("2 · The cheap demonstration: a diagonal linear network")
st.markdown(
    "Andriushchenko & Flammarion (ICML 2022) train w = u⊙u − v⊙v on sparse regression (n = 20 samples, "
    "d = 30, a 3-sparse target, Gaussian inputs) with full-batch steps and unnormalised perturbations. "
    "**n-SAM** perturbs once with the gradient of the whole training set; **1-SAM** perturbs each sample "
    "with its own gradient. The paper reports test loss GD ≈ 1.6e-2, best n-SAM ≈ 1.6e-2, 1-SAM ≈ 6e-9 at "
    "ρ = 0.3 (their parametrisation u⊙v). Here every (method, ρ) trains at once."
)
setup = toy.DiagonalNetworkSetup()


@st.cache_data(show_spinner=False, max_entries=4)
def diagonal_demo(rhos: tuple[float, ...]) -> dict:
    return toy.diagonal_network_demo(setup, list(rhos))


if params.toggle(st, "run the diagonal-network demonstration (about 15 s on 2 cores)", "diag", default=False):
    with st.spinner("training GD, n-SAM and 1-SAM for every ρ…"):
        result = diagonal_demo(tuple(toy.DEFAULT_DIAG_RHOS))
    best = view.diag_best(result)
    m = st.columns(3)
    for col, method in zip(m, ("gd", "nsam", "1sam")):
        if method in best:
            rho_text = "" if method == "gd" else f" at ρ = {best[method]['rho']:g}"
            col.metric(f"{view.METHOD_NAMES[method]} test loss{rho_text}", f"{best[method]['test_loss']:.2e}")
    ui.show_figure(view.diag_figure(result), key="lesson.diag")
    st.caption(
        f"Measured just now: one data draw (data seed {setup.data_seed}), {setup.iterations} iterations, lr "
        f"{setup.lr:g}, init u = v = {setup.init_scale:g}; test loss on {setup.n_test} held-out samples; "
        f"{result['seconds']:.1f} s for all {len(result['rows'])} configurations. Deterministic: no seeds "
        "beyond the data."
    )
    with st.expander("all configurations"):
        st.dataframe(view.diag_table(result), hide_index=True)

# -- step 3 ------------------------------------------------------------------------------------------------
st.header("3 · A CNN-sized check: digits, accuracy against m")
spec = view.lesson_spec()
grids = "; ".join(f"m = {m}: ρ ∈ {spec.rhos_for(m)}" for m in sorted(spec.rhos_by_m, reverse=True))
st.markdown(
    f"The sweep behind this step trains the `{spec.base.name}` preset (a small BatchNorm CNN, batch "
    f"{spec.base.batch_size}) with SGD, SAM (m = {spec.base.batch_size}, the batch), m-SAM for m ∈ "
    f"{sorted(m for m in spec.ms if m < spec.base.batch_size)} and n-SAM (m = the whole train set, ρ ∈ "
    f"{spec.rhos}), over {len(spec.seeds)} seeds ({len(sweeps.sweep_configs(spec))} runs, a few minutes on 2 "
    f"cores with sweep workers). Each m gets its own four ρ ({grids}): the best ρ falls as m shrinks, "
    "because normalised m-SAM moves every micro-batch by the full radius ρ along its own gradient."
)
store = ui.get_store()
groups = sorted({r["group_id"] for r in store.list_runs(text=view.LESSON_SWEEP_NAME, limit=10_000)
                 if r["group_id"]})
group = groups[-1] if groups else None
if group is None:
    ui.empty_state("No lesson sweep yet.")
    if st.button("Launch the lesson sweep", key="lesson.launch"):
        try:
            group = sweep_runs.submit(spec, store=store)
            st.rerun()
        except ValueError as err:
            ui.show_exception(err, "Could not launch the sweep")
tables = None
if group is not None:
    state = sweep_runs.progress(group, store=store)
    st.progress(state["fraction"], text=f"{state['finished']} / {state['total']} runs finished "
                                         f"({state['counts']['running']} running)")
    tables = sweeps.aggregate(store, group)
    if tables.best_by_m.empty:
        st.info("No finished m-SAM runs yet; the figure fills in as runs finish (reload the page).")
    else:
        ui.show_figure(view.accuracy_vs_m_figure(tables.best_by_m, tables.references, error=True),
                       key="lesson.acc")
        # describe the runs as they were trained (the preset may have changed since the sweep ran)
        st.caption(view.seeds_caption(tables, ui.run_config(store.get_run(tables.runs.iloc[0]["run_id"]))))
        st.markdown(view.trend_sentence(tables.best_by_m))
        paired = sweeps.paired_differences(tables)
        st.markdown(view.paired_sentence(paired))
        show = tables.best_by_m[["m", "rho", "test_acc_mean", "test_acc_std", "n_seeds", "rhos_tried"]]
        st.dataframe(pd.concat([show, tables.references[["method", "rho", "test_acc_mean", "test_acc_std",
                                                          "n_seeds"]]]), hide_index=True)
        st.caption("Paired: for each best-ρ cell, its test accuracy minus that of the largest m's best-ρ cell "
                   "trained with the same seed (same initialisation and batch order), in points.")
        st.dataframe(view.paired_table(paired), hide_index=True)
        with st.expander("how to read these numbers"):
            st.markdown(
                "The m-sharpness claim is that, with ρ tuned for each m, test error falls as m falls. The "
                "published gains are a few tenths of a point to two points for deep image networks trained "
                "for hundreds of epochs (Andriushchenko & Flammarion 2022, Fig. 1). Here a two-layer CNN "
                "sees 512 digit images with noisy labels for 30 epochs and is tested on 360 images, so one "
                "test image is 0.28 points and the seed spread is of the size of the published gains. The "
                "paired differences remove the part of that spread the cells share (same seed, same "
                "initialisation and batch order). n-SAM is the far end of the m axis (m = the whole train "
                "set); the sentences above say, from the runs, which steps along m exceed the spread. "
                "Two traps: the best ρ falls with m, so a ρ grid shared by all m — or one too coarse to hit "
                "an m's best ρ — makes one end look better for want of tuning (here every m gets four ρ on "
                "one √2 ladder); and where small m and a smaller ρ reach what large m reaches at a larger ρ, "
                "m and ρ trade off and the best-ρ curve is flat. The diagonal network of step 2 isolates "
                "the effect of m itself; step 4 measures the quantity that changes with m."
            )

# -- step 4 ------------------------------------------------------------------------------------------------
st.header("4 · The explanation: gradient noise grows as m shrinks")
st.markdown(
    r"The SDE account (Luo et al., NeurIPS 2025): m-USAM's drift carries the regularizer "
    r"$\frac{\rho}{2m} \operatorname{tr} V$, $V$ the covariance of per-sample gradients, and normalised "
    r"m-SAM's carries $\rho\, \mathbb{E} \lVert \nabla L_I \rVert$ over micro-batches $I$ of size $m$ — both "
    "grow as m shrinks, so smaller m penalises gradient noise harder."
)
if tables is None or tables.best_by_m.empty:
    ui.empty_state("Measured on the models of the step-3 sweep once it has finished runs.")
else:
    done = tables.runs[(tables.runs["status"] == "completed") & (tables.runs["seed"] == 0)]
    picks = {}
    for _, row in tables.best_by_m.iterrows():
        match = done[(done["m"] == row["m"]) & (done["rho"] == row["rho"])]
        if not match.empty:
            picks[f"trained with m={int(row['m'])}"] = match.iloc[0]["run_id"]
    sgd = done[done["method"] == "sgd"]
    if not sgd.empty:
        picks["trained with SGD"] = sgd.iloc[0]["run_id"]
    if noise_and_sharpness_panel({label: store.get_run(run_id) for label, run_id in picks.items()},
                                 key="lesson.msharp"):
        st.caption("Seed-0 model of each best-ρ cell and of SGD.")

# -- step 5 ------------------------------------------------------------------------------------------------
@st.cache_data(show_spinner="computing per-sample gradient norms…", max_entries=16)
def rwsam_demo_weights(checkpoint: str, modified: float, lam: float) -> dict:
    """RW-SAM weights on the first 256 training samples (exact norms); cached per checkpoint version and λ
    so that moving another slider on the page does not reload the model and its data."""
    from samlab.checkpoints import load_trained
    from samlab.noise import rwsam_weights

    trained = load_trained(checkpoint)
    x, y = trained.data.x_train[:256], trained.data.y_train[:256]
    return rwsam_weights(trained.model, trained.loss_fn, x, y, lam, estimator="exact")


st.header("5 · RW-SAM: m-SAM's regularizer without micro-batches")
st.markdown(
    r"RW-SAM (Luo et al. 2025) keeps one perturbation but weights the samples by $p = \operatorname{softmax}"
    r"(\lambda s)$, $s_i \approx \lVert \nabla f_i \rVert$ (one extra forward pass with a random probe), so "
    "the perturbation leans toward "
    "the noisiest samples as small-m SAM does; the paper reports about 1/6 extra cost over SAM."
)
if tables is None or tables.runs.empty:
    ui.empty_state("Uses a trained model of the step-3 sweep.")
else:
    # Per-sample gradient norms are O(1–10) on these models: λ of a few tenths spreads the weights, while
    # λ ≳ 5 already puts them all on one sample. λ = 0 is SAM (uniform weights).
    lam = params.slider(st, "λ (0 is plain SAM: uniform weights)", "lam", 0.0, 5.0, default=0.5, step=0.1)
    done = tables.runs[tables.runs["status"] == "completed"]
    if not done.empty:
        run = store.get_run(done.iloc[0]["run_id"])
        checkpoint = checkpoint_of(run)
        if Path(checkpoint).is_file():
            weights = rwsam_demo_weights(checkpoint, Path(checkpoint).stat().st_mtime, lam)
            c = st.columns(2)
            with c[0]:
                ui.show_figure(view.weights_figure(weights), key="lesson.weights")
            with c[1]:
                ui.show_figure(view.norms_histogram(weights["scores"]), key="lesson.norms")
            st.caption(f"Model {run['name']} ({run['id'][:8]}); first 256 training samples; exact per-sample "
                       f"gradient norms. Effective sample count 1/Σp² = {weights['effective_samples']:.1f} of 256; "
                       f"largest weight {weights['max_weight']:.3f}.")
    cost = ui.load_metrics(done["run_id"].tolist(), names=["step_time"], kind="step") if not done.empty else None
    if cost is not None and not cost.empty:
        per_run = cost.groupby("run_id")["value"].median().rename("median step time (s)")
        methods = tables.runs.set_index("run_id")["method"]
        table = per_run.to_frame().join(methods).groupby("method")["median step time (s)"].agg(["median", "count"])
        st.dataframe(table.rename(columns={"median": "median step time (s)", "count": "runs"}))
        st.caption("Cost per step: the median over runs of each run's median logged step time, measured "
                   "during the sweep on this machine (shared; compare ratios).")
    refs = tables.references
    if "rwsam" not in set(refs["method"]):
        st.info("This sweep has no RW-SAM runs; launch one from the Sweeps page with the method RW-SAM to "
                "compare its accuracy with SAM and m-SAM.")
params.sync()
