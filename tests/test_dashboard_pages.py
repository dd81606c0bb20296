"""AppTest for the home page and every page under pages/: empty store and a store with finished,
running, queued and failed runs; the Train form queues what it shows and refuses bad values; the Runs
page keeps its view in the URL."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from samlab.config import preset
from samlab.reporting import RecordingReporter
from samlab.runs.store import Store
from tests.helpers import chart_entries, live_feeds, progress_lines

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pages").glob("*.py"))
TIMEOUT = 120
# the failed run's recorded error: the pages that list runs show it in an error box, on purpose
FAILED_RUN_ERROR = "out of memory in the test"


def _tiny_config(seed: int = 0, **overrides):
    base = {"data.n_train": 64, "data.n_test": 64, "epochs": 2, "batch_size": 16, "seed": seed}
    base.update(overrides)
    return preset("digits-mlp", base)


@pytest.fixture(scope="module")
def recorded_rows():
    """Metric rows of a real tiny training run, in the store's row format."""
    from samlab.train import run

    reporter = RecordingReporter()
    result = run(_tiny_config(), reporter)
    t0 = time.time()
    rows = [(kind, step, name, float(value), t0 + 0.1 * i)
            for i, (kind, step, values) in enumerate(reporter.rows) for name, value in values.items()]
    return rows, result.summary


def _populate(store: Store, rows, summary) -> dict[str, str]:
    """One run of each state the pages must draw: completed (two seeds, one group), running, queued, failed."""
    specs = [
        {"kind": "train", "params": _tiny_config(0).to_dict(), "name": "tiny", "group_id": "g-seeds"},
        {"kind": "train", "params": _tiny_config(1).to_dict(), "name": "tiny", "group_id": "g-seeds"},
        {"kind": "train", "params": _tiny_config(0, **{"optim.method": "msam", "optim.rho": 0.1,
                                                       "optim.m": 4}).to_dict(), "name": "msam"},
        {"kind": "train", "params": _tiny_config(0, **{"optim.method": "sam"}).to_dict(), "name": "queued"},
        {"kind": "train", "params": _tiny_config(2).to_dict(), "name": "broken"},
    ]
    done0, done1, running, queued, failed = store.create_runs(specs)
    for run_id in (done0, done1):
        store.start_run(run_id, pid=os.getpid(), host="test-host", device="cpu")
        store.flush(run_id, rows, progress=1.0, message="completed")
        store.finish_run(run_id, "completed", summary=summary)
    store.start_run(running, pid=os.getpid(), host="test-host", device="cpu")
    store.flush(running, rows[: len(rows) // 2], progress=0.5, message="epoch 2/2")
    log = Path(store.get_run(running)["log_path"])
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("started\nepoch 1 done\n")
    store.start_run(failed, pid=os.getpid(), host="test-host", device="cpu")
    store.flush(failed, rows[:5], progress=0.1, message="epoch 1/2")
    store.fail_run(failed, f"Traceback (most recent call last):\nRuntimeError: {FAILED_RUN_ERROR}")
    return {"completed": done0, "completed2": done1, "running": running, "queued": queued, "failed": failed}


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    return at


def _no_exception(at: AppTest, where: str, expected_error: str | None = None) -> None:
    """No exception element, and no error box but the one showing `expected_error`."""
    assert not at.exception, f"{where}: " + "; ".join(str(e.value) for e in at.exception)
    unexpected = [e.value for e in at.error if expected_error is None or expected_error not in e.value]
    assert not unexpected, f"{where}: error boxes {unexpected}"


def test_every_page_is_found():
    assert "pages/1_Train.py" in PAGES and "pages/2_Runs.py" in PAGES


@pytest.mark.parametrize("page", [None, *PAGES], ids=["app", *PAGES])
def test_page_renders_on_an_empty_store(store_env, page):
    at = _app(page)
    _no_exception(at, f"{page or 'app.py'} on an empty store")


@pytest.mark.parametrize("page", [None, *PAGES], ids=["app", *PAGES])
def test_page_renders_on_a_populated_store(store_env, recorded_rows, page):
    _populate(store_env, *recorded_rows)
    at = _app(page)
    _no_exception(at, f"{page or 'app.py'} on a populated store", FAILED_RUN_ERROR)


def test_home_counts_runs_by_status(store_env, recorded_rows):
    _populate(store_env, *recorded_rows)
    at = _app()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"queued": "1", "running": "1", "finished": "3", "failed": "1"}
    assert any(store_env.url in md.value for md in at.markdown)


def test_empty_pages_say_what_to_do(store_env):
    for page in (None, "pages/1_Train.py", "pages/2_Runs.py"):
        at = _app(page)
        assert any("No runs yet" in info.value for info in at.info), page


def test_train_form_queues_the_configured_runs_as_a_group(store_env):
    at = _app("pages/1_Train.py")
    at.number_input(key="train.data.n_train").set_value(128)
    at.number_input(key="train.epochs").set_value(3)
    at.selectbox(key="train.optim.method").set_value("msam")
    at.run()
    at.number_input(key="train.optim.m").set_value(8)
    at.number_input(key="train.optim.rho").set_value(0.2)
    at.text_input(key="train.seeds").set_value("3, 4")
    at.run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="train.launch").click().run()
    _no_exception(at, "launch")
    runs = store_env.list_runs()
    assert len(runs) == 2 and {r["status"] for r in runs} == {"queued"}
    assert len({r["group_id"] for r in runs}) == 1 and runs[0]["group_id"]
    expected = {s: preset("digits-mlp", {"data.n_train": 128, "epochs": 3, "optim.method": "msam",
                                         "optim.m": 8, "optim.rho": 0.2, "seed": s}).to_dict() for s in (3, 4)}
    assert {r["params"]["seed"]: r["params"] for r in runs} == expected
    assert any("Queued 2 runs" in s.value for s in at.success)


