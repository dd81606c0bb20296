"""Suite-wide settings: one torch thread per test process; no silent skips in CI; tests counted by layer.

The suite runs on small machines (2 cores) with tests that start worker subprocesses beside the
in-process ones; several torch thread pools on two cores spin against each other and make tiny
models many times slower. One thread per process, in tests and in the workers they start.

With SAMLAB_REQUIRE_ALL=1 (set by `.ci/run`) every layer must run: a skipped test or a skipped test
module (a missing Chromium, PostgreSQL server, ray or playwright) is reported as a failure, and a
run of the whole suite in which some layer passed no test fails. Without it, skips stay skips.
"""

import os

import pytest
import torch

from tests.helpers import REQUIRE_ALL

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

# The layers the summary counts, first match wins: (name, test files, a word in the test id).
LAYERS = [
    ("browser", {"test_browser.py", "test_access.py", "test_figure_layout_browser.py"}, None),
    ("Ray", {"test_ray.py"}, None),
    ("PostgreSQL", {"test_postgres.py"}, "postgresql"),
    ("pages (AppTest)", {"test_dashboard_pages.py", "test_analysis_pages.py", "test_lesson_page.py",
                         "test_msharp_panel.py"}, "_page"),
    ("store and runs", {"test_store.py", "test_jobs.py", "test_sweeps.py", "test_cli.py", "test_cores.py"}, None),
    ("analyses", {"test_hessian.py", "test_landscape.py", "test_stability.py", "test_msharp.py",
                  "test_noise.py", "test_tasks_protocol.py"}, None),
    ("dashboard helpers", {"test_dashboard_common.py", "test_dashboard_figures.py", "test_dashboard_forms.py"},
     None),
    ("optimizer core", {"test_optim.py", "test_train.py", "test_distributed.py", "test_toy.py", "test_config.py",
                        "test_data.py", "test_models.py"}, None),
    ("architecture", {"test_architecture.py"}, None),
]
REQUIRE_ALL_NOTE = "skipped under SAMLAB_REQUIRE_ALL=1, where every layer of the suite must run"


@pytest.fixture
def store_env(tmp_path, monkeypatch):
    """An empty store in tmp_path, selected through SAMLAB_STORE; submitting starts no scheduler, and
    the Train page's live feeds start no thread."""
    from dashboard import live
    from samlab.runs import jobs
    from samlab.runs.store import Store

    url = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    monkeypatch.setenv("SAMLAB_STORE", url)
    monkeypatch.setattr(jobs, "ensure_scheduler", lambda store=None: False)
    monkeypatch.setattr(live, "FEED_THREAD", False)  # a test steps the live feeds itself (`FeedWriter.step`)
    return Store(url)


def layer_of(nodeid: str) -> str:
    """The layer a test id belongs to (`other` for a file no layer names)."""
    path, _, name = nodeid.partition("::")
    filename = path.rsplit("/", 1)[-1]
    for layer, files, word in LAYERS:
        if filename in files or (word is not None and word in name):
            return layer
    return "other"


def _skip_reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL_NOTE}: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:  # a module-level skip, e.g. importorskip of ray or playwright
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL_NOTE}: {_skip_reason(report.longrepr)}"


# per layer and outcome, the ids of the tests reported to this process (the xdist controller gets every worker's)
_COUNTS: dict[str, dict[str, set[str]]] = {}
_EMPTY_LAYERS: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = "skipped" if report.skipped else report.outcome
        _COUNTS.setdefault(layer_of(report.nodeid), {}).setdefault(outcome, set()).add(report.nodeid)


def pytest_collectreport(report):
    """A test module skipped or broken as a whole counts once in its layer."""
    if report.outcome != "passed" and report.nodeid.endswith(".py"):
        _COUNTS.setdefault(layer_of(report.nodeid), {}).setdefault(report.outcome, set()).add(report.nodeid)


def _whole_suite(config) -> bool:
    selected = config.option.keyword or config.option.markexpr or config.option.deselect
    return config.args_source == pytest.Config.ArgsSource.TESTPATHS and not selected


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Under SAMLAB_REQUIRE_ALL, a whole-suite run in which a layer passed no test fails."""
    config = session.config
    if hasattr(config, "workerinput") or not REQUIRE_ALL or not _whole_suite(config):
        return
    _EMPTY_LAYERS[:] = [layer for layer, _, _ in LAYERS if not _COUNTS.get(layer, {}).get("passed")]
    if _EMPTY_LAYERS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many tests ran in each layer: the CI log shows that no layer was skipped."""
    if hasattr(config, "workerinput"):
        return
    terminalreporter.write_sep("=", "tests by layer (passed / failed / skipped)")
    for layer in [name for name, _, _ in LAYERS] + ["other"]:
        outcomes = _COUNTS.get(layer, {})
        if layer == "other" and not outcomes:
            continue
        passed, failed, skipped = (len(outcomes.get(k, ())) for k in ("passed", "failed", "skipped"))
        terminalreporter.write_line(f"{layer:>18}: {passed:4d} passed {failed:4d} failed {skipped:4d} skipped")
    if _EMPTY_LAYERS:
        terminalreporter.write_line(f"SAMLAB_REQUIRE_ALL=1: no test passed in {', '.join(_EMPTY_LAYERS)}", red=True)
