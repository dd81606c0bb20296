"""SAM family: every method against a hand-written oracle on a tiny float64 MLP, plus the
invariants (weights untouched, BatchNorm statistics, loop == vmap) and the SAM optimizer class.

The oracles below use an explicit functional MLP (a list of weight tensors) and plain
torch.autograd on explicitly perturbed weights; they share no code with samlab.optim.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from samlab.config import METHODS as CONFIG_METHODS
from samlab.optim import METHODS, SAM, sample_scores, sharpness_gradient
from samlab.optim.perturbations import METHOD_RULES, perturbation
from tests.oracles import msam_by_copies, sam_by_copy

RHO = 0.3
ETA = 0.01
DTYPE = torch.float64


# -- fixtures ------------------------------------------------------------------------------------------
class TinyMLP(nn.Module):
    """5 -> 12 -> 3 with tanh: 111 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyBNNet(nn.Module):
    """conv -> BatchNorm -> relu -> linear on 1x4x4 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def ce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def make_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(DTYPE)


def make_bn_net(seed: int = 0) -> TinyBNNet:
    torch.manual_seed(seed)
    net = TinyBNNet().to(DTYPE)
    with torch.no_grad():  # non-trivial running statistics to start from
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


def batch(n: int = 8, seed: int = 1, shape: tuple[int, ...] = (5,)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=DTYPE), torch.randint(0, 3, (n,), generator=gen)


# -- the oracle: an explicit functional MLP ----------------------------------------------------------
def weights_of(model: TinyMLP) -> list[torch.Tensor]:
    return [model.fc1.weight.detach().clone(), model.fc1.bias.detach().clone(),
            model.fc2.weight.detach().clone(), model.fc2.bias.detach().clone()]


def mlp_losses(w: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ w[0].T + w[1])
    logits = hidden @ w[2].T + w[3]
    return -(logits.log_softmax(dim=1).gather(1, y[:, None]).squeeze(1))


def grad_at(w: list[torch.Tensor], x, y, sample_weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in w]
    losses = mlp_losses(leaves, x, y)
    objective = losses.mean() if sample_weights is None else (losses * sample_weights).sum()
    return list(torch.autograd.grad(objective, leaves))


def flat_norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((t**2).sum() for t in ts))


def shifted(w, eps):
    return [a + b for a, b in zip(w, eps)]


def oracle_sam(w, x, y, rho=RHO):
    g = grad_at(w, x, y)
    n = flat_norm(g)
    return grad_at(shifted(w, [rho * t / n for t in g]), x, y)


def oracle_asam(w, x, y, rho=RHO, eta=ETA):
    g = grad_at(w, x, y)
    t_scale = [t.abs() + eta for t in w]
    n = flat_norm([s * t for s, t in zip(t_scale, g)])
    return grad_at(shifted(w, [rho * s * s * t / n for s, t in zip(t_scale, g)]), x, y)


def oracle_usam(w, x, y, rho=RHO):
    g = grad_at(w, x, y)
    return grad_at(shifted(w, [rho * t for t in g]), x, y)


def oracle_nsam(w, x, y, xp, yp, rho=RHO):
    gn = grad_at(w, xp, yp)
    n = flat_norm(gn)
    return grad_at(shifted(w, [rho * t / n for t in gn]), x, y)


def oracle_msam(w, x, y, m, rho=RHO):
    k = x.shape[0] // m
    total = [torch.zeros_like(t) for t in w]
    for j in range(k):
        xj, yj = x[j * m:(j + 1) * m], y[j * m:(j + 1) * m]
        total = [a + b / k for a, b in zip(total, oracle_sam(w, xj, yj, rho))]
    return total


def per_sample_grads(w, x, y) -> list[list[torch.Tensor]]:
    return [grad_at(w, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]


def oracle_rwsam_exact(w, x, y, lam, rho=RHO):
    norms = torch.stack([flat_norm(g) for g in per_sample_grads(w, x, y)])
    p = torch.softmax(lam * norms, 0)
    gp = grad_at(w, x, y, sample_weights=p)
    n = flat_norm(gp)
    return grad_at(shifted(w, [rho * t / n for t in gp]), x, y)


def rademacher_draws(model: nn.Module, seed: int) -> list[torch.Tensor]:
    """The ±1 vector samlab draws: one tensor per parameter, in order, from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.empty_like(p).bernoulli_(0.5, generator=gen) * 2 - 1 for p in model.parameters()]


