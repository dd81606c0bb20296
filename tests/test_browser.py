"""End to end in a real browser: launch a tiny run from the Train page, watch it complete, find it on Runs.

Starts `streamlit run app.py` on a free loopback port with a temporary run store, drives headless
Chromium through Playwright, and saves screenshots (light and dark theme) under `screenshots/`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.browser

# found on PATH, as `.ci/run` finds it (`command -v chromium`) before it installs the package
CHROMIUM = shutil.which("chromium")
ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "screenshots"
COMPLETED = re.compile(r"100% · completed")  # the progress line of a completed run
# Streamlit scrolls inside its own container, so a full-page screenshot is the viewport: make it tall.
VIEWPORT = {"width": 1400, "height": 2600}
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer on {url} within {timeout:.0f} s")


@pytest.fixture
def server(tmp_path):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: install the Debian 'chromium' package to run the browser tests")
    pytest.importorskip("playwright.sync_api")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "SAMLAB_STORE": f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}",
        "SAMLAB_SCHEDULER_IDLE_S": "5",
    })
    with running_streamlit(env, "127.0.0.1", port, tmp_path / "streamlit.log") as url:
        yield url


@contextmanager
def running_streamlit(env: dict, address: str, port: int, log_path: Path):
    """`streamlit run app.py` bound to `address`, reached at http://127.0.0.1:port; stopped afterwards."""
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", address,
             "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            _wait_healthy(url, proc)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _new_page(browser, page_errors: list[str], color_scheme: str = "light"):
    """A page with 60 s timeouts whose uncaught errors go to `page_errors`."""
    page = browser.new_page(viewport=VIEWPORT, color_scheme=color_scheme)
    page.set_default_timeout(60_000)
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    return page


