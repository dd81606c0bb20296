"""Loss landscapes: every surface value is checked against a plain loop over model copies."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from samlab import landscape as L
from samlab.losses import cross_entropy_per_sample, squared_error_per_sample
from samlab.reporting import RecordingReporter
from samlab.tasks import landscape as LT
from tests.test_optim_fused import BUILTIN, builtin


def conv_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)
    )
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 0.5)
    return model.eval()


def mlp(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, outputs))


def image_data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def vector_data(n: int = 30, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def loop_loss(model, loss_fn, batches, state, training=False):
    """Oracle: copy the model, load the point's weights, evaluate the mean loss and accuracy."""
    clone = copy.deepcopy(model)
    clone.train(training)
    with torch.no_grad():
        named = dict(clone.named_parameters())
        named.update(dict(clone.named_buffers()))
        for name, value in state.items():
            named[name].copy_(value)
        total, hits, count = 0.0, 0.0, 0
        for x, y in batches:
            out = clone(x)
            total += loss_fn(out, y).sum().item()
            if not y.is_floating_point():
                hits += (out.argmax(-1) == y).sum().item()
            count += len(y)
    return total / count, hits / count


def shifted(model, center, directions, coords):
    base = L.model_state(model) if center is None else center
    point = dict(base)
    for d, c in zip(directions, coords):
        for name, t in d.items():
            point[name] = point[name] + c * t
    return point


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- grid values against a plain loop ----------------------------------------------------------


@pytest.mark.parametrize("builder,data", [(conv_bn_model, image_data), (mlp, vector_data)])
def test_surface_2d_matches_loop_over_model_copies(builder, data):
    model, (x, y) = builder(), data()
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]  # uneven batches: the mean is over all samples
    d1, d2 = L.random_directions(model, 2, seed=3)
    xs, ys = np.linspace(-1, 1, 4), np.linspace(-0.5, 1.5, 3)
    surface = L.surface_2d(model, cross_entropy_per_sample, batches, d1, d2, xs, ys)
    assert surface.complete and surface.loss.shape == (4, 3)
    for i, a in enumerate(xs):
        for j, b in enumerate(ys):
            loss, acc = loop_loss(model, cross_entropy_per_sample, batches, shifted(model, None, [d1, d2], [a, b]))
            assert surface.loss[i, j] == pytest.approx(loss, abs=1e-5)
            assert surface.accuracy[i, j] == pytest.approx(acc, abs=1e-9)
    assert len(np.unique(surface.loss.round(4))) > 6  # the grid really varies


def test_surface_1d_train_mode_uses_batch_statistics():
    model, (x, y) = conv_bn_model(), image_data()
    (d,) = L.random_directions(model, 1, seed=5)
    alphas = [-0.7, 0.0, 0.4]
    surface = L.surface_1d(model, cross_entropy_per_sample, (x, y), d, alphas, mode="train")
    evaluated = L.surface_1d(model, cross_entropy_per_sample, (x, y), d, alphas, mode="eval")
    for k, a in enumerate(alphas):
        state = shifted(model, None, [d], [a])
        assert surface.loss[k] == pytest.approx(loop_loss(model, cross_entropy_per_sample, [(x, y)], state, True)[0],
                                                abs=1e-5)
    assert np.abs(surface.loss - evaluated.loss).max() > 1e-3  # the two modes really differ here


def test_regression_loss_and_nan_accuracy():
    model = mlp(outputs=1)
    x = torch.randn(12, 5)
    y = torch.randn(12)
    (d,) = L.random_directions(model, 1, seed=0)
    surface = L.surface_1d(model, squared_error_per_sample, (x, y), d, [0.0, 0.5])
    expected = loop_loss(model, squared_error_per_sample, [(x, y)], shifted(model, None, [d], [0.5]))[0]
    assert surface.loss[1] == pytest.approx(expected, abs=1e-6)
    assert np.isnan(surface.accuracy).all()


def test_model_is_not_modified():
    model, (x, y) = conv_bn_model(), image_data()
    model.train()  # a caller's own flag must come back too
    before = snapshot(model)
    d1, d2 = L.random_directions(model, 2, seed=0)
    for mode in ("eval", "train"):
        L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, [-1.0, 1.0], [0.0, 2.0], mode=mode)
    L.flatness(model, cross_entropy_per_sample, (x, y), [d1, d2], [0.1])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())


