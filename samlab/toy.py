"""Two small worlds where SAM can be watched: a 2-D loss surface and the diagonal linear network.

1. `ToyLoss2D`: a 2-D loss with a sharp minimum and a flat one; `sam_path` records each SAM step
   (gradient, ascent point, descent gradient, next point) so a page can draw it step by step.
2. `diagonal_network_demo`: the cheap m-sharpness demonstration of Andriushchenko & Flammarion
   ("Towards Understanding Sharpness-Aware Minimization", ICML 2022, Sec. 4): a diagonal linear
   network w = u⊙u − v⊙v trained by full-batch GD, n-SAM and 1-SAM with unnormalised (USAM-style)
   perturbations on sparse regression. Every (method, ρ) configuration trains at once: the
   parameters carry a leading configuration axis and each iteration is a handful of batched tensor
   operations with closed-form gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from samlab.config import DataConfig
from samlab.reporting import Reporter
from samlab.validation import check_int, check_number, check_positive


# -- 1. a 2-D loss with a sharp and a flat minimum ----------------------------------------------------
@dataclass(frozen=True)
class ToyLoss2D:
    """L(w) = −depth_sharp·exp(−‖w − c_s‖² / 2σ_s²) − depth_flat·exp(−‖w − c_f‖² / 2σ_f²) + κ‖w‖²/2.

    The sharp well is a narrow, slightly deeper dip on the slope of a wide, flat basin: gradient
    descent started near the dip falls into it; SAM, which descends the worst loss in a ρ-ball, is
    pushed out of dips narrower than ρ.
    """

    sharp_centre: tuple[float, float] = (-0.6, 0.4)
    flat_centre: tuple[float, float] = (1.0, 0.0)
    sharp_width: float = 0.15
    flat_width: float = 1.0
    sharp_depth: float = 1.0
    flat_depth: float = 1.0
    curvature: float = 0.05

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        """Loss at points w of shape [..., 2]."""
        return (
            -self.sharp_depth * _bump(w, self.sharp_centre, self.sharp_width)
            - self.flat_depth * _bump(w, self.flat_centre, self.flat_width)
            + 0.5 * self.curvature * w.pow(2).sum(-1)
        )

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self(w).sum(), w)
        return g

    def grid(self, lo: float = -2.5, hi: float = 2.5, points: int = 121) -> dict[str, list]:
        """Loss on a square grid for a contour plot: {"x": [...], "y": [...], "z": [[...]] (rows = y)}."""
        axis = torch.linspace(lo, hi, points, dtype=torch.float64)
        yy, xx = torch.meshgrid(axis, axis, indexing="ij")
        z = self(torch.stack([xx, yy], dim=-1))
        return {"x": axis.tolist(), "y": axis.tolist(), "z": z.tolist()}


def _bump(w: torch.Tensor, centre: tuple[float, float], width: float) -> torch.Tensor:
    c = torch.tensor(centre, dtype=w.dtype, device=w.device)
    return torch.exp(-(w - c).pow(2).sum(-1) / (2 * width**2))


def sam_path(
    loss: ToyLoss2D, start: Sequence[float], *, lr: float, rho: float, steps: int, normalized: bool = True
) -> list[dict[str, Any]]:
    """SAM on the 2-D loss, one record per step (Foret et al. 2021):

    g = ∇L(w); ε = ρ g/‖g‖ (or ρ g when `normalized` is False, USAM); g_SAM = ∇L(w + ε);
    w ← w − lr · g_SAM. ρ = 0 is gradient descent. Each record holds w, loss, g, ascent (w + ε),
    g_sam and next (the new w) as plain lists.
    """
    check_positive("lr", lr)
    check_number("rho", rho, lower=0.0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1 (got {steps!r})")
    if len(start) != 2:
        raise ValueError(f"start: a point (x, y) of the plane (got {list(start)!r})")
    w = torch.tensor([float(s) for s in start], dtype=torch.float64)
    path = []
    for _ in range(steps):
        g = loss.grad(w)
        scale = rho / (float(g.norm()) + 1e-12) if normalized else rho
        ascent = w + scale * g
        g_sam = loss.grad(ascent)
        nxt = w - lr * g_sam
        path.append({
            "w": w.tolist(), "loss": float(loss(w)), "g": g.tolist(), "ascent": ascent.tolist(),
            "ascent_loss": float(loss(ascent)), "g_sam": g_sam.tolist(), "next": nxt.tolist(),
        })
        w = nxt
    return path


# -- 2. the diagonal linear network ------------------------------------------------------------------
DIAG_METHODS = ("gd", "nsam", "1sam")


@dataclass(frozen=True)
class DiagonalNetworkSetup:
    """The sparse-regression problem of Andriushchenko & Flammarion 2022 (after Pesme et al. 2021):
    n = 20 samples, d = 30 features, x ~ N(0, I), y = <w*, x>, w* 3-sparse with unit norm."""

    n_train: int = 20
    n_test: int = 1000
    n_features: int = 30
    sparsity: int = 3
    data_seed: int = 0
    init_scale: float = 0.3  # u = v = α·1 at initialisation (w = 0)
    lr: float = 0.1
    iterations: int = 10_000


DEFAULT_DIAG_RHOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def diagonal_network_demo(
    setup: DiagonalNetworkSetup,
    rhos: Sequence[float],
    methods: Sequence[str] = DIAG_METHODS,
    *,
    reporter: Reporter | None = None,
    record_every: int = 100,
) -> dict[str, Any]:
    """Train GD, n-SAM and 1-SAM for every ρ at once and return their test losses.

    Loss: L(w) = (1/n) Σ_i f_i, f_i = ½(<u⊙u − v⊙v, x_i> − y_i)². Full-batch updates
    θ ← θ − η (1/n) Σ_i ∇f_i(θ + ε_i) with unnormalised perturbations (USAM-style):
      gd:    ε_i = 0;
      nsam:  ε_i = ρ ∇L(θ) — one perturbation from the whole training set (here the full batch);
      1sam:  ε_i = ρ ∇f_i(θ) — each sample perturbed by its own gradient (m = 1).
    Test loss: ½ mean over the n_test held-out samples of the squared error (as in the paper), and
    the population loss ½‖w − w*‖² (exact for x ~ N(0, I)). Returns rows (method, rho, train_loss,
    test_loss, population_loss, diverged), curves (test loss every `record_every` iterations),
    seconds and the setup.
    """
    _check_setup(setup, rhos, methods)
    reporter = reporter or Reporter()
    data = _sparse_regression(setup)
    configs = [("gd", 0.0)] if "gd" in methods else []
    configs += [(method, float(rho)) for method in methods if method != "gd" for rho in rhos]
    rho = torch.tensor([r for _, r in configs], dtype=torch.float64)
    own = torch.tensor([1.0 if m == "1sam" else 0.0 for m, _ in configs], dtype=torch.float64)
    x, y = data["x_train"], data["y_train"]
    c, d = len(configs), x.shape[1]
    u = torch.full((c, d), setup.init_scale, dtype=torch.float64)
    v = u.clone()
    curves: list[list[float]] = [[] for _ in configs]
    record_at: list[int] = []
    t0 = time.perf_counter()
    for it in range(setup.iterations):
        du, dv = _descent_direction(u, v, x, y, rho, own)
        u, v = u - setup.lr * du, v - setup.lr * dv
        if (it + 1) % record_every == 0 or it + 1 == setup.iterations:
            record_at.append(it + 1)
            for i, value in enumerate(_test_loss(u, v, data).tolist()):
                curves[i].append(value)
            reporter.progress(it + 1, setup.iterations, "diagonal linear network")
            if reporter.should_stop():
                break
    seconds = time.perf_counter() - t0
    rows = _summary_rows(configs, u, v, data)
    return {"rows": rows, "curves": {"iterations": record_at, "test_loss": curves,
                                     "labels": [f"{m} ρ={r:g}" for m, r in configs]},
            "seconds": seconds, "iterations_done": record_at[-1] if record_at else 0,
            "setup": setup.__dict__ | {"rhos": [float(r) for r in rhos], "methods": list(methods)}}


def per_sample_gradients(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """∇_u f_i, ∇_v f_i for every configuration c and sample i: shapes [C, n, d] (closed form).

    f_i = ½ r_i², r_i = <u⊙u − v⊙v, x_i> − y_i ⇒ ∇_u f_i = 2 r_i x_i⊙u, ∇_v f_i = −2 r_i x_i⊙v.
    u, v may carry a per-sample axis ([C, n, d]) or not ([C, d]).
    """
    u_, v_ = (u, v) if u.dim() == 3 else (u[:, None, :], v[:, None, :])
    r = ((u_ * u_ - v_ * v_) * x).sum(-1) - y  # [C, n]
    scaled = 2 * r[..., None] * x
    return scaled * u_, -scaled * v_


def _descent_direction(u, v, x, y, rho, own):
    """(1/n) Σ_i ∇f_i(θ + ε_i), ε_i = ρ_c (own_c ∇f_i + (1 − own_c) ∇L): 1-SAM when own_c = 1, n-SAM when 0."""
    gu, gv = per_sample_gradients(u, v, x, y)
    mix = own[:, None, None]
    eps_u = rho[:, None, None] * (mix * gu + (1 - mix) * gu.mean(1, keepdim=True))
    eps_v = rho[:, None, None] * (mix * gv + (1 - mix) * gv.mean(1, keepdim=True))
    pu, pv = per_sample_gradients(u[:, None, :] + eps_u, v[:, None, :] + eps_v, x, y)
    return pu.mean(1), pv.mean(1)


def _sparse_regression(setup: DiagonalNetworkSetup) -> dict[str, torch.Tensor]:
    from samlab.data import load_dataset

    ds = load_dataset(DataConfig(name="sparse-regression", n_train=setup.n_train, n_test=setup.n_test,
                                 n_features=setup.n_features, sparsity=setup.sparsity, standardize=False,
                                 data_seed=setup.data_seed))
    return {"x_train": ds.x_train.double(), "y_train": ds.y_train.double(), "x_test": ds.x_test.double(),
            "y_test": ds.y_test.double(), "w_star": ds.true_weights.double()}


def _test_loss(u: torch.Tensor, v: torch.Tensor, data: dict[str, torch.Tensor]) -> torch.Tensor:
    w = u * u - v * v
    return 0.5 * (w @ data["x_test"].T - data["y_test"]).pow(2).mean(-1)


def _summary_rows(configs, u, v, data) -> list[dict[str, Any]]:
    w = u * u - v * v
    train = 0.5 * (w @ data["x_train"].T - data["y_train"]).pow(2).mean(-1)
    test = _test_loss(u, v, data)
    population = 0.5 * (w - data["w_star"]).pow(2).sum(-1)
    rows = []
    for i, (method, rho) in enumerate(configs):
        diverged = not (math.isfinite(float(train[i])) and math.isfinite(float(test[i])))
        rows.append({"method": method, "rho": rho, "train_loss": float(train[i]), "test_loss": float(test[i]),
                     "population_loss": float(population[i]), "diverged": diverged})
    return rows


def _check_setup(setup: DiagonalNetworkSetup, rhos: Sequence[float], methods: Sequence[str]) -> None:
    for name in ("n_train", "n_test", "n_features", "iterations"):
        check_int(name, getattr(setup, name), 1)
    check_int("sparsity", setup.sparsity, 1, setup.n_features)
    check_positive("init_scale", setup.init_scale)
    check_positive("lr", setup.lr)
    unknown = [m for m in methods if m not in DIAG_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods: choose from {', '.join(DIAG_METHODS)} (got {list(methods)!r})")
    if any(m != "gd" for m in methods) and not rhos:
        raise ValueError("rhos: at least one radius for n-SAM / 1-SAM")
    for rho in rhos:
        check_number("rhos", rho, lower=0.0)
