"""Hessian engine against the dense Hessian of tiny float64 models (torch.autograd.functional.hessian)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from samlab.hessian import (
    extreme_eigenvalues,
    hessian_trace,
    hvp,
    lambda_max_metric,
    layer_groups,
    spectral_density,
    top_eigenvalues,
)
from samlab.hessian_operator import HessianOperator
from samlab.losses import mean_loss
from tests.helpers import chart_specs, plotly_array

CE = mean_loss("classification")
MSE = mean_loss("regression")


# -- tiny models and data ---------------------------------------------------------------------------
def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()


class BNDropoutNet(nn.Module):
    """Conv → BatchNorm → tanh → dropout → linear: BatchNorm and dropout both active in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.bn(self.conv(x))))
        return self.head(h.flatten(1))


def bn_dropout_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = BNDropoutNet().double()
    with torch.no_grad():  # non-trivial running statistics, as after training
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


def classification_data(n: int = 40, shape=(6,), classes: int = 4, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def dense_hessian(model, loss_fn, batches, names=None, mode="eval") -> torch.Tensor:
    """The oracle: the full Hessian of the size-weighted mean loss, by reverse-over-reverse autograd."""
    was_training = model.training
    model.train(mode == "train")
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = names or list(base)
    sizes = [base[n].numel() for n in names]

    def loss_of(flat):
        pieces = {n: t.view_as(base[n]) for n, t in zip(names, flat.split(sizes))}
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # train-mode BN must not touch the model
        total = sum(len(x) * loss_fn(functional_call(model, {**base, **buffers, **pieces}, (x,)), y) for x, y in batches)
        return total / sum(len(x) for x, _ in batches)

    flat = torch.cat([base[n].reshape(-1) for n in names])
    hess = torch.autograd.functional.hessian(loss_of, flat, vectorize=True)
    model.train(was_training)
    return hess


def hutchinson_sd(H: torch.Tensor, n: int) -> float:
    """Standard deviation of the mean of n Rademacher quadratic forms zᵀHz: Var(zᵀHz) = 2 (‖H‖_F² − Σ H_ii²)."""
    return math.sqrt(2 * (float((H**2).sum()) - float((H.diag() ** 2).sum())) / n)


def hutch_plus_plus_sd(H: torch.Tensor, sketch: torch.Tensor, g: int) -> float:
    """Standard deviation of Hutch++'s estimate given its sketch S [s × dim]: with Q an orthonormal basis of
    range(H Sᵀ) and P = I − QQᵀ, tr(QᵀHQ) is exact and the rest is the mean of g forms zᵀ(PHP)z."""
    q = torch.linalg.qr(H @ sketch.T, mode="reduced").Q
    projector = torch.eye(H.shape[0], dtype=H.dtype) - q @ q.T
    return hutchinson_sd(projector @ H @ projector, g)


@pytest.fixture
def rademacher_draws(monkeypatch) -> list[torch.Tensor]:
    """The Rademacher blocks the Hessian operator draws (in order: Hutch++ sketch S, then its probes)."""
    from samlab.hessian_operator import HessianOperator

    draws: list[torch.Tensor] = []
    original = HessianOperator.random_vectors

    def recording(self, count, seed, kind="gaussian"):
        out = original(self, count, seed, kind)
        if kind == "rademacher":
            draws.append(out.detach().double().cpu())
        return out

    monkeypatch.setattr(HessianOperator, "random_vectors", recording)
    return draws


def as64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- hvp ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["func", "autograd"])
def test_hvp_matches_dense_hessian(impl):
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert rel_err(hvp(model, CE, data, v, impl=impl), H @ v) < 1e-5
    stack = torch.randn(5, H.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert rel_err(hvp(model, CE, data, stack, impl=impl), stack @ H) < 1e-5


def test_hvp_regression_loss_and_per_sample_loss_is_averaged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Softplus(), nn.Linear(8, 1)).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    y = torch.randn(30, dtype=torch.float64)
    H = dense_hessian(model, MSE, [(x, y)])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    per_sample = lambda out, t: 0.5 * (out.reshape(t.shape) - t) ** 2  # noqa: E731
    assert rel_err(hvp(model, MSE, (x, y), v), H @ v) < 1e-5
    assert rel_err(hvp(model, per_sample, (x, y), v), H @ v) < 1e-5


def test_one_batch_and_uneven_batches_agree():
    model, (x, y) = mlp(), classification_data(n=41)
    batches = [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])]
    H = dense_hessian(model, CE, [(x, y)])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel_err(hvp(model, CE, batches, v), H @ v) < 1e-5
    one = top_eigenvalues(model, CE, (x, y), k=3, tol=1e-9)
    split = top_eigenvalues(model, CE, iter(batches), k=3, tol=1e-9)
    assert torch.allclose(as64(one.values), as64(split.values), rtol=1e-7)


# -- eigenvalues -------------------------------------------------------------------------------------
def test_top_and_bottom_k_match_dense_eigenvalues():
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    exact = torch.linalg.eigvalsh(H)  # ascending
    assert exact[0] < 0  # the test needs negative curvature to find
    top = top_eigenvalues(model, CE, data, k=4, tol=1e-8)
    bottom = top_eigenvalues(model, CE, data, k=3, which="smallest", tol=1e-8)
    assert top.converged and bottom.converged and top.mode == "eval"
    assert torch.allclose(as64(top.values), exact.flip(0)[:4], rtol=1e-5, atol=0)
    assert torch.allclose(as64(bottom.values), exact[:3].flip(0), rtol=1e-5, atol=0)
    for values, vectors in ((top.values, top.vectors), (bottom.values, bottom.vectors)):
        residual = vectors @ H - as64(values)[:, None] * vectors
        assert float(residual.norm(dim=1).max()) < 1e-5 * max(abs(v) for v in values)
        assert torch.allclose(vectors @ vectors.T, torch.eye(len(values), dtype=torch.float64), atol=1e-8)