def test_tiny_memory_budget_chunks_give_the_same_values():
    model, (x, y) = conv_bn_model(), image_data()
    d1, d2 = L.random_directions(model, 2, seed=1)
    evaluator = L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2])
    assert evaluator.chunk_size(1e-6) == 1
    assert evaluator.chunk_size(1e4) >= 12
    xs, ys = np.linspace(-1, 1, 3), np.linspace(-1, 1, 4)
    tiny, big = RecordingReporter(), RecordingReporter()
    a = L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, xs, ys, max_memory_mb=1e-6, reporter=tiny)
    b = L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, xs, ys, max_memory_mb=1e4, reporter=big)
    # one point per chunk, or one chunk per coarse-to-fine pass (3x4 grid: 4 corners, 2 more, the rest)
    assert len(tiny.progress_calls) == 12 and [done for done, _, _ in big.progress_calls] == [4, 6, 12]
    np.testing.assert_allclose(a.loss, b.loss, atol=1e-6)
    np.testing.assert_array_equal(a.accuracy, b.accuracy)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_vmapped_and_sequential_evaluation_agree(mode):
    """The accelerator path (one vmapped pass per chunk) and the CPU path (points one by one) agree."""
    model, (x, y) = conv_bn_model(), image_data()
    d1, d2 = L.random_directions(model, 2, seed=3)
    coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 1.0]])
    vmapped = L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2], mode=mode, impl="vmap")
    sequential = L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2], mode=mode, impl="sequential")
    assert sequential.impl == "sequential" and vmapped.impl == "vmap"
    (loss_v, acc_v), (loss_s, acc_s) = vmapped(coords), sequential(coords)
    np.testing.assert_allclose(loss_v, loss_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(acc_v, acc_s)
    assert L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2]).impl == "sequential"  # CPU, conv


def built_in(name: str):
    """(float64 built-in model with non-trivial BatchNorm statistics, two uneven batches, loss)."""
    model, x, y, loss_fn = builtin(name)
    return model.eval(), [(x[:5], y[:5]), (x[5:], y[5:])], loss_fn


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(BUILTIN))
def test_copies_evaluation_equals_point_by_point_on_every_built_in_model(name, mode):
    """All points of a chunk in one pass (point j's weights on its own copy of the data) give the
    numbers of the points evaluated one by one, also with BatchNorm statistics moving along a direction."""
    model, batches, loss_fn = built_in(name)
    ignore = "none" if name == "diag-linear" else "biasbn"
    d1 = L.random_directions(model, 1, seed=1, ignore=ignore)[0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.mul_(1.2).add_(0.05)
    d2 = L.interpolation_direction(model, other)  # parameters and running statistics
    coords = np.array([[0.0, 0.0], [0.5, -0.25], [-1.0, 1.0], [0.3, 0.6], [0.0, 1.0]])
    out = {impl: L.PointEvaluator(model, loss_fn, batches, [d1, d2], mode=mode, impl=impl)(coords)
           for impl in ("sequential", "copies")}
    np.testing.assert_allclose(out["copies"][0], out["sequential"][0], rtol=1e-10)
    np.testing.assert_array_equal(out["copies"][1], out["sequential"][1])
    assert len(np.unique(out["copies"][0].round(6))) >= 4  # (the diagonal network has u = v along d2)


def test_auto_impl_batches_small_models_into_copies_on_cpu():
    for name, impl in (("mlp", "copies"), ("diag-linear", "copies"), ("cnn-bn", "sequential"), ("wrn16-bn", "sequential")):
        model, batches, loss_fn = built_in(name)
        directions = L.random_directions(model, 1, ignore="none")
        assert L.PointEvaluator(model, loss_fn, batches, directions).impl == impl
    unbatched = Unbatched()  # a module of the user's, with no batched forward
    data = (torch.randn(5, 6), torch.randn(5))
    directions = L.random_directions(unbatched, 1, ignore="none")
    assert L.PointEvaluator(unbatched, squared_error_per_sample, data, directions).impl == "sequential"
    with pytest.raises(ValueError, match="impl: 'copies' cannot batch"):
        L.PointEvaluator(unbatched, squared_error_per_sample, data, directions, impl="copies")


class Unbatched(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) @ self.weight


# -- cancel and resume ---------------------------------------------------------------------------


class StopAfter(RecordingReporter):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def should_stop(self) -> bool:
        return len(self.progress_calls) >= self.n


def test_cancelled_then_resumed_equals_uninterrupted(tmp_path):
    model, (x, y) = conv_bn_model(), image_data()
    d1, d2 = L.random_directions(model, 2, seed=4)
    xs, ys = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    budget = 1.2 * (L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2]).point_bytes()
                    + L.PointEvaluator(model, cross_entropy_per_sample, (x, y), [d1, d2]).activation_bytes()) / 2**20
    updates = []
    partial = L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, xs, ys, max_memory_mb=budget,
                           reporter=StopAfter(7), on_update=lambda s: updates.append(int(s.done.sum())))
    assert int(partial.done.sum()) == 7 and not partial.complete and updates == list(range(1, 8))
    assert np.isnan(partial.loss[~partial.done]).all()
    path = tmp_path / "state.npz"
    LT.save_surface(partial, path)
    restored = LT.load_surface(path)
    calls = RecordingReporter()
    resumed = L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, xs, ys, max_memory_mb=budget,
                           reporter=calls, resume_from=restored)
    whole = L.surface_2d(model, cross_entropy_per_sample, (x, y), d1, d2, xs, ys)
    assert resumed.complete and len(calls.progress_calls) == 20 - 7  # the saved points are not recomputed
    np.testing.assert_allclose(resumed.loss, whole.loss, atol=1e-6)
    np.testing.assert_array_equal(resumed.accuracy, whole.accuracy)


