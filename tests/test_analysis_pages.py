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
from tests.helpers import chart_traces, mark_finished, plotly_array, stored_trained_run


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


def test_landscape_page_draws_a_cached_surface_of_a_trained_run(store_env, tmp_path):
    train_id, checkpoint = stored_trained_run(store_env, tmp_path / "train")
    params = landscape_view.request([checkpoint], "1d", span=1.0, points=5, seed=0, data="train", n_samples=128)
    result = landscape.run_task(landscape.check_task(params), RecordingReporter(), tmp_path / "ls", False)
    _store_finished(store_env, "landscape", params, result)

    at = AppTest.from_file("../pages/4_Landscape.py", default_timeout=60)
    for name, value in {"kind": "1d", "points": "5", "n_samples": "128"}.items():
        at.query_params[name] = value
    at.run()
    at.multiselect(key="landscape.runs").set_value([train_id]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Compute the surfaces" not in [b.label for b in at.button]  # the stored surface is used
    assert len(at.get("plotly_chart")) >= 1
    # the curve drawn is the stored surface, labelled with the run
    (curve,) = chart_traces(at, "landscape.curves")
    assert plotly_array(curve["x"]) == pytest.approx(result["axes"][0], rel=1e-12)
    assert plotly_array(curve["y"]) == pytest.approx(result["runs"][0]["loss"], rel=1e-12)
    assert curve["name"] == run_labels([store_env.get_run(train_id)])[train_id]
