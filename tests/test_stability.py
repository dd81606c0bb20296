"""SGD linear stability: coherence, the theorem, the exact second-moment map, simulation, model checks."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from torch import nn

from samlab import stability as st
from samlab.losses import per_sample_loss
from samlab.reporting import RecordingReporter
from samlab.tasks import stability as stt


def random_psd_set(generator: torch.Generator, n: int, d: int, rank: int, aligned: bool = False) -> torch.Tensor:
    factors = torch.randn(n, rank, d, generator=generator, dtype=torch.float64)
    factors = factors * 3 * torch.rand(n, 1, 1, generator=generator, dtype=torch.float64)
    if aligned:  # a shared dominant direction: high coherence
        factors[:, :, 0] *= 5
    return factors.transpose(1, 2) @ factors


def dense_second_moment_matrix(hessians: torch.Tensor, eta: float, B: float) -> torch.Tensor:
    """The d²×d² matrix of M ↦ (I − ηH)M(I − ηH) + η²(1/(nB) − 1/n²) Σ H_i M H_i acting on vec(M)."""
    n, d, _ = hessians.shape
    gd = torch.eye(d, dtype=torch.float64) - eta * hessians.mean(0)
    c = 1.0 / (n * B) - 1.0 / n**2
    return torch.kron(gd, gd) + eta**2 * c * sum(torch.kron(h, h) for h in hessians)


def top_eigenvalue_of_mean(hessians: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(hessians.mean(0))[-1])


# -- coherence ---------------------------------------------------------------------------------------
def test_orthogonal_rank_one_hessians_have_coherence_one():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    scales = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    vectors = scales[:, None] * basis[:, :5].T
    hessians = vectors[:, :, None] * vectors[:, None, :]
    assert st.coherence(hessians) == pytest.approx(1.0, rel=1e-10)
    assert st.coherence(list(hessians)) == pytest.approx(1.0, rel=1e-10)


def test_identical_rank_one_hessians_have_coherence_n():
    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    hessians = torch.outer(a, a).expand(9, 3, 3)
    assert st.coherence(hessians) == pytest.approx(9.0, rel=1e-10)


def test_coherence_lies_between_one_and_n_on_random_sets():
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        n = int(torch.randint(2, 10, (1,), generator=g))
        hessians = random_psd_set(g, n, 4, int(torch.randint(1, 5, (1,), generator=g)))
        assert 1.0 - 1e-9 <= st.coherence(hessians) <= n + 1e-9


@pytest.mark.parametrize("n, sigma", [(100, 1.0), (40, 7.3), (30, 2.5), (30, 13.0), (30, 30.0), (12, 5.0)])
def test_paper_construction_has_the_requested_coherence_and_top_curvature(n, sigma):
    hessians = st.paper_construction(n, sigma, lam_max=2.0, seed=3)
    assert hessians.shape == (n, n, n)
    # S_ij = sqrt(tr(H_i H_j)) turns rounding of tr(H_i H_j) ≈ 0 into ~1e-8 relative noise near σ = 1
    assert st.coherence(hessians) == pytest.approx(sigma, rel=1e-6)
    assert top_eigenvalue_of_mean(hessians) == pytest.approx(2.0, rel=1e-9)
    # a PSD matrix is rank one exactly when its Frobenius norm equals its trace
    frobenius = torch.linalg.matrix_norm(hessians)
    assert frobenius == pytest.approx(hessians.diagonal(dim1=1, dim2=2).sum(1), rel=1e-9)


def test_paper_construction_embeds_into_larger_dimensions_and_checks_inputs():
    hessians = st.paper_construction(10, 4.2, lam_max=3.0, dim=15, seed=1)
    assert hessians.shape == (10, 15, 15)
    assert st.coherence(hessians) == pytest.approx(4.2, rel=1e-9)
    assert top_eigenvalue_of_mean(hessians) == pytest.approx(3.0, rel=1e-9)
    with pytest.raises(ValueError, match="dim"):
        st.paper_construction(10, 2.0, dim=5)
    with pytest.raises(ValueError, match="sigma"):
        st.paper_construction(10, 11.0)


def test_coherence_refuses_indefinite_or_asymmetric_input():
    with pytest.raises(ValueError, match="positive semi-definite"):
        st.coherence(torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64)).expand(3, 2, 2))
    with pytest.raises(ValueError, match="symmetric"):
        st.coherence(torch.tensor([[[1.0, 0.3], [0.0, 1.0]]], dtype=torch.float64))
    with pytest.raises(ValueError, match="hessians"):
        st.coherence(torch.ones(2, 3))


# -- the theorem and its inverse forms ---------------------------------------------------------------
def test_inverse_forms_bracket_the_condition():
    lam, sigma, n = 2.0, 7.0, 100
    eta_star = st.divergence_lr(lam, sigma, 10, n)
    assert st.predicts_divergence(lam, sigma, eta_star * (1 + 1e-9), 10, n)
    assert not st.predicts_divergence(lam, sigma, eta_star * (1 - 1e-9), 10, n)
    b_star = st.divergence_batch_size(lam, sigma, 0.8, n)
    assert st.predicts_divergence(lam, sigma, 0.8, b_star * (1 - 1e-9), n)
    assert not st.predicts_divergence(lam, sigma, 0.8, b_star * (1 + 1e-9), n)
    # λ_max ≥ (σ/η)(n/B − 1)^(−1/2) written out by hand at one point
    assert st.predicts_divergence(2.0, 7.0, 0.8, 5, 100) == ((7.0 / 0.8) / math.sqrt(100 / 5 - 1) <= 2.0)


def test_full_batch_is_outside_the_theorem_and_gd_has_its_own_condition():
    assert not st.predicts_divergence(100.0, 1.0, 10.0, 50, 50)
    assert st.divergence_lr(2.0, 1.0, 50, 50) == math.inf
    assert st.gd_stable(2.0, 0.99) and not st.gd_stable(2.0, 1.0)


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: st.predicts_divergence(2.0, 1.0, 0.8, 0, 10), "B"),
        (lambda: st.predicts_divergence(2.0, 1.0, 0.8, 11, 10), "B"),
        (lambda: st.predicts_divergence(2.0, 0.5, 0.8, 5, 10), "sigma"),
        (lambda: st.predicts_divergence(2.0, 1.0, -0.8, 5, 10), "eta"),
        (lambda: st.divergence_lr(0.0, 1.0, 5, 10), "lam_max"),
        (lambda: st.divergence_batch_size(2.0, 1.0, 0.8, 0), "n"),
        (lambda: st.gd_stable(float("nan"), 0.1), "lam_max"),
        (lambda: st.second_moment_radius(torch.eye(2).expand(3, 2, 2), 0.1, 4), "B"),
    ],
)
def test_bad_inputs_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# -- the exact second-moment map ---------------------------------------------------------------------
def test_one_step_second_moment_matches_monte_carlo_bernoulli_sgd():
    """E‖w₁‖² over many Bernoulli batches equals tr T(w₀w₀ᵀ) with c = 1/(nB) − 1/n² (not 1/(nB))."""
    g = torch.Generator().manual_seed(5)
    hessians = random_psd_set(g, 4, 2, 1)
    hessians = hessians / top_eigenvalue_of_mean(hessians)
    eta, B, n = 0.9, 1.0, 4
    w0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    sim = st.simulate_sgd_quadratic(hessians, eta, B, 1, seed=0, w0=w0, repeats=200_000)
    measured = float((sim.norms[:, 1] ** 2).mean())
    m0 = torch.outer(w0, w0)
    gd = torch.eye(2, dtype=torch.float64) - eta * hessians.mean(0)
    sandwich = sum(h @ m0 @ h for h in hessians)
    predicted = float(torch.trace(gd @ m0 @ gd + eta**2 * (1 / (n * B) - 1 / n**2) * sandwich))
    wrong = float(torch.trace(gd @ m0 @ gd + eta**2 / (n * B) * sandwich))
    assert abs(wrong - predicted) > 0.1 * predicted  # the test can tell the two constants apart
    assert measured == pytest.approx(predicted, rel=0.02)


def test_second_moment_radius_equals_dense_operator_radius():
    g = torch.Generator().manual_seed(2)
    for _ in range(12):
        n = int(torch.randint(2, 7, (1,), generator=g))
        d = int(torch.randint(1, 4, (1,), generator=g))
        hessians = random_psd_set(g, n, d, d)  # full rank: no common null space
        lam = top_eigenvalue_of_mean(hessians)
        for eta, B in [(0.5 / lam, 1.0), (1.5 / lam, n / 2), (2.2 / lam, n), (0.1 / lam, 1.3)]:
            dense = float(torch.linalg.eigvalsh(dense_second_moment_matrix(hessians, eta, B)).abs().amax())
            assert st.second_moment_radius(hessians, eta, B) == pytest.approx(dense, rel=1e-8)


def test_full_batch_radius_is_the_gd_contraction():
    g = torch.Generator().manual_seed(3)
    hessians = random_psd_set(g, 5, 3, 3)
    evals = torch.linalg.eigvalsh(hessians.mean(0))
    for eta in (0.3 / evals[-1], 1.9 / evals[-1], 2.1 / evals[-1]):
        expected = float(((1 - eta * evals) ** 2).amax())
        radius = st.second_moment_radius(hessians, float(eta), 5)
        assert radius == pytest.approx(expected, rel=1e-9)
        assert (radius < 1) == st.gd_stable(float(evals[-1]), float(eta))


def test_theorem_never_raises_a_false_alarm_on_random_sets():
    """Hundreds of random PSD sets, η just past the theorem's threshold: the exact radius exceeds 1."""
    g = torch.Generator().manual_seed(4)
    checked = 0
    for trial in range(200):
        n = int(torch.randint(2, 9, (1,), generator=g))
        d = int(torch.randint(1, 5, (1,), generator=g))
        rank = int(torch.randint(1, d + 1, (1,), generator=g))
        hessians = random_psd_set(g, n, d, rank, aligned=trial % 3 == 0)
        lam, sigma = top_eigenvalue_of_mean(hessians), st.coherence(hessians)
        B = min(0.5 + float(torch.rand(1, generator=g)) * (n - 1), n - 1e-3)
        for factor in (1 + 1e-6, 1.5, 4.0):
            eta = st.divergence_lr(lam, sigma, B, n) * factor
            assert st.predicts_divergence(lam, sigma, eta, B, n)
            assert st.second_moment_radius(hessians, eta, B) > 1.0
            checked += 1
    assert checked == 600


