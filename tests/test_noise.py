"""Gradient noise against Python loops of autograd and dense covariances."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from samlab.losses import cross_entropy_per_sample
from samlab.noise import (
    expected_microbatch_grad_norm,
    gradient_noise,
    microbatch_noise_curve,
    noise_metrics,
    per_sample_grads,
    predicted_microbatch_grad_norm,
    random_partitions,
    sde_regularizers,
    trace_covariance,
)


def tiny_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    net.train()
    net(torch.randn(32, 5, dtype=torch.float64))
    return net


def data(n: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def grads_by_loop(model: nn.Module, x, y) -> torch.Tensor:
    """Per-sample gradients by one autograd call per sample (eval mode), flattened in parameter order."""
    probe = copy.deepcopy(model).eval()
    rows = []
    for i in range(len(x)):
        loss = cross_entropy_per_sample(probe(x[i : i + 1]), y[i : i + 1]).sum()
        grads = torch.autograd.grad(loss, list(probe.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_per_sample_grads_match_a_loop_of_autograd_and_leave_the_model_alone():
    model, (x, y) = tiny_bn_net(), data()
    before = copy.deepcopy(model.state_dict())
    got = per_sample_grads(model, cross_entropy_per_sample, x, y, chunk_size=5)
    torch.testing.assert_close(got, grads_by_loop(model, x, y), rtol=1e-9, atol=1e-12)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_trace_v_equals_the_trace_of_a_dense_covariance():
    model, (x, y) = tiny_bn_net(seed=3), data(seed=4)
    reference = grads_by_loop(model, x, y)
    dense = torch.cov(reference.T, correction=0)  # 1/n: the n samples are the population SGD draws from
    got = gradient_noise(model, cross_entropy_per_sample, x, y)
    assert got["trace_v"] == pytest.approx(float(torch.trace(dense)), rel=1e-9)
    assert got["full_grad_norm"] == pytest.approx(float(reference.mean(0).norm()), rel=1e-9)
    assert got["sample_grad_norms"] == pytest.approx(reference.norm(dim=1).tolist(), rel=1e-9)
    assert got["mean_sample_grad_norm"] == pytest.approx(float(reference.norm(dim=1).mean()), rel=1e-9)
    assert float(trace_covariance(reference)) == pytest.approx(float(torch.trace(dense)), rel=1e-12)


def test_partitions_are_exact_and_disjoint():
    index = random_partitions(26, 4, 3, seed=0)
    assert index.shape == (3, 6, 4)
    for partition in index:
        assert len(set(partition.reshape(-1).tolist())) == 24
    assert not torch.equal(index[0], index[1])
    with pytest.raises(ValueError, match="m:"):
        random_partitions(26, 27, 1, seed=0)


def test_expected_microbatch_norm_matches_a_hand_loop_over_the_same_partitions():
    model, (x, y) = tiny_bn_net(seed=5), data(seed=6)
    reference = grads_by_loop(model, x, y)
    m, count = 3, 4
    got = expected_microbatch_grad_norm(reference, m, partitions=count, seed=11)
    norms, partition_means = [], []
    for partition in random_partitions(len(x), m, count, seed=11).tolist():
        here = []
        for block in partition:
            total = torch.zeros(reference.shape[1], dtype=reference.dtype)
            for i in block:
                total += reference[i]
            here.append(float((total / m).norm()))
        norms += here
        partition_means.append(sum(here) / len(here))
    assert got["mean"] == pytest.approx(sum(norms) / len(norms), rel=1e-12)
    assert got["std_over_partitions"] == pytest.approx(float(torch.tensor(partition_means, dtype=torch.float64).std()), rel=1e-9)
    assert got["microbatches"] == 8 and got["partitions"] == 4


def test_microbatch_norm_grows_as_m_shrinks_between_its_exact_endpoints():
    model, (x, y) = tiny_bn_net(seed=7), data(n=32, seed=8)
    grads = per_sample_grads(model, cross_entropy_per_sample, x, y)
    rows = microbatch_noise_curve(grads, [32, 16, 8, 4, 2, 1], rho=0.1, partitions=16, seed=0)
    means = [r["mean"] for r in rows]
    assert all(a < b for a, b in zip(means, means[1:])), means
    # m = n is the full-batch gradient, m = 1 the mean per-sample norm, whatever the partition
    assert means[0] == pytest.approx(float(grads.mean(0).norm()), rel=1e-10)
    assert means[-1] == pytest.approx(float(grads.norm(dim=1).mean()), rel=1e-10)


def test_mean_squared_microbatch_norm_follows_the_variance_identity():
    # Sampling without replacement: E‖∇L_I‖² = ‖ḡ‖² + tr V (n − m) / (m (n − 1)).
    model, (x, y) = tiny_bn_net(seed=9), data(n=24, seed=10)
    grads = per_sample_grads(model, cross_entropy_per_sample, x, y)
    trace_v, mean_sq = float(trace_covariance(grads)), float(grads.mean(0).pow(2).sum())
    for m in (2, 6):
        got = expected_microbatch_grad_norm(grads, m, partitions=3000, seed=1)["mean_sq"]
        assert got == pytest.approx(mean_sq + trace_v * (24 - m) / (m * 23), rel=0.02)


def test_predicted_squared_norm_is_the_exact_average_over_every_micro_batch():
    """All C(n, m) micro-batches of a tiny model, enumerated: the identity holds to rounding."""
    import itertools

    model, (x, y) = tiny_bn_net(seed=3), data(n=10, seed=4)
    grads = per_sample_grads(model, cross_entropy_per_sample, x, y)
    trace_v, full = float(trace_covariance(grads)), float(grads.mean(0).norm())
    for m in (1, 2, 3, 5, 10):
        subsets = list(itertools.combinations(range(10), m))
        exact = sum(float(grads[list(s)].mean(0).pow(2).sum()) for s in subsets) / len(subsets)
        pred = predicted_microbatch_grad_norm(full_grad_norm=full, trace_v=trace_v, m=m, n=10)
        assert pred["mean_sq"] == pytest.approx(exact, rel=1e-10)
        mean_norm = sum(float(grads[list(s)].mean(0).norm()) for s in subsets) / len(subsets)
        assert mean_norm <= pred["mean"] * (1 + 1e-12)  # Jensen: E‖·‖ ≤ sqrt(E‖·‖²)


def test_noise_curve_rows_carry_the_prediction():
    model, (x, y) = tiny_bn_net(seed=5), data(n=24, seed=6)
    grads = per_sample_grads(model, cross_entropy_per_sample, x, y)
    for row in microbatch_noise_curve(grads, [24, 6, 1], rho=0.1, partitions=4, seed=0):
        assert row["mean"] <= row["predicted"] * (1 + 1e-9)
        assert row["predicted"] ** 2 == pytest.approx(row["predicted_sq"])


def test_sde_regularizers_follow_the_formulas():
    regs = sde_regularizers(trace_v=8.0, expected_norm=0.5, rho=0.1, m=4, n=21)
    assert regs["usam_noise"] == pytest.approx(0.1 / 8 * 8.0)
    assert regs["usam_noise_without_replacement"] == pytest.approx(0.1 / 8 * 8.0 * 17 / 20)
    assert regs["sam"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="rho:"):
        sde_regularizers(trace_v=1.0, expected_norm=1.0, rho=-0.1, m=1, n=2)


def test_noise_metrics_are_the_scalars_of_gradient_noise_and_keep_train_mode():
    model, (x, y) = tiny_bn_net(seed=2), data()
    metrics = noise_metrics(model, cross_entropy_per_sample, (x, y))
    full = gradient_noise(model, cross_entropy_per_sample, x, y)
    assert set(metrics) == {"trace_v", "full_grad_norm", "mean_sample_grad_norm"}
    assert metrics["trace_v"] == pytest.approx(full["trace_v"], rel=1e-12)
    assert model.training


def test_rwsam_weights_are_a_softmax_of_the_exact_per_sample_gradient_norms():
    from samlab.noise import rwsam_weights

    model, (x, y) = tiny_bn_net(seed=12), data(seed=13)
    norms = grads_by_loop(model, x, y).norm(dim=1)
    got = rwsam_weights(model, cross_entropy_per_sample, x, y, 2.0, estimator="exact")
    assert got["scores"] == pytest.approx(norms.tolist(), rel=1e-8)
    expected = torch.softmax(2.0 * norms, dim=0)
    assert got["weights"] == pytest.approx(expected.tolist(), rel=1e-8)
    assert got["effective_samples"] == pytest.approx(float(1 / expected.pow(2).sum()), rel=1e-8)
    uniform = rwsam_weights(model, cross_entropy_per_sample, x, y, 0.0)
    assert uniform["weights"] == pytest.approx([1 / 24] * 24)
    assert uniform["effective_samples"] == pytest.approx(24.0)
    assert model.training


def test_rwsam_finite_difference_scores_square_to_the_squared_gradient_norms_on_average():
    # E_z[<g_i, z>²] = ‖g_i‖² for Rademacher z; the fd score is |<g_i, z>| up to O(δ).
    from samlab.noise import rwsam_weights

    model, (x, y) = tiny_bn_net(seed=14), data(n=8, seed=15)
    norms_sq = grads_by_loop(model, x, y).norm(dim=1).pow(2)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([
        torch.tensor(rwsam_weights(model, cross_entropy_per_sample, x, y, 1.0, estimator="fd", delta=1e-6,
                                   generator=gen)["scores"], dtype=torch.float64).pow(2)
        for _ in range(60)
    ])
    torch.testing.assert_close(draws.mean(0), norms_sq, rtol=0.35, atol=0.0)  # 60 seeded draws


def test_rwsam_weights_reject_a_bad_estimator():
    from samlab.noise import rwsam_weights

    model, (x, y) = tiny_bn_net(), data()
    with pytest.raises(ValueError, match="estimator"):
        rwsam_weights(model, cross_entropy_per_sample, x, y, 1.0, estimator="guess")