@contextmanager
def _browser_page(page_errors: list[str]):
    """A page of a headless Chromium (`_new_page`); the browser is closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            yield _new_page(browser, page_errors)
        finally:
            browser.close()


def _fill_number(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Enter")
    _settle(page)  # the rerun that the new value triggers is over


def test_launch_watch_and_compare_in_a_browser(server):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(exist_ok=True)
    expect.set_options(timeout=60_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page_errors: list[str] = []
            page = _new_page(browser, page_errors)
            page.goto(server)
            expect(page.get_by_text("System status")).to_be_visible()
            expect(page.get_by_text("No runs yet")).to_be_visible()  # the live status fragment
            expect(page.get_by_role("link", name="Runs").last).to_be_visible()
            page.screenshot(path=str(SHOTS / "home.png"), full_page=True)

            page.goto(f"{server}/Train")
            expect(page.get_by_role("button", name="Launch")).to_be_visible()
            _fill_number(page, "train samples", "256")
            _fill_number(page, "epochs", "2")
            _fill_number(page, "batch size", "32")
            # a bad value shows its error next to the field and blocks the launch
            _fill_number(page, "learning rate", "-1")
            expect(page.get_by_text("optim.lr: must be in (0, inf]").first).to_be_visible()
            page.screenshot(path=str(SHOTS / "train_validation.png"), full_page=True)
            _fill_number(page, "learning rate", "0.1")
            expect(page.get_by_text("optim.lr: must be")).to_have_count(0)

            seeds = page.get_by_label("seeds", exact=True)
            seeds.fill("0, 1")
            seeds.press("Enter")
            _settle(page)
            page.get_by_role("button", name="Launch").click()
            expect(page.get_by_text("Queued 2 runs")).to_be_visible()
            # the live panel refreshes on its own until both runs have completed with curves drawn
            try:
                for card in range(2):  # a card's progress line is in its chart's frame
                    expect(page.frame_locator(RUN_CARD_CHART).nth(card).get_by_text(COMPLETED)).to_be_visible(
                        timeout=300_000)
            finally:
                page.screenshot(path=str(SHOTS / "train.png"), full_page=True)
            panel_chart = page.frame_locator(RUN_CARD_CHART).first  # the run cards draw in the live chart frame
            try:
                expect(panel_chart.locator("g.scatterlayer .trace").first).to_be_attached()
            except AssertionError as error:
                raise AssertionError(f"{error}\nthe live chart frames: {_live_chart_states(page)}") from None
            _settle(page)
            page.screenshot(path=str(SHOTS / "train.png"), full_page=True)

            page.goto(f"{server}/Runs")
            table = page.locator('[data-testid="stDataFrame"]')
            expect(table).to_be_visible()
            expect(table.get_by_text("completed", exact=True)).to_have_count(2)  # the grid's cells
            expect(page.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
            run_id = _first_run_id(page)
            expect(table.get_by_text(run_id)).to_have_count(1)
            expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(2)  # curves, parallel coords
            assert "runs=" in page.url, f"the selection is not in the URL: {page.url}"
            _settle(page)
            page.screenshot(path=str(SHOTS / "runs.png"), full_page=True)
            _assert_clean(page, "Runs", page_errors)

            dark = _new_page(browser, page_errors, color_scheme="dark")
            dark.goto(page.url)  # the shared URL reproduces the view
            expect(dark.locator('[data-testid="stPlotlyChart"]').first).to_be_visible()
            _settle(dark)
            dark.screenshot(path=str(SHOTS / "runs_dark.png"), full_page=True)
            dark.goto(f"{server}/Train")
            expect(dark.frame_locator(RUN_CARD_CHART).first.get_by_text(COMPLETED)).to_be_visible()
            _settle(dark)
            dark.screenshot(path=str(SHOTS / "train_dark.png"), full_page=True)
            _assert_clean(dark, "Train (dark)", page_errors)
        finally:
            browser.close()


def _first_run_id(page) -> str:
    """The run id the Runs page put in the URL (`?runs=<id>`)."""
    from urllib.parse import parse_qs, urlparse

    query = parse_qs(urlparse(page.url).query)
    assert query.get("runs"), f"no runs selected in {page.url}"
    return query["runs"][0].split(",")[0]


PAGES = {"home": "", "train": "Train", "runs": "Runs", "hessian": "Hessian", "landscape": "Landscape",
         "sweeps": "Sweeps", "lesson": "Lesson_m-sharpness", "stability": "Stability"}
LIVE_CHART = 'iframe[title="dashboard.live_chart.live_chart"]'
RUN_CARD_CHART = f'[class*="st-key-run-card-"] {LIVE_CHART}'  # not the active runs' frame, which draws nothing
BUSY = ('[data-testid="stStatusWidgetRunningIcon"], [data-testid="stStatusWidgetRunningManIcon"], '
        '[data-stale="true"], [data-testid="stSkeleton"]')


def _live_chart_states(page) -> list:
    """What each live chart frame has done (its counters, traces drawn, plotly.js loaded): for a failure's message."""
    states = []
    for frame in page.frames:
        if frame.parent_frame is None or "live_chart" not in frame.url:
            continue
        try:
            states.append(frame.evaluate("""() => ({counters: window.liveChart, plotly: !!window.Plotly,
                svg: !!document.querySelector('.main-svg'),
                traces: document.querySelectorAll('g.scatterlayer .trace').length,
                progress: document.getElementById('progress').innerText})"""))
        except Exception as error:  # a frame that went away meanwhile
            states.append(repr(error))
    return states


def _settle(page, quiet_checks: int = 3, timeout_s: float = 90.0) -> None:
    """Wait until the script run is over: no running indicator and no stale element, several checks in a row.

    Fails when the page is still busy after `timeout_s`: a check made then could pass too early.
    """
    quiet, deadline = 0, time.monotonic() + timeout_s
    while quiet < quiet_checks:
        if time.monotonic() > deadline:
            raise AssertionError(f"{page.url} still running after {timeout_s:g} s")
        quiet = quiet + 1 if page.locator(BUSY).count() == 0 else 0
        page.wait_for_timeout(400)


