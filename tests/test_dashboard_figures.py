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


def test_run_panel_of_a_run_that_does_not_perturb_has_no_sharpness_panel():
    step = pd.DataFrame({"step": [1, 2], "train_loss": [2.0, 1.5], "sharpness": [0.0, 0.0], "lr": [0.1, 0.1]})
    fig = figures.run_panel_figure(step, pd.DataFrame(columns=["step"]), perturbs=False)
    assert {t.name for t in fig.data} == {"train (per step)", "learning rate"}
    assert [a.text for a in fig.layout.annotations] == ["loss", "accuracy", "learning rate"]
    lr_axis = fig.layout[fig.data[-1].xaxis.replace("x", "xaxis")]
    assert lr_axis.domain[1] - lr_axis.domain[0] > 0.9  # the learning rate spans the bottom row
    perturbing = figures.run_panel_figure(step, pd.DataFrame(columns=["step"]))
    assert "sharpness proxy" in [a.text for a in perturbing.layout.annotations]


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
    labels = tables.distinguishing_labels({"a1b2c3d4": sgd, "b": sam, "c": msam})
    assert labels == {"a1b2c3d4": "sgd seed=0 · a1b2c3", "b": "sam ρ=0.1 seed=0 · b", "c": "msam ρ=0.1 m=8 seed=1 · c"}
    twins = tables.distinguishing_labels({"x": sgd, "y": sgd}, {"x": "first", "y": "second"})
    assert twins == {"x": "first · x", "y": "second · y"}
    same = tables.distinguishing_labels({"x": sgd, "y": sgd})
    assert same == {"x": "sgd · x", "y": "sgd · y"}


def test_labels_of_runs_that_differ_in_everything_fit_sixty_characters():
    # the case of a store with runs from several presets: 20+ hyperparameters differ
    configs = {
        "67f621aa11": preset("digits-cnn", {"optim.method": "rwsam", "optim.lam": 0, "optim.delta": 0.001, "seed": 1}),
        "12ab34cd56": preset("digits-mlp", {"seed": 0}),
        "99ff001122": preset("digits-cnn", {"optim.method": "msam", "optim.m": 8, "optim.rho": 0.1, "seed": 2}),
        "abcdef1234": preset("digits-cnn-msharp", {}),
    }
    labels = tables.distinguishing_labels(configs)
    assert all(len(label) <= tables.LABEL_CHARS for label in labels.values())
    assert labels["67f621aa11"].startswith("rwsam ρ=0.05 λ=0 cnn") and labels["67f621aa11"].endswith(" … · 67f621")
    assert labels["99ff001122"].startswith("msam ρ=0.1 m=8 cnn")
    # the full config keeps what the label leaves out
    full = tables.config_text(configs["67f621aa11"])
    assert len(full) > 100 and "estimator=fd" in full and full.endswith("seed=1")
    # a name too long for a label is cut, not dropped
    long_name = tables.distinguishing_labels({"r1": configs["12ab34cd56"]}, {"r1": "x" * 80})["r1"]
    assert long_name == "x" * 54 + "… · r1" and len(long_name) == tables.LABEL_CHARS


def test_seed_groups_put_runs_that_differ_only_in_seed_together():
    sam = [preset("digits-mlp", {"optim.method": "sam", "optim.rho": 0.1, "seed": s}) for s in range(3)]
    sgd = [preset("digits-mlp", {"seed": s}) for s in range(2)]
    groups = tables.seed_groups({"a": sam[0], "b": sgd[0], "c": sam[1], "d": sam[2], "e": sgd[1]})
    assert groups == {"sam ρ=0.1 · 3 seeds": ["a", "c", "d"], "sgd · 2 seeds": ["b", "e"]}
    assert tables.seed_groups({"a": sam[0]}) == {"sam · 1 seed": ["a"]}


def test_seed_band_is_the_mean_and_sample_std_at_each_x():
    # three seeds logged at epochs 1, 2, 3; a fourth curve missing epoch 3 restricts the shared x to 1, 2
    x = [1, 2, 3]
    grid, mean, std = figures.seed_band([(x, [0.5, 0.7, 0.8]), (x, [0.6, 0.7, 1.0]), (x, [0.4, 0.7, 0.9])])
    assert list(grid) == [1, 2, 3]
    assert mean == pytest.approx([0.5, 0.7, 0.9])
    # by hand: deviations (0, 0.1, -0.1) → sqrt(0.02 / 2) = 0.1; (0, 0, 0) → 0; (-0.1, 0.1, 0) → 0.1
    assert std == pytest.approx([0.1, 0.0, 0.1])
    grid, mean, std = figures.seed_band([([3, 1, 2], [0.8, 0.5, 0.7]), ([1, 2], [0.7, 0.9])])
    assert list(grid) == [1, 2] and mean == pytest.approx([0.6, 0.8])
    assert std == pytest.approx([math.sqrt(0.02), math.sqrt(0.02)])
    # downsampled curves without shared x: interpolated onto the first curve's x inside the common range
    grid, mean, _ = figures.seed_band([([0, 1, 2, 3], [0, 1, 2, 3]), ([0.5, 2.5], [10, 30])])
    assert list(grid) == [1, 2] and mean == pytest.approx([(1 + 15) / 2, (2 + 25) / 2])


def test_band_figure_draws_a_band_per_group_with_its_seed_count():
    curves = {i: figures.Curve(i, np.array([1.0, 2.0]), np.array(y)) for i, y in
              (("a", [0.5, 0.6]), ("b", [0.7, 0.8]), ("c", [0.2, 0.3]))}
    bands = figures.seed_bands({"sam · 2 seeds": ["a", "b"], "sgd · 1 seed": ["c"]}, curves,
                               {"a": "sam ρ=0.1 lr=0.1 seed=0", "b": "sam ρ=0.1 lr=0.1 seed=1", "c": "sgd seed=0"})
    assert [b.n for b in bands] == [2, 1] and bands[0].hover == {"config": "sam ρ=0.1 lr=0.1"}
    fig = figures.band_figure(bands, metric="test_acc", x="epoch")
    # group one: band (filled, mean ± std in percent) + mean line; group two (one seed): the line only
    assert [t.name for t in fig.data] == ["sam · 2 seeds ± std", "sam · 2 seeds", "sgd · 1 seed"]
    assert fig.data[0].fill == "toself" and not fig.data[0].showlegend
    std = math.sqrt(0.02)
    assert list(fig.data[0].y) == pytest.approx([60 + 100 * std, 70 + 100 * std, 70 - 100 * std, 60 - 100 * std])
    assert list(fig.data[1].y) == pytest.approx([60, 70]) and "± std" in fig.data[1].hovertemplate
    assert "%{customdata:.3g}" in fig.data[1].hovertemplate and "sam ρ=0.1 lr=0.1" in fig.data[1].hovertemplate


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
