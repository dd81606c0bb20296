"""Analysis pages draw a finished background analysis read from the store (the cached path)."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from dashboard import stability_view
from samlab import jobs, stability
from samlab.reporting import RecordingReporter
from samlab.store import Store


def _store_finished(store: Store, kind: str, params: dict, result: dict) -> str:
    run_id = jobs.submit_cached(kind, params, store=store, start=False)
    assert store.claim(run_id, "h", "local") and store.start_run(run_id, 1, "h", "cpu")
    assert store.finish_run(run_id, "completed", result=result)
    return run_id


def test_stability_page_overlays_a_cached_grid_and_summarises_it(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("SAMLAB_STORE", url)
    params = stability_view.grid_params(0.8, 10, 2.0, repeats=1, steps=100, seed=0)
    result = stability.run_task(stability.check_task(params), RecordingReporter(), tmp_path / "grid", False)
    _store_finished(Store(url), "stability", params, result)

    at = AppTest.from_file("../pages/7_Stability.py", default_timeout=60)
    for name, value in {"n": "10", "repeats": "1", "steps": "100"}.items():
        at.query_params[name] = value
    at.run()
    assert not at.exception
    assert not [b for b in at.button if b.label.startswith("Compute")]  # cached: nothing to launch
    (summary,) = at.dataframe
    row = summary.value.iloc[0].to_dict()
    cells = len(params["Bs"]) * len(params["sigmas"])
    assert list(row.values())[0] == cells
    predicted = sum(sum(r["predicted"]) for r in result["rows"])
    assert predicted in row.values()  # the theorem's count, read from the stored result


def test_landscape_page_draws_a_cached_surface_of_a_trained_run(tmp_path, monkeypatch):
    from dashboard import landscape_view
    from samlab import landscape
    from samlab.config import preset
    from samlab.train import run

    url = f"sqlite:///{tmp_path}/s.db"
    monkeypatch.setenv("SAMLAB_STORE", url)
    store = Store(url)
    cfg = preset("digits-mlp", ["data.n_train=128", "epochs=1", "batch_size=64", "model.width=8"])
    trained = run(cfg, workdir=tmp_path / "train")
    train_id = jobs.submit(cfg, store=store, start=False)
    assert store.claim(train_id, "h", "local") and store.start_run(train_id, 1, "h", "cpu")
    assert store.finish_run(train_id, "completed", checkpoint_path=str(trained.checkpoint))
    params = landscape_view.request([str(trained.checkpoint)], "1d", span=1.0, points=5, seed=0, data="train",
                                    n_samples=128)
    result = landscape.run_task(landscape.check_task(params), RecordingReporter(), tmp_path / "ls", False)
    _store_finished(store, "landscape", params, result)

    at = AppTest.from_file("../pages/4_Landscape.py", default_timeout=60)
    for name, value in {"kind": "1d", "points": "5", "n_samples": "128"}.items():
        at.query_params[name] = value
    at.run()
    at.multiselect(key="landscape.runs").set_value([train_id]).run()
    assert not at.exception
    assert "Compute the surfaces" not in [b.label for b in at.button]  # the stored surface is used
    assert len(at.get("plotly_chart")) >= 1
