"""The notebook API: lazy top-level names, runs and metrics as DataFrames, the dashboard's figures drawn
from stored runs without streamlit, and the live cell helper."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import mark_finished

ROOT = Path(__file__).resolve().parents[1]
BUILDER_MODULES = ["dashboard.figures", "dashboard.hessian_view", "dashboard.landscape_view",
                   "dashboard.msharp_view", "dashboard.stability_view", "dashboard.tables", "dashboard.forms",
                   "dashboard.plots"]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# -- imports ------------------------------------------------------------------------------------------------
def test_import_samlab_loads_nothing_heavy():
    out = _python("import sys, samlab; print(sorted(m for m in ('torch', 'pandas', 'numpy', 'sqlalchemy', "
                  "'plotly') if m in sys.modules))")
    assert out == "[]"


def test_lazy_names_are_the_implementations():
    import samlab
    from samlab import checkpoints, config, notebook
    from samlab.runs import jobs, store

    assert samlab.submit is jobs.submit and samlab.wait is jobs.wait
    assert samlab.cancel is jobs.cancel and samlab.resume is jobs.resume
    assert samlab.runs_table is notebook.runs_table and samlab.metrics is notebook.metrics
    assert samlab.preset is config.preset and samlab.RunConfig is config.RunConfig
    assert samlab.open_store is store.open_store and samlab.checkpoint_of is checkpoints.checkpoint_of
    assert {"submit", "wait", "runs_table", "metrics"} <= set(dir(samlab))
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = samlab.no_such_name


def test_figure_builders_import_without_streamlit():
    out = _python(f"import sys\nfor m in {BUILDER_MODULES!r}: __import__(m)\nprint('streamlit' in sys.modules)")
    assert out == "False"


# -- runs and metrics ---------------------------------------------------------------------------------------
def _nested_get(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


def _queue(store, method: str, **overrides):
    from samlab.config import preset

    sets = [f"optim.method={method}", *(f"{k}={v}" for k, v in overrides.items())]
    cfg = preset("digits-cnn", sets)
    (run_id,) = store.create_runs([{"kind": "train", "params": cfg.to_dict(), "name": cfg.label()}])
    return run_id, cfg


def test_runs_table_has_config_columns_summaries_and_filters(store_env):
    import samlab

    assert samlab.runs_table().empty
    sam, sam_cfg = _queue(store_env, "sam", **{"optim.rho": 0.05})
    msam, _ = _queue(store_env, "msam", **{"optim.rho": 0.1, "optim.m": 16})
    mark_finished(store_env, sam, summary={"final_test_acc": 0.93, "wall_time": 12.5, "device": "cpu",
                                            "epochs": 10})
    (hessian,) = store_env.create_runs([{"kind": "hessian", "params": {"checkpoint": "x.pt", "k": 3}}])

    table = samlab.runs_table()
    assert list(table["id"]) == [msam, sam]  # newest first, train runs only by default
    row = table.set_index("id").loc[sam]
    params = store_env.get_run(sam)["params"]
    for column in ("optim.method", "optim.rho", "data.name", "model.width", "epochs", "seed"):
        assert row[column] == _nested_get(params, column)
    assert row["final_test_acc"] == 0.93 and row["wall_time"] == 12.5 and row["status"] == "completed"
    assert row["summary.device"] == "cpu" and row["summary.epochs"] == 10  # clashing names keep both
    assert table.set_index("id").loc[msam, "optim.m"] == 16

    assert list(samlab.runs_table(method="msam")["id"]) == [msam]
    assert list(samlab.runs_table(rho=[0.05, 0.2])["id"]) == [sam]
    assert list(samlab.runs_table(status="completed")["id"]) == [sam]
    assert set(samlab.runs_table(kind=None)["id"]) == {sam, msam, hessian}
    assert row["params.name"] == sam_cfg.name and row["name"] == sam_cfg.label()  # the run's name wins
    assert row["params.device"] == sam_cfg.device

    store_env.create_runs([{"kind": "landscape", "params": {"grid": {"n": 5}, "radii": {"n": 3}}}])
    assert list(samlab.runs_table(kind="landscape", **{"grid.n": 5})["grid.n"]) == [5]
    with pytest.raises(ValueError, match="n: names several columns"):
        samlab.runs_table(kind="landscape", n=5)
    with pytest.raises(ValueError, match="no_such: no such column"):
        samlab.runs_table(no_such=1)


def test_metrics_are_the_stores_downsampled_curves(store_env):
    import samlab

    run_id, _ = _queue(store_env, "sgd")
    steps = np.arange(1, 5001)
    values = np.sin(steps / 300.0)
    store_env.flush(run_id, [("step", int(s), "train_loss", float(v), 0.0) for s, v in zip(steps, values)]
                    + [("epoch", e, "test_acc", e / 10, 0.0) for e in range(1, 4)])

    frame = samlab.metrics(run_id[:8], "train_loss")  # a unique prefix, one name
    assert list(frame.columns) == ["run_id", "kind", "name", "step", "value"]
    assert set(frame["run_id"]) == {run_id} and 0 < len(frame) <= 2 * 2000
    # the store's downsampled read (one implementation): the same rows, and it keeps the first and last
    # point and the curve's extremes
    same = store_env.metrics([run_id], names=["train_loss"], max_points=2000)
    np.testing.assert_array_equal(frame["step"], same["step"])
    np.testing.assert_array_equal(frame["value"], same["value"])
    assert frame["step"].iloc[0] == 1 and frame["step"].iloc[-1] == 5000
    assert frame["value"].max() == values.max() and frame["value"].min() == values.min()
    assert set(frame["step"]) <= set(steps.tolist())

    full = samlab.metrics(samlab.runs_table(), max_points=None, kind="step")
    np.testing.assert_array_equal(full["value"], values)
    epoch = samlab.metrics([run_id], ["test_acc"], kind="epoch")
    assert list(epoch["value"]) == pytest.approx([0.1, 0.2, 0.3])


# -- figures from stored runs ---------------------------------------------------------------------------------
def test_curves_figure_of_stored_runs(store_env):
    from dashboard import plots

    sam, sam_cfg = _queue(store_env, "sam", **{"data.n_train": 512, "batch_size": 64})
    msam, _ = _queue(store_env, "msam", **{"data.n_train": 512, "batch_size": 64, "optim.m": 16})
    for run_id, offset in ((sam, 0.0), (msam, 0.05)):
        store_env.flush(run_id, [("epoch", e, "test_acc", 0.5 + offset + e / 100, 0.0) for e in (1, 2, 3)])

    fig = plots.curves([sam, msam], "epoch.test_acc", x="step")
    # the hyperparameters that tell the runs apart, then the short id
    assert {trace.name for trace in fig.data} == {f"sam · {sam[:6]}", f"msam m=16 · {msam[:6]}"}
    lines = {trace.name.split(" · ")[0]: trace for trace in fig.data}
    spe = 512 // 64
    np.testing.assert_allclose(lines["sam"].x, [spe, 2 * spe, 3 * spe])
    np.testing.assert_allclose(lines["msam m=16"].y, [56.0, 57.0, 58.0])  # percent
    assert "test accuracy" in fig.layout.yaxis.title.text
    with pytest.raises(ValueError, match="x: must be one of"):
        plots.curves([sam], "epoch.test_acc", x="wall")

    panel = plots.run_panel(sam)
    assert {t.name for t in panel.data} == {"test (epoch)"}
    assert "no metrics yet" in plots.run_panel(_queue(store_env, "sgd")[0]).layout.annotations[0].text


def _trained_and_analysis(store, method: str, kind: str, params: dict, result: dict):
    train_id, _ = _queue(store, method, **({"optim.m": 16} if method == "msam" else {}))
    checkpoint = f"/ckpt/{train_id}.pt"
    mark_finished(store, train_id, checkpoint_path=checkpoint)
    key = "checkpoints" if kind == "landscape" else "checkpoint"
    value = [checkpoint] if kind == "landscape" else checkpoint
    (analysis,) = store.create_runs([{"kind": kind, "params": {key: value, **params}}])
    mark_finished(store, analysis, result=result)
    return analysis, checkpoint, train_id


def test_analysis_figures_are_labelled_by_their_trained_runs(store_env):
    from dashboard import plots

    eig = {"largest": {"values": [5.0, 3.0]}, "smallest": {"values": [-0.5, -0.1]}}
    density = {"grid": [0.0, 1.0, 2.0], "density": [0.2, 0.5, 0.3]}
    h_sam, *_ = _trained_and_analysis(store_env, "sam", "hessian", {},
                                     {"eigenvalues": eig, "density": density, "lr": 0.05})
    h_sgd, *_ = _trained_and_analysis(store_env, "sgd", "hessian", {},
                                     {"eigenvalues": {"largest": {"values": [9.0, 4.0]}}, "lr": 0.05})
    spectrum = plots.hessian_spectrum([h_sam, h_sgd])
    assert all(re.fullmatch(r".+ · [0-9a-f]{6}", trace.name) for trace in spectrum.data)  # then a short id
    bars = {trace.name.split(" · ")[0]: list(trace.y) for trace in spectrum.data}
    assert set(bars) == {"sam ρ=0.05", "sgd"}  # what tells the trained runs apart (sgd has no ρ)
    assert sorted(bars["sam ρ=0.05"]) == sorted([5.0, 3.0, -0.5, -0.1]) and bars["sgd"] == [9.0, 4.0]
    dens = plots.hessian_density(h_sam, log_scale=False)
    assert len(dens.data) == 1 and list(dens.data[0].y) == [0.2, 0.5, 0.3]

    ms, *_ = _trained_and_analysis(store_env, "msam", "msharp", {},
                                  {"sharpness_curve": [{"m": 16, "sharpness": 0.2}, {"m": 1, "sharpness": 0.5}]})
    sharp = plots.m_sharpness(ms)
    assert list(sharp.data[0].x) == [1, 16] and list(sharp.data[0].y) == [0.5, 0.2]

    loss = [0.9, 0.3, 0.8]
    land, checkpoint, trained = _trained_and_analysis(
        store_env, "asam", "landscape", {"kind": "1d"},
        {"kind": "1d", "axes": [[-1.0, 0.0, 1.0]], "runs": [{"checkpoint": "", "label": "x", "loss": loss}]})
    run = store_env.get_run(land)
    run["result"]["runs"][0]["checkpoint"] = checkpoint
    store_env.flush(land, [], result=run["result"])
    curve = plots.landscape(land)
    # one run alone is labelled by its name and short id, as on the pages
    assert curve.data[0].name == f'{store_env.get_run(trained)["name"]} · {trained[:6]}'
    assert list(curve.data[0].y) == loss
    with pytest.raises(ValueError, match="style: must be one of"):
        plots.landscape(land, style="wireframe")


def test_stability_plane_of_a_stored_grid(store_env):
    from dashboard import plots
    from samlab import stability

    params = {"mode": "grid", "eta": 0.5, "n": 20, "lam_max": 2.0, "Bs": [1, 2, 4, 8], "sigmas": [1, 3, 6, 10]}
    (grid,) = store_env.create_runs([{"kind": "stability", "params": params}])
    fig = plots.stability_plane(grid)  # queued: the theorem's colours, nothing simulated yet
    expected = [[float(stability.predicts_divergence(2.0, s, 0.5, b, 20)) for b in params["Bs"]]
                for s in params["sigmas"]]
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), expected)
    assert 0 < np.asarray(expected).sum() < np.asarray(expected).size  # both colours appear
    (model,) = store_env.create_runs([{"kind": "stability", "params": {"mode": "model"}}])
    with pytest.raises(ValueError, match="not a stability grid"):
        plots.stability_plane(model)


def test_live_returns_by_its_deadline_or_when_the_run_ends(store_env):
    from dashboard import plots

    queued, _ = _queue(store_env, "sgd")
    assert plots.live(queued, seconds=0.3, every=0.1) == "queued"  # never started: the deadline ends it
    done, _ = _queue(store_env, "sgd")
    mark_finished(store_env, done)
    assert plots.live(done, seconds=3600) == "completed"  # a finished run returns at once
    with pytest.raises(ValueError, match="seconds, every"):
        plots.live(done, seconds=1, every=0)