@pytest.mark.parametrize("basis_size", [None, 14])
def test_one_lanczos_run_gives_both_ends_of_the_dense_spectrum(basis_size):
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    exact = torch.linalg.eigvalsh(H)  # ascending
    result = extreme_eigenvalues(model, CE, data, k=4, tol=1e-8, basis_size=basis_size, max_iter=3000)
    top, bottom = result.largest, result.smallest
    assert top.converged and bottom.converged and top.which == "largest" and bottom.which == "smallest"
    assert top.n_hvp == bottom.n_hvp == result.n_hvp
    assert torch.allclose(as64(top.values), exact.flip(0)[:4], rtol=1e-6, atol=0)
    assert torch.allclose(as64(bottom.values), exact[:4].flip(0), rtol=1e-6, atol=0)
    for values, vectors in ((top.values, top.vectors), (bottom.values, bottom.vectors)):
        residual = vectors @ H - as64(values)[:, None] * vectors
        assert float(residual.norm(dim=1).max()) < 1e-6 * max(abs(v) for v in values)
    if basis_size is None:  # fewer products than the two ends computed one after the other
        separate = (top_eigenvalues(model, CE, data, k=4, tol=1e-8).n_hvp
                    + top_eigenvalues(model, CE, data, k=4, which="smallest", tol=1e-8).n_hvp)
        assert result.n_hvp < separate
    only_top = extreme_eigenvalues(model, CE, data, k=2, smallest=False, tol=1e-8)
    assert only_top.smallest is None
    assert torch.allclose(as64(only_top.largest.values), exact.flip(0)[:2], rtol=1e-6, atol=0)


def test_the_shared_lanczos_run_starts_with_the_density_first_run():
    model, data = mlp(), classification_data()
    alone = spectral_density(model, CE, data, n_runs=3, n_steps=15, seed=4)
    result = extreme_eigenvalues(model, CE, data, k=2, tol=1e-8, seed=4, slq_steps=15)
    nodes, weights = result.slq_run
    assert torch.allclose(as64(nodes), as64(alone.nodes[0]), rtol=0, atol=1e-10)
    assert torch.allclose(as64(weights), as64(alone.weights[0]), rtol=0, atol=1e-10)
    shared = spectral_density(model, CE, data, n_runs=3, n_steps=15, seed=4, first_runs=[result.slq_run])
    assert shared.n_hvp == alone.n_hvp - 15
    assert shared.nodes[1:] == alone.nodes[1:]
    assert torch.allclose(as64(shared.density), as64(alone.density), rtol=1e-8, atol=1e-12)
    short = extreme_eigenvalues(model, CE, data, k=1, tol=0.5, seed=4, slq_steps=15, max_iter=10)
    assert short.slq_run is None  # stopped before the quadrature run was complete


def test_thick_restart_with_small_basis_still_converges():
    model, data = mlp(), classification_data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, CE, [data])).flip(0)
    small = top_eigenvalues(model, CE, data, k=3, tol=1e-8, basis_size=8, max_iter=2000)
    assert small.converged
    assert torch.allclose(as64(small.values), exact[:3], rtol=1e-5, atol=0)


def test_params_subset_gives_the_sub_block_spectrum():
    model, data = mlp(), classification_data()
    names = ["0.weight", "0.bias"]
    block = dense_hessian(model, CE, [data], names=names)
    exact = torch.linalg.eigvalsh(block).flip(0)
    by_name = top_eigenvalues(model, CE, data, k=2, params=names, tol=1e-9)
    by_tensor = top_eigenvalues(model, CE, data, k=2, params=[model[0].bias, model[0].weight], tol=1e-9)
    assert by_name.param_names == names == by_tensor.param_names
    assert torch.allclose(as64(by_name.values), exact[:2], rtol=1e-5, atol=0)
    assert torch.allclose(as64(by_tensor.values), exact[:2], rtol=1e-5, atol=0)
    assert layer_groups(model) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}


def test_batchnorm_and_dropout_in_eval_mode_match_dense():
    model = bn_dropout_net()
    data = classification_data(n=24, shape=(1, 5, 5), classes=3)
    H = dense_hessian(model, CE, [data], mode="eval")
    exact = torch.linalg.eigvalsh(H).flip(0)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert rel_err(hvp(model, CE, data, v), H @ v) < 1e-5
    top = top_eigenvalues(model, CE, data, k=2, tol=1e-9)
    assert top.mode == "eval"
    assert torch.allclose(as64(top.values), exact[:2], rtol=1e-5, atol=0)


def test_train_mode_uses_batch_statistics_and_leaves_buffers_alone():
    model = bn_dropout_net()
    model.drop.p = 0.0  # dropout's masks are random in train mode; BatchNorm is what this test is about
    data = classification_data(n=24, shape=(1, 5, 5), classes=3)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    H_train = dense_hessian(model, CE, [data], mode="train")
    H_eval = dense_hessian(model, CE, [data], mode="eval")
    assert rel_err(H_train, H_eval) > 1e-3  # the two modes are different Hessians
    v = torch.randn(H_train.shape[0], dtype=torch.float64)
    for impl in ("func", "autograd"):
        assert rel_err(hvp(model, CE, data, v, mode="train", impl=impl), H_train @ v) < 1e-5
    result = top_eigenvalues(model, CE, data, k=1, mode="train", tol=1e-9)
    assert result.mode == "train"
    assert math.isclose(result.values[0], float(torch.linalg.eigvalsh(H_train)[-1]), rel_tol=1e-5)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, buffers[name]), name


