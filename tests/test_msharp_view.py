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
