"""Hessian spectra of a model's mean loss: top/bottom eigenvalues, trace, spectral density, per-layer.

Everything goes through `HessianOperator` (samlab/hessian_operator.py), v ↦ H v on flat parameter
vectors (the selected parameters concatenated in `named_parameters()` order). Algorithms:

- `top_eigenvalues`: thick-restart Lanczos with full reorthogonalization (Lanczos 1950; Wu & Simon,
  SIAM J. Matrix Anal. Appl. 2000). A Ritz pair (θ, y) of the projected matrix T = V H Vᵀ has the
  residual ‖H y − θ y‖ = β |e_mᵀ s| (β the norm of the next Lanczos vector, s the eigenvector of T);
  iteration stops once every wanted pair has residual ≤ tol · max(|θ|, ε^(2/3) ‖T‖), which bounds
  |λ − θ| ≤ tol |θ| (Kahan–Parlett–Jiang; the ε^(2/3) floor is ARPACK's, for eigenvalues near 0).
- `hessian_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021) or Hutchinson (1989).
- `spectral_density`: stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017;
  Ghorbani, Krishnan & Xiao 2019; PyHessian, Yao et al. 2020) with Gaussian broadening.
- `backend="pyhessian"` runs PyHessian 0.1's power iteration / Hutchinson for cross-checks.

The model's mode is explicit ("eval" by default: BatchNorm running statistics, no dropout) and
recorded in every result; the model's modes and parameters are left as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from samlab.hessian_operator import HessianOperator, select_parameter_names
from samlab.hessian_pyhessian import pyhessian_eigenvalues, pyhessian_trace
from samlab.reporting import Reporter
from samlab.tensors import Data, LossFn, ParamSelection

BACKENDS = ("samlab", "pyhessian")
TRACE_METHODS = ("hutch++", "hutchinson")
WHICH = ("largest", "smallest")


# -- results -----------------------------------------------------------------------------------------
@dataclass
class EigenResult:
    values: list[float]  # descending (for which="smallest" the last one is the most negative)
    vectors: torch.Tensor = field(repr=False)  # [k, dim] unit rows, same order as values
    residuals: list[float]  # ‖H y − θ y‖ per pair (samlab backend)
    n_hvp: int
    mode: str
    which: str
    converged: bool
    backend: str
    param_names: list[str] = field(repr=False)


@dataclass
class TraceResult:
    mean: float
    stderr: float
    n_hvp: int
    mode: str
    method: str
    backend: str
    samples: list[float] = field(repr=False)  # the stochastic terms the stderr comes from


@dataclass
class DensityResult:
    grid: list[float]
    density: list[float]  # Gaussian-broadened, integrates to 1 over the grid
    nodes: list[list[float]]  # Ritz values per run
    weights: list[list[float]]  # quadrature weights per run (each run sums to 1)
    sigma: float
    n_hvp: int
    mode: str

    @property
    def mean(self) -> float:
        """Σ weights · nodes averaged over runs: a Hutchinson estimate of tr(H) / dim."""
        per_run = [sum(w * x for w, x in zip(ws, xs)) for ws, xs in zip(self.weights, self.nodes)]
        return sum(per_run) / len(per_run)


# -- Hessian-vector product ------------------------------------------------------------------------
def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    v: torch.Tensor,
    *,
    params: ParamSelection = None,
    mode: str = "eval",
    impl: str = "auto",
) -> torch.Tensor:
    """H v, H the Hessian of the mean loss over `data` w.r.t. the selected parameters.

    `v` is a flat vector (the selected parameters concatenated in `model.named_parameters()`
    order, each flattened row-major; length = their total size), or a [k, dim] stack of them.
    impl: "func" (torch.func forward-over-reverse), "autograd" (double backward) or "auto".
    """
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl) as op:
        return op.matmat(v) if v.ndim == 2 else op.matvec(v)


# -- Lanczos ---------------------------------------------------------------------------------------
class _Lanczos:
    """Lanczos basis V (rows) with full reorthogonalization for a symmetric operator `apply`.

    Keeps T = V A Vᵀ (float64) and the next residual f, so that A Vᵀ = Vᵀ T + f e_mᵀ holds (to
    rounding) after every `extend`. `restart(keep)` compresses to the kept Ritz vectors (thick
    restart); the relation is restored by the next `extend`.
    """

    def __init__(self, apply, start: torch.Tensor, capacity: int) -> None:
        self.apply = apply
        self.dim = start.numel()
        self.capacity = min(capacity, self.dim)
        self.V = torch.zeros(self.capacity, self.dim, dtype=start.dtype, device=start.device)
        self.T = torch.zeros(self.capacity, self.capacity, dtype=torch.float64)
        self.m = 0
        self.f = start.clone()
        self.beta = float(start.norm())
        self.eps = torch.finfo(start.dtype).eps
        self.scale = 0.0  # running estimate of ‖A‖ for the breakdown test

    def broke_down(self) -> bool:
        """The basis spans an invariant subspace (the next residual is rounding noise)."""
        return self.m > 0 and self.beta <= 64 * self.eps * max(self.scale, 1e-300) * math.sqrt(self.m)

    def extend(self) -> None:
        v = self._orthogonalize(self.f.clone())
        v /= v.norm()
        self.V[self.m] = v
        w = self.apply(v)
        basis = self.V[: self.m + 1]
        h = basis @ w
        w -= basis.T @ h
        correction = basis @ w  # second Gram-Schmidt pass (DGKS): keeps V orthonormal to rounding
        w -= basis.T @ correction
        h = (h + correction).double().cpu()
        self.T[: self.m + 1, self.m] = h
        self.T[self.m, : self.m + 1] = h
        self.m += 1
        self.f = w
        self.beta = float(w.norm())
        self.scale = max(self.scale, float(h.abs().max()))

    def restart_with_random(self, generator: torch.Generator) -> None:
        """After a breakdown, continue in the orthogonal complement with a fresh random direction."""
        fresh = torch.randn(self.dim, generator=generator, dtype=torch.float64)
        self.f = self._orthogonalize(fresh.to(device=self.V.device, dtype=self.V.dtype))
        self.beta = float(self.f.norm())

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), eigenvectors of T, and residual norms β |last row|."""
        theta, s = torch.linalg.eigh(self.T[: self.m, : self.m])
        return theta, s, self.beta * s[-1].abs()

    def ritz_vectors(self, s: torch.Tensor) -> torch.Tensor:
        return s.T.to(dtype=self.V.dtype, device=self.V.device) @ self.V[: self.m]

    def restart(self, keep: torch.Tensor) -> None:
        """Thick restart: keep the Ritz vectors with indices `keep` (f stays as the next direction)."""
        theta, s, _ = self.ritz()
        kept = self.ritz_vectors(s[:, keep])
        p = len(keep)
        self.V[:p] = kept
        self.V[p:] = 0
        self.T.zero_()
        self.T[:p, :p] = torch.diag(theta[keep])
        self.m = p

    def _orthogonalize(self, x: torch.Tensor) -> torch.Tensor:
        basis = self.V[: self.m]
        for _ in range(2):
            x -= basis.T @ (basis @ x)
        return x


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
    params: ParamSelection = None,
    mode: str = "eval",
    backend: str = "samlab",
    impl: str = "auto",
    basis_size: int | None = None,
    reporter: Reporter | None = None,
) -> EigenResult:
    """The k largest (or most negative, which="smallest") eigenvalues of the loss Hessian.

    Thick-restart Lanczos with full reorthogonalization on H (or −H for "smallest") from a Gaussian
    start vector drawn with `seed`; stops when each wanted Ritz pair's residual is below
    tol · max(|θ|, ε^(2/3)‖T‖) (so |λ − θ| ≤ tol·|θ|) or after `max_iter` Hessian-vector products.
    `basis_size` vectors are kept in memory (default max(2k + 20, 40), at most dim).
    backend="pyhessian": PyHessian 0.1's power iteration with deflation (`hessian.eigenvalues`),
    tol its relative change between iterations, max_iter its per-eigenvalue iteration cap.
    """
    _check_common(k=k, which=which, tol=tol, max_iter=max_iter, backend=backend)
    if backend == "samlab" and max_iter < k:
        raise ValueError(f"max_iter: Lanczos needs at least k = {k} Hessian-vector products (got {max_iter})")
    if backend == "pyhessian":
        if which != "largest":
            raise ValueError("which: the pyhessian backend computes the largest eigenvalues only")
        values, vectors, n_hvp = pyhessian_eigenvalues(model, loss_fn, data, k, tol, max_iter, seed, params, mode)
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return EigenResult([values[i] for i in order], vectors[order], [], n_hvp, "eval", which, True,
                           "pyhessian", select_parameter_names(model, None))  # fmt: skip
    reporter = reporter or Reporter()
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl) as op:
        if k > op.dim:
            raise ValueError(f"k: must be at most the number of selected parameters {op.dim} (got {k})")
        sign = 1.0 if which == "largest" else -1.0
        capacity = basis_size if basis_size is not None else max(2 * k + 20, 40)
        if capacity < k + 2 and capacity < op.dim:
            raise ValueError(f"basis_size: must be at least k + 2 = {k + 2} (got {capacity})")
        gen = torch.Generator().manual_seed(int(seed))
        start = op.random_vectors(1, seed)[0]
        lanczos = _Lanczos(lambda v: sign * op.matvec(v), start, capacity)
        converged = False
        while True:
            lanczos.extend()
            theta, s, residual = lanczos.ritz()
            wanted = torch.arange(lanczos.m - 1, max(lanczos.m - 1 - k, -1), -1)  # largest first
            converged = lanczos.m >= k and _ritz_converged(theta, residual, wanted, tol, lanczos.eps)
            reporter.progress(op.n_hvp, max_iter, f"Lanczos: {op.n_hvp} Hessian-vector products")
            if converged or op.n_hvp >= max_iter or reporter.should_stop():
                break
            if lanczos.broke_down():
                if lanczos.m >= op.dim:
                    converged = True
                    break
                lanczos.restart_with_random(gen)
            if lanczos.m == lanczos.capacity:
                keep_count = min(lanczos.m - 1, k + (lanczos.capacity - k) // 2)
                lanczos.restart(torch.arange(lanczos.m - 1, lanczos.m - 1 - keep_count, -1))
        wanted = wanted[:k]
        vectors = lanczos.ritz_vectors(s[:, wanted])
        values = (sign * theta[wanted]).tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return EigenResult(
            values=[values[i] for i in order],
            vectors=vectors[order],
            residuals=[float(residual[wanted][i]) for i in order],
            n_hvp=op.n_hvp,
            mode=mode,
            which=which,
            converged=bool(converged),
            backend="samlab",
            param_names=list(op.names),
        )


def _ritz_converged(theta, residual, wanted, tol: float, eps: float) -> bool:
    floor = eps ** (2 / 3) * float(theta.abs().max())
    return bool(all(residual[i] <= tol * max(abs(float(theta[i])), floor) for i in wanted))


# -- trace -----------------------------------------------------------------------------------------
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_samples: int = 99,
    method: str = "hutch++",
    seed: int = 0,
    params: ParamSelection = None,
    mode: str = "eval",
    backend: str = "samlab",
    impl: str = "auto",
    tol: float = 1e-3,
    reporter: Reporter | None = None,
) -> TraceResult:
    """tr(H) from `n_samples` Hessian-vector products, with a standard error.

    Hutchinson: tr(H) ≈ (1/n) Σ zᵢᵀ H zᵢ, zᵢ Rademacher; stderr = sample std / √n.
    Hutch++ (Meyer et al. 2021), budget n = 2s + g: S Rademacher [dim × s], Q = orth(H S);
    tr(H) ≈ tr(Qᵀ H Q) + (1/g) Σⱼ gⱼᵀ (I − QQᵀ) H (I − QQᵀ) gⱼ. Given Q the first term is exact and
    the second an unbiased Hutchinson estimate of tr((I − QQᵀ) H (I − QQᵀ)), so stderr is the
    sample std of those g terms / √g (the deflated remainder's spread; it vanishes when Q captures
    the whole range of H). The sketches go through vmapped batches of HVPs.
    backend="pyhessian": PyHessian's `hessian.trace(maxIter=n_samples, tol=tol)` (Hutchinson that
    stops early once the running mean changes by less than tol relative).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method: must be one of {', '.join(TRACE_METHODS)} (got {method!r})")
    min_samples = 6 if method == "hutch++" else 2
    if not isinstance(n_samples, int) or n_samples < min_samples:
        raise ValueError(f"n_samples: must be an integer >= {min_samples} for {method} (got {n_samples!r})")
    _check_backend(backend)
    if backend == "pyhessian":
        samples, n_hvp = pyhessian_trace(model, loss_fn, data, n_samples, tol, seed, params, mode)
        drawn = torch.tensor(samples, dtype=torch.float64)
        mean, stderr = _mean_and_stderr(drawn) if len(drawn) > 1 else (samples[0], float("nan"))
        return TraceResult(mean, stderr, n_hvp, "eval", "hutchinson", "pyhessian", samples)
    reporter = reporter or Reporter()
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl) as op:
        if method == "hutchinson":
            exact, samples = 0.0, _quadratic_forms(op, op.random_vectors(n_samples, seed, "rademacher"))
        else:
            exact, samples = _hutch_plus_plus(op, n_samples, seed, reporter)
        reporter.progress(n_samples, n_samples, "trace")
        mean, stderr = _mean_and_stderr(samples)
        return TraceResult(exact + mean, stderr, op.n_hvp, mode, method, "samlab", samples.tolist())


def _hutch_plus_plus(op: HessianOperator, n_samples: int, seed: int, reporter: Reporter):
    s = n_samples // 3
    g = n_samples - 2 * s
    sketch = op.matmat(op.random_vectors(s, seed, "rademacher"))
    reporter.progress(s, n_samples, "trace: range sketch")
    q = torch.linalg.qr(sketch.T.double(), mode="reduced").Q.T.to(op.dtype)  # [≤s, dim]
    probes = op.random_vectors(g, seed + 1, "rademacher")
    probes = probes - (probes @ q.T) @ q
    products = op.matmat(torch.cat([q, probes]))
    exact = float((q.double() * products[: len(q)].double()).sum())
    samples = (probes.double() * products[len(q) :].double()).sum(dim=1)
    return exact, samples.cpu()


def _quadratic_forms(op: HessianOperator, vectors: torch.Tensor) -> torch.Tensor:
    return (vectors.double() * op.matmat(vectors).double()).sum(dim=1).cpu()


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    return float(samples.mean()), float(samples.std(unbiased=True) / math.sqrt(len(samples)))


# -- spectral density ------------------------------------------------------------------------------
def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    n_runs: int = 4,
    n_steps: int = 80,
    seed: int = 0,
    sigma: float | None = None,
    grid: int | torch.Tensor | list[float] = 1000,
    params: ParamSelection = None,
    mode: str = "eval",
    impl: str = "auto",
    reporter: Reporter | None = None,
) -> DensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature with Gaussian broadening.

    Each run starts Lanczos (full reorthogonalization) from a normalized Rademacher vector v and
    takes `n_steps` steps (fewer if the Krylov space becomes invariant); the Ritz values θⱼ of T with
    weights wⱼ = (first component of T's j-th eigenvector)² form a Gauss quadrature rule for the
    spectral measure seen from v: Σ wⱼ g(θⱼ) ≈ vᵀ g(H) v, an unbiased estimate of tr(g(H)) / dim.
    density(t) = (1/n_runs) Σ_runs Σⱼ wⱼ N(t; θⱼ, σ²); `sigma` defaults to 1% of the Ritz range, the
    default grid spans the Ritz values ± 6σ with `grid` points (or pass the grid itself).
    """
    for name, value in (("n_runs", n_runs), ("n_steps", n_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer (got {value!r})")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma: must be > 0 (got {sigma!r})")
    reporter = reporter or Reporter()
    nodes, weights = [], []
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl) as op:
        starts = op.random_vectors(n_runs, seed, "rademacher") / math.sqrt(op.dim)
        for run, start in enumerate(starts):
            lanczos = _Lanczos(op.matvec, start, n_steps)
            while lanczos.m < lanczos.capacity and not lanczos.broke_down() and not reporter.should_stop():
                lanczos.extend()
                reporter.progress(run * n_steps + lanczos.m, n_runs * n_steps, f"density: run {run + 1}/{n_runs}")
            theta, s, _ = lanczos.ritz()
            nodes.append(theta.tolist())
            weights.append((s[0] ** 2).tolist())
            if reporter.should_stop():
                break
        n_hvp = op.n_hvp
    all_nodes = torch.tensor([x for run in nodes for x in run], dtype=torch.float64)
    width = float(all_nodes.max() - all_nodes.min())
    sigma = sigma if sigma is not None else max(0.01 * width, 1e-12 * max(1.0, float(all_nodes.abs().max())))
    grid_t = _density_grid(grid, all_nodes, sigma)
    density = _broadened(grid_t, nodes, weights, sigma)
    return DensityResult(grid_t.tolist(), density.tolist(), nodes, weights, sigma, n_hvp, mode)