def test_train_form_shows_the_error_next_to_the_field_and_queues_nothing(store_env):
    at = _app("pages/1_Train.py")
    at.selectbox(key="train.optim.method").set_value("msam")
    at.run()
    at.number_input(key="train.optim.m").set_value(5)  # batch size 64 is not a multiple of 5
    at.run()
    messages = [e.value for e in at.error]
    assert any(m.startswith("optim.m: must divide batch_size=64") for m in messages), messages
    at.button(key="train.launch").click().run()
    assert store_env.list_runs() == []
    assert any("Not launched: optim.m" in e.value for e in at.error)


def test_hidden_method_fields_do_not_leak_into_the_run(store_env):
    at = _app("pages/1_Train.py")
    at.selectbox(key="train.optim.method").set_value("msam")
    at.run()
    at.number_input(key="train.optim.m").set_value(5)  # invalid for msam
    at.run()
    at.selectbox(key="train.optim.method").set_value("sam")  # m is not a SAM field: hidden, not used
    at.run()
    assert not at.error, [e.value for e in at.error]
    at.button(key="train.launch").click().run()
    (run,) = store_env.list_runs()
    assert run["params"]["optim"]["method"] == "sam" and run["params"]["optim"]["m"] is None


def test_presets_fill_the_form(store_env):
    at = _app("pages/1_Train.py")
    at.selectbox(key="train.preset").set_value("diag-sparse")
    at.button[0].click().run()  # "Load preset"
    assert at.selectbox(key="train.data.name").value == "sparse-regression"
    assert at.selectbox(key="train.model.name").value == "diag-linear"
    assert at.number_input(key="train.data.sparsity").value == 3
    assert at.selectbox(key="train.optim.method").value == "usam"