def oracle_rwsam_fd(w, x, y, z, lam, delta, rho=RHO):
    base = mlp_losses(w, x, y)
    scores = (mlp_losses(shifted(w, [delta * t for t in z]), x, y) - base).abs() / delta
    gp = grad_at(w, x, y, sample_weights=torch.softmax(lam * scores, 0))
    n = flat_norm(gp)
    return grad_at(shifted(w, [rho * t / n for t in gp]), x, y)


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def assert_all_close(actual, expected, rtol=1e-9, atol=1e-11):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# -- each method against its oracle ---------------------------------------------------------------
def test_method_table_covers_config_methods():
    assert set(METHODS) == set(CONFIG_METHODS) == set(METHOD_RULES)


@pytest.mark.parametrize("method", ["sgd", "sam", "asam", "usam"])
def test_single_batch_methods_match_oracle(method):
    model, (x, y) = make_mlp(), batch()
    w = weights_of(model)
    expected = {
        "sgd": lambda: grad_at(w, x, y),
        "sam": lambda: oracle_sam(w, x, y),
        "asam": lambda: oracle_asam(w, x, y),
        "usam": lambda: oracle_usam(w, x, y),
    }[method]()
    out = sharpness_gradient(model, ce, x, y, method=method, rho=RHO, adaptive_eta=ETA)
    assert_all_close(grads_of(model), expected)
    assert out["loss"] == pytest.approx(mlp_losses(w, x, y).mean().item(), rel=1e-12)
    assert out["grad_norm"] == pytest.approx(flat_norm(grad_at(w, x, y)).item(), rel=1e-12)
    if method == "sgd":
        assert out["perturbed_loss"] == out["loss"]
    else:
        assert out["perturbed_loss"] > out["loss"]  # an ascent step of a smooth loss at small rho


def test_nsam_matches_oracle_and_uses_the_perturbation_batch():
    model, (x, y) = make_mlp(), batch()
    xp, yp = batch(n=40, seed=7)
    w = weights_of(model)
    out = sharpness_gradient(model, ce, x, y, method="nsam", rho=RHO, perturb_batch=(xp, yp))
    assert_all_close(grads_of(model), oracle_nsam(w, x, y, xp, yp))
    assert out["perturb_grad_norm"] == pytest.approx(flat_norm(grad_at(w, xp, yp)).item(), rel=1e-12)