def test_copies_chunks_cancelled_then_resumed_equal_one_chunk_per_pass():
    model, data = mlp(), vector_data()
    d1, d2 = L.random_directions(model, 2, seed=4)
    xs, ys = np.linspace(-1, 1, 9), np.linspace(-1, 1, 5)
    evaluator = L.PointEvaluator(model, cross_entropy_per_sample, data, [d1, d2])
    assert evaluator.impl == "copies"
    budget = 3.5 * (evaluator.point_bytes() + evaluator.activation_bytes()) / 2**20  # 3 points per pass
    assert evaluator.chunk_size(budget) == 3
    partial = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys, max_memory_mb=budget,
                           reporter=StopAfter(6))
    assert not partial.complete and (partial.done[L.grid_levels((9, 5)) == 0]).all()
    resumed = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys, max_memory_mb=budget,
                           resume_from=partial)
    whole = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys)  # one chunk per pass
    one_by_one = L.PointEvaluator(model, cross_entropy_per_sample, data, [d1, d2], impl="sequential")
    loss, accuracy = one_by_one(whole.coordinates)
    assert resumed.complete
    np.testing.assert_allclose(resumed.loss, whole.loss, rtol=1e-6)
    np.testing.assert_allclose(whole.loss.reshape(-1), loss, rtol=1e-6)
    np.testing.assert_array_equal(resumed.accuracy.reshape(-1), accuracy)


def test_resume_from_a_different_grid_is_refused():
    model, data = mlp(), vector_data()
    (d,) = L.random_directions(model, 1)
    partial = L.Surface.empty([np.linspace(0, 1, 3)])
    with pytest.raises(ValueError, match="resume_from"):
        L.surface_1d(model, cross_entropy_per_sample, data, d, np.linspace(0, 1, 4), resume_from=partial)


# -- directions ---------------------------------------------------------------------------------


def test_filter_normalized_directions_match_filter_norms_and_ignore_bias_and_bn():
    model = conv_bn_model()
    directions = L.random_directions(model, 2, norm="filter", ignore="biasbn", seed=7)
    weights = dict(model.named_parameters())
    ignored = {"0.bias", "1.weight", "1.bias", "4.bias"}
    for d in directions:
        assert set(d) == set(weights)
        for name, w in weights.items():
            if name in ignored:
                assert torch.count_nonzero(d[name]) == 0
            else:
                for f in range(w.shape[0]):
                    assert d[name][f].norm().item() == pytest.approx(w[f].norm().item(), rel=1e-5)
    assert not torch.allclose(directions[0]["0.weight"], directions[1]["0.weight"])