def test_exact_critical_batch_size_is_where_the_radius_crosses_one():
    g = torch.Generator().manual_seed(6)
    for _ in range(15):
        n = int(torch.randint(3, 9, (1,), generator=g))
        hessians = random_psd_set(g, n, 3, 2)
        eta = 1.2 / top_eigenvalue_of_mean(hessians)
        critical = st.exact_critical_batch_size(hessians, eta)
        assert critical < n  # GD is stable at this η, so large enough batches are too
        assert st.second_moment_radius(hessians, eta, critical) == pytest.approx(1.0, abs=1e-8)
        assert st.second_moment_radius(hessians, eta, 0.97 * critical) > 1.0
        assert st.second_moment_radius(hessians, eta, min(1.03 * critical, n)) < 1.0


def test_exact_critical_batch_size_matches_the_orthogonal_closed_form():
    """σ = 1: n decoupled 1-D problems with h = n·λ: (1 − ηλ)² + η² c (nλ)² = 1 gives c* and B*."""
    n, lam, eta = 20, 2.0, 0.8
    hessians = st.paper_construction(n, 1.0, lam_max=lam, seed=0)
    c_star = (1 - (1 - eta * lam) ** 2) / (eta * n * lam) ** 2
    assert st.exact_critical_batch_size(hessians, eta) == pytest.approx(n / (n**2 * c_star + 1), rel=1e-9)
    assert st.exact_critical_batch_size(hessians, 1.01) == math.inf  # η > 2/λ_max: GD diverges


