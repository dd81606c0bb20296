"""Models: shapes on every input size, functional_call + vmap, the diagonal network by hand, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from samlab.config import ModelConfig
from samlab.models import MODEL_INFO, build_model, count_parameters, has_batchnorm, norm_layer

# Tiny widths: the architecture is what is under test, not its capacity.
TINY = {
    "mlp": ModelConfig(name="mlp", width=8, depth=2),
    "cnn": ModelConfig(name="cnn", width=4),
    "resnet18": ModelConfig(name="resnet18", width=4),
    "wrn16": ModelConfig(name="wrn16", widen=1),
}
IMAGE_SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def tiny(name: str, **overrides) -> ModelConfig:
    cfg = TINY[name]
    return ModelConfig(**{**cfg.__dict__, **overrides})


SHAPE_CASES = [(name, shape) for name in ("mlp", "cnn") for shape in IMAGE_SHAPES] + [
    (name, shape) for name in ("resnet18", "wrn16") for shape in ((1, 8, 8), (3, 32, 32))
]


@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_forward_shape_on_image_sizes(name, shape):
    model = build_model(TINY[name], shape, 7, seed=0)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def test_mlp_on_vectors_and_depth():
    model = build_model(ModelConfig(name="mlp", width=5, depth=3), (30,), 1, seed=0)
    assert model(torch.randn(4, 30)).shape == (4, 1)
    assert len(model.hidden) == 3
    assert count_parameters(model) == (30 * 5 + 5) + 2 * (5 * 5 + 5) + (5 + 1)


def test_diag_linear_output_and_gradient_by_hand():
    model = build_model(ModelConfig(name="diag-linear", init_scale=0.3), (6,), 1)
    torch.testing.assert_close(model.u.detach(), torch.full((6,), 0.3))
    torch.testing.assert_close(model.v.detach(), torch.full((6,), 0.3))
    x = torch.randn(5, 6)
    assert torch.equal(model(x), torch.zeros(5))  # u = v gives w = 0 at initialisation
    with torch.no_grad():
        model.u.copy_(torch.tensor([1.0, 2.0, 0.5, 0.0, -1.0, 3.0]))
        model.v.copy_(torch.tensor([0.0, 1.0, 1.5, 2.0, 0.5, 3.0]))
    u, v = model.u.detach().tolist(), model.v.detach().tolist()
    w = [a * a - b * b for a, b in zip(u, v)]
    by_hand = torch.tensor([sum(wi * xi for wi, xi in zip(w, row)) for row in x.tolist()])
    out = model(x)
    assert out.shape == (5,)
    torch.testing.assert_close(out, by_hand)
    out.sum().backward()  # d/du sum_b <u⊙u − v⊙v, x_b> = 2 u ⊙ sum_b x_b
    torch.testing.assert_close(model.u.grad, 2 * torch.tensor(u) * x.sum(0))
    torch.testing.assert_close(model.v.grad, -2 * torch.tensor(v) * x.sum(0))


def test_resnet18_parameter_count_matches_cifar_resnet18():
    model = build_model(ModelConfig(name="resnet18", width=64, norm="bn"), (3, 32, 32), 10)
    assert count_parameters(model) == 11_173_962  # the published CIFAR ResNet-18 size (11.17M)
    gn = build_model(ModelConfig(name="resnet18", width=64, norm="gn"), (3, 32, 32), 10)
    assert count_parameters(gn) == 11_173_962  # GroupNorm has the same affine parameters as BatchNorm
    assert has_batchnorm(model) and not has_batchnorm(gn)


@pytest.mark.parametrize(("widen", "millions"), [(4, 2.7), (8, 11.0)])
def test_wrn16_parameter_count_matches_paper_table(widen, millions):
    """Zagoruyko & Komodakis 2016, Table 4: WRN-16-4 has 2.7M and WRN-16-8 11.0M parameters."""
    model = build_model(ModelConfig(name="wrn16", widen=widen), (3, 32, 32), 10)
    assert round(count_parameters(model) / 1e6, 1) == millions


def test_group_norm_groups_and_batchnorm_detection():
    assert [norm_layer("gn", c).num_groups for c in (512, 64, 32, 12, 4, 1)] == [32, 32, 16, 6, 2, 1]
    assert has_batchnorm(build_model(TINY["cnn"], (1, 8, 8), 10))
    assert not has_batchnorm(build_model(tiny("cnn", norm="gn"), (1, 8, 8), 10))
    assert not has_batchnorm(build_model(TINY["mlp"], (1, 8, 8), 10))


def test_seed_fixes_initialisation_without_touching_global_rng():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(TINY["resnet18"], (3, 8, 8), 10, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model(TINY["resnet18"], (3, 8, 8), 10, seed=7)
    c = build_model(TINY["resnet18"], (3, 8, 8), 10, seed=8)
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    assert all(torch.equal(p, q) for p, q in pairs)
    assert not torch.equal(a.stem.weight, c.stem.weight)


# -- torch.func ------------------------------------------------------------------------------------
# Every model and norm, in the mode a vmapped call can use: GroupNorm/no-norm models in train mode;
# BatchNorm models only in eval mode (train-mode BatchNorm writes running statistics in place, which
# vmap cannot batch; the optimizers loop over micro-batches for those). The residual nets run on
# 16×16 colour images to keep the suite fast; their forward on 32×32 is covered above.
FUNCTIONAL_CASES = [
    ("mlp", {}, (1, 8, 8), "train"),
    ("cnn", {"norm": "gn"}, (1, 8, 8), "train"),
    ("cnn", {"norm": "bn"}, (1, 8, 8), "eval"),
    ("resnet18", {"norm": "gn"}, (3, 16, 16), "train"),
    ("resnet18", {"norm": "bn"}, (3, 16, 16), "eval"),
    ("wrn16", {"norm": "gn"}, (3, 16, 16), "train"),
    ("wrn16", {"norm": "bn"}, (3, 16, 16), "eval"),
]


def build_case(name, overrides, shape, mode):
    model = build_model(tiny(name, **overrides), shape, 5, seed=0)
    return model.train(mode == "train")


@pytest.mark.parametrize(("name", "overrides", "shape", "mode"), FUNCTIONAL_CASES)
def test_vmap_over_micro_batches_with_perturbed_weights(name, overrides, shape, mode):
    """k parameter sets applied to k micro-batches in one vmapped call == a loop over them."""
    model = build_case(name, overrides, shape, mode)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    k, m = 3, 2
    gen = torch.Generator().manual_seed(1)
    stacked = {n: p + 0.01 * torch.randn((k, *p.shape), generator=gen) for n, p in params.items()}
    x = torch.randn(k, m, *shape, generator=gen)

    def call(p, xb):
        return functional_call(model, (p, buffers), (xb,))

    batched = vmap(call)(stacked, x)
    looped = torch.stack([call({n: v[j] for n, v in stacked.items()}, x[j]) for j in range(k)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "overrides", "shape", "mode"), FUNCTIONAL_CASES)
def test_per_sample_gradients_by_vmap_match_backward(name, overrides, shape, mode):
    model = build_case(name, overrides, shape, mode)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 3])

    def loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi[None],))
        return torch.nn.functional.cross_entropy(out, yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    model.zero_grad()
    # Sample 1 alone, through autograd: a batch of one for GroupNorm / eval BatchNorm is the same function.
    torch.nn.functional.cross_entropy(model(x[1:2]), y[1:2]).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(per_sample[n][1], p.grad, atol=1e-5, rtol=1e-4)


def test_diag_linear_under_vmap():
    model = build_model(ModelConfig(name="diag-linear", init_scale=0.2), (4,), 1)
    params = {"u": torch.randn(3, 4), "v": torch.randn(3, 4)}
    x = torch.randn(3, 5, 4)
    out = vmap(lambda p, xb: functional_call(model, p, (xb,)))(params, x)
    by_hand = torch.einsum("kbd,kd->kb", x, params["u"] ** 2 - params["v"] ** 2)
    torch.testing.assert_close(out, by_hand)


# -- validation and metadata -----------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_field():
    with pytest.raises(ValueError, match="model.name: 'cnn' needs image inputs"):
        build_model(TINY["cnn"], (30,), 10)
    with pytest.raises(ValueError, match="model.name: 'diag-linear' is a scalar regressor"):
        build_model(ModelConfig(name="diag-linear"), (30,), 10)
    with pytest.raises(ValueError, match="model.name: must be one of"):
        build_model(ModelConfig(name="vit"), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="model.norm"):
        build_model(tiny("resnet18", norm="ln"), (3, 32, 32), 10)
    with pytest.raises(ValueError, match="num_outputs"):
        build_model(TINY["mlp"], (4,), 0)


def test_model_info_covers_every_model():
    from samlab.config import DATASETS, MODELS

    assert set(MODEL_INFO) == set(MODELS)
    for info in MODEL_INFO.values():
        assert info["description"] and set(info["datasets"]) <= set(DATASETS)


def _pool_input(shape, dtype=torch.float64):
    """A seeded input for the samlab pools and torch's own ones (the oracle)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("shape", [(64, 16, 8, 8), (4, 16, 32, 32)])
