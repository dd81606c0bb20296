"""Analysis pages draw a finished background analysis read from the store (the cached path)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from dashboard import landscape_view, stability_view
from dashboard.common import run_labels
from samlab.reporting import RecordingReporter
from samlab.runs import jobs
from samlab.runs.store import Store
from samlab.tasks import landscape, stability
from tests.helpers import (
    chart_traces,
    live_feeds,
    mark_finished,
    plotly_array,
    record_fragments,
    stored_trained_run,
)


def _store_finished(store: Store, kind: str, params: dict, result: dict) -> str:
    run_id = jobs.submit_cached(kind, params, store=store, start=False)
    mark_finished(store, run_id, result=result)
    return run_id


def test_stability_page_overlays_a_cached_grid_and_summarises_it(store_env, tmp_path):
    params = stability_view.grid_params(0.8, 10, 2.0, repeats=1, steps=100, seed=0)
    result = stability.run_task(stability.check_task(params), RecordingReporter(), tmp_path / "grid", False)
    _store_finished(store_env, "stability", params, result)

    at = AppTest.from_file("../pages/7_Stability.py", default_timeout=60)
    for name, value in {"n": "10", "repeats": "1", "steps": "100"}.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [b for b in at.button if b.label.startswith("Compute")]  # cached: nothing to launch
    (summary,) = at.dataframe
    row = summary.value.iloc[0].to_dict()
    cells = len(params["Bs"]) * len(params["sigmas"])
    assert list(row.values())[0] == cells
    predicted = sum(sum(r["predicted"]) for r in result["rows"])
    assert predicted in row.values()  # the theorem's count, read from the stored result


def test_landscape_page_draws_a_cached_surface_of_a_trained_run(store_env, tmp_path, monkeypatch):
    train_id, checkpoint = stored_trained_run(store_env, tmp_path / "train")
    params = landscape_view.request([checkpoint], "1d", span=1.0, points=5, seed=0, data="train", n_samples=128)
    result = landscape.run_task(landscape.check_task(params), RecordingReporter(), tmp_path / "ls", False)
    _store_finished(store_env, "landscape", params, result)

    at = AppTest.from_file("../pages/4_Landscape.py", default_timeout=60)
    for name, value in {"kind": "1d", "points": "5", "n_samples": "128"}.items():
        at.query_params[name] = value
    at.run()
    defined = record_fragments(monkeypatch)
    at.multiselect(key="landscape.runs").set_value([train_id]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [name for name, every in defined if every] == []  # an open page with finished results runs nothing
    assert "Compute the surfaces" not in [b.label for b in at.button]  # the stored surface is used
    assert len(at.get("plotly_chart")) >= 1
    # the curve drawn is the stored surface, labelled with the run
    (curve,) = chart_traces(at, "landscape.curves")
    assert plotly_array(curve["x"]) == pytest.approx(result["axes"][0], rel=1e-12)
    assert plotly_array(curve["y"]) == pytest.approx(result["runs"][0]["loss"], rel=1e-12)
    assert curve["name"] == run_labels([store_env.get_run(train_id)])[train_id]


def _two_trained_runs(store: Store, tmp_path) -> list[str]:
    return [stored_trained_run(store, tmp_path / f"train{i}")[0] for i in range(2)]


def test_hessian_compute_all_queues_every_missing_spectrum_and_shows_queue_places(store_env, tmp_path):
    ids = _two_trained_runs(store_env, tmp_path)
    at = AppTest.from_file("../pages/3_Hessian.py", default_timeout=60)
    at.run()
    at.multiselect(key="hessian.runs").set_value(ids).run()
    assert not at.exception
    assert len([b for b in at.button if b.label.startswith("Compute the spectrum of")]) == 2
    at.button(key="hessian.submit_all").click().run()
    assert not at.exception
    queued = store_env.list_runs(kind="hessian")
    assert len(queued) == 2 and {r["status"] for r in queued} == {"queued"}
    assert {r["params"]["checkpoint"] for r in queued} == {store_env.get_run(i)["checkpoint_path"] for i in ids}
    # each queued analysis follows its feed: status and queue place in its frame's progress line
    text = " ".join(feed["progress"]["text"] for feed in live_feeds(at))
    assert "queued · place 1 of 2 in the queue" in text and "queued · place 2 of 2 in the queue" in text
    assert not [b for b in at.button if b.label.startswith("Compute")]  # nothing left to launch


def test_a_computing_hessian_analysis_is_followed_by_its_feed_and_its_partial_result_drawn(
        store_env, tmp_path, monkeypatch):
    import json
    import os
    import time

    from dashboard import common, live

    train_id, _ = stored_trained_run(store_env, tmp_path / "train")
    defined = record_fragments(monkeypatch)
    at = AppTest.from_file("../pages/3_Hessian.py", default_timeout=60)
    at.run()
    at.multiselect(key="hessian.runs").set_value([train_id]).run()
    at.button(key=f"hessian.submit.{train_id}").click().run()
    (analysis,) = store_env.list_runs(kind="hessian")
    store_env.start_run(analysis["id"], pid=os.getpid(), host="test-host", device="cpu")
    partial = {"eigenvalues": {"largest": {"values": [3.0, 2.0]}}, "done": ["top"], "complete": False,
               "n_samples": 64, "lr": 0.1}
    store_env.flush(analysis["id"], [], progress=0.25, message="top eigenvalues", result=partial)
    defined.clear()
    at.run()
    assert not at.exception
    assert [name for name, every in defined if every] == []  # nothing refreshes while the analysis computes
    (feed,) = live_feeds(at)
    run = store_env.get_run(analysis["id"])
    assert feed["rerun_at_end"] and feed["stage"] == common.result_digest(run)  # the page runs again at the end
    assert feed["stage_every_s"] > 0 and feed["progress"]["text"].startswith("running · 25% · top eigenvalues")
    assert at.dataframe[0].value.iloc[0]["λ_max"] == 3.0  # the partial result is drawn
    writer = common._task_feeds(store_env.url)
    store_env.flush(analysis["id"], [], progress=0.5, message="trace",
                    result={**partial, "trace": {"mean": 9.0, "stderr": 0.5}, "done": ["top", "trace"]})
    writer.step(time.monotonic() + live.MAX_S)
    written = json.loads(writer.path(analysis["id"]).read_text())  # the frame sees a new stage
    assert written["stage"] == common.result_digest(store_env.get_run(analysis["id"])) != feed["stage"]
    assert written["progress"]["fraction"] == 0.5 and not written["final"]


def test_landscape_compute_all_queues_surfaces_interpolation_and_flatness(store_env, tmp_path):
    ids = _two_trained_runs(store_env, tmp_path)
    at = AppTest.from_file("../pages/4_Landscape.py", default_timeout=60)
    for name, value in {"kind": "1d", "points": "5", "n_samples": "128"}.items():
        at.query_params[name] = value
    at.run()
    at.multiselect(key="landscape.runs").set_value(ids).run()
    assert not at.exception
    assert at.button(key="landscape.submit_all").label == "Compute all (3 missing)"
    at.button(key="landscape.submit_all").click().run()
    assert not at.exception
    kinds = sorted(r["params"]["kind"] for r in store_env.list_runs(kind="landscape"))
    assert kinds == ["1d", "flatness", "interpolation"]
    assert not [b for b in at.button if b.label in ("Compute the surfaces", "Interpolate", "Measure flatness")]
    # each queued analysis follows its feed (no refreshing fragment): status and queue place in its frame
    text = " ".join(feed["progress"]["text"] for feed in live_feeds(at))
    assert all(f"queued · place {p} of 3 in the queue" in text for p in (1, 2, 3)), text
