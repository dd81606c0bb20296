"""m-SAM's fused path (all micro-batches in two passes of the model) against the loop, which runs
each micro-batch through the unchanged model one after another: gradients, metrics and BatchNorm
statistics must agree on every built-in model, in train and eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samlab.config import ModelConfig
from samlab.losses import per_sample_loss
from samlab.models import build_model
from samlab.optim import sharpness_gradient
from samlab.optim.fused import per_sample_model, unsupported_modules
from samlab.optim.sharpness import choose_impl

DTYPE = torch.float64
RHO = 0.2
BUILTIN = {
    "mlp": (ModelConfig(name="mlp", width=12, depth=2), (1, 4, 4), 3),
    "cnn-bn": (ModelConfig(name="cnn", width=4, norm="bn"), (1, 8, 8), 3),
    "cnn-gn": (ModelConfig(name="cnn", width=4, norm="gn"), (1, 8, 8), 3),
    "wrn16-bn": (ModelConfig(name="wrn16", widen=1, norm="bn"), (3, 8, 8), 3),
    "resnet18-bn": (ModelConfig(name="resnet18", width=4, norm="bn"), (3, 16, 16), 3),
    "resnet18-gn": (ModelConfig(name="resnet18", width=4, norm="gn"), (3, 8, 8), 3),
    "diag-linear": (ModelConfig(name="diag-linear", init_scale=0.3), (6,), 1),
    "relu-net": (ModelConfig(name="relu-net", width=5, init_scale=0.5), (6,), 1),
}


def builtin(label: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, object]:
    cfg, shape, outputs = BUILTIN[label]
    model = build_model(cfg, shape, outputs, seed=3).to(DTYPE)
    with torch.no_grad():  # running statistics away from their initial (0, 1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, *shape, generator=gen, dtype=DTYPE)
    if outputs == 1:
        return model, x, torch.randn(8, generator=gen, dtype=DTYPE), per_sample_loss("regression")
    return model, x, torch.randint(0, outputs, (8,), generator=gen), per_sample_loss("classification")


def run_both(model: nn.Module, loss_fn, x, y, m: int, impl: str = "fused"):
    """(loop model, loop metrics, fused model, fused metrics) from the same starting copy."""
    loop_model, fused_model = copy.deepcopy(model), copy.deepcopy(model)
    a = sharpness_gradient(loop_model, loss_fn, x, y, method="msam", rho=RHO, m=m, impl="loop")
    b = sharpness_gradient(fused_model, loss_fn, x, y, method="msam", rho=RHO, m=m, impl=impl)
    return loop_model, a, fused_model, b


def assert_same_step(loop_model, a, fused_model, b) -> None:
    for (name, p), q in zip(loop_model.named_parameters(), fused_model.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert set(a) == set(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10, abs=1e-14), key
    for (name, buf_a), buf_b in zip(loop_model.named_buffers(), fused_model.buffers(), strict=True):
        torch.testing.assert_close(buf_b, buf_a, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("label", list(BUILTIN))
def test_fused_equals_loop_on_every_builtin_model(label, m, mode):
    model, x, y, loss_fn = builtin(label)
    model.train(mode == "train")
    assert_same_step(*run_both(model, loss_fn, x, y, m))


def test_fused_equals_loop_on_the_digits_cnn_at_a_batch_whose_pool_runs_channels_last():
    """The fused pass pools the whole batch ([64, 16, 8, 8]: the channels-last max-pool), the loop each
    micro-batch of 16 (torch's NCHW pool): the same step."""
    from samlab.models import CHANNELS_LAST_POOL_FROM

    model = build_model(ModelConfig(name="cnn", width=16, norm="bn"), (1, 8, 8), 10, seed=3).to(DTYPE)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 1, 8, 8, generator=gen, dtype=DTYPE), torch.randint(0, 10, (64,), generator=gen)
    assert 64 * 16 * 8 * 8 >= CHANNELS_LAST_POOL_FROM > 16 * 16 * 8 * 8
    assert_same_step(*run_both(model.train(), per_sample_loss("classification"), x, y, m=16))