@pytest.mark.parametrize("impl", ["loop", "vmap", "fused", "auto"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_msam_matches_oracle(impl, m):
    model, (x, y) = make_mlp(), batch()
    w = weights_of(model)
    out = sharpness_gradient(model, ce, x, y, method="msam", rho=RHO, m=m, impl=impl)
    assert_all_close(grads_of(model), oracle_msam(w, x, y, m))
    micro = [flat_norm(grad_at(w, x[j:j + m], y[j:j + m])).item() for j in range(0, 8, m)]
    assert out["micro_grad_norm"] == pytest.approx(sum(micro) / len(micro), rel=1e-10)
    assert out["grad_norm"] == pytest.approx(flat_norm(grad_at(w, x, y)).item(), rel=1e-10)


def test_rwsam_exact_matches_oracle():
    model, (x, y) = make_mlp(), batch()
    w = weights_of(model)
    out = sharpness_gradient(model, ce, x, y, method="rwsam", rho=RHO, lam=2.0, estimator="exact")
    assert_all_close(grads_of(model), oracle_rwsam_exact(w, x, y, lam=2.0))
    norms = torch.stack([flat_norm(g) for g in per_sample_grads(w, x, y)])
    p = torch.softmax(2.0 * norms, 0)
    assert out["grad_norm"] == pytest.approx(flat_norm(grad_at(w, x, y, sample_weights=p)).item(), rel=1e-10)
    assert out["weight_entropy"] == pytest.approx(-(p * p.log()).sum().item(), rel=1e-10)
    assert out["max_weight"] == pytest.approx(p.max().item(), rel=1e-10)
    assert 0.0 < out["weight_entropy"] < math.log(8)
    assert 1 / 8 < out["max_weight"] < 1.0


def test_rwsam_fd_matches_oracle_with_the_same_draw():
    model, (x, y) = make_mlp(), batch()
    w = weights_of(model)
    z = rademacher_draws(model, seed=5)
    sharpness_gradient(model, ce, x, y, method="rwsam", rho=RHO, lam=3.0, estimator="fd", delta=1e-4,
                       generator=torch.Generator().manual_seed(5))
    assert_all_close(grads_of(model), oracle_rwsam_fd(w, x, y, z, lam=3.0, delta=1e-4))


# -- identities between methods --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sam", "asam", "usam", "nsam", "msam", "rwsam"])
def test_rho_zero_gives_the_plain_gradient(method):
    model, (x, y) = make_mlp(), batch()
    plain = grad_at(weights_of(model), x, y)
    out = sharpness_gradient(model, ce, x, y, method=method, rho=0.0, m=2, lam=1.0, perturb_batch=batch(seed=9),
                             generator=torch.Generator().manual_seed(0))
    assert_all_close(grads_of(model), plain)
    assert out["perturbed_loss"] == pytest.approx(out["loss"], rel=1e-12)


@pytest.mark.parametrize("impl", ["loop", "vmap", "fused"])
def test_msam_with_m_equal_batch_is_sam(impl):
    x, y = batch()
    sam_model, msam_model = make_mlp(), make_mlp()
    a = sharpness_gradient(sam_model, ce, x, y, method="sam", rho=RHO)
    b = sharpness_gradient(msam_model, ce, x, y, method="msam", rho=RHO, m=8, impl=impl)
    assert_all_close(grads_of(msam_model), grads_of(sam_model), rtol=0, atol=0)
    assert (a["loss"], a["perturbed_loss"]) == (b["loss"], b["perturbed_loss"])


@pytest.mark.parametrize("estimator", ["fd", "exact"])
def test_rwsam_with_lam_zero_is_sam(estimator):
    x, y = batch()
    sam_model, rw_model = make_mlp(), make_mlp()
    sharpness_gradient(sam_model, ce, x, y, method="sam", rho=RHO)
    sharpness_gradient(rw_model, ce, x, y, method="rwsam", rho=RHO, lam=0.0, estimator=estimator,
                       generator=torch.Generator().manual_seed(0))
    assert_all_close(grads_of(rw_model), grads_of(sam_model), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("m", [2, 4])
def test_msam_loop_equals_vmap_with_batchnorm(mode, m):
    x, y = batch(n=8, shape=(1, 4, 4))
    loop_model, vmap_model = make_bn_net(), make_bn_net()
    loop_model.train(mode == "train")
    vmap_model.train(mode == "train")
    a = sharpness_gradient(loop_model, ce, x, y, method="msam", rho=RHO, m=m, impl="loop")
    b = sharpness_gradient(vmap_model, ce, x, y, method="msam", rho=RHO, m=m, impl="vmap")
    assert_all_close(grads_of(vmap_model), grads_of(loop_model), rtol=1e-9, atol=1e-12)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-10)
    for buf_a, buf_b in zip(loop_model.buffers(), vmap_model.buffers()):
        assert torch.equal(buf_a, buf_b)


def test_msam_micro_batches_normalise_with_their_own_statistics():
    """Oracle for BatchNorm m-SAM: each micro-batch through its own copy of the model."""
    x, y = batch(n=8, shape=(1, 4, 4))
    model, m = make_bn_net(), 4
    expected = None
    for j in range(0, 8, m):
        part = make_bn_net()
        sharpness_gradient(part, ce, x[j:j + m], y[j:j + m], method="sam", rho=RHO)
        grads = [g / 2 for g in grads_of(part)]
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
    sharpness_gradient(model, ce, x, y, method="msam", rho=RHO, m=m, impl="vmap")
    assert_all_close(grads_of(model), expected, rtol=1e-9, atol=1e-12)
    fused = make_bn_net()
    sharpness_gradient(fused, ce, x, y, method="msam", rho=RHO, m=m, impl="fused")
    assert_all_close(grads_of(fused), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("method", "extra"), [("sam", {}), ("msam", {"m": 8, "impl": "vmap"}),
                                               ("msam", {"m": 4, "impl": "vmap"}), ("msam", {"m": 2, "impl": "vmap"}),
                                               ("msam", {"m": 4, "impl": "loop"}), ("msam", {"m": 2, "impl": "loop"})])
def test_sam_and_msam_with_batchnorm_match_deep_copies_perturbed_in_place(method, extra):
    """The independent oracle (tests/oracles.py): per (micro-)batch a deep copy in train mode, its weights
    moved in place, backpropagated with the batch's statistics; the buffers as the unperturbed passes leave
    them (averaged over the micro-batches' copies, the convention sharpness_gradient documents)."""
    x, y = batch(n=8, shape=(1, 4, 4))
    model = make_bn_net()
    expected, buffers = msam_by_copies(model, ce, x, y, rho=RHO, m=extra.get("m", 8))
    sharpness_gradient(model, ce, x, y, method=method, rho=RHO, **extra)
    assert_all_close(grads_of(model), expected, rtol=1e-9, atol=1e-12)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf.to(DTYPE), buffers[name], rtol=1e-12, atol=1e-14, msg=name)
    # with batch statistics the m-SAM gradient is not SAM's: the oracle tells the two apart
    if extra.get("m", 8) < 8:
        sam_grads, _ = sam_by_copy(make_bn_net(), ce, x, y, rho=RHO)
        assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads_of(model), sam_grads))