def test_live_panel_shows_progress_error_and_controls(store_env, recorded_rows):
    ids = _populate(store_env, *recorded_rows)
    at = _app("pages/1_Train.py")
    expanders = " ".join(e.label for e in at.expander)
    for status in ("running", "queued", "failed", "completed"):
        assert ids[status] in expanders, status
    assert any(FAILED_RUN_ERROR in e.value for e in at.error)
    assert at.button(key=f"cancel.{ids['running']}") is not None
    assert at.button(key=f"resume.{ids['failed']}") is not None
    # every card's progress line is in its chart's frame: the finished ones' drawn with the figure, the
    # watched run's from its feed
    assert 1.0 in [line["fraction"] for line in progress_lines(at)]
    assert 0.5 in [feed["progress"]["fraction"] for feed in live_feeds(at)]
    at.button(key=f"cancel.{ids['queued']}").click().run()
    assert store_env.get_run(ids["queued"])["status"] == "cancelled"


def test_runs_page_view_lives_in_the_url(store_env, recorded_rows):
    ids = _populate(store_env, *recorded_rows)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/2_Runs.py")
    chosen = [ids["completed"], ids["failed"]]
    at.query_params["runs"] = ",".join(chosen)
    at.query_params["metric"] = "step.train_loss"
    at.query_params["x"] = "step"
    at.query_params["log"] = "1"
    at.run()
    _no_exception(at, "Runs with query parameters", FAILED_RUN_ERROR)
    assert at.multiselect(key="runs.runs").value == chosen
    assert at.selectbox(key="runs.metric").value == "step.train_loss"
    assert at.radio(key="runs.x").value == "step"
    assert at.toggle(key="runs.log").value is True
    at.radio(key="runs.x").set_value("epoch").run()
    assert at.query_params["x"] == ["epoch"] or at.query_params["x"] == "epoch"
    assert ids["completed"] in str(at.query_params["runs"])