@pytest.mark.parametrize("label", list(BUILTIN))
def test_auto_takes_the_fused_path_on_builtin_models(label):
    model, x, y, loss_fn = builtin(label)
    assert per_sample_model(model) and choose_impl(model) == "fused"
    fused_model, auto_model = copy.deepcopy(model), copy.deepcopy(model)
    a = sharpness_gradient(fused_model, loss_fn, x, y, method="msam", rho=RHO, m=2, impl="fused")
    b = sharpness_gradient(auto_model, loss_fn, x, y, method="msam", rho=RHO, m=2)
    assert a == b
    for p, q in zip(fused_model.parameters(), auto_model.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_the_builtin_models_take_every_form_of_the_convolution(monkeypatch):
    """The oracle tests above cover the patch form of an input convolution (`_PatchConv`), the split first
    pass (`_MicroConv`) and the grouped one: some layer of the test models takes each (which one depends on
    the layer's place, SPLIT_FROM and its sizes)."""
    from samlab.optim import fused

    taken = {"patch": 0, "split": 0, "grouped": 0}
    real = {"patch": fused._PatchConv.apply, "split": fused._MicroConv.apply, "grouped": fused._conv2d}

    def count(form):
        def counted(*args):
            taken[form] += 1
            return real[form](*args)
        return counted

    monkeypatch.setattr(fused._PatchConv, "apply", count("patch"))
    monkeypatch.setattr(fused._MicroConv, "apply", count("split"))
    monkeypatch.setattr(fused, "_conv2d", count("grouped"))
    for label in BUILTIN:
        model, x, y, loss_fn = builtin(label)
        sharpness_gradient(model, loss_fn, x, y, method="msam", rho=RHO, m=2, impl="fused")
    assert all(count > 0 for count in taken.values()), taken


class ScaledInput(nn.Module):
    """The input convolution sees 2x, a new tensor in each pass: the second pass makes its own patches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(2 * x))).flatten(1))


def test_patch_form_makes_new_patches_when_the_second_pass_input_differs(monkeypatch):
    from samlab.optim import fused

    made, real = [], fused._input_patches
    monkeypatch.setattr(fused, "_input_patches", lambda *args: made.append(args[1]) or real(*args))
    torch.manual_seed(0)
    model = ScaledInput().to(DTYPE).train()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 5, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (8,), generator=gen)
    assert_same_step(*run_both(model, per_sample_loss("classification"), x, y, m=2))
    assert len(made) == 2 and made[0] is not made[1]  # one set per pass
    made.clear()
    model, x, y, loss_fn = builtin("cnn-bn")
    assert_same_step(*run_both(model, loss_fn, x, y, m=2))
    assert len(made) == 1  # the digits CNN's conv1 takes the batch itself: the second pass reuses its patches


def test_fused_leaves_the_module_as_it_was():
    model, x, y, loss_fn = builtin("cnn-bn")
    weights = [p.detach().clone() for p in model.parameters()]
    sharpness_gradient(model, loss_fn, x, y, method="msam", rho=RHO, m=2, impl="fused")
    assert all("forward" not in module.__dict__ for module in model.modules())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    # the plain forward is the module's own again: BatchNorm with whole-batch statistics
    reference = copy.deepcopy(model)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


class Frozen(nn.Module):
    """conv (frozen) -> BatchNorm (frozen affine) -> linear with a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 16, 3)
        for p in (self.conv.weight, self.bn.weight, self.head.bias):
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


class Sequence3d(nn.Module):
    """LayerNorm and linear layers on [b, t, features] inputs; BatchNorm1d with momentum None."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 6, bias=False)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(5, momentum=None)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.inner(x)))  # [b, 5, 6]
        return self.head(self.bn(h).mean(1))


class Convolutions(nn.Module):
    """Convolutions with a bias, a stride, a dilation, channel groups and a frozen weight under a trainable bias."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.frozen = nn.Conv2d(6, 4, 1)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.grouped(torch.tanh(self.first(x))))
        return self.head(self.frozen(h).flatten(1))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", [Frozen, Sequence3d, Convolutions])
def test_fused_equals_loop_with_frozen_tensors_layer_norm_and_sequences(make, mode):
    torch.manual_seed(0)
    model = make().to(DTYPE).train(mode == "train")
    shape = {Frozen: (1, 4, 4), Sequence3d: (5, 4), Convolutions: (1, 4, 4)}[make]
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, *shape, generator=gen, dtype=DTYPE), torch.randint(0, 3, (8,), generator=gen)
    for _ in range(2):  # twice: BatchNorm's cumulative moving average (momentum None) moves on
        loop_model, a, fused_model, b = run_both(model, per_sample_loss("classification"), x, y, m=4)
        assert_same_step(loop_model, a, fused_model, b)
        model = loop_model


