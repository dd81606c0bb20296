"""The shared tr V / m-sharpness panel draws a finished msharp analysis of a real trained run."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from samlab.reporting import RecordingReporter
from samlab.runs import jobs
from samlab.tasks import msharp
from tests.helpers import chart_traces, mark_finished, plotly_array, stored_trained_run


def test_panel_draws_the_table_and_both_curves_of_a_cached_analysis(store_env, tmp_path):
    train_id, checkpoint = stored_trained_run(store_env, tmp_path / "train")

    from dashboard.msharp_panel import NOISE_REQUEST

    params = {"checkpoint": checkpoint, **NOISE_REQUEST, "n_samples": 64, "ms": [64, 8, 1]}
    result = msharp.run_task(msharp.check_task(params), RecordingReporter(), tmp_path / "ms", False)

    def page(run_id: str, request: dict) -> None:
        from dashboard import msharp_panel
        from dashboard.common import get_store

        msharp_panel.NOISE_REQUEST = request  # the test's smaller request, same mechanism
        drawn = msharp_panel.noise_and_sharpness_panel({"sgd": get_store().get_run(run_id)}, key="t")
        import streamlit as st

        st.write(f"drawn={drawn}")

    request = {k: v for k, v in params.items() if k != "checkpoint"}
    before = AppTest.from_function(page, args=(train_id, request)).run(timeout=60)
    assert not before.exception and not before.error, [e.value for e in before.error]
    assert any("drawn=False" in m.value for m in before.markdown)
    assert [b.label for b in before.button] == ["Measure tr V and m-sharpness (sgd)"]

    analysis_id = jobs.submit_cached("msharp", params, store=store_env, start=False)
    mark_finished(store_env, analysis_id, result=result)
    after = AppTest.from_function(page, args=(train_id, request)).run(timeout=60)
    assert not after.exception and not after.error, [e.value for e in after.error]
    assert any("drawn=True" in m.value for m in after.markdown)
    assert len(after.dataframe) == 1
    assert len(after.get("plotly_chart")) == 2
    # what is drawn is the stored result: the table's tr V, both curves point by point (m ascending)
    table = after.dataframe[0].value
    assert table["tr V"].tolist() == [result["noise"]["trace_v"]] and table["samples"].tolist() == [64]
    noise = {r["m"]: r for r in result["noise_curve"]}
    measured, predicted = chart_traces(after, "t.noise")  # the measurement, then the SGN prediction over it
    curve = measured
    assert predicted["name"] == "sgd: predicted from ‖∇L‖, tr V"
    assert curve["name"] == "sgd" and plotly_array(curve["x"]) == [1, 8, 64]
    assert plotly_array(curve["y"]) == pytest.approx([noise[m]["mean"] for m in (1, 8, 64)], rel=1e-12)
    assert plotly_array(curve["error_y"]["array"]) == pytest.approx(
        [noise[m]["std_over_partitions"] for m in (1, 8, 64)], rel=1e-12)
    sharpness = {r["m"]: r["sharpness"] for r in result["sharpness_curve"]}
    (curve,) = chart_traces(after, "t.sharp")
    assert plotly_array(curve["x"]) == [1, 8, 64]
    assert plotly_array(curve["y"]) == pytest.approx([sharpness[m] for m in (1, 8, 64)], rel=1e-12)