def test_norm_layer_parameters_are_ignored_even_when_not_1d():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm([2, 3]))
    model[1].weight.data = torch.randn(2, 3)
    (d,) = L.random_directions(model, 1, ignore="biasbn")
    assert torch.count_nonzero(d["1.weight"]) == 0 and torch.count_nonzero(d["0.weight"]) > 0


def test_layer_norm_and_ignore_none_and_raw_directions():
    model = conv_bn_model()
    weights = dict(model.named_parameters())
    (layer,) = L.random_directions(model, 1, norm="layer", ignore="none", seed=2)
    for name, w in weights.items():
        assert layer[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-5)
    (raw,) = L.random_directions(model, 1, norm="none", ignore="none", seed=2)
    (again,) = L.random_directions(model, 1, norm="none", ignore="none", seed=2)
    g = torch.Generator().manual_seed(2)
    first = torch.randn(weights["0.weight"].shape, generator=g)
    assert torch.equal(raw["0.weight"], first) and all(torch.equal(raw[n], again[n]) for n in raw)
    # the raw draw only gets rescaled: same direction, the weights' norm
    cosine = torch.nn.functional.cosine_similarity(layer["4.weight"].flatten(), raw["4.weight"].flatten(), dim=0)
    assert cosine.item() == pytest.approx(1.0, abs=1e-6)


def test_same_seed_same_raw_directions_for_two_models_each_normalized_to_its_own_weights():
    a, b = conv_bn_model(0), conv_bn_model(1)
    (da,), (db,) = L.random_directions(a, 1, seed=9), L.random_directions(b, 1, seed=9)
    wa, wb = a[0].weight[0], b[0].weight[0]
    unit_a, unit_b = da["0.weight"][0] / wa.norm(), db["0.weight"][0] / wb.norm()
    torch.testing.assert_close(unit_a, unit_b)


def test_direction_validation():
    model = conv_bn_model()
    with pytest.raises(ValueError, match="norm"):
        L.random_directions(model, norm="model")
    with pytest.raises(ValueError, match="k"):
        L.random_directions(model, k=0)
    diagonal = nn.Module()
    diagonal.u = nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match="ignore"):
        L.random_directions(diagonal, ignore="biasbn")
    (d,) = L.random_directions(model, 1)
    with pytest.raises(ValueError, match="directions\\[0\\]"):
        L.surface_1d(model, cross_entropy_per_sample, image_data(), {"nope": torch.zeros(1)}, [0.0])
    with pytest.raises(ValueError, match="alphas"):
        L.surface_1d(model, cross_entropy_per_sample, image_data(), d, [])
    with pytest.raises(ValueError, match="mode"):
        L.surface_1d(model, cross_entropy_per_sample, image_data(), d, [0.0], mode="test")


# -- interpolation, PCA, projection, flatness ---------------------------------------------------


def test_interpolation_reproduces_both_endpoints_with_their_running_statistics():
    a, b = conv_bn_model(0), conv_bn_model(1)
    x, y = image_data()
    direction = L.interpolation_direction(a, b)
    assert "1.running_mean" in direction  # BatchNorm statistics move along too
    surface = L.surface_1d(a, cross_entropy_per_sample, (x, y), direction, [0.0, 1.0], center=L.model_state(a))
    for k, model in enumerate((a, b)):
        with torch.no_grad():
            assert surface.loss[k] == pytest.approx(cross_entropy_per_sample(model(x), y).mean().item(), abs=1e-5)
    assert abs(surface.loss[0] - surface.loss[1]) > 1e-3


