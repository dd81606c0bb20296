"""Figures of the m-sharpness lesson, checked on their data (no browser): the toy animation's frames and
the prediction drawn over the measured E‖∇L_I‖."""

from __future__ import annotations

import pytest

from dashboard import msharp_view as view
from samlab import toy


@pytest.fixture(scope="module")
def paths():
    surface = toy.ToyLoss2D()
    sam = toy.sam_path(surface, (-0.5, 0.3), lr=0.02, rho=0.4, steps=100)
    gd = toy.sam_path(surface, (-0.5, 0.3), lr=0.02, rho=0.0, steps=100)
    return surface.grid(), sam, gd


def test_toy_animation_has_frames_that_grow_both_paths(paths):
    grid, sam, gd = paths
    fig = view.toy_animation(grid, sam, gd, max_frames=25)
    assert len(fig.frames) == 25
    first, last = fig.frames[0], fig.frames[-1]
    assert last.name == str(len(sam) - 1)
    gd_trace, sam_trace = last.data[0], last.data[1]
    assert len(sam_trace.x) == len(sam) and len(gd_trace.x) == len(gd)
    assert len(first.data[1].x) == 1
    # the ascent arrow of the last frame starts at that step's w and ends at w + ε
    ascent = last.data[2]
    assert (ascent.x[0], ascent.y[0]) == tuple(sam[-1]["w"])
    assert (ascent.x[1], ascent.y[1]) == tuple(sam[-1]["ascent"])
    labels = [b["label"] for b in fig.layout.updatemenus[0].buttons]
    assert any("play" in label for label in labels) and any("pause" in label for label in labels)
    assert [s["label"] for s in fig.layout.sliders[0].steps] == [f.name for f in fig.frames]


def test_toy_animation_with_few_steps_shows_every_step(paths):
    grid, sam, gd = paths
    fig = view.toy_animation(grid, sam[:10], gd[:10], max_frames=60)
    assert [f.name for f in fig.frames] == [str(t) for t in range(10)]


@pytest.fixture(scope="module")
def noise_result():
    """An msharp-shaped result from real per-sample gradients of a tiny network."""
    import torch
    from torch import nn

    from samlab.losses import cross_entropy_per_sample
    from samlab.noise import microbatch_noise_curve, noise_summary, per_sample_grads

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    grads = per_sample_grads(net, cross_entropy_per_sample, x, y)
    return {"n": 32, "noise": noise_summary(grads),
            "noise_curve": microbatch_noise_curve(grads, [32, 8, 2, 1], rho=0.1, partitions=4, seed=0)}


def test_prediction_is_drawn_over_the_measured_noise_curve(noise_result):
    fig = view.noise_figure({"sgd": noise_result})
    measured, predicted = fig.data
    assert list(measured.x) == [1, 2, 8, 32]
    assert predicted.line.dash == "dash" and predicted.x[0] == 1 and predicted.x[-1] == 32
    full, trace_v = noise_result["noise"]["full_grad_norm"], noise_result["noise"]["trace_v"]
    assert predicted.y[0] == pytest.approx((full**2 + trace_v) ** 0.5)  # m = 1: ‖∇L‖² + tr V
    assert predicted.y[-1] == pytest.approx(full)  # m = n: the full gradient, no noise
    at = dict(zip(predicted.x, predicted.y))
    rows = {r["m"]: r for r in noise_result["noise_curve"]}
    for m, mean in zip(measured.x, measured.y):
        assert mean <= rows[m]["mean_sq"] ** 0.5 * (1 + 1e-12)  # Jensen, on the same micro-batches
        assert rows[m]["mean_sq"] == pytest.approx(at[m] ** 2, rel=0.2)  # the identity, to sampling error


def test_usam_regularizer_follows_one_over_m(noise_result):
    fig = view.usam_regularizer_figure({"sgd": noise_result}, rho=0.1)
    law, measured = fig.data
    trace_v = noise_result["noise"]["trace_v"]
    for m, value in zip(law.x, law.y):
        assert value == pytest.approx(0.1 / (2 * m) * trace_v)
    n = noise_result["n"]
    assert 32 not in list(measured.x)
    for m, value in zip(measured.x, measured.y):  # exact without replacement: the law times (n − m)/(n − 1)
        assert value == pytest.approx(0.1 / (2 * m) * trace_v * (n - m) / (n - 1), rel=0.35)