def test_ascent_hook_replaces_the_perturbation_gradient():
    """A hook returning the gradient of another batch turns SAM into n-SAM; rescaling changes nothing."""
    model, (x, y) = make_mlp(), batch()
    xp, yp = batch(n=40, seed=7)
    w = weights_of(model)
    other = grad_at(w, xp, yp)
    sharpness_gradient(model, ce, x, y, method="sam", rho=RHO, ascent_hook=lambda g: [t.clone() for t in other])
    assert_all_close(grads_of(model), oracle_nsam(w, x, y, xp, yp))
    sharpness_gradient(model, ce, x, y, method="sam", rho=RHO, ascent_hook=lambda g: [3.0 * t for t in g])
    assert_all_close(grads_of(model), oracle_sam(w, x, y))
    with pytest.raises(ValueError, match="^ascent_hook:"):
        sharpness_gradient(model, ce, x, y, method="msam", m=2, rho=RHO, ascent_hook=lambda g: g)


# -- the finite-difference estimator ------------------------------------------------------------------
def exact_per_sample_norms(model, x, y) -> torch.Tensor:
    return torch.stack([flat_norm(g) for g in per_sample_grads(weights_of(model), x, y)])


def test_fd_score_is_the_absolute_directional_derivative():
    model, (x, y) = make_mlp(), batch()
    z = rademacher_draws(model, seed=11)
    per_sample = per_sample_grads(weights_of(model), x, y)
    directional = torch.stack([sum((a * b).sum() for a, b in zip(g, z)).abs() for g in per_sample])
    scores = sample_scores(model, ce, x, y, estimator="fd", delta=1e-6, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(scores, directional, rtol=1e-4, atol=1e-6)


def test_fd_scores_match_exact_norms_in_mean_square():
    """E_z[s_i²] = ‖∇f_i‖²; E_z[s_i] = E|⟨∇f_i, z⟩| lies in [‖∇f_i‖/√2, ‖∇f_i‖] (Szarek 1976).

    2000 draws: the relative standard error of a mean of s_i² is at most sqrt(2/2000) = 3.2%.
    """
    model, (x, y) = make_mlp(), batch()
    exact = exact_per_sample_norms(model, x, y)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_scores(model, ce, x, y, estimator="fd", delta=1e-5, generator=gen)
                         for _ in range(2000)])
    square_ratio = draws.pow(2).mean(0) / exact.pow(2)
    assert torch.all((square_ratio - 1).abs() < 0.13), square_ratio
    assert abs(square_ratio.mean().item() - 1) < 0.05, square_ratio
    ratio = draws.mean(0) / exact
    assert torch.all(ratio > 1 / math.sqrt(2) - 0.05) and torch.all(ratio < 1.0 + 0.05), ratio
    # many coordinates of comparable size: close to the Gaussian value sqrt(2/pi) = 0.80
    assert abs(ratio.mean().item() - math.sqrt(2 / math.pi)) < 0.05, ratio