def test_interpolation_direction_of_param_dicts_and_shape_check():
    a, b = mlp(0), mlp(1)
    d = L.interpolation_direction(L.model_params(a), L.model_params(b))
    torch.testing.assert_close(d["0.weight"], b[0].weight - a[0].weight)
    bad = L.model_params(b)
    bad["0.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="params_b"):
        L.interpolation_direction(L.model_params(a), bad)


def test_project_trajectory_recovers_coordinates_for_non_orthogonal_directions():
    model = mlp()
    center = L.model_params(model)
    d1, d2 = L.random_directions(model, 2, norm="none", ignore="none", seed=0)
    d2 = {n: d2[n] + 0.8 * d1[n] for n in d2}  # strongly correlated with d1
    true_xy = [(0.3, -1.2), (2.0, 0.5), (-0.7, 0.0)]
    noise = L.random_directions(model, 1, norm="none", ignore="none", seed=11)[0]
    # a component orthogonal to the plane must not move the coordinates
    n1, n2, g11, g12, g22 = L.dot(noise, d1), L.dot(noise, d2), L.dot(d1, d1), L.dot(d1, d2), L.dot(d2, d2)
    a, b = np.linalg.solve([[g11, g12], [g12, g22]], [n1, n2])
    orthogonal = {n: noise[n] - a * d1[n] - b * d2[n] for n in noise}
    points = [{n: center[n] + x * d1[n] + y * d2[n] + orthogonal[n] for n in center} for x, y in true_xy]
    xs, ys = L.project_trajectory(points, center, d1, d2)
    np.testing.assert_allclose(xs, [p[0] for p in true_xy], atol=1e-4)
    np.testing.assert_allclose(ys, [p[1] for p in true_xy], atol=1e-4)
    with pytest.raises(ValueError, match="d2"):
        L.project_trajectory(points, center, d1, {n: 2 * t for n, t in d1.items()})


def test_pca_directions_find_the_plane_of_a_planar_trajectory():
    model = mlp()
    final = L.model_params(model)
    u, v = L.random_directions(model, 2, norm="none", ignore="none", seed=3)
    t = np.linspace(0, 1, 12)
    trajectory = [{n: final[n] + float(3 * (1 - s)) * u[n] + float(np.sin(5 * s)) * v[n] for n in final} for s in t]
    directions, explained = L.pca_directions(trajectory, k=2)
    assert explained.sum() == pytest.approx(1.0, abs=1e-6) and explained[0] >= explained[1] > 0
    basis = torch.stack([L.flatten(u), L.flatten(v)]).double().T
    q, _ = torch.linalg.qr(basis)
    for d in directions:
        flat = L.flatten(d).double()
        assert flat.norm().item() == pytest.approx(1.0, abs=1e-5)
        assert (q.T @ flat).norm().item() == pytest.approx(1.0, abs=1e-5)  # lies in span(u, v)
    assert abs(L.dot(directions[0], directions[1])) < 1e-5
    with pytest.raises(ValueError, match="trajectory_checkpoints"):
        L.pca_directions(trajectory[:3], k=2)


def test_flatness_is_the_loss_increase_along_each_direction_and_sign():
    model, (x, y) = conv_bn_model(), image_data()
    directions = L.random_directions(model, 3, seed=6)
    radii = [0.05, 0.3]
    result = L.flatness(model, cross_entropy_per_sample, (x, y), directions, radii)
    base = loop_loss(model, cross_entropy_per_sample, [(x, y)], L.model_state(model))[0]
    assert result["base_loss"] == pytest.approx(base, abs=1e-5)
    for k, r in enumerate(radii):
        increases = [
            loop_loss(model, cross_entropy_per_sample, [(x, y)], shifted(model, None, [d], [s * r]))[0] - base
            for d in directions
            for s in (1, -1)
        ]
        assert result["mean_increase"][k] == pytest.approx(np.mean(increases), abs=1e-5)
        assert result["max_increase"][k] == pytest.approx(np.max(increases), abs=1e-5)
    assert result["mean_increase"][1] > result["mean_increase"][0]
    with pytest.raises(ValueError, match="radii"):
        L.flatness(model, cross_entropy_per_sample, (x, y), directions, [0.0])


# -- helpers: flatten, surface files, cache key ---------------------------------------------------


def test_flatten_unflatten_round_trip():
    params = L.model_params(conv_bn_model())
    back = L.unflatten(L.flatten(params), params)
    assert all(torch.equal(params[n], back[n]) for n in params)
    with pytest.raises(ValueError, match="vector"):
        L.unflatten(torch.zeros(3), params)


def test_surface_json_has_none_for_missing_points():
    surface = L.Surface.empty([np.arange(2.0), np.arange(3.0)])
    surface.loss[0, 1], surface.done[0, 1] = 0.5, True
    encoded = json.loads(json.dumps(surface.to_dict()))
    assert encoded["loss"][0] == [None, 0.5, None] and encoded["done_fraction"] == pytest.approx(1 / 6)


def test_cache_key_is_canonical():
    k1 = LT.cache_key("abc", {"seed": 0, "norm": "filter"}, {"n": 41, "min": -1}, {"split": "train"}, "eval")
    k2 = LT.cache_key("abc", {"norm": "filter", "seed": 0}, {"min": -1, "n": 41}, {"split": "train"}, "eval")
    k3 = LT.cache_key("abc", {"norm": "filter", "seed": 1}, {"min": -1, "n": 41}, {"split": "train"}, "eval")
    k4 = LT.cache_key("abc", {"norm": "filter", "seed": 0}, {"min": -1, "n": 41}, {"split": "train"}, "train")
    assert k1 == k2 and len({k1, k3, k4}) == 3 and len(k1) == 64


# -- the background task on real checkpoints ----------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from samlab.config import preset
    from samlab.train import run

    paths = []
    for method in ("sgd", "sam"):
        workdir = tmp_path_factory.mktemp(method)
        cfg = preset("digits-cnn", {"data.n_train": 64, "data.n_test": 48, "model.width": 4, "epochs": 4,
                                    "batch_size": 32, "device": "cpu", "optim.method": method})
        paths.append(str(run(cfg, workdir=workdir).checkpoint))
    return paths


def task(paths, **overrides):
    params = {"checkpoints": paths, "kind": "2d", "n_samples": None, "device": "cpu",
              "grid": {"xmin": -1.0, "xmax": 1.0, "nx": 3, "ymin": -0.5, "ymax": 0.5, "ny": 3}}
    return {**params, **overrides}


def test_task_2d_two_runs_same_grid_with_trajectory(checkpoints, tmp_path):
    from samlab.checkpoints import load_trained

    reporter = RecordingReporter()
    result = LT.run_task(task(checkpoints, trajectory=True), reporter, tmp_path, resume=False)
    assert result["complete"] and result["axes"] == [[-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5]]
    assert reporter.progress_calls[-1][:2] == (18, 18)
    for path, entry in zip(checkpoints, result["runs"]):
        trained = load_trained(path)
        x, y = trained.data.x_train, trained.data.y_train
        with torch.no_grad():
            centre = cross_entropy_per_sample(trained.model(x), y).mean().item()
        assert entry["loss"][1][1] == pytest.approx(centre, abs=1e-5)
        assert len(entry["trajectory"]["x"]) == 4 and entry["trajectory"]["epochs"] == [1, 2, 3, 4]
        assert entry["trajectory"]["x"][-1] == pytest.approx(0.0, abs=1e-6)  # the last snapshot is the centre
    assert result["runs"][0]["loss"] != result["runs"][1]["loss"]
    assert LT.task_cache_key(task(checkpoints, trajectory=True)) == result["key"]


def test_task_cancelled_then_resumed_equals_uninterrupted(checkpoints, tmp_path):
    params = task(checkpoints, max_memory_mb=1e-6)  # one grid point per chunk
    stopper = StopAfter(11)
    partial = LT.run_task(params, stopper, tmp_path / "a", resume=False)
    assert not partial["complete"] and stopper.results
    assert partial["runs"][0]["done_fraction"] == 1.0 and partial["runs"][1]["done_fraction"] == pytest.approx(2 / 9)
    again = RecordingReporter()
    resumed = LT.run_task(params, again, tmp_path / "a", resume=True)
    assert resumed["complete"] and len(again.progress_calls) == 18 - 11
    whole = LT.run_task(params, RecordingReporter(), tmp_path / "b", resume=False)
    for r, w in zip(resumed["runs"], whole["runs"]):
        np.testing.assert_allclose(np.array(r["loss"], dtype=float), np.array(w["loss"], dtype=float), atol=1e-6)


def test_task_interpolation_hits_both_endpoints_on_train_and_test(checkpoints, tmp_path):
    from samlab.checkpoints import load_trained

    params = {"checkpoints": checkpoints, "kind": "interpolation", "n_samples": None, "device": "cpu",
              "grid": {"min": -0.5, "max": 1.5, "n": 5}}
    result = LT.run_task(params, RecordingReporter(), tmp_path, resume=False)
    assert result["alphas"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    for k, path in ((1, checkpoints[0]), (3, checkpoints[1])):
        trained = load_trained(path)
        d = trained.data
        with torch.no_grad():
            train = cross_entropy_per_sample(trained.model(d.x_train), d.y_train).mean().item()
            test = cross_entropy_per_sample(trained.model(d.x_test), d.y_test).mean().item()
        assert result["train"]["loss"][k] == pytest.approx(train, abs=1e-5)
        assert result["test"]["loss"][k] == pytest.approx(test, abs=1e-5)


def test_task_flatness_and_pca(checkpoints, tmp_path):
    flat = LT.run_task({"checkpoints": checkpoints[:1], "kind": "flatness", "radii": [0.1, 0.5], "n_directions": 2,
                       "device": "cpu"}, RecordingReporter(), tmp_path, resume=False)
    entry = flat["runs"][0]
    assert flat["complete"] and entry["radii"] == [0.1, 0.5] and entry["mean_increase"][1] > entry["mean_increase"][0]
    pca = LT.run_task(task(checkpoints[:1], directions="pca", trajectory=True), RecordingReporter(), tmp_path,
                     resume=False)
    run = pca["runs"][0]
    assert len(run["explained_variance"]) == 2 and 0 < sum(run["explained_variance"]) <= 1 + 1e-9
    assert np.isfinite(run["trajectory"]["x"]).all() and max(np.abs(run["trajectory"]["x"])) > 0


def test_check_task_names_the_bad_field(checkpoints):
    from samlab.tasks import check_params

    assert check_params("landscape", task(checkpoints))["grid"]["nx"] == 3
    bad = [({"kind": "3d"}, "kind"), ({"grid": {"nx": 1}}, "grid.nx"), ({"grid": {"xmin": 2.0}}, "grid.xmin"),
           ({"checkpoints": ["/no/such.pt"]}, "checkpoints"), ({"kind": "interpolation", "grid": None}, "checkpoints"),
           ({"colour": 1}, "colour"), ({"data": "val"}, "data"), ({"n_samples": 0}, "n_samples")]
    for override, field in bad:
        with pytest.raises(ValueError, match=field):
            LT.check_task(task(checkpoints[:1] if override.get("kind") == "interpolation" else checkpoints, **override))
    assert LT.task_cache_key(task(checkpoints)) != LT.task_cache_key(task(checkpoints, seed=1))


def test_hessian_directions_are_the_top_eigenvectors_of_the_dense_hessian():
    model, (x, y) = mlp(), vector_data()
    params = L.model_params(model)
    flat = L.flatten(params).double()

    def loss_of(vector):
        state = {n: t.double() for n, t in L.unflatten(vector, {n: t.double() for n, t in params.items()}).items()}
        out = torch.func.functional_call(model.double(), state, (x.double(),))
        return cross_entropy_per_sample(out, y).mean()

    dense = torch.autograd.functional.hessian(loss_of, flat)
    model.float()
    values, vectors = torch.linalg.eigh(dense)
    directions = L.hessian_directions(model, cross_entropy_per_sample, (x, y), k=2, tol=1e-8)
    for i, d in enumerate(directions):
        assert set(d) == set(params)
        cosine = torch.dot(L.flatten(d).double(), vectors[:, -1 - i]) / L.flatten(d).double().norm()
        assert abs(cosine.item()) == pytest.approx(1.0, abs=1e-3)


# -- coarse to fine ---------------------------------------------------------------------------------
def test_grid_levels_go_every_fourth_then_every_second_then_the_rest():
    levels = L.grid_levels((9,))
    assert levels.tolist() == [0, 2, 1, 2, 0, 2, 1, 2, 0]
    assert L.grid_levels((6,)).tolist() == [0, 2, 1, 2, 0, 0]  # the last index belongs to the first pass
    grid = L.grid_levels((41, 41))
    assert grid.shape == (41, 41)
    assert (grid == 0).sum() == 11 * 11  # every 4th row and column, corners included: 121 of 1681 ≈ 1/14
    assert ((grid <= 1).sum()) == 21 * 21
    assert grid[0, 0] == grid[0, 40] == grid[40, 0] == grid[40, 40] == 0
    assert grid[2, 4] == 1 and grid[4, 3] == 2


def test_surface_is_computed_coarse_to_fine_and_resumes_in_that_order(tmp_path):
    model, data = mlp(), vector_data()
    d1, d2 = L.random_directions(model, 2, seed=3)
    xs, ys = np.linspace(-1, 1, 9), np.linspace(-1, 1, 5)
    levels = L.grid_levels((9, 5))
    seen = []
    whole = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys, max_memory_mb=1e-6,
                         on_update=lambda s: seen.append(s.done.copy()))
    assert len(seen) == 45  # one point per chunk at this budget
    first = int((levels == 0).sum())
    assert (seen[first - 1] == (levels == 0)).all()  # the first pass done before any other point
    assert (seen[int((levels <= 1).sum()) - 1] == (levels <= 1)).all()
    # stopped inside the second pass, saved, restored and resumed: the rest in order, same numbers
    partial = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys, max_memory_mb=1e-6,
                           reporter=StopAfter(first + 3))
    assert (partial.done[levels == 0]).all() and int(partial.done.sum()) == first + 3
    LT.save_surface(partial, tmp_path / "state.npz")
    order = []
    resumed = L.surface_2d(model, cross_entropy_per_sample, data, d1, d2, xs, ys, max_memory_mb=1e-6,
                           resume_from=LT.load_surface(tmp_path / "state.npz"),
                           on_update=lambda s: order.append(s.done.copy()))
    assert len(order) == 45 - first - 3
    assert (order[int((levels <= 1).sum()) - first - 3 - 1] == (levels <= 1)).all()
    np.testing.assert_allclose(resumed.loss, whole.loss, rtol=1e-12)
    np.testing.assert_array_equal(resumed.accuracy, whole.accuracy)


