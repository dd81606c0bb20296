"""The 2-D SAM path and the vectorised diagonal-linear-network demonstration against hand computations."""

from __future__ import annotations

import pytest
import torch

from samlab.toy import (
    DiagonalNetworkSetup,
    ToyLoss2D,
    _descent_direction,
    diagonal_network_demo,
    per_sample_gradients,
    sam_path,
)


def sample_loss(u, v, xi, yi):
    return 0.5 * (((u * u - v * v) * xi).sum() - yi) ** 2


def problem(seed=0, n=6, d=4, c=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    u = torch.rand(c, d, generator=gen, dtype=torch.float64) + 0.1
    v = torch.rand(c, d, generator=gen, dtype=torch.float64) + 0.1
    return x, y, u, v


def autograd_grads(u, v, xi, yi):
    u, v = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    return torch.autograd.grad(sample_loss(u, v, xi, yi), (u, v))


def test_closed_form_per_sample_gradients_match_autograd():
    x, y, u, v = problem()
    gu, gv = per_sample_gradients(u, v, x, y)
    for c in range(u.shape[0]):
        for i in range(x.shape[0]):
            au, av = autograd_grads(u[c], v[c], x[i], y[i])
            torch.testing.assert_close(gu[c, i], au)
            torch.testing.assert_close(gv[c, i], av)


def test_descent_directions_of_gd_nsam_and_1sam_match_hand_loops():
    x, y, u, v = problem(seed=1)
    rho = torch.tensor([0.0, 0.2, 0.2], dtype=torch.float64)
    own = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # gd, n-SAM, 1-SAM
    du, dv = _descent_direction(u, v, x, y, rho, own)
    n = x.shape[0]

    def full_grad(uc, vc):
        uc, vc = uc.clone().requires_grad_(True), vc.clone().requires_grad_(True)
        loss = sum(sample_loss(uc, vc, x[i], y[i]) for i in range(n)) / n
        return torch.autograd.grad(loss, (uc, vc))

    torch.testing.assert_close((du[0], dv[0]), full_grad(u[0], v[0]))
    eu, ev = full_grad(u[1], v[1])
    torch.testing.assert_close((du[1], dv[1]), full_grad(u[1] + 0.2 * eu, v[1] + 0.2 * ev))
    hand_u, hand_v = torch.zeros_like(u[2]), torch.zeros_like(v[2])
    for i in range(n):
        eu, ev = autograd_grads(u[2], v[2], x[i], y[i])
        gu, gv = autograd_grads(u[2] + 0.2 * eu, v[2] + 0.2 * ev, x[i], y[i])
        hand_u, hand_v = hand_u + gu / n, hand_v + gv / n
    torch.testing.assert_close((du[2], dv[2]), (hand_u, hand_v))


def test_vectorised_configurations_do_not_interact():
    setup = DiagonalNetworkSetup(iterations=300)
    together = diagonal_network_demo(setup, [0.1, 0.3], record_every=100)
    alone = diagonal_network_demo(setup, [0.3], methods=["1sam"], record_every=100)
    row = next(r for r in together["rows"] if r["method"] == "1sam" and r["rho"] == 0.3)
    assert alone["rows"][0]["test_loss"] == pytest.approx(row["test_loss"], rel=1e-12)
    assert [r["method"] for r in together["rows"]] == ["gd", "nsam", "nsam", "1sam", "1sam"]
    assert together["curves"]["iterations"] == [100, 200, 300]
    assert together["rows"][0]["population_loss"] > 0


def test_two_d_sam_step_follows_its_definition_and_rho_zero_is_gradient_descent():
    loss = ToyLoss2D()
    path = sam_path(loss, (-0.5, 0.3), lr=0.02, rho=0.3, steps=2)
    w = torch.tensor([-0.5, 0.3], dtype=torch.float64)
    g = loss.grad(w)
    ascent = w + 0.3 * g / g.norm()
    expected = w - 0.02 * loss.grad(ascent)
    assert path[0]["ascent"] == pytest.approx(ascent.tolist(), rel=1e-12)
    assert path[0]["next"] == pytest.approx(expected.tolist(), rel=1e-12)
    assert path[1]["w"] == path[0]["next"]
    gd = sam_path(loss, (-0.5, 0.3), lr=0.02, rho=0.0, steps=1)
    assert gd[0]["next"] == pytest.approx((w - 0.02 * g).tolist(), rel=1e-12)


def test_sam_leaves_the_sharp_dip_that_gradient_descent_falls_into():
    loss = ToyLoss2D()
    sharp = torch.tensor(loss.sharp_centre, dtype=torch.float64)
    gd_end = torch.tensor(sam_path(loss, (-0.5, 0.3), lr=0.02, rho=0.0, steps=300)[-1]["next"], dtype=torch.float64)
    sam_end = torch.tensor(sam_path(loss, (-0.5, 0.3), lr=0.02, rho=0.4, steps=300)[-1]["next"], dtype=torch.float64)
    assert float((gd_end - sharp).norm()) < loss.sharp_width / 2
    assert float((sam_end - sharp).norm()) > 2 * loss.sharp_width


@pytest.mark.parametrize(("kwargs", "field"), [({"lr": 0.0}, "lr:"), ({"rho": -1.0}, "rho:"), ({"steps": 0}, "steps:")])
def test_sam_path_rejects_bad_values(kwargs, field):
    args = {"lr": 0.1, "rho": 0.1, "steps": 1} | kwargs
    with pytest.raises(ValueError, match=field):
        sam_path(ToyLoss2D(), (0.0, 0.0), **args)


def test_demo_rejects_unknown_methods():
    with pytest.raises(ValueError, match="methods:"):
        diagonal_network_demo(DiagonalNetworkSetup(iterations=1), [0.1], methods=["adam"])