def test_exact_scores_equal_per_sample_gradient_norms():
    model, (x, y) = make_mlp(), batch()
    torch.testing.assert_close(sample_scores(model, ce, x, y, estimator="exact"), exact_per_sample_norms(model, x, y))


def test_exact_scores_with_batchnorm_are_jacobian_rows():
    """With BatchNorm in train mode f_i depends on the whole batch: s_i = ‖∂f_i/∂w‖ of the batch forward."""
    model, (x, y) = make_bn_net(), batch(n=6, shape=(1, 4, 4))
    probe = copy.deepcopy(model)
    losses = ce(probe(x), y)
    rows = [torch.autograd.grad(losses[i], list(probe.parameters()), retain_graph=True) for i in range(6)]
    expected = torch.stack([flat_norm(list(r)) for r in rows])
    before = [b.clone() for b in model.buffers()]
    torch.testing.assert_close(sample_scores(model, ce, x, y, estimator="exact"), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


# -- invariants ------------------------------------------------------------------------------------
ALL_CALLS = [
    ("sgd", {}),
    ("sam", {}),
    ("asam", {}),
    ("usam", {}),
    ("nsam", {"perturb_batch": "independent"}),
    ("msam", {"m": 2, "impl": "loop"}),
    ("msam", {"m": 2, "impl": "vmap"}),
    ("msam", {"m": 8, "impl": "vmap"}),
    ("rwsam", {"lam": 1.0, "estimator": "fd"}),
    ("rwsam", {"lam": 1.0, "estimator": "exact"}),
]


def call_kwargs(method, extra):
    kwargs = dict(extra, method=method, rho=RHO, generator=torch.Generator().manual_seed(0))
    if kwargs.get("perturb_batch") == "independent":
        kwargs["perturb_batch"] = batch(n=12, seed=4, shape=(1, 4, 4))
    return kwargs


def buffers_after_plain_forwards(x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Oracle: one plain train-mode forward per micro-batch, each on a fresh copy; their buffers averaged."""
    copies = []
    for part in x.chunk(k):
        net = make_bn_net()
        with torch.no_grad():
            net(part)
        copies.append(dict(net.named_buffers()))
    return {name: torch.stack([c[name].to(DTYPE) for c in copies]).mean(0) for name in copies[0]}


@pytest.mark.parametrize(("method", "extra"), ALL_CALLS)
def test_weights_unchanged_and_running_stats_from_the_unperturbed_pass(method, extra):
    """Buffers as after one plain forward of x; for m-SAM the mean over the micro-batches' forwards."""
    x, y = batch(n=8, shape=(1, 4, 4))
    model = make_bn_net()
    before = [p.detach().clone() for p in model.parameters()]
    out = sharpness_gradient(model, ce, x, y, **call_kwargs(method, extra))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    expected = buffers_after_plain_forwards(x, 8 // extra["m"] if method == "msam" else 1)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf.to(DTYPE), expected[name], rtol=1e-12, atol=1e-14, msg=name)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(math.isfinite(v) for v in out.values())


def test_eval_mode_leaves_buffers_alone():
    x, y = batch(n=8, shape=(1, 4, 4))
    for method, extra in ALL_CALLS:
        model = make_bn_net().eval()
        before = {name: b.clone() for name, b in model.named_buffers()}
        sharpness_gradient(model, ce, x, y, **call_kwargs(method, extra))
        assert all(torch.equal(b, before[name]) for name, b in model.named_buffers()), method


@pytest.mark.parametrize(("method", "extra"), ALL_CALLS)
def test_every_method_decreases_a_quadratic(method, extra):
    """Least squares with a linear model: L(w) = mean_i 0.5 (x_i·w + b − y_i)², a convex quadratic."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).to(DTYPE)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 4, generator=gen, dtype=DTYPE)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE) + 0.1 * torch.randn(8, generator=gen, dtype=DTYPE)

    def squared(out, target):
        return 0.5 * (out.squeeze(1) - target) ** 2

    kwargs = call_kwargs(method, extra)
    if method == "nsam":
        xp = torch.randn(32, 4, generator=gen, dtype=DTYPE)
        kwargs["perturb_batch"] = (xp, xp @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(8):
        losses.append(sharpness_gradient(model, squared, x, y, **kwargs)["loss"])
        opt.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0]


def test_zero_gradient_gives_no_perturbation():
    model = nn.Linear(3, 1, bias=False).to(DTYPE)
    nn.init.zeros_(model.weight)
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.zeros(4, dtype=DTYPE)

    def squared(out, target):
        return 0.5 * (out.squeeze(1) - target) ** 2

    for method in ("sam", "asam", "msam", "rwsam"):
        out = sharpness_gradient(model, squared, x, y, method=method, rho=RHO, m=2, lam=1.0)
        assert torch.equal(model.weight.grad, torch.zeros_like(model.weight))
        assert out["loss"] == out["perturbed_loss"] == 0.0
    eps = perturbation("adaptive", [torch.zeros(3)], [torch.ones(3)], 0.1, [0.01])
    assert torch.equal(eps[0], torch.zeros(3))


# -- the SAM optimizer class ---------------------------------------------------------------------------
def sam_class_step(model, opt, x, y):
    def closure():
        loss = ce(model(x), y).mean()
        loss.backward()
        return loss

    return opt.step(closure)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_class_equals_sharpness_gradient_plus_base_step(adaptive):
    x, y = batch()
    a, b = make_mlp(), make_mlp()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=RHO, adaptive=adaptive, adaptive_eta=ETA, lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = sam_class_step(a, opt_a, x, y)
        info = sharpness_gradient(b, ce, x, y, method="asam" if adaptive else "sam", rho=RHO, adaptive_eta=ETA)
        opt_b.step()
        opt_b.zero_grad()
        assert loss.item() == pytest.approx(info["loss"], rel=1e-12)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_sam_class_two_step_api_matches_oracle_and_restores_exactly():
    model, (x, y) = make_mlp(), batch()
    w = weights_of(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.5)
    ce(model(x), y).mean().backward()
    opt.first_step(zero_grad=True)
    perturbed = weights_of(model)
    g = grad_at(w, x, y)
    assert_all_close(perturbed, shifted(w, [RHO * t / flat_norm(g) for t in g]))
    ce(model(x), y).mean().backward()
    opt.second_step(zero_grad=True)
    expected = [a - 0.5 * b for a, b in zip(w, oracle_sam(w, x, y))]
    assert_all_close(weights_of(model), expected)
    assert all(p.grad is None for p in model.parameters())


def test_sam_class_state_dict_round_trip_continues_identically():
    x, y = batch()
    straight = make_mlp()
    opt = SAM(straight.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(6):
        sam_class_step(straight, opt, x, y)
        sched.step()

    first = make_mlp()
    opt1 = SAM(first.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9, weight_decay=1e-3)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    for _ in range(3):
        sam_class_step(first, opt1, x, y)
        sched1.step()
    saved = copy.deepcopy({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()})
    assert saved["opt"]["base"]["state"], "the base optimizer's momentum must be saved"

    resumed = make_mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = SAM(resumed.parameters(), torch.optim.SGD, rho=0.01, lr=7.0, momentum=0.9, weight_decay=1e-3)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == RHO
    for _ in range(3):
        sam_class_step(resumed, opt2, x, y)
        sched2.step()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert opt2.base_optimizer.param_groups[0]["lr"] == opt.base_optimizer.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_lr_scheduler_on_either_optimizer_reaches_both():
    model = make_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=1.0)
    torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda epoch: 0.25)
    assert opt.param_groups[0]["lr"] == 0.25
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5)
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5


# -- boundaries ------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    """Python control flow on a tensor value: fine in a loop, impossible under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        return out if out.sum() > 0 else -out


def test_model_that_cannot_be_vmapped_asks_for_the_loop():
    torch.manual_seed(0)
    model, (x, y) = DataDependent().to(DTYPE), batch()
    with pytest.raises(ValueError, match="impl='loop'"):
        sharpness_gradient(model, ce, x, y, method="msam", rho=RHO, m=2, impl="vmap")
    sharpness_gradient(model, ce, x, y, method="msam", rho=RHO, m=2, impl="loop")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "adam"}, "method"),
        ({"method": "msam", "m": 3}, "m"),
        ({"method": "msam", "m": None}, "m"),
        ({"method": "msam", "m": 16}, "m"),
        ({"method": "nsam"}, "perturb_batch"),
        ({"method": "sam", "rho": -0.1}, "rho"),
        ({"method": "sam", "rho": float("nan")}, "rho"),
        ({"method": "msam", "m": 2, "impl": "jit"}, "impl"),
        ({"method": "rwsam", "estimator": "hutch"}, "estimator"),
        ({"method": "rwsam", "delta": 0.0}, "delta"),
        ({"method": "rwsam", "lam": -1.0}, "lam"),
        ({"method": "asam", "adaptive_eta": -1.0}, "adaptive_eta"),
        ({"method": "rwsam", "generator": 3}, "generator"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    model, (x, y) = make_mlp(), batch()
    kwargs = {"rho": RHO, **kwargs}
    with pytest.raises(ValueError, match=f"^{field}:"):
        sharpness_gradient(model, ce, x, y, **kwargs)


def test_bad_loss_and_batch_shapes_name_the_field():
    model, (x, y) = make_mlp(), batch()
    with pytest.raises(ValueError, match="^loss_fn:"):
        sharpness_gradient(model, lambda o, t: ce(o, t).mean(), x, y, method="sam", rho=RHO)
    with pytest.raises(ValueError, match="^y:"):
        sharpness_gradient(model, ce, x, y[:5], method="sam", rho=RHO)


def test_sam_class_rejects_bad_arguments():
    params = list(make_mlp().parameters())
    with pytest.raises(ValueError, match="^base_optimizer:"):
        SAM(params, torch.optim.SGD(params, lr=0.1))
    with pytest.raises(ValueError, match="^rho:"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="^closure:"):
        SAM(params, torch.optim.SGD, lr=0.1).step()
    with pytest.raises(ValueError, match="^first_step:"):
        SAM(params, torch.optim.SGD, lr=0.1).first_step()
    with pytest.raises(ValueError, match="^state_dict:"):
        SAM(params, torch.optim.SGD, lr=0.1).load_state_dict({"state": {}})