def _assert_clean(page, where: str, page_errors: list[str]) -> None:
    """After the page settled: no exception element, no error box, no uncaught error in the browser."""
    from playwright.sync_api import expect

    expect(page.locator('[data-testid="stException"]'), f"exception on {where}").to_have_count(0)
    expect(page.get_by_text("Traceback"), f"traceback on {where}").to_have_count(0)
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, f"error box on {where}: {errors.all_inner_texts()}"
    assert not page_errors, f"uncaught errors in the browser on {where}: {page_errors}"


def _finished_run(store_url: str) -> None:
    """A real tiny run trained by a background worker through the CLI, waited for."""
    env = {**os.environ, "SAMLAB_STORE": store_url, "SAMLAB_SCHEDULER_IDLE_S": "2"}
    done = subprocess.run(
        [sys.executable, "-m", "samlab", "submit", "--preset", "digits-mlp", "--set", "epochs=2",
         "--set", "data.n_train=128", "--set", "batch_size=32", "--name", "browser-tour", "--wait"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, f"the tiny run did not complete:\n{done.stdout}\n{done.stderr}"


def test_a_page_opened_first_on_a_fresh_server_has_the_apps_navigation(server):
    # a bookmark opened right after `make run`: Streamlit would run the page without app.py (its old
    # multipage mode, for an app with a pages/ folder) and list "app" where the navigation says Home
    from playwright.sync_api import expect

    page_errors: list[str] = []
    with _browser_page(page_errors) as page:
        page.goto(f"{server}/Runs?metric=step.train_loss")
        nav = page.get_by_test_id("stSidebarNav")
        expect(nav.get_by_role("link", name="Home")).to_be_visible()
        expect(nav.get_by_role("link", name="app", exact=True)).to_have_count(0)
        expect(page.get_by_role("heading", name="Runs").first).to_be_visible()
        _settle(page)
        assert "metric=step.train_loss" in page.url  # the page's own query parameters survive
        _assert_clean(page, "Runs opened first", page_errors)


def test_every_page_renders_without_an_exception(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    _finished_run(f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}")  # the store the server fixture reads
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page_errors: list[str] = []
            page = _new_page(browser, page_errors)
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            for slug, path in PAGES.items():
                page.goto(f"{server}/{path}")
                expect(page.locator("h1").first).to_be_visible()
                _settle(page)
                page.screenshot(path=str(SHOTS / f"tour_{slug}.png"), full_page=True)
                _assert_clean(page, slug, page_errors)
                # the tab's icon is the dashboard's own file, on every page (Home included)
                icons = page.evaluate("() => [...document.querySelectorAll('link[rel*=icon]')].map(l => l.href)")
                assert icons and all(icon.startswith(f"{server}/media/") for icon in icons), (slug, icons)
            # offline first: nothing the pages load comes from anywhere but the dashboard's server
            outside = {url for url in requested if not url.startswith((server, "data:", "blob:", "about:"))}
            assert not outside, outside
            # the finished run is listed where runs are picked, so the pages were drawn with data
            page.goto(f"{server}/Runs")
            expect(page.locator('[data-testid="stDataFrame"]').get_by_text("completed", exact=True)).to_have_count(1)
        finally:
            browser.close()


def _live_chart_frame(page, timeout_s: float = 60.0):
    """The Playwright frame of the first live chart on the page, once it has drawn its figure."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "live_chart" in frame.url and frame.evaluate("() => (window.liveChart || {}).renders || 0") > 0:
                return frame
        page.wait_for_timeout(250)
    raise AssertionError("no live chart drew its figure")


def _trace_lengths(frame) -> dict[tuple[str, str], int]:
    """(trace label, metric) -> how many points the chart in the frame draws."""
    pairs = frame.evaluate("() => document.getElementById('chart')._fullData.map(t => [t.name, t.meta, t.x.length])")
    return {(label, meta): n for label, meta, n in pairs}


def test_a_watched_runs_chart_is_redrawn_in_place_with_every_new_point(server, tmp_path):
    """The Train page's live card: the points drawn are the store's, new ones and the progress arrive
    (from the run's feed, fetched by the frame) without the chart being built again, a reader's zoom
    survives the refreshes, and the card turns into a finished one when the run ends."""
    from samlab.config import preset
    from samlab.reporting import RecordingReporter
    from samlab.runs.store import Store
    from samlab.train import run as train

    cfg = preset("digits-mlp", {"data.n_train": 96, "data.n_test": 64, "epochs": 4, "batch_size": 16, "seed": 0})
    reporter = RecordingReporter()
    summary = train(cfg, reporter).summary
    rows = [(kind, step, name, float(value), time.time())
            for kind, step, values in reporter.rows for name, value in values.items()]
    half = len(rows) // 2
    store = Store(f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}")  # the store the server fixture reads
    (run_id,) = store.create_runs([{"kind": "train", "params": cfg.to_dict(), "name": "watched"}])
    store.start_run(run_id, pid=os.getpid(), host="browser-test", device="cpu")
    store.flush(run_id, rows[:half], progress=0.5, message="half")

    def expected(upto: int) -> dict[tuple[str, str], int]:
        """Points per drawn series, counted from the rows written so far."""
        counts: dict[tuple[str, str], int] = {}
        for kind, _, name, _, _ in rows[:upto]:
            counts[(kind, name)] = counts.get((kind, name), 0) + 1
        return {("train (per step)", "train_loss"): counts.get(("step", "train_loss"), 0),
                ("test (epoch)", "test_acc"): counts.get(("epoch", "test_acc"), 0)}

    page_errors: list[str] = []
    with _browser_page(page_errors) as page:
        page.goto(f"{server}/Train")
        frame = _live_chart_frame(page)
        lengths = _trace_lengths(frame)
        assert {k: lengths.get(k) for k in expected(half)} == expected(half)
        # the Streamlit theme's text colour, not plotly's default
        assert frame.evaluate("() => document.getElementById('chart')._fullLayout.font.color") != "#444"
        frame.evaluate("() => Plotly.relayout('chart', {'xaxis.range': [2, 9]})")  # a reader zooms in
        frame.evaluate("() => { window.firstSvg = document.querySelector('.main-svg'); }")
        renders = frame.evaluate("() => window.liveChart.renders")

        store.flush(run_id, rows[half:], progress=0.9, message="almost")
        deadline = time.monotonic() + 60
        while {k: _trace_lengths(frame).get(k) for k in expected(len(rows))} != expected(len(rows)):
            assert time.monotonic() < deadline, f"the new points were not drawn: {_trace_lengths(frame)}"
            page.wait_for_timeout(250)
        state = frame.evaluate("""() => ({renders: window.liveChart.renders, rebuilds: window.liveChart.rebuilds,
            sameSvg: document.querySelector('.main-svg') === window.firstSvg,
            range: document.getElementById('chart').layout.xaxis.range})""")
        assert state["renders"] > renders and state["rebuilds"] == 0 and state["sameSvg"], state
        assert state["range"] == [2, 9], state  # the zoom survived the refresh
        # the frame followed the run's feed by itself: its progress line too
        assert frame.evaluate("() => document.querySelector('#progress .text').textContent").startswith("running · 90% · almost")
        assert frame.evaluate("() => window.liveChart.fetches") > 0

        # the run ends: the page runs again and draws a finished card, its progress line in its chart's frame
        store.finish_run(run_id, "completed", summary=summary)
        page.frame_locator(RUN_CARD_CHART).first.get_by_text(re.compile(r"^100% · almost")).wait_for(timeout=60_000)
        assert not page_errors, page_errors