def test_common_null_space_is_left_out_of_the_radius():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    hessians = a[:, :, None] * a[:, None, :]  # both vanish along e₃
    radius = st.second_moment_radius(hessians, 0.1, 1.0)
    dense = torch.linalg.eigvalsh(dense_second_moment_matrix(hessians[:, :2, :2], 0.1, 1.0)).abs().amax()
    assert radius == pytest.approx(float(dense), rel=1e-9)
    assert radius < 1.0


# -- simulation --------------------------------------------------------------------------------------
def test_simulation_matches_a_hand_written_loop():
    g = torch.Generator().manual_seed(7)
    hessians = random_psd_set(g, 5, 3, 2)
    eta, B, steps = 0.3 / top_eigenvalue_of_mean(hessians), 2.0, 25
    sim = st.simulate_sgd_quadratic(hessians, eta, B, steps, seed=11, repeats=1)
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(1, 3, generator=gen, dtype=torch.float64)[0]
    w = w / w.norm()
    norms = [float(w.norm())]
    for _ in range(steps):
        z = torch.rand(1, 5, generator=gen, dtype=torch.float64)[0] < B / 5
        w = w - eta / B * sum(hessians[i] @ w for i in range(5) if z[i])
        norms.append(float(w.norm()))
    assert sim.norms[0].tolist() == pytest.approx(norms, rel=1e-9)


