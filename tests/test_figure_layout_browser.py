"""The Hessian page's bar chart of eigenvalues and its spectral density stay readable for 1–8 runs:
each figure is drawn by plotly.js in headless Chromium at the width of a half-page column and of the
full page, the plot area is measured and the legend must sit below it, neither squeezing nor clipped.
Screenshots go to screenshots/hessian_bars_<n>runs_<width>.png."""

from __future__ import annotations

import numpy as np
import pytest

from dashboard import hessian_view as view
from dashboard.tables import LABEL_CHARS
from tests.test_browser import CHROMIUM, LAUNCH_ARGS, SHOTS

pytestmark = pytest.mark.browser

# (runs, width): a column of the page's two (one or two runs) and the whole page (more runs), and the
# worst case of eight runs in a column
CASES = ((1, 620), (2, 620), (4, 1300), (8, 1300), (8, 620))


def _results(n: int) -> list[tuple[str, dict]]:
    rng = np.random.default_rng(n)
    results = []
    for i in range(n):
        label = f"msam ρ={0.05 * (i + 1):g} m={2 ** i} cnn noise=0.2 lr=0.05 b=128 … · {i:06x}"[:LABEL_CHARS]
        top = sorted(rng.uniform(1, 40, 5), reverse=True)
        bottom = sorted(rng.uniform(-3, -0.1, 5), reverse=True)
        grid = np.linspace(-5, 45, 60)
        results.append((label, {"eigenvalues": {"largest": {"values": top}, "smallest": {"values": bottom}},
                                "density": {"grid": grid.tolist(), "density": np.exp(-grid ** 2 / 50).tolist()}}))
    return results


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on the PATH: install the Debian 'chromium' package to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.mark.parametrize("builder", ["eigenvalue_figure", "density_figure"])
def test_hessian_figures_keep_their_plot_area_for_one_to_eight_runs(browser, builder, tmp_path):
    SHOTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        for n, width in CASES:
            fig = getattr(view, builder)(_results(n))
            fig.update_layout(width=width)
            html = tmp_path / f"{builder}_{n}_{width}.html"
            fig.write_html(html, include_plotlyjs="directory", full_html=True)  # one plotly.min.js
            page.goto(html.as_uri())
            page.wait_for_selector(".main-svg")
            box = page.locator(".nsewdrag").first.bounding_box()  # the plot area
            svg = page.locator(".main-svg").first.bounding_box()
            legend = page.locator(".legend").first.bounding_box()
            page.locator(".plot-container").first.screenshot(
                path=str(SHOTS / f"hessian_{builder.split('_')[0]}_{n}runs_{width}px.png"))
            where = f"{builder}, {n} runs, {width} px"
            assert box["width"] >= 0.8 * width, where  # the legend does not squeeze the plot sideways
            assert box["height"] >= 250, where
            assert legend["y"] >= box["y"] + box["height"] + 30, where  # below the plot and its axis title
            assert legend["y"] + legend["height"] <= svg["y"] + svg["height"] + 1, where  # not clipped
            entries = page.locator(".legend .traces")
            assert entries.count() == n, where
    finally:
        page.close()