def test_model_parameters_modes_and_grads_unchanged():
    model = bn_dropout_net()
    model.train()
    model.bn.eval()  # a mixed state must come back exactly
    model.head.weight.grad = torch.ones_like(model.head.weight)
    data = classification_data(n=16, shape=(1, 5, 5), classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    top_eigenvalues(model, CE, data, k=2)
    top_eigenvalues(model, CE, data, k=1, backend="pyhessian", max_iter=20)
    hessian_trace(model, CE, data, n_samples=9)
    spectral_density(model, CE, data, n_runs=1, n_steps=5)
    hvp(model, CE, data, torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64), mode="train")
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert model.conv.weight.grad is None
    assert "forward" not in vars(model.bn)  # the eval-mode affine BatchNorm forward is gone again


@pytest.mark.parametrize("variant", ["affine", "no-affine", "no-running-stats"])
def test_eval_mode_batchnorm_products_match_dense(variant):
    # In eval mode the operator computes BatchNorm with running statistics as its affine map; the oracle
    # runs torch's own BatchNorm. Without running statistics eval-mode BatchNorm uses the batch's: untouched.
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(5, affine=variant != "no-affine", track_running_stats=variant != "no-running-stats")
    model = nn.Sequential(nn.Linear(6, 5), norm, nn.Tanh(), nn.Linear(5, 3)).double()
    if norm.running_mean is not None:
        with torch.no_grad():
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    sentinel = norm.forward
    norm.forward = sentinel  # an instance-level forward of the model's own is kept
    data = classification_data(n=24, shape=(6,), classes=3)
    H = dense_hessian(model, CE, [data], mode="eval")
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel_err(hvp(model, CE, data, v), H @ v) < 1e-10
    assert rel_err(hvp(model, CE, data, v, impl="func"), H @ v) < 1e-10
    assert vars(norm)["forward"] is sentinel
    with HessianOperator(model, CE, data):  # a copy made meanwhile and put in train mode uses batch statistics
        import copy

        twin = copy.deepcopy(model).train()
    assert torch.equal(twin(data[0]), model.train()(data[0]))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("budget", [2048.0, 0.0])  # graphs kept, or rebuilt at every product
def test_worker_threads_split_the_samples_and_match_dense(threads, budget):
    import threading

    model = bn_dropout_net()
    x, y = classification_data(n=25, shape=(1, 5, 5), classes=3)
    batches = [(x[:10], y[:10]), (x[10:17], y[10:17]), (x[17:], y[17:])]
    H = dense_hessian(model, CE, batches)
    vectors = torch.randn(4, H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    seen: list[tuple[str, int]] = []  # (thread, samples) of every forward
    hook = model.conv.register_forward_hook(lambda m, i, o: seen.append((threading.current_thread().name, len(i[0]))))
    before = torch.get_num_threads()
    caller = threading.current_thread().name
    try:
        with HessianOperator(model, CE, batches, threads=threads, graph_budget_mb=budget) as op:
            assert torch.get_num_threads() == 1  # the caller's own ops leave the cores to the workers
            products = op.matmat(vectors)
        assert torch.get_num_threads() == before
        # the graph-budget probe (8 samples) runs in the caller, the graphs in the workers
        assert [n for name, n in seen if name == caller] == ([8] if budget else [])
        in_workers = sorted(n for name, n in seen if name != caller)
        seen.clear()
        with HessianOperator(model, CE, batches, threads=1, graph_budget_mb=budget) as op:
            single = op.matmat(vectors)
        with HessianOperator(model, CE, batches, mode="train", threads=threads) as op:
            op.matmat(vectors[:1])
    finally:
        hook.remove()
    assert rel_err(products, vectors @ H) < 1e-10
    assert rel_err(products, single) < 1e-13
    if budget:  # samples do not interact: one kept graph per worker over a share of them
        assert in_workers == sorted(len(part) for part in torch.tensor_split(x, threads))
    else:  # the batches as given, spread over the workers; one graph each for the 4 vectors
        assert in_workers == sorted(len(b) for b, _ in batches)
    assert {name for name, _ in seen} == {caller}  # threads=1, and train mode: in the caller


def test_worker_threads_leave_a_thread_count_set_meanwhile():
    model, data = mlp(), classification_data()
    before = torch.get_num_threads()
    try:
        with HessianOperator(model, CE, data, threads=2) as op:
            op.matvec(torch.ones(op.dim, dtype=torch.float64))
            torch.set_num_threads(3)  # e.g. a run worker's thread governor, ticked by the task
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("now", [1, 2])
def test_a_run_workers_governor_sets_the_shares_and_how_many_workers_compute_them_now(monkeypatch, now):
    """Under a thread governor the operator splits the samples into its largest count of shares and
    computes them on as many workers as it allows at the moment: the same sums (to rounding)."""
    import threading
    import types

    from samlab.runs import cores

    model = bn_dropout_net()
    x, y = classification_data(n=30, shape=(1, 5, 5), classes=3)
    vectors = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=torch.float64,
                          generator=torch.Generator().manual_seed(7))
    with HessianOperator(model, CE, (x, y), threads=3) as op:  # no governor: three workers
        reference = op.matmat(vectors)
    governor = types.SimpleNamespace(most=3, threads=now)
    monkeypatch.setattr(cores, "_process_governor", governor)
    seen: list[str] = []
    # the first product's first forward on each worker waits until `now` workers have reached it: if the
    # lanes ran one after another on one worker, the barrier would break (the pool starts a worker lazily)
    together = threading.Barrier(now, timeout=60)

    def record(module, inputs, output):
        name = threading.current_thread().name
        seen.append(name)
        if name.startswith("hvp") and sum(s.startswith("hvp") for s in seen) <= now:
            together.wait()

    hook = model.conv.register_forward_hook(record)
    try:
        with HessianOperator(model, CE, (x, y)) as op:  # threads: the governor's most
            assert op.threads == 3
            products = op.matmat(vectors)
            governor.threads = 3
            assert rel_err(op.matmat(vectors), reference) < 1e-13
    finally:
        hook.remove()
    assert rel_err(products, reference) < 1e-13  # the same shares summed in the same order, on fewer workers
    first_product = [name for name in seen[:4] if name.startswith("hvp")]  # 3 graphs (+ the budget probe)
    assert len(first_product) == 3 and len(set(first_product)) == now