def test_simulation_agrees_with_the_exact_radius_far_from_the_boundary():
    n, eta = 30, 0.8
    hessians = st.paper_construction(n, 3.0, lam_max=2.0, seed=2)
    critical = st.exact_critical_batch_size(hessians, eta)
    unstable, stable = critical / 3, min(3 * critical, n)
    assert st.second_moment_radius(hessians, eta, unstable) > 1.0
    assert st.second_moment_radius(hessians, eta, stable) < 1.0
    diverging = st.simulate_sgd_quadratic(hessians, eta, unstable, 250, seed=0, repeats=10)
    settling = st.simulate_sgd_quadratic(hessians, eta, stable, 250, seed=0, repeats=10)
    assert diverging.fraction_diverged > 0.5
    assert (diverging.divergence_step[diverging.diverged] > 0).all()
    assert settling.fraction_diverged < 0.5
    assert float(settling.norms[:, -1].median()) < 1.0  # started at unit norm


# -- the grid and the background task ----------------------------------------------------------------
GRID = {"eta": 0.8, "Bs": [1, 2, 4, 8], "sigmas": [1.0, 3.0, 9.0], "n": 12, "repeats": 4, "steps": 150, "seed": 1}


def test_grid_rows_are_consistent_with_the_pieces():
    reporter = RecordingReporter()
    result = st.stability_grid(**GRID, reporter=reporter)
    assert result["complete"] and len(result["rows"]) == 3
    assert reporter.progress_calls[-1][:2] == (3, 3)
    for row in result["rows"]:
        hessians = st.paper_construction(12, row["sigma"], seed=1)
        assert row["exact_critical_batch"] == pytest.approx(st.exact_critical_batch_size(hessians, 0.8))
        for b, predicted, exact in zip(GRID["Bs"], row["predicted"], row["exact"]):
            assert predicted == st.predicts_divergence(2.0, row["sigma"], 0.8, b, 12)
            assert exact == (st.second_moment_radius(hessians, 0.8, b) > 1.0)
            assert exact or not predicted  # the theorem is sufficient
        assert row["simulated"] == [f > 0.5 for f in row["simulated_fraction"]]
    json.dumps(result, allow_nan=False)


class StopAfterRows(RecordingReporter):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows_allowed = rows

    def should_stop(self) -> bool:
        return len(self.results) >= self.rows_allowed


def test_task_publishes_partial_rows_and_resumes_to_the_same_result(tmp_path):
    params = stt.check_task(GRID)
    stopping = StopAfterRows(1)
    assert stt.run_task(GRID, stopping, tmp_path, resume=False) is None
    assert len(stopping.results) == 1 and stopping.results[0]["complete"] is False
    assert (tmp_path / stt.GRID_STATE).is_file()
    resumed = RecordingReporter()
    result = stt.run_task(GRID, resumed, tmp_path, resume=True)
    assert any("resumed" in line for line in resumed.lines)
    assert len(resumed.results) == 2  # only the two missing rows were computed
    fresh = st.stability_grid(**{k: v for k, v in params.items() if k != "mode"})
    assert result == fresh


@pytest.mark.parametrize(
    "params, field",
    [
        ({"eta": 0}, "eta"),
        ({"Bs": []}, "Bs"),
        ({"Bs": [200]}, "Bs"),
        ({"sigmas": [0.5]}, "sigma"),
        ({"repeats": 0}, "repeats"),
        ({"blowup": 1.0}, "blowup"),
        ({"colour": 1}, "colour"),
        ({"mode": "other"}, "mode"),
        ({"mode": "model"}, "checkpoint"),
        ({"mode": "model", "checkpoint": "x.pt", "etas": [0.1], "Bs": [300]}, "Bs"),
    ],
)
def test_check_task_names_the_bad_field(params, field):
    with pytest.raises(ValueError, match=field):
        stt.check_task(params)