def test_missing_points_are_interpolated_exactly_on_a_plane_and_a_line():
    xs, ys = np.linspace(-1, 1, 9), np.linspace(0, 2, 5)
    plane = 3.0 + 2.0 * xs[:, None] - 0.5 * ys[None, :]
    partial = np.where(L.grid_levels(plane.shape) == 0, plane, np.nan)
    filled, interpolated = L.interpolate_missing([xs, ys], partial.tolist())
    assert (interpolated == (L.grid_levels(plane.shape) > 0)).all()
    np.testing.assert_allclose(filled, plane, atol=1e-12)
    line = 1.0 - 4.0 * xs
    values = [v if level == 0 else None for v, level in zip(line, L.grid_levels((9,)))]
    filled, interpolated = L.interpolate_missing([xs], values)
    np.testing.assert_allclose(filled, line, atol=1e-12)
    assert interpolated.sum() == 6
    done, mask = L.interpolate_missing([xs], line)
    assert not mask.any() and np.array_equal(done, line)


def test_a_partial_surface_is_drawn_interpolated_and_says_so():
    from dashboard import landscape_view

    xs, ys = np.linspace(-1, 1, 9), np.linspace(-1, 1, 9)
    bowl = xs[:, None] ** 2 + ys[None, :] ** 2
    partial = np.where(L.grid_levels(bowl.shape) == 0, bowl, np.nan)
    result = {"kind": "2d", "axes": [xs.tolist(), ys.tolist()],
              "runs": [{"label": "run", "loss": np.where(np.isnan(partial), None, partial).tolist()}]}
    for make in (landscape_view.contour_figure, landscape_view.surface_figure):
        fig = make(result, 0)
        assert "partial: 9 of 81 points computed, the rest interpolated" in fig.layout.title.text
        assert np.isfinite(np.array(fig.data[0].z, dtype=float)).all()
    contour = landscape_view.contour_figure(result, 0)
    assert [t.name for t in contour.data if t.name == "computed points"] == ["computed points"]
    result["runs"][0]["loss"] = bowl.tolist()
    assert "partial" not in landscape_view.contour_figure(result, 0).layout.title.text
    line = {"kind": "1d", "axes": [xs.tolist()], "runs": [{"label": "run", "loss": [
        v if level == 0 else None for v, level in zip((xs ** 2).tolist(), L.grid_levels((9,)))]}]}
    curves = landscape_view.curves_1d_figure(line)
    assert [t.name for t in curves.data] == ["run (interpolated)", "run (computed)"]
    assert "interpolated" in curves.layout.title.text
