"""The entry point (`streamlit run app.py`): the navigation — Home, then every page under pages/ — and
the Home page itself: what samlab is, how to start, live system status, and links to every page."""

from __future__ import annotations

import streamlit as st

from dashboard import common as ui

PAGE_NOTES: dict[str, str] = {
    "Train": "configure a run (dataset, model, SAM variant, schedule, seeds), launch it, watch it live",
    "Runs": "filter, compare and export runs: overlaid curves, summary table, parallel coordinates",
    "Hessian": "top eigenvalues, trace and spectral density of trained models; λ_max against 2/η",
    "Landscape": "filter-normalized 1-D / 2-D loss surfaces, interpolations and trajectories",
    "Sweeps": "grids over m × ρ × seeds × methods, aggregated accuracy against m",
    "Lesson m-sharpness": "why does a smaller perturbation micro-batch m generalize better?",
    "Stability": "the coherence σ and the linear-stability condition of SGD, checked on real runs",
}


def _home() -> None:
    """The Home page: what samlab is, the quick start, live status, links to every page."""
    ui.page_setup(
        "samlab",
        "Sharpness-aware minimization (SAM) and the m-sharpness phenomenon: train, watch, compare, understand.",
    )

    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown(
            r"""
**SAM** (Foret et al., ICLR 2021) trains on the loss at an adversarially perturbed point
$w + \varepsilon$, $\varepsilon = \rho\, g / \lVert g \rVert$, to find flatter minima. **m-sharpness**: when each
perturbation is computed on a micro-batch of only $m$ samples (mSAM), test error falls as $m$ falls — with n-SAM (the
full-batch perturbation) no better than SGD (Andriushchenko & Flammarion, ICML 2022).
samlab implements SGD, SAM, ASAM, USAM, n-SAM, mSAM and RW-SAM on one mechanism, trains in
background processes (GPU when present), and measures sharpness, Hessian spectra, loss
landscapes and gradient-noise structure.
"""
        )
        st.subheader("Quick start")
        st.markdown(
            """
1. **Train** — pick the `digits-mlp` preset, set the seeds (e.g. `0, 1, 2`), press *Launch*.
   Runs start in the background; the page shows their curves live. You can close the tab.
2. **Runs** — select runs to overlay their curves, compare final accuracy, export CSV.
3. From Python or a shell: `python -m samlab submit --preset digits-cnn --set optim.m=8 --set optim.method=msam`.
"""
        )

    with right:
        st.subheader("System status")

        @st.cache_resource(show_spinner=False)
        def _devices() -> list[dict]:
            from samlab.devices import describe_devices

            return describe_devices()

        for dev in _devices():
            memory = f" · {dev['memory_gib']:.0f} GiB" if dev.get("memory_gib") else ""
            st.markdown(f"- `{dev['device']}` — {dev['name']}{memory}")
        st.markdown(f"Run store: `{ui.store_url_for_display()}`")

        @st.cache_data(ttl=30, show_spinner=False)
        def _backend() -> str:
            from samlab.runs.executors import describe_backend

            try:
                return describe_backend()
            except ValueError as err:  # a bad SAMLAB_EXECUTOR / SAMLAB_RAY_ADDRESS is shown, not raised
                return f"not usable: {err}"

        st.markdown(f"Runs go to: {_backend()}")

        @ui.live(5)
        def status_counts() -> None:
            try:
                counts = ui.get_store().count_by_status()
            except Exception as err:  # an unreachable store is shown, not raised
                ui.show_exception(err, "Run store")
                return
            finished = sum(counts[s] for s in ui.FINAL)
            cols = st.columns(4)
            cols[0].metric("queued", counts["queued"])
            cols[1].metric("running", counts["running"])
            cols[2].metric("finished", finished)
            cols[3].metric("failed", counts["failed"] + counts["diverged"])
            if sum(counts.values()) == 0:
                ui.empty_state("No runs yet — launch one on the Train page.", page=ui.TRAIN_PAGE,
                               link_label="Go to Train")

        status_counts()

    st.subheader("Pages")
    lessons = [p for p in ui.page_files() if "lesson" in p.stem.lower()]
    tools = [p for p in ui.page_files() if p not in lessons]
    cols = st.columns(2, gap="large")
    for column, heading, group in ((cols[0], "Tools", tools), (cols[1], "Lessons", lessons)):
        with column:
            st.markdown(f"**{heading}**")
            if not group:
                st.caption("none yet")
            for path in group:
                title = ui.page_title(path)
                ui.page_link(f"pages/{path.name}", title, icon=":material/insights:" if path in tools else ":material/school:")
                if title in PAGE_NOTES:
                    st.caption(PAGE_NOTES[title])


# No icon: Streamlit makes a page's icon the browser tab's while it is open, and a Material icon there is
# fetched from fonts.gstatic.com (unreachable offline); every page keeps page_setup's local one.
home = st.Page(_home, title="Home", default=True)
st.navigation([home, *ui.navigation_pages()]).run()
