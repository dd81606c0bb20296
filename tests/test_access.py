"""The lock: loopback binds are open; any other bind refuses to serve without SAMLAB_PASSWORD and asks
for it once per session with one. The rule as functions, `python -m dashboard.access` as `make run`
calls it, and both cases in headless Chromium against a real `streamlit run app.py`."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from dashboard import access
from tests.helpers import free_port
from tests.test_browser import CHROMIUM, LAUNCH_ARGS, ROOT, SHOTS, _settle, running_streamlit


@pytest.mark.parametrize("address, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("", False), (None, False), ("example.org", False),
])
def test_loopback_rule(address, loopback):
    assert access.is_loopback(address) is loopback


def test_refusal_unless_loopback_or_a_password(monkeypatch):
    monkeypatch.delenv(access.PASSWORD_ENV, raising=False)
    assert access.refusal("127.0.0.1") is None
    reason = access.refusal("0.0.0.0")
    assert "0.0.0.0" in reason and access.PASSWORD_ENV in reason and "\n" not in reason
    assert "every interface" in access.refusal(None)
    monkeypatch.setenv(access.PASSWORD_ENV, "s3cret")
    assert access.refusal("0.0.0.0") is None


def test_password_check():
    assert access.check_password("s3cret", "s3cret")
    assert not access.check_password("s3cre", "s3cret") and not access.check_password("s3cret ", "s3cret")
    assert not access.check_password("", "")  # no secret opens nothing


def _check(host: str, password: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != access.PASSWORD_ENV}
    if password is not None:
        env[access.PASSWORD_ENV] = password
    return subprocess.run([sys.executable, "-m", "dashboard.access", "--host", host], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_start_check_refuses_an_exposed_bind_without_a_password_in_one_line():
    refused = _check("0.0.0.0", None)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "SAMLAB_PASSWORD" in refused.stderr
    assert _check("0.0.0.0", "s3cret").returncode == 0
    assert _check("127.0.0.1", None).returncode == 0 and _check("127.0.0.1", None).stderr == ""


def test_make_run_does_the_check_before_streamlit():
    dry = subprocess.run(["make", "-n", "run", "HOST=0.0.0.0", "STAMP=Makefile"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    lines = dry.stdout.splitlines()
    check = next(i for i, line in enumerate(lines) if "-m dashboard.access --host 0.0.0.0" in line)
    start = next(i for i, line in enumerate(lines) if "streamlit run app.py" in line)
    assert check < start


# -- in a browser ----------------------------------------------------------------------------------------
@contextmanager
def _streamlit(tmp_path: Path, address: str, password: str | None):
    if CHROMIUM is None:
        pytest.skip("no chromium on the PATH: install the Debian 'chromium' package to run the browser tests")
    pytest.importorskip("playwright.sync_api")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != access.PASSWORD_ENV}
    env["SAMLAB_STORE"] = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    if password is not None:
        env[access.PASSWORD_ENV] = password
    with running_streamlit(env, address, port, tmp_path / f"streamlit-{port}.log") as url:
        yield url  # an exposed server is still reached over loopback here


@contextmanager
def _page():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=60_000)  # a first script run on a busy 2-core machine takes a while
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


@pytest.mark.browser
def test_an_exposed_dashboard_without_a_password_serves_only_the_refusal(tmp_path):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with _streamlit(tmp_path, "0.0.0.0", None) as url, _page() as page:
        for path in ("", "/Train", "/Runs"):
            page.goto(url + path)
            expect(page.get_by_text("samlab refuses to serve")).to_be_visible()
            _settle(page)
            expect(page.get_by_role("button", name="Launch")).to_have_count(0)
            expect(page.get_by_text("System status")).to_have_count(0)
        page.screenshot(path=str(SHOTS / "lock_refused.png"))


@pytest.mark.browser
def test_an_exposed_dashboard_asks_for_the_password_once_per_session(tmp_path):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with _streamlit(tmp_path, "0.0.0.0", "s3cret") as url, _page() as page:
        page.goto(url)
        password = page.get_by_label("Password", exact=True)
        expect(password).to_be_visible()
        expect(page.get_by_text("System status")).to_have_count(0)  # nothing of the page behind the lock
        page.screenshot(path=str(SHOTS / "lock_prompt.png"))
        password.fill("wrong")
        page.get_by_role("button", name="Enter").click()
        expect(page.get_by_text("Wrong password.")).to_be_visible()
        password.fill("s3cret")
        page.get_by_role("button", name="Enter").click()
        expect(page.get_by_text("System status")).to_be_visible()  # the Home page itself
        # other pages of the same session: no second prompt
        nav = page.locator('[data-testid="stSidebarNav"]')
        nav.get_by_role("link", name="Runs").click()
        expect(page.get_by_text("No runs yet")).to_be_visible()
        nav.get_by_role("link", name="Train").click()
        expect(page.get_by_role("button", name="Launch")).to_be_visible()
        page.screenshot(path=str(SHOTS / "lock_train.png"))
        nav.get_by_role("link", name="Home").click()
        expect(page.get_by_text("System status")).to_be_visible()
        expect(page.get_by_label("Password", exact=True)).to_have_count(0)
        page.screenshot(path=str(SHOTS / "lock_open.png"))


@pytest.mark.browser
def test_loopback_stays_password_free_and_the_sidebar_says_home(tmp_path):
    from playwright.sync_api import expect

    with _streamlit(tmp_path, "127.0.0.1", "s3cret") as url, _page() as page:
        page.goto(url)
        expect(page.get_by_text("System status")).to_be_visible()
        expect(page.get_by_label("Password", exact=True)).to_have_count(0)
        expect(page.locator(".katex").first).to_be_visible()  # the formulas are typeset by KaTeX
        _settle(page)
        nav = page.locator('[data-testid="stSidebarNav"]')
        expect(nav.get_by_role("link", name="Home")).to_be_visible()
        expect(nav.get_by_role("link", name="app", exact=True)).to_have_count(0)
        expect(nav.get_by_role("link", name="Lesson m-sharpness")).to_be_visible()
        page.screenshot(path=str(SHOTS / "sidebar_home.png"))