def _density_grid(grid, nodes: torch.Tensor, sigma: float) -> torch.Tensor:
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError(f"grid: needs at least 2 points (got {grid})")
        return torch.linspace(float(nodes.min()) - 6 * sigma, float(nodes.max()) + 6 * sigma, grid, dtype=torch.float64)
    out = torch.as_tensor(grid, dtype=torch.float64)
    if out.ndim != 1 or len(out) < 2 or not bool((out[1:] > out[:-1]).all()):
        raise ValueError("grid: expected an increasing 1-D sequence of at least 2 points")
    return out


def _broadened(grid: torch.Tensor, nodes, weights, sigma: float) -> torch.Tensor:
    total = torch.zeros_like(grid)
    for xs, ws in zip(nodes, weights):
        x = torch.tensor(xs, dtype=torch.float64)
        w = torch.tensor(ws, dtype=torch.float64)
        z = (grid[:, None] - x[None, :]) / sigma
        total += (torch.exp(-0.5 * z**2) * w).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))
    return total / len(nodes)


# -- the training hook -----------------------------------------------------------------------------
def lambda_max_metric(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Data,
    *,
    tol: float = 1e-3,
    max_iter: int = 50,
    seed: int = 0,
) -> float:
    """λ_max of the Hessian of the mean loss on `batch`, eval mode (BatchNorm statistics untouched).

    For the training engine's "lambda_max" step metric (edge of stability: compare with 2/η).
    The model's mode and parameters are restored; NaN if the loss is not finite.
    """
    value = top_eigenvalues(model, loss_fn, batch, k=1, tol=tol, max_iter=max_iter, seed=seed, mode="eval")
    return float(value.values[0]) if math.isfinite(value.values[0]) else float("nan")


# -- per-layer table -------------------------------------------------------------------------------
def layer_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them ("conv1" → conv1.weight, conv1.bias)."""
    groups: dict[str, list[str]] = {}
    for name in select_parameter_names(model, None):
        owner = name.rsplit(".", 1)[0] if "." in name else "(top level)"
        groups.setdefault(owner, []).append(name)
    return groups


# -- validation ------------------------------------------------------------------------------------
def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {', '.join(BACKENDS)} (got {backend!r})")


def _check_common(*, k: int, which: str, tol: float, max_iter: int, backend: str) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k: must be a positive integer (got {k!r})")
    if which not in WHICH:
        raise ValueError(f"which: must be one of {', '.join(WHICH)} (got {which!r})")
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol: must be in (0, 1) (got {tol!r})")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter: must be a positive integer (got {max_iter!r})")
    _check_backend(backend)


__all__ = [
    "DensityResult",
    "EigenResult",
    "HessianOperator",
    "TraceResult",
    "hessian_trace",
    "hvp",
    "lambda_max_metric",
    "layer_groups",
    "spectral_density",
    "top_eigenvalues",
]