def test_runs_page_filters_and_deletes_with_confirmation(store_env, recorded_rows):
    ids = _populate(store_env, *recorded_rows)
    workdir = Path(store_env.get_run(ids["completed"])["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    from samlab.runs.worker import RUN_MARKER

    (workdir / RUN_MARKER).write_text(ids["completed"])
    at = _app("pages/2_Runs.py")
    at.multiselect(key="runs.status").set_value(["completed"]).run()
    table = at.dataframe[0].value
    assert set(table["id"]) == {ids["completed"], ids["completed2"]}
    at.multiselect(key="runs.runs").set_value([ids["completed"]]).run()
    delete = at.button(key="runs.delete")
    assert delete.disabled  # confirmation first
    at.checkbox(key="runs.confirm_delete").check().run()
    at.button(key="runs.delete").click().run()
    _no_exception(at, "delete", FAILED_RUN_ERROR)
    remaining = {r["id"] for r in store_env.list_runs()}
    assert ids["completed"] not in remaining and ids["completed2"] in remaining
    assert not workdir.exists()


def _plotly_specs(at: AppTest) -> list[dict]:
    """Every figure on the page: st.plotly_chart's and the live chart frames' (the run cards')."""
    return [spec for _, spec in chart_entries(at)]


def test_runs_page_groups_seeds_into_a_mean_and_std_band(store_env, recorded_rows):
    ids = _populate(store_env, *recorded_rows)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("pages/2_Runs.py")
    at.query_params["runs"] = ",".join([ids["completed"], ids["completed2"], ids["running"]])
    at.query_params["group_seeds"] = "1"
    at.run()
    _no_exception(at, "Runs grouped by seed")
    names = [t.get("name") for spec in _plotly_specs(at) for t in spec["data"]]
    # the two sgd seeds form one group with a band; the msam run is a group of one (a line, no band)
    assert "sgd · 2 seeds ± std" in names and "sgd · 2 seeds" in names
    assert any(n and n.startswith("msam") and n.endswith("· 1 seed") for n in names)
    # every picker option is a short label ending in the run's short id
    options = at.multiselect(key="runs.runs").options
    assert options and all(len(o) <= 60 for o in options)
    assert any(o.endswith(f"· {ids['running'][:6]}") for o in options)
    assert "config" in at.dataframe[0].value.columns  # the full config beside the short label


def test_run_card_of_sgd_has_no_sharpness_panel(store_env, recorded_rows):
    _populate(store_env, *recorded_rows)
    at = _app("pages/1_Train.py")
    _no_exception(at, "Train with runs", FAILED_RUN_ERROR)
    titles = [[a["text"] for a in spec["layout"].get("annotations", [])] for spec in _plotly_specs(at)]
    panels = [t for t in titles if "loss" in t]
    assert any("sharpness proxy" not in t and "learning rate" in t for t in panels)  # the sgd runs
    assert any("sharpness proxy" in t for t in panels)  # the msam run


def test_a_run_card_draws_its_panel_axes_before_the_first_metrics(store_env, recorded_rows):
    # the queued msam run has written nothing: its card's chart is there already (set up in the browser
    # while the worker starts), with the panels' titled axes, no data and a note
    ids = _populate(store_env, *recorded_rows)
    assert not store_env.metrics([ids["queued"]]).shape[0]
    at = _app("pages/1_Train.py")
    _no_exception(at, "Train with a queued run", FAILED_RUN_ERROR)
    waiting = [spec for spec in _plotly_specs(at) if not any(t.get("x") for t in spec["data"])]
    assert len(waiting) == 1 and len(waiting[0]["data"]) == 4  # one empty trace per panel: its axes show
    layout = waiting[0]["layout"]
    notes = [a["text"] for a in layout["annotations"]]
    assert "no metrics yet" in notes and "sharpness proxy" in notes  # the msam run's four panels
    assert [layout[f"xaxis{i}"]["title"]["text"] for i in ("", "2", "3", "4")] == ["optimizer step"] * 4
    assert layout["yaxis"]["title"]["text"] and layout["height"] == 580


def test_train_form_explains_a_train_set_smaller_than_the_batch(store_env):
    at = _app("pages/1_Train.py")
    assert "samlab never downloads" in at.selectbox(key="train.data.name").help
    assert "data/datasets/" in at.selectbox(key="train.data.name").help
    at.number_input(key="train.batch_size").set_value(128).run()
    at.number_input(key="train.data.n_train").set_value(5).run()
    _no_exception(at, "n_train < batch size")
    notes = [c.value for c in at.caption if "batch is clipped" in c.value]
    assert notes == [":material/info: 5 train samples < batch size 128: the batch is clipped to 5, so each epoch "
                     "is one full-batch step on all 5 samples."]
    at.number_input(key="train.data.n_train").set_value(500).run()
    assert not [c for c in at.caption if "batch is clipped" in c.value]


def test_a_train_set_smaller_than_the_batch_trains_one_full_batch_step_per_epoch():
    # what the note says, checked on the engine: 5 samples, batch 128, 3 epochs → 3 steps of 5 samples
    from samlab.train import run

    reporter = RecordingReporter()
    result = run(_tiny_config(**{"data.n_train": 5, "batch_size": 128, "epochs": 3, "log_every": 1}), reporter)
    assert result.status == "completed" and result.summary["steps"] == 3


@pytest.mark.parametrize("page, formula", [
    (None, r"\varepsilon = \rho\, g / \lVert g \rVert"),
    ("pages/3_Hessian.py", r"$\lambda_{\max}$"),
    ("pages/7_Stability.py", r"\frac{\sigma}{\eta} \left(\frac{n}{B} - 1\right)^{-1/2}"),
    ("pages/7_Stability.py", r"\sum_i H_i M H_i"),
    ("pages/6_Lesson_m-sharpness.py", r"$\frac{\rho}{2m} \operatorname{tr} V$"),
], ids=["home", "hessian", "stability-theorem", "stability-map", "lesson"])
def test_formulas_are_typeset_as_latex(store_env, page, formula):
    at = _app(page)
    _no_exception(at, f"{page or 'app.py'}")
    texts = [e.value for kind in ("markdown", "latex", "caption") for e in at.get(kind)]
    assert any(formula in text for text in texts), formula
    # the plain-text spellings they replace are gone
    plain = ("‖g‖", "(n/B − 1)^(−1/2)", "Σ H_i M H_i", "(ρ/2m) tr V", "top eigenvalue λ_max")
    assert not [p for p in plain for text in texts if p in text]
