"""Figure builders and table helpers: pure functions checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dashboard import figures, tables
from samlab.config import preset
from samlab.reporting import RecordingReporter


def _ema_oracle(values, w):
    """Debiased EMA written as the explicit weighted average of the points seen so far."""
    out, seen = [], []
    for y in values:
        if math.isnan(y):
            out.append(math.nan)
            continue
        seen.append(y)
        k = len(seen)
        weights = [(1 - w) * w ** (k - 1 - i) for i in range(k)]
        out.append(sum(wi * yi for wi, yi in zip(weights, seen)) / sum(weights))
    return np.array(out)


def test_smooth_ema_matches_the_weighted_average_and_skips_nans():
    values = [3.0, 1.0, math.nan, 4.0, 1.5, 9.0, 2.6]
    for w in (0.3, 0.9):
        np.testing.assert_allclose(figures.smooth_ema(values, w), _ema_oracle(values, w), rtol=1e-12)
    np.testing.assert_array_equal(figures.smooth_ema([1.0, 2.0], 0.0), [1.0, 2.0])
    with pytest.raises(ValueError, match="smoothing"):
        figures.smooth_ema([1.0], 1.0)


def test_curves_figure_axes_units_legend_and_percent():
    curves = [figures.Curve("sam ρ=0.05", np.array([1, 2, 3]), np.array([0.5, 0.6, 0.7])),
              figures.Curve("sgd", np.array([1, 2, 3]), np.array([0.4, 0.5, 0.55]))]
    fig = figures.curves_figure(curves, metric="test_acc", x="epoch")
    assert fig.layout.xaxis.title.text == "epoch"
    assert fig.layout.yaxis.title.text == "test accuracy (%)"
    assert [t.name for t in fig.data] == ["sam ρ=0.05", "sgd"]
    np.testing.assert_allclose(fig.data[0].y, [50.0, 60.0, 70.0])
    assert "%{y" in fig.data[0].hovertemplate and "sam ρ=0.05" in fig.data[0].hovertemplate
    assert fig.layout.showlegend is True

    smoothed = figures.curves_figure(curves[:1], metric="train_loss", x="time", smoothing=0.5, log_y=True,
                                     task="classification")
    raw, line = smoothed.data
    assert raw.showlegend is False and raw.opacity < 1
    np.testing.assert_allclose(line.y, _ema_oracle([0.5, 0.6, 0.7], 0.5))
    assert smoothed.layout.yaxis.type == "log"
    assert smoothed.layout.yaxis.title.text == "train loss (cross-entropy, nats)"
    assert smoothed.layout.xaxis.title.text == "wall time (s)"
    with pytest.raises(ValueError, match="x: must be one of"):
        figures.curves_figure(curves, metric="test_acc", x="hours")


def test_run_panel_figure_draws_what_exists():
    step = pd.DataFrame({"step": [1, 2, 3], "train_loss": [2.0, 1.5, 1.2], "sharpness": [0.01, 0.02, 0.01],
                         "lr": [0.1, 0.1, 0.1]})
    epoch = pd.DataFrame({"step": [3], "train_loss": [1.1], "test_loss": [1.3], "test_acc": [0.5],
                          "train_acc": [0.6]})
    fig = figures.run_panel_figure(step, epoch, task="regression")
    names = [t.name for t in fig.data]
    assert names.count("test (epoch)") == 2  # loss and accuracy panels
    assert "L(w+ε) − L(w)" in names and "learning rate" in names
    assert fig.layout.yaxis.title.text == "loss (½·squared error)"
    assert fig.layout.yaxis2.title.text == "accuracy (%)"
    assert all(ax.title.text == "optimizer step" for ax in (fig.layout.xaxis, fig.layout.xaxis4))
    assert sum(bool(t.showlegend) for t in fig.data) == len(set(names))  # one legend entry per series
    only_steps = figures.run_panel_figure(step, pd.DataFrame(columns=["step"]))
    assert {t.name for t in only_steps.data} == {"train (per step)", "L(w+ε) − L(w)", "learning rate"}


def test_parallel_coordinates_drop_constant_axes_and_name_categories():
    table = pd.DataFrame({"method": ["sam", "sgd", "msam"], "rho": [0.05, None, 0.1], "lr": [0.1, 0.1, 0.1],
                          "final_test_acc": [91.0, 88.0, 93.0]})
    fig = figures.parallel_coordinates_figure(table, ["method", "rho", "lr", "missing"])
    dims = fig.data[0].dimensions
    assert [d.label for d in dims] == ["method", "ρ", "final test acc (%)"]
    assert list(dims[0].ticktext) == ["msam", "sam", "sgd"] and list(dims[0].values) == [1, 2, 0]
    # plotly drops a line with a NaN on any axis: the SGD run (no ρ) sits on a "none" tick instead
    assert list(dims[1].ticktext) == ["none", "0.05", "0.1"] and list(dims[1].values) == [1, 0, 2]
    assert fig.data[0].line.colorbar.title.text == "final test acc (%)"


def test_labels_name_runs_by_what_differs():
    sgd = preset("digits-mlp", {"seed": 0})
    sam = preset("digits-mlp", {"optim.method": "sam", "optim.rho": 0.1, "seed": 0})
    msam = preset("digits-mlp", {"optim.method": "msam", "optim.rho": 0.1, "optim.m": 8, "seed": 1})
    labels = tables.distinguishing_labels({"a": sgd, "b": sam, "c": msam})
    assert labels == {"a": "sgd seed=0", "b": "sam ρ=0.1 seed=0", "c": "msam ρ=0.1 m=8 seed=1"}
    twins = tables.distinguishing_labels({"x": sgd, "y": sgd}, {"x": "first", "y": "second"})
    assert twins == {"x": "first", "y": "second"}
    same = tables.distinguishing_labels({"x": sgd, "y": sgd})
    assert same == {"x": "sgd #x", "y": "sgd #y"}


def test_summary_table_scores_in_percent():
    cfg = preset("digits-mlp")
    summary = {"final_test_acc": 0.9, "best_test_acc": 0.925, "final_train_acc": 1.0,
               "generalization_gap": 0.1, "final_test_loss": 0.3, "loss_gap": 0.25, "wall_time": 12.5,
               "device": "cpu"}
    table = tables.summary_table([{"id": "r1", "config": cfg, "status": "completed", "summary": summary},
                                  {"id": "r2", "config": cfg.to_dict(), "status": "running", "summary": None}])
    first = table.iloc[0]
    assert (first["final_test_acc"], first["best_test_acc"], first["gap_acc"]) == pytest.approx((90, 92.5, 10))
    assert first["device"] == "cpu" and first["method"] == "sgd" and pd.isna(first["rho"])
    assert pd.isna(table.iloc[1]["final_test_acc"])


def test_steps_per_epoch_matches_the_engine():
    from samlab.train import run

    cfg = preset("digits-mlp", {"data.n_train": 100, "batch_size": 32, "epochs": 2})
    reporter = RecordingReporter()
    run(cfg, reporter)
    steps = [step for kind, step, _ in reporter.rows if kind == "step"]
    epochs = [step for kind, step, _ in reporter.rows if kind == "epoch"]
    assert tables.steps_per_epoch(cfg) * len(epochs) == max(steps)


def test_curve_coordinates_convert_between_steps_epochs_and_time():
    metrics = pd.DataFrame({
        "run_id": ["r"] * 5, "kind": ["step", "step", "step", "epoch", "epoch"],
        "name": ["train_loss", "train_loss", "train_loss", "test_acc", "test_acc"],
        "step": [2, 4, 6, 1, 2], "value": [3.0, 2.0, 1.0, 0.5, 0.7]})
    x, y = tables.curve_xy(metrics, "r", "step.train_loss", "epoch", spe=4)
    np.testing.assert_allclose(x, [0.5, 1.0, 1.5])
    np.testing.assert_allclose(y, [3.0, 2.0, 1.0])
    x, _ = tables.curve_xy(metrics, "r", "epoch.test_acc", "step", spe=4)
    np.testing.assert_allclose(x, [4, 8])
    times = pd.DataFrame({"run_id": ["r", "r"], "kind": ["step", "step"], "step": [2, 6], "time": [0.0, 8.0]})
    x, _ = tables.curve_xy(metrics, "r", "step.train_loss", "time", spe=4, times=times)
    np.testing.assert_allclose(x, [0.0, 4.0, 8.0])
    with pytest.raises(ValueError, match="metric"):
        tables.split_metric_key("test_acc")
    assert tables.metric_choices([("step", "lr"), ("epoch", "test_acc")]) == ["epoch.test_acc", "step.lr"]


def test_wide_metrics_and_csv():
    metrics = pd.DataFrame({"run_id": ["r", "r", "r"], "kind": ["epoch"] * 3,
                            "name": ["test_acc", "test_loss", "test_acc"], "step": [1, 1, 2],
                            "value": [0.5, 1.2, 0.6]})
    wide = tables.wide_metrics(metrics, "r", "epoch", spe=10)
    assert list(wide["step"]) == [10, 20] and list(wide["epoch"]) == [1, 2]
    assert list(wide["test_acc"]) == [0.5, 0.6]
    csv = tables.metrics_csv({"run A": metrics.drop(columns=["run_id"])})
    lines = csv.strip().splitlines()
    assert lines[0] == "run,kind,name,step,value" and len(lines) == 4 and lines[1].startswith("run A,epoch")


def test_eta_and_durations():
    assert tables.eta_seconds(0.25, 1.0, 30.0) == pytest.approx(90.0)
    assert tables.eta_seconds(0.0, 1.0, 5.0) is None and tables.eta_seconds(1.0, 1.0, 5.0) is None
    assert [tables.format_duration(s) for s in (None, 42.4, 185, 7620)] == ["—", "42 s", "3 min 05 s", "2 h 07 min"]