def test_channels_last_max_pool_equals_torchs_in_every_derivative(shape):
    """Inputs large enough for the channels-last path: values, gradient (NCHW and contiguous), Hessian-vector
    products by double backward and batched double backward, forward mode and vmap all equal torch's pool."""
    import torch.nn.functional as F

    from samlab.models import CHANNELS_LAST_POOL_FROM, max_pool_2x2

    x = _pool_input(shape)
    assert x.numel() >= CHANNELS_LAST_POOL_FROM
    out = max_pool_2x2(x.requires_grad_())
    assert "_MaxPool2x2" in type(out.grad_fn).__name__  # the channels-last path ran
    assert torch.equal(out, F.max_pool2d(x, 2)) and out.is_contiguous()

    def loss(pool, t):
        return (pool(torch.tanh(t), 2) ** 2).sum() if pool is F.max_pool2d else (pool(torch.tanh(t)) ** 2).sum()

    grads = {}
    for pool in (max_pool_2x2, F.max_pool2d):
        g = torch.autograd.grad(loss(pool, x), x, create_graph=True)[0]
        vectors = _pool_input((3, *shape))
        hvps = torch.autograd.grad(g, x, vectors, is_grads_batched=True)[0]  # vmap over the double backward
        forward_mode = torch.func.jvp(grad(lambda t, p=pool: loss(p, t)), (x.detach(),), (vectors[0],))[1]
        batched = vmap(grad(lambda t, p=pool: loss(p, t)))(torch.stack([x.detach(), -x.detach()]))  # 2 inputs
        grads[pool] = (g, hvps, forward_mode, batched)
    assert grads[max_pool_2x2][0].is_contiguous()
    for ours, torchs in zip(grads[max_pool_2x2], grads[F.max_pool2d], strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-12, atol=1e-12)


def test_small_pools_and_other_devices_keep_torchs_kernel():
    from samlab.models import max_pool_2x2

    out = max_pool_2x2(_pool_input((8, 16, 8, 8)).requires_grad_())
    assert "MaxPool2DWithIndices" in type(out.grad_fn).__name__


@pytest.mark.parametrize("shape", [(8, 32, 4, 4), (8, 32, 16, 16), (8, 32, 14, 14), (8, 32, 5, 5)])
def test_average_pool_to_2x2_equals_the_adaptive_pool(shape):
    import torch.nn.functional as F

    from samlab.models import average_pool_to_2x2

    x = _pool_input(shape).requires_grad_()
    ours, torchs = average_pool_to_2x2(x), F.adaptive_avg_pool2d(x, 2)
    torch.testing.assert_close(ours, torchs, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(ours.pow(2).sum(), x)[0],
                               torch.autograd.grad(torchs.pow(2).sum(), x)[0], rtol=1e-14, atol=1e-14)
