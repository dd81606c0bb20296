"""Lesson: why does smaller m generalize better? Five steps, each measured live or read from runs the
page launches itself."""

from __future__ import annotations

from pathlib import Path

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
c = st.columns(3)
rho = params.slider(c[0], "ρ", "toy_rho", 0.0, 0.8, default=0.4, step=0.05)
lr = params.slider(c[1], "learning rate", "toy_lr", 0.005, 0.05, default=0.02, step=0.005)
steps = int(params.slider(c[2], "steps", "toy_steps", 10.0, 400.0, default=300.0, step=10.0))
surface = toy.ToyLoss2D()
start = (-0.5, 0.3)
path = toy.sam_path(surface, start, lr=lr, rho=rho, steps=steps)
gd_path = toy.sam_path(surface, start, lr=lr, rho=0.0, steps=steps)
st.caption("Press ▶ play to watch both paths grow, SAM's ascent (red) and descent (cyan) at every step; "
           "pause and drag the step slider to stop at any step.")
ui.show_figure(view.toy_animation(surface.grid(), path, gd_path), key="lesson.toy")
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
st.header("3 · A neural network: test loss against m")
spec = sweeps.lesson_spec()
base = spec.base
grids = ", ".join(f"m = {m}: ρ = {spec.rhos_for(m)[0]:g}" for m in sorted(spec.rhos_by_m, reverse=True))
st.markdown(
    f"One step beyond the diagonal network: a two-layer ReLU network (`{base.name}` preset: width "
    f"{base.model.width}, small initial weights) fitted with full-batch steps to n = {base.data.n_train} noisy "
    f"samples of a ReLU teacher with {base.data.sparsity} hidden units in {base.data.n_features} dimensions, "
    f"{base.epochs} steps; the test loss is measured on {base.data.n_test} clean held-out samples. The batch is "
    f"the whole train set, so SAM (m = {base.batch_size}) is n-SAM here. The sweep trains SGD, SAM, m-SAM and "
    f"RW-SAM (λ = {spec.lam:g}, ρ = {spec.rhos[0]:g}) on seeds {spec.seeds}, each cell at one ρ ({grids}) that "
    "`benchmarks/msharp_search.py` chose on seeds 0–3: the ρ were picked on other seeds than the ones "
    f"judged here. {len(sweeps.sweep_configs(spec))} runs, a few minutes on 2 idle cores with sweep workers."
)
store = ui.get_store()


def latest_group(name: str) -> str | None:
    groups = sorted({r["group_id"] for r in store.list_runs(text=name, limit=10_000) if r["group_id"]})
    return groups[-1] if groups else None


def launch_button(label: str, sweep_spec, key: str) -> None:
    if st.button(label, key=key):
        try:
            sweep_runs.submit(sweep_spec, store=store)
            st.rerun()
        except ValueError as err:
            ui.show_exception(err, "Could not launch the sweep")


def paired_block(group: str, key: str) -> sweeps.SweepTables:
    """Progress, the paired m-curve, the claims sentence and the table of one sweep; returns its tables."""
    state = sweep_runs.progress(group, store=store)
    st.progress(state["fraction"], text=f"{state['finished']} / {state['total']} runs finished "
                                         f"({state['counts']['running']} running)")
    tables = sweeps.aggregate(store, group)
    paired = sweeps.paired_differences(tables)
    if paired.empty:
        st.info("No finished runs to pair yet; the figure fills in as runs finish (reload the page).")
        return tables
    ui.show_figure(view.paired_figure(paired, regression=tables.regression), key=f"{key}.paired")
    st.markdown(view.claims_sentence(paired, regression=tables.regression))
    st.dataframe(view.paired_se_table(paired, regression=tables.regression), hide_index=True)
    st.caption(view.seeds_caption(tables, ui.run_config(store.get_run(tables.runs.iloc[0]["run_id"]))))
    return tables


group = latest_group(sweeps.LESSON_SWEEP_NAME)
tables = None
if group is None:
    ui.empty_state("No lesson sweep yet.")
    launch_button("Launch the lesson sweep", spec, "lesson.launch")
else:
    tables = paired_block(group, "lesson")
with st.expander("how to read these numbers"):
    st.markdown(
        "Each point is the mean over seeds of (SAM's test loss − the cell's test loss) for the same seed — the "
        "same initialisation and the same micro-batch order — with ± one standard error of that mean "
        "(std of the differences / √seeds); above zero is better than SAM. A difference is called a "
        "result only at 3 standard errors or more. ρ was chosen for every cell on seeds 0–3 and the "
        "differences are measured on the other seeds: choosing ρ on the same seeds would favour whichever "
        "cell had the luckiest draw. What the search found (README, \"m-sharpness search\"): the test loss "
        "falls from m = 60 to m = 20 to m = 6 and rises again at m = 2 and m = 1, so the best m is small but "
        "not the smallest; on the digits CNN the effect stays within a few tenths of a point."
    )

st.subheader("The BatchNorm control")
control = sweeps.control_spec()
st.markdown(
    "With BatchNorm, m-SAM changes two things at once: each micro-batch gets its own perturbation *and* its "
    "own normalisation statistics. The control `ghostbn` keeps m-SAM's statistics (BatchNorm per micro-batch "
    "of m) but perturbs once for the whole batch, as SAM does: ghost-BN − SAM is the normalisation effect, "
    f"m-SAM − ghost-BN the perturbation effect. On the `{control.base.name}` preset (the BatchNorm CNN, batch "
    f"{control.base.batch_size}), with RW-SAM (λ = {control.lam:g}) beside them, seeds {control.seeds}."
)
control_group = latest_group(sweeps.CONTROL_SWEEP_NAME)
if control_group is None:
    launch_button("Launch the BatchNorm control sweep", control, "lesson.launch_control")
else:
    paired_block(control_group, "lesson.control")

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
    finished = tables.runs[tables.runs["status"] == "completed"]
    first_seed = finished["seed"].min() if not finished.empty else None
    done = finished[finished["seed"] == first_seed]
    picks = {}
    for _, row in tables.best_by_m.iterrows():
        match = done[(done["m"] == row["m"]) & (done["rho"] == row["rho"])]
        if not match.empty:
            picks[f"trained with m={int(row['m'])}"] = match.iloc[0]["run_id"]
    sgd = done[done["method"] == "sgd"]
    if not sgd.empty:
        picks["trained with SGD"] = sgd.iloc[0]["run_id"]
    if noise_and_sharpness_panel({label: store.get_run(run_id) for label, run_id in picks.items()},
                                 key="lesson.msharp", rho=0.1):
        st.caption(f"The seed-{first_seed} model of each cell and of SGD, at the end of training.")

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
    # λ multiplies raw per-sample gradient norms, so what spreads the weights depends on their scale: on the
    # trained ReLU student they are hundredths, and λ of tens to hundreds is needed. λ = 0 is SAM.
    lam = params.slider(st, "λ (0 is plain SAM: uniform weights)", "lam", 0.0, 300.0,
                        default=float(sweeps.LESSON_RWSAM["lam"]), step=1.0)
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