def test_products_do_not_import_sympy():
    # torch.autograd.grad with grad_outputs imports sympy (~0.6 s) on first use; the products avoid it
    import subprocess
    import sys

    code = ("import sys, torch; from samlab.hessian import hvp; from torch import nn\n"
            "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
            "data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))\n"
            "from samlab.losses import mean_loss\n"
            "hvp(model, mean_loss('classification'), data, torch.randn(2, 26), threads=2)\n"
            "hvp(model, mean_loss('classification'), data, torch.randn(26), threads=1)\n"
            "print('sympy' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


class SmoothGate(torch.autograd.Function):
    """x · tanh(x) with a hand-written (differentiable) backward and no forward-mode rule or
    setup_context, so torch.func cannot transform it but double backward works."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        t = torch.tanh(x)
        return grad_out * (t + x * (1 - t * t))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(SmoothGate.apply(self.a(x)))


def test_automatic_fallback_to_double_backward():
    torch.manual_seed(0)
    model = GatedNet().double()
    data = classification_data(n=20, shape=(4,), classes=3)
    H = dense_hessian(model, CE, [data])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    with pytest.raises(RuntimeError):
        hvp(model, CE, data, v, impl="func")
    assert rel_err(hvp(model, CE, data, v, impl="auto"), H @ v) < 1e-5


# -- trace -------------------------------------------------------------------------------------------
# The reported stderr is a sample standard deviation over the draws: checked against the exact one within
# a factor that the sample spread of 30 draws (Hutchinson) or 10 (the remainder of Hutch++ at 30) allows.
STDERR_FACTOR = {"hutchinson": 1.5, "hutch++": 2.5}


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_trace_within_three_standard_errors(method, rademacher_draws):
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    exact = float(torch.trace(H))
    result = hessian_trace(model, CE, data, n_samples=30, method=method, seed=5)
    assert result.method == method and result.n_hvp == 30
    assert 0 < result.stderr < abs(exact)
    # the estimator's spread computed from the dense Hessian, not from the estimator
    if method == "hutchinson":
        sd = hutchinson_sd(H, 30)
    else:
        sketch, probes = rademacher_draws
        assert len(sketch) == 10 and len(probes) == 10  # the budget 30 = 2 × 10 sketch products + 10 probes
        sd = hutch_plus_plus_sd(H, sketch, len(probes))
    assert abs(result.mean - exact) <= 3 * sd
    assert sd / STDERR_FACTOR[method] <= result.stderr <= sd * STDERR_FACTOR[method]


def test_hutch_plus_plus_beats_hutchinson_on_a_decaying_spectrum(rademacher_draws):
    # Least squares on inputs with geometrically decaying scales: H = E[(x, 1)(x, 1)ᵀ] has a fast-decaying
    # spectrum, the case Hutch++ is built for (its sketch captures the top directions exactly).
    torch.manual_seed(0)
    model = nn.Linear(40, 1).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 40, generator=gen, dtype=torch.float64) * 0.7 ** torch.arange(40, dtype=torch.float64)
    data = (x, torch.randn(200, generator=gen, dtype=torch.float64))
    H = dense_hessian(model, MSE, [data])
    exact = float(torch.trace(H))
    plain = hessian_trace(model, MSE, data, n_samples=30, method="hutchinson", seed=2)
    deflated = hessian_trace(model, MSE, data, n_samples=30, method="hutch++", seed=2)
    sketch, probes = rademacher_draws[1:]  # after the Hutchinson run's 30 vectors
    sds = {"hutchinson": hutchinson_sd(H, 30), "hutch++": hutch_plus_plus_sd(H, sketch, len(probes))}
    for result in (plain, deflated):
        sd = sds[result.method]
        assert abs(result.mean - exact) <= 3 * result.stderr
        assert abs(result.mean - exact) <= 3 * sd
        assert sd / STDERR_FACTOR[result.method] <= result.stderr <= sd * STDERR_FACTOR[result.method]
    assert deflated.stderr < 0.1 * plain.stderr
    assert sds["hutch++"] < 0.1 * sds["hutchinson"]


def block_positions(model, blocks):
    starts = torch.tensor([0] + [p.numel() for _, p in model.named_parameters()]).cumsum(0)
    where = {n: torch.arange(int(starts[i]), int(starts[i + 1])) for i, (n, _) in enumerate(model.named_parameters())}
    return {b: torch.cat([where[n] for n in names]) for b, names in blocks.items()}


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_block_traces_from_shared_probes_are_unbiased_with_honest_stderr(method, rademacher_draws):
    # Every block's trace from the whole-Hessian products: over 200 seeds the mean is within 4 standard
    # errors of the dense block trace, the estimates sum to the total, and each run's reported stderr
    # matches the estimator's exact spread (from the dense Hessian and the run's own sketch).
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    blocks = layer_groups(model)
    index = block_positions(model, blocks)
    exact = {b: float(H[i][:, i].trace()) for b, i in index.items()}
    estimates = {b: [] for b in blocks}
    ratios = {b: [] for b in blocks}
    spreads = {b: [] for b in blocks}
    for seed in range(200):
        rademacher_draws.clear()
        r = hessian_trace(model, CE, data, n_samples=30, method=method, seed=seed, blocks=blocks)
        assert math.isclose(sum(m for m, _ in r.blocks.values()), r.mean, rel_tol=1e-10)
        if method == "hutch++":
            sketch, probes = rademacher_draws
            q = torch.linalg.qr(H @ sketch.T, mode="reduced").Q
            deflate = torch.eye(H.shape[0], dtype=H.dtype) - q @ q.T
        else:
            deflate, probes = torch.eye(H.shape[0], dtype=H.dtype), rademacher_draws[0]
        for b, i in index.items():
            estimates[b].append(r.blocks[b][0])
            select = torch.zeros_like(H)
            select[i, i] = 1
            a = deflate @ select @ H @ deflate  # the remainder zᵀAz averages: Var = 2 Σ_{i≠j} sym(A)_ij²
            sd = hutchinson_sd(0.5 * (a + a.T), len(probes))
            ratios[b].append(r.blocks[b][1] / sd)
            spreads[b].append(sd)
    for b in blocks:
        values = torch.tensor(estimates[b])
        stderr = float(values.std() / math.sqrt(len(values)))
        assert abs(float(values.mean()) - exact[b]) <= 4 * stderr, b
        assert 0.8 <= float(torch.tensor(ratios[b]).mean()) <= 1.1, b  # E[sample sd] is a bit below sd
        # given the sketch only the remainder is random: the spread over seeds is the exact sd's rms
        rms_sd = math.sqrt(float((torch.tensor(spreads[b]) ** 2).mean()))
        assert 0.8 * rms_sd <= float(values.std()) <= 1.25 * rms_sd, b


def test_exact_trace_and_block_traces_equal_the_dense_ones():
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    blocks = layer_groups(model)
    r = hessian_trace(model, CE, data, method="exact", blocks=blocks)
    assert r.n_hvp == H.shape[0] and r.stderr == 0 and r.method == "exact"
    assert math.isclose(r.mean, float(torch.trace(H)), rel_tol=1e-10)
    for b, i in block_positions(model, blocks).items():
        assert math.isclose(r.blocks[b][0], float(H[i][:, i].trace()), rel_tol=1e-10) and r.blocks[b][1] == 0
    alone = hessian_trace(model, CE, data, method="exact", params=blocks["2"])
    assert alone.n_hvp == 44 and math.isclose(alone.mean, r.blocks["2"][0], rel_tol=1e-10)
    with pytest.raises(ValueError, match="blocks"):
        hessian_trace(model, CE, data, blocks={"a": ["0.weight"], "b": ["0.weight"]})
    with pytest.raises(ValueError, match="blocks"):
        hessian_trace(model, CE, data, params=["0.bias"], blocks={"a": ["0.weight"]})


def test_trace_with_full_sketch_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)).double()  # 14 parameters
    data = classification_data(n=20, shape=(3,), classes=2)
    exact = float(torch.trace(dense_hessian(model, CE, [data])))
    result = hessian_trace(model, CE, data, n_samples=48, method="hutch++")  # sketch of 16 ≥ 14 columns
    assert math.isclose(result.mean, exact, rel_tol=1e-9)
    assert result.stderr < 1e-9 * abs(exact)


# -- density -----------------------------------------------------------------------------------------
def test_density_is_normalised_and_its_mean_estimates_trace_over_dim():
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    dim = H.shape[0]
    n_runs = 6
    result = spectral_density(model, CE, data, n_runs=n_runs, n_steps=20, seed=1)
    for w in result.weights:
        assert math.isclose(sum(w), 1.0, rel_tol=1e-10)
    grid, density = as64(result.grid), as64(result.density)
    assert float(density.min()) >= 0
    assert math.isclose(float(torch.trapezoid(density, grid)), 1.0, rel_tol=1e-4)
    # mean of the quadrature = Hutchinson with n_runs Rademacher vectors, whose variance is known exactly:
    # Var(zᵀHz) = 2 (‖H‖_F² − Σ H_ii²)
    stderr = hutchinson_sd(H, n_runs) / dim
    assert abs(result.mean - float(torch.trace(H)) / dim) <= 4 * stderr
    assert math.isclose(float(torch.trapezoid(density * grid, grid)), result.mean, rel_tol=1e-3, abs_tol=1e-6)


def test_density_nodes_are_exact_eigenvalues_when_the_krylov_space_is_exhausted():
    model, data = mlp(), classification_data()
    H = dense_hessian(model, CE, [data])
    exact = torch.linalg.eigvalsh(H)
    result = spectral_density(model, CE, data, n_runs=1, n_steps=H.shape[0], seed=0)
    nodes, weights = as64(result.nodes[0]), as64(result.weights[0])
    heavy = nodes[weights > 1e-6]
    distance = (heavy[:, None] - exact[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-6 * float(exact.abs().max())
    assert math.isclose(float(nodes.max()), float(exact.max()), rel_tol=1e-8)


# -- PyHessian backend -------------------------------------------------------------------------------
def pyhessian_error_bound(exact_desc: torch.Tensor, tol: float) -> float:
    """Power iteration stopped when the Rayleigh quotient changes by < tol (relative) is off by about
    tol / (1 − (λ₂/λ₁)²); PyHessian's normalisation v / (‖v‖ + 1e-6) adds a bias of 2e-6 / λ₁."""
    ratio = float(exact_desc[1] / exact_desc[0]) ** 2
    return tol / (1 - ratio) + 2e-6 / float(exact_desc[0])


def test_pyhessian_backend_agrees_on_the_top_eigenvalue():
    model, data = mlp(), classification_data()
    exact = torch.linalg.eigvalsh(dense_hessian(model, CE, [data])).flip(0)
    ours = top_eigenvalues(model, CE, data, k=1, tol=1e-8)
    tol = 1e-4
    theirs = top_eigenvalues(model, CE, data, k=1, tol=tol, max_iter=1000, backend="pyhessian", seed=0)
    assert theirs.backend == "pyhessian" and theirs.n_hvp > 1
    assert math.isclose(ours.values[0], float(exact[0]), rel_tol=1e-6)
    assert math.isclose(theirs.values[0], ours.values[0], rel_tol=pyhessian_error_bound(exact, tol))
    assert abs(float(theirs.vectors[0] @ ours.vectors[0])) > 0.99


def test_pyhessian_backend_with_several_batches_and_trace():
    model, (x, y) = mlp(), classification_data()
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    H = dense_hessian(model, CE, [(x, y)])
    exact = torch.linalg.eigvalsh(H).flip(0)
    theirs = top_eigenvalues(model, CE, batches, k=1, tol=1e-4, max_iter=1000, backend="pyhessian")
    assert math.isclose(theirs.values[0], float(exact[0]), rel_tol=pyhessian_error_bound(exact, 1e-4))
    trace = hessian_trace(model, CE, batches, n_samples=40, backend="pyhessian", tol=1e-12)
    assert trace.backend == "pyhessian" and len(trace.samples) == 40 == trace.n_hvp
    assert abs(trace.mean - float(torch.trace(H))) <= 3 * trace.stderr
    sd = hutchinson_sd(H, 40)  # PyHessian draws Rademacher vectors too
    assert abs(trace.mean - float(torch.trace(H))) <= 3 * sd
    assert sd / STDERR_FACTOR["hutchinson"] <= trace.stderr <= sd * STDERR_FACTOR["hutchinson"]


# -- training hook and validation --------------------------------------------------------------------
def test_lambda_max_metric_is_the_eval_mode_top_eigenvalue_and_restores_train_mode():
    model = bn_dropout_net()
    model.train()
    data = classification_data(n=24, shape=(1, 5, 5), classes=3)
    exact = float(torch.linalg.eigvalsh(dense_hessian(model, CE, [data], mode="eval"))[-1])
    value = lambda_max_metric(model, CE, data, tol=1e-6, max_iter=100, seed=0)
    assert math.isclose(value, exact, rel_tol=1e-5)
    assert model.training and model.bn.training


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 0}, "k"),
        ({"which": "middle"}, "which"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"mode": "test"}, "mode"),
        ({"backend": "scipy"}, "backend"),
        ({"params": ["nope"]}, "params"),
        ({"k": 1000, "max_iter": 5000}, "k"),
        ({"k": 3, "max_iter": 2}, "max_iter"),
        ({"impl": "jax"}, "impl"),
        ({"threads": 0}, "threads"),
        ({"which": "smallest", "backend": "pyhessian"}, "which"),
        ({"params": ["0.bias"], "backend": "pyhessian"}, "params"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    model, data = mlp(), classification_data()
    with pytest.raises(ValueError, match=rf"^{field}:"):
        top_eigenvalues(model, CE, data, **kwargs)


def test_bad_data_and_trace_arguments():
    model, data = mlp(), classification_data()
    with pytest.raises(ValueError, match="^data:"):
        hvp(model, CE, [], torch.zeros(74, dtype=torch.float64))
    with pytest.raises(ValueError, match="^v:"):
        hvp(model, CE, data, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="^n_samples:"):
        hessian_trace(model, CE, data, n_samples=4)
    with pytest.raises(ValueError, match="^method:"):
        hessian_trace(model, CE, data, method="dense")
    with pytest.raises(ValueError, match="^n_steps:"):
        spectral_density(model, CE, data, n_steps=0)


# -- background task and the training hook (a real checkpoint) ---------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A digits CNN (BatchNorm) trained for two epochs with the λ_max hook on the whole train set."""
    from samlab.checkpoints import load_trained
    from samlab.config import preset
    from samlab.reporting import RecordingReporter
    from samlab.train import run

    workdir = tmp_path_factory.mktemp("hessian-run")
    cfg = preset("digits-cnn", {"data.n_train": 64, "data.n_test": 32, "model.width": 4, "epochs": 2,
                                "batch_size": 32, "device": "cpu", "hessian_every": 2, "hessian_samples": 64})
    reporter = RecordingReporter()
    checkpoint = run(cfg, reporter, workdir=workdir).checkpoint
    trained = load_trained(checkpoint)  # the oracle: dense float64 Hessian on the whole train set, eval mode
    model, data = trained.model.double(), trained.data
    H = dense_hessian(model, CE, [(data.x_train.double(), data.y_train)])
    return checkpoint, reporter, H, model


def test_training_hook_logs_lambda_max_of_the_eval_mode_hessian(trained_run):
    _, reporter, H, _ = trained_run
    steps = {step: values for kind, step, values in reporter.rows if kind == "step"}
    assert sorted(steps) == [1, 2, 3, 4] and [s for s in steps if "lambda_max" in steps[s]] == [2, 4]
    # the whole train set is the probe: the last value is λ_max of the final model
    assert math.isclose(steps[4]["lambda_max"], float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-3)


def task_params(path, **overrides):
    params = {"checkpoint": str(path), "k": 3, "n_samples": None, "batch_size": 24, "trace_samples": 12,
              "density_runs": 2, "density_steps": 8, "tol": 1e-6, "device": "cpu"}
    return {**params, **overrides}


def test_task_result_matches_the_dense_hessian(trained_run, tmp_path, rademacher_draws):
    from samlab.reporting import RecordingReporter
    from samlab.tasks.hessian import check_task, run_task

    checkpoint, _, H, model = trained_run
    reporter = RecordingReporter()
    result = run_task(task_params(checkpoint), reporter, tmp_path, resume=False)
    exact = torch.linalg.eigvalsh(H)
    scale = float(exact.abs().max())
    assert result["complete"] and result["mode"] == "eval" and result["n_samples"] == 64
    assert torch.allclose(as64(result["eigenvalues"]["largest"]["values"]), exact.flip(0)[:3], rtol=0, atol=1e-4 * scale)
    assert torch.allclose(as64(result["eigenvalues"]["smallest"]["values"]), exact[:3].flip(0), rtol=0, atol=1e-4 * scale)
    trace = result["trace"]
    assert abs(trace["mean"] - float(exact.sum())) <= 3 * trace["stderr"] + 1e-5 * abs(float(exact.sum()))
    # the spectrum's start vector (the density's first run), then the trace stage's Hutch++ draws
    sketch, probes = rademacher_draws[1:3]
    assert len(sketch) == 4 and len(probes) == 4  # trace_samples 12 = 2 × 4 + 4
    sd = hutch_plus_plus_sd(H, sketch, len(probes))
    assert abs(trace["mean"] - float(exact.sum())) <= 3 * sd + 1e-5 * abs(float(exact.sum()))
    assert all(math.isclose(sum(w), 1.0, rel_tol=1e-6) for w in result["density"]["weights"])
    layers = {row["layer"]: row for row in result["per_layer"]}
    assert set(layers) == set(layer_groups(model))
    positions = torch.arange(H.shape[0]).split([p.numel() for p in model.parameters()])
    position = dict(zip([n for n, _ in model.named_parameters()], positions))
    for layer, names in layer_groups(model).items():
        index = torch.cat([position[n] for n in names])  # the layer's sub-block of the full Hessian
        top = float(torch.linalg.eigvalsh(H[index][:, index])[-1])
        assert math.isclose(layers[layer]["lambda_max"], top, rel_tol=1e-4, abs_tol=1e-6 * scale), layer
        assert_block_trace(layers[layer], float(H[index][:, index].trace()), scale, trace_samples=12)
    assert {row["trace_method"] for row in layers.values()} == {"exact", "hutch++ (whole-Hessian products)"}
    assert reporter.results[-1] == result
    assert reporter.progress_calls[-1][0] == reporter.progress_calls[-1][1]
    assert check_task(task_params(checkpoint))["digest"] == result_digest(checkpoint)


def assert_block_trace(row, exact, scale, trace_samples):
    if row["n_params"] <= trace_samples:
        assert row["trace_method"] == "exact" and row["trace_stderr"] == 0
        assert math.isclose(row["trace"], exact, rel_tol=1e-4, abs_tol=1e-6 * scale), row["layer"]
    else:
        assert row["trace_stderr"] > 0 and abs(row["trace"] - exact) <= 4 * row["trace_stderr"] + 1e-5 * scale


def test_task_per_layer_hutch_plus_plus_runs_when_asked(trained_run, tmp_path):
    from samlab.reporting import RecordingReporter
    from samlab.tasks.hessian import run_task

    checkpoint, _, H, model = trained_run
    params = task_params(checkpoint, density=False, layer_trace_samples=12)
    result = run_task(params, RecordingReporter(), tmp_path, resume=False)
    scale = float(torch.linalg.eigvalsh(H).abs().max())
    positions = torch.arange(H.shape[0]).split([p.numel() for p in model.parameters()])
    position = dict(zip([n for n, _ in model.named_parameters()], positions))
    for row in result["per_layer"]:
        index = torch.cat([position[n] for n in row["params"]])
        assert row["trace_method"] == ("exact" if row["n_params"] <= 12 else "hutch++")
        assert_block_trace(row, float(H[index][:, index].trace()), scale, trace_samples=12)


def result_digest(path):
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_task_stops_after_a_stage_and_resumes_without_recomputing(trained_run, tmp_path):
    from samlab.reporting import RecordingReporter
    from samlab.tasks.hessian import run_task

    class StopAfterFirstStage(RecordingReporter):
        def result(self, value):
            super().result(value)
            self.stop_requested = True

    checkpoint = trained_run[0]
    params = task_params(checkpoint, per_layer=False, density=False)
    first = run_task(params, StopAfterFirstStage(), tmp_path, resume=False)
    assert not first["complete"] and first["done"] == ["spectrum"]
    again = RecordingReporter()
    resumed = run_task(params, again, tmp_path, resume=True)
    assert resumed["complete"] and resumed["done"] == ["spectrum", "trace"]
    assert resumed["eigenvalues"] == first["eigenvalues"]
    assert not any(message.startswith("spectrum") for _, _, message in again.progress_calls)


def test_resumed_density_takes_its_first_run_from_the_saved_spectrum(trained_run, tmp_path):
    from samlab.reporting import RecordingReporter
    from samlab.tasks.hessian import run_task

    class StopAfterFirstStage(RecordingReporter):
        def result(self, value):
            super().result(value)
            self.stop_requested = True

    params = task_params(trained_run[0], per_layer=False, density_runs=2, density_steps=8)
    first = run_task(params, StopAfterFirstStage(), tmp_path / "a", resume=False)
    assert first["done"] == ["spectrum"]
    resumed = run_task(params, RecordingReporter(), tmp_path / "a", resume=True)
    whole = run_task(params, RecordingReporter(), tmp_path / "b", resume=False)
    assert resumed["done"] == whole["done"] == ["spectrum", "trace", "density"]
    assert resumed["density"]["n_hvp"] == whole["density"]["n_hvp"] == 8  # one run computed, one reused
    assert resumed["density"]["nodes"] == whole["density"]["nodes"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"checkpoint": "/nonexistent/checkpoint.pt"}, "checkpoint"),
        ({"k": 0}, "k"),
        ({"mode": "test"}, "mode"),
        ({"trace_samples": 3}, "trace_samples"),
        ({"density": "yes"}, "density"),
        ({"tol": 2.0}, "tol"),
        ({"max_iter": 2}, "max_iter"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_check_task_names_the_bad_field(trained_run, overrides, field):
    from samlab.tasks.hessian import check_task

    checkpoint = trained_run[0]
    with pytest.raises(ValueError, match=rf"^{field}:"):
        check_task(task_params(checkpoint, **overrides))


# -- the Hessian page --------------------------------------------------------------------------------
def test_hessian_page_draws_a_cached_analysis_and_the_lambda_max_trajectory(trained_run, tmp_path, monkeypatch):
    import os
    import time
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from dashboard import hessian_view
    from samlab.reporting import RecordingReporter
    from samlab.runs import jobs
    from samlab.runs.store import Store
    from samlab.tasks.hessian import run_task

    url = f"sqlite:///{tmp_path / 'runs' / 'samlab.db'}"
    monkeypatch.setenv("SAMLAB_STORE", url)
    monkeypatch.setattr(jobs, "ensure_scheduler", lambda store=None: False)
    store = Store(url)
    checkpoint, reporter, _, _ = trained_run
    from samlab.checkpoints import load_trained

    train_params = load_trained(checkpoint).config.to_dict()
    (train_id,) = store.create_runs([{"kind": "train", "params": train_params, "name": "tiny cnn"}])
    store.start_run(train_id, pid=os.getpid(), host="test", device="cpu")
    rows = [(kind, step, name, float(v), time.time()) for kind, step, values in reporter.rows for name, v in values.items()]
    store.flush(train_id, rows, progress=1.0, message="completed")
    store.finish_run(train_id, "completed", summary={}, checkpoint_path=str(checkpoint))
    # the analysis the page asks for with these URL settings, computed for real and stored as cached
    request = hessian_view.request(str(checkpoint), k=2, n_samples=64, trace_samples=12, mode="eval", seed=0,
                                   per_layer=True)
    analysis_id = jobs.submit_cached("hessian", request, store=store)
    result = run_task(request, RecordingReporter(), tmp_path / "analysis", resume=False)
    store.start_run(analysis_id, pid=os.getpid(), host="test", device="cpu")
    store.finish_run(analysis_id, "completed", result=result, summary={})

    at = AppTest.from_file(str(Path(__file__).resolve().parent.parent / "pages" / "3_Hessian.py"), default_timeout=120)
    at.query_params.update({"k": "2", "n_samples": "64", "trace": "12", "mode": "eval", "seed": "0", "per_layer": "1"})
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.multiselect(key="hessian.runs").set_value([train_id]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert not [b for b in at.button if b.key == f"hessian.submit.{train_id}"]  # cached: nothing to submit
    summary = at.dataframe[0].value
    assert summary["λ_max"].iloc[0] == pytest.approx(result["eigenvalues"]["largest"]["values"][0])
    assert summary["trace"].iloc[0] == pytest.approx(result["trace"]["mean"])
    # the λ_max-trajectory picker follows the runs compared above, so its chart is drawn too
    assert list(chart_specs(at)) == ["hessian.eigenvalues", "hessian.density", "hessian.layers", "hessian.trajectory"]
    assert at.multiselect(key="hessian.trajectory_runs").value == [train_id]
    at.multiselect(key="hessian.trajectory_runs").set_value([train_id]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = chart_specs(at)["hessian.trajectory"]
    # legend names end with the run's short id; the trained run is "tiny cnn"
    curves = {trace["name"].rsplit(" · ", 1)[0]: plotly_array(trace["y"]) for trace in spec["data"]}
    logged = [values["lambda_max"] for _, _, values in reporter.rows if "lambda_max" in values]
    assert curves["tiny cnn"] == pytest.approx(logged)
    assert curves["2/η · tiny cnn"] == pytest.approx([2 / v["lr"] for _, _, v in reporter.rows if "lr" in v])


def test_view_builders_draw_partial_results():
    from dashboard import hessian_view

    partial = {"eigenvalues": {"largest": {"values": [3.0, 1.0]}}, "lr": 0.1, "mode": "eval", "per_layer": []}
    names, values = hessian_view._eigen_bars(partial)
    assert names == ["λ1", "λ2"] and values == [3.0, 1.0]
    table = hessian_view.summary_table([("run", partial)])
    assert table["λ_max · η / 2"].iloc[0] == pytest.approx(0.15) and table["2/η"].iloc[0] == pytest.approx(20.0)
    assert len(hessian_view.density_figure([("run", partial)]).data) == 0  # an empty-state figure
    full = {**partial, "eigenvalues": {"largest": {"values": [3.0]}, "smallest": {"values": [-0.1, -0.5]}}}
    assert hessian_view._eigen_bars(full) == (["λ1", "λn−1", "λn"], [3.0, -0.1, -0.5])
