"""The shared tr V / m-sharpness panel draws a finished msharp analysis of a real trained run."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from samlab import jobs, msharp
from samlab.config import preset
from samlab.reporting import RecordingReporter
from samlab.store import Store
from samlab.train import run


def _finished(store: Store, run_id: str, **fields) -> None:
    assert store.claim(run_id, "h", "local") and store.start_run(run_id, 1, "h", "cpu")
    assert store.finish_run(run_id, "completed", **fields)


def test_panel_draws_the_table_and_both_curves_of_a_cached_analysis(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("SAMLAB_STORE", url)
    store = Store(url)
    cfg = preset("digits-mlp", ["data.n_train=128", "epochs=1", "batch_size=64", "model.width=8"])
    trained = run(cfg, workdir=tmp_path / "train")
    train_id = jobs.submit(cfg, store=store, start=False)
    _finished(store, train_id, checkpoint_path=str(trained.checkpoint))

    from dashboard.msharp_panel import NOISE_REQUEST

    params = {"checkpoint": str(trained.checkpoint), **NOISE_REQUEST, "n_samples": 64, "ms": [64, 8, 1]}
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
    assert not before.exception
    assert any("drawn=False" in m.value for m in before.markdown)
    assert [b.label for b in before.button] == ["Measure tr V and m-sharpness (sgd)"]

    analysis_id = jobs.submit_cached("msharp", params, store=store, start=False)
    _finished(store, analysis_id, result=result)
    after = AppTest.from_function(page, args=(train_id, request)).run(timeout=60)
    assert not after.exception
    assert any("drawn=True" in m.value for m in after.markdown)
    assert len(after.dataframe) == 1
    assert len(after.get("plotly_chart")) == 2