# -- a model ------------------------------------------------------------------------------------------
def flat_parameter_hessians(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Oracle: dense Hessian of each sample's loss by autograd, one sample at a time."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss_at(flat: torch.Tensor, i: int) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return loss_fn(torch.func.functional_call(model, params, (x[i : i + 1],)), y[i : i + 1]).sum()

    return torch.stack([torch.autograd.functional.hessian(partial(loss_at, i=i), theta) for i in range(len(x))])


def psd_projection(stack: torch.Tensor) -> torch.Tensor:
    out = []
    for h in stack.double():
        evals, evecs = torch.linalg.eigh(0.5 * (h + h.T))
        out.append(evecs @ torch.diag(evals.clamp_min(0)) @ evecs.T)
    return torch.stack(out)


def test_coherence_of_model_equals_coherence_of_dense_hessians():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    loss = per_sample_loss("regression")
    dense = flat_parameter_hessians(mlp, loss, x, y)
    result = st.coherence_of_model(mlp, loss, x, y, method="exact")
    projected = psd_projection(dense)
    assert result["sigma"] == pytest.approx(st.coherence(projected), rel=1e-5)
    assert result["lam_max"] == pytest.approx(top_eigenvalue_of_mean(projected), rel=1e-5)
    assert result["negative_curvature"] > 0  # an untrained tanh net has indefinite per-sample Hessians


def test_power_iteration_finds_the_largest_algebraic_eigenvalue_of_indefinite_rows():
    """The matrix-free path's eigenvalue routine, on symmetric matrices whose dominant eigenvalue is negative."""
    g = torch.Generator().manual_seed(9)
    basis, _ = torch.linalg.qr(torch.randn(6, 5, 5, generator=g, dtype=torch.float64))
    spectra = torch.tensor([[-9.0, -1.0, 0.5, 1.0, 3.0]] * 3 + [[-1.0, 0.0, 0.2, 2.0, 6.0]] * 3, dtype=torch.float64)
    matrices = basis @ torch.diag_embed(spectra) @ basis.transpose(1, 2)
    start = torch.randn(6, 5, generator=g, dtype=torch.float64)
    top = st._top_algebraic_eigenvalue(lambda v: (matrices @ v[:, :, None])[:, :, 0], start, 3000, 1e-13)
    assert top.tolist() == pytest.approx([3.0] * 3 + [6.0] * 3, rel=1e-6)


def test_matrix_free_coherence_is_close_to_the_exact_value():
    """Linear softmax regression has PSD per-sample Hessians; 256 shared probes give σ within 5%."""
    torch.manual_seed(1)
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    model = nn.Linear(4, 3)
    loss = per_sample_loss("classification")
    exact = st.coherence_of_model(model, loss, x, y, method="exact")
    assert exact["sigma"] == pytest.approx(st.coherence(flat_parameter_hessians(model, loss, x, y)), rel=1e-5)
    estimate = st.coherence_of_model(model, loss, x, y, method="matrix_free", probes=256, seed=3)
    assert estimate["sigma"] == pytest.approx(exact["sigma"], rel=0.05)
    assert estimate["lam_max"] == pytest.approx(exact["lam_max"], rel=1e-3)
    assert estimate["max_sample_lam_max"] == pytest.approx(exact["max_sample_lam_max"], rel=1e-3)


def test_model_check_on_a_realisable_linear_regression_follows_the_quadratic_theory():
    """Least squares at an interpolating minimum is exactly the quadratic: every predicted divergence is seen."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    x[:, 0] *= 3  # a shared dominant direction
    w_star = torch.randn(3, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star[None])
    y = x @ w_star
    loss = per_sample_loss("regression")
    lam = float(torch.linalg.eigvalsh(x.T @ x / 16)[-1])
    etas = [0.05 / lam, 1.0 / lam, 1.95 / lam, 3.0 / lam]
    reporter = RecordingReporter()
    result = st.model_stability_check(model, loss, x, y, etas, [1, 4, 16], steps=200, repeats=4, seed=0, reporter=reporter)
    assert result["coherence"]["lam_max"] == pytest.approx(lam, rel=1e-9)
    assert result["gd_lr_limit"] == pytest.approx(2 / lam, rel=1e-9)
    assert reporter.results and reporter.progress_calls[-1][0] == reporter.progress_calls[-1][1]
    hessians = x[:, :, None] * x[:, None, :]
    decided = 0
    for cell in result["cells"]:
        if cell["theorem_diverges"]:
            assert cell["observed_diverges"]
        # The restart is SGD on ½(w − w*)ᵀ H_i (w − w*): where 20 runs on the quadratic all agree, so must it.
        # (A second-moment radius > 1 alone is not enough: near the boundary E‖w‖² can blow up through
        # rare trajectories while most runs settle.)
        quadratic = st.simulate_sgd_quadratic(hessians, cell["eta"], cell["B"], 200, seed=5, repeats=20)
        if quadratic.fraction_diverged in (0.0, 1.0):
            assert cell["observed_diverges"] == (quadratic.fraction_diverged == 1.0), cell
            decided += 1
    assert decided >= 8
    assert result["false_alarms"] == 0
    assert any(c["observed_diverges"] for c in result["cells"])
    assert any(not c["observed_diverges"] for c in result["cells"])
    json.dumps(result, allow_nan=False)