@pytest.mark.parametrize("make", ["cnn-bn", "resnet18-gn", Convolutions])
def test_fused_equals_loop_under_bf16_autocast(make):
    """Mixed precision (a run's precision=bf16): the fused convolutions cast like autocast does, save
    what they cast and return fp32 gradients; they match the loop to bf16's precision."""
    torch.manual_seed(0)
    if isinstance(make, str):
        model, x, y, loss_fn = builtin(make)
        model, x = model.float(), x.float()
    else:
        model, loss_fn = make().train(), per_sample_loss("classification")
        gen = torch.Generator().manual_seed(2)
        x, y = torch.randn(8, 1, 4, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loop_model, a, fused_model, b = run_both(model, loss_fn, x, y, m=4)
    full = copy.deepcopy(model)
    sharpness_gradient(full, loss_fn, x, y, method="msam", rho=RHO, m=4, impl="loop")  # fp32
    for (name, p), q, r in zip(loop_model.named_parameters(), fused_model.parameters(), full.parameters(),
                               strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert q.grad.dtype == torch.float32, name
        scale = r.grad.norm().item() + 1e-6
        # fused vs loop, both in bf16, to 5 % of the gradient bf16 computes: where a layer's bf16 gradient is
        # far from fp32's (resnet18-gn's last block, GroupNorm over 1 × 1 maps), its own size is the scale
        assert (q.grad - p.grad).norm().item() < 0.05 * max(scale, p.grad.norm().item()), name
        # against fp32, the fused path's bf16 error is the loop's (bf16 itself), not more
        assert (q.grad - r.grad).norm().item() < 1.5 * (p.grad - r.grad).norm().item() + 0.02 * scale, name
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


class ScalarGain(nn.Module):
    """A model of its own with a 0-dim parameter: f(x) = c · <w, x>, batched by `micro_batched_forward`."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Parameter(torch.tensor(0.7))
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * (x @ self.w)

    def micro_batched_forward(self, xs: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["c"].unsqueeze(1) * (xs * params["w"].unsqueeze(1)).sum(2)


@pytest.mark.parametrize("frozen_w", [False, True])
def test_fused_equals_loop_on_a_model_of_its_own_with_a_scalar_parameter(frozen_w):
    model = ScalarGain().to(DTYPE)
    model.w.requires_grad_(not frozen_w)  # frozen: the scalar alone makes the micro-batch norms
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 5, generator=gen, dtype=DTYPE), torch.randn(8, generator=gen, dtype=DTYPE)
    assert choose_impl(model) == "fused"
    assert_same_step(*run_both(model, per_sample_loss("regression"), x, y, m=2))


class Scaled(nn.Module):
    """A parameter outside any layer the fused path knows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class DataDependent(nn.Module):
    """Python control flow on a tensor value: neither fused nor vmap can run it; the loop can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out if out.sum() > 0 else -out


def test_unsupported_models_are_refused_by_fused_and_routed_by_auto():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randint(0, 3, (8,))
    ce = per_sample_loss("classification")
    scaled = Scaled().to(DTYPE)
    assert unsupported_modules(scaled) == ["model (Scaled)"]
    with pytest.raises(ValueError, match="^impl: the fused path cannot batch"):
        sharpness_gradient(scaled, ce, x, y, method="msam", rho=RHO, m=2, impl="fused")
    assert all("forward" not in module.__dict__ for module in scaled.modules())
    assert choose_impl(scaled) == "vmap"
    vmap_model, auto_model = copy.deepcopy(scaled), copy.deepcopy(scaled)
    assert (sharpness_gradient(auto_model, ce, x, y, method="msam", rho=RHO, m=2)
            == sharpness_gradient(vmap_model, ce, x, y, method="msam", rho=RHO, m=2, impl="vmap"))

    branching = DataDependent().to(DTYPE)
    assert choose_impl(branching) == "vmap"  # a custom model: samples may interact, so not fused
    loop_model, auto_model = copy.deepcopy(branching), copy.deepcopy(branching)
    a = sharpness_gradient(loop_model, ce, x, y, method="msam", rho=RHO, m=2, impl="loop")
    b = sharpness_gradient(auto_model, ce, x, y, method="msam", rho=RHO, m=2)
    assert a == b and choose_impl(auto_model) == "loop"  # vmap failed once: the loop from now on
    assert torch.equal(loop_model.fc.weight.grad, auto_model.fc.weight.grad)


def test_fused_with_a_zero_micro_batch_gradient_does_not_perturb():
    """Micro-batches at zero loss gradient get eps = 0 (as the shared rule), not NaN."""
    model = nn.Linear(3, 1).to(DTYPE)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    x = torch.randn(8, 3, dtype=DTYPE)
    y = torch.zeros(8, dtype=DTYPE)
    y[4:] = 1.0  # micro-batch 0 has zero residuals, micro-batch 1 does not

    def mse(out, target):
        return (out.squeeze(1) - target) ** 2

    assert_same_step(*run_both(model, mse, x, y, m=4))


def test_a_model_changed_between_steps_is_looked_at_again():
    """The layer structure is remembered between steps; a replaced module or an added parameter is seen."""
    model, x, y, loss_fn = builtin("mlp")
    assert per_sample_model(model) and choose_impl(model) == "fused"
    assert_same_step(*run_both(model, loss_fn, x, y, 4))
    model.hidden[1] = nn.Linear(12, 12, bias=False).to(DTYPE)  # a bias fewer
    assert_same_step(*run_both(model, loss_fn, x, y, 4))
    model.hidden[0].register_parameter("extra", nn.Parameter(torch.ones(3, dtype=DTYPE)))  # unused by forward
    loop_model, a, fused_model, b = run_both(model, loss_fn, x, y, 4)
    assert_same_step(loop_model, a, fused_model, b)
    model.hidden[0] = nn.RNN(16, 12)  # a module the fused path does not know
    assert not per_sample_model(model) and choose_impl(model) == "vmap"
