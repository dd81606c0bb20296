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
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from samlab.hessian_operator import HessianOperator, select_parameter_names
from samlab.hessian_pyhessian import pyhessian_eigenvalues, pyhessian_trace
from samlab.reporting import Reporter
from samlab.tensors import Data, LossFn, ParamSelection

BACKENDS = ("samlab", "pyhessian")
TRACE_METHODS = ("hutch++", "hutchinson", "exact")
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
class SpectrumResult:
    largest: EigenResult
    smallest: EigenResult | None
    slq_run: tuple[list[float], list[float]] | None  # (Ritz values, weights) of the first slq_steps steps
    n_hvp: int  # of the one shared Lanczos run


@dataclass
class TraceResult:
    mean: float
    stderr: float
    n_hvp: int
    mode: str
    method: str
    backend: str
    samples: list[float] = field(repr=False)  # the stochastic terms the stderr comes from
    blocks: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (trace of H_bb, stderr)


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
    threads: int | None = None,
) -> torch.Tensor:
    """H v, H the Hessian of the mean loss over `data` w.r.t. the selected parameters.

    `v` is a flat vector (the selected parameters concatenated in `model.named_parameters()`
    order, each flattened row-major; length = their total size), or a [k, dim] stack of them.
    impl: "func" (torch.func forward-over-reverse), "autograd" (double backward) or "auto".
    threads: worker threads for the products on a CPU (None: torch's intra-op thread count); every
    analysis here takes it (see `HessianOperator`).
    """
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl, threads=threads) as op:
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
    threads: int | None = None,
    basis_size: int | None = None,
    reporter: Reporter | None = None,
) -> EigenResult:
    """The k largest (or most negative, which="smallest") eigenvalues of the loss Hessian.

    Thick-restart Lanczos with full reorthogonalization on H from a Gaussian start vector drawn with
    `seed`, keeping the wanted end's Ritz vectors at a restart; stops when each wanted Ritz pair's residual is below
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
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl, threads=threads) as op:
        if k > op.dim:
            raise ValueError(f"k: must be at most the number of selected parameters {op.dim} (got {k})")
        ends = (k, 0) if which == "largest" else (0, k)
        run = _extreme_lanczos(op, ends, tol, max_iter, seed, op.random_vectors(1, seed)[0],
                               _capacity(basis_size, k, 1, 0, op.dim), reporter)
        return run.result(which, op)


def extreme_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    k: int = 1,
    *,
    smallest: bool = True,
    tol: float = 1e-6,
    max_iter: int = 500,
    seed: int = 0,
    slq_steps: int = 0,
    params: ParamSelection = None,
    mode: str = "eval",
    impl: str = "auto",
    threads: int | None = None,
    basis_size: int | None = None,
    reporter: Reporter | None = None,
) -> SpectrumResult:
    """The k largest and (`smallest`) the k most negative eigenvalues from one Lanczos run.

    The extreme Ritz values of a Krylov space converge first at both ends, so one thick-restart
    Lanczos run on H (full reorthogonalization; at a restart both ends' Ritz vectors are kept) serves
    both; it stops once every wanted pair at either end meets `top_eigenvalues`' residual test
    (|λ − θ| ≤ tol·|θ|), or after `max_iter` Hessian-vector products.
    The start vector is the normalized Rademacher vector that `spectral_density` starts its first run
    from with the same seed, and the first `slq_steps` steps are plain Lanczos steps (no restart
    before them; the basis holds at least `slq_steps` vectors): with `slq_steps` = its `n_steps`,
    `slq_run` is that first quadrature run, node for node (None if the run ended before them), and
    `spectral_density(..., first_runs=[result.slq_run])` takes it instead of recomputing it.
    """
    _check_common(k=k, which="largest", tol=tol, max_iter=max_iter, backend="samlab")
    if not isinstance(slq_steps, int) or isinstance(slq_steps, bool) or slq_steps < 0:
        raise ValueError(f"slq_steps: must be an integer >= 0 (got {slq_steps!r})")
    ends = (k, k if smallest else 0)
    if max_iter < sum(ends):
        raise ValueError(f"max_iter: Lanczos needs at least {sum(ends)} Hessian-vector products (got {max_iter})")
    reporter = reporter or Reporter()
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl, threads=threads) as op:
        if sum(ends) > op.dim:
            raise ValueError(f"k: {'2k' if smallest else 'k'} must be at most the number of selected parameters "
                             f"{op.dim} (got k = {k})")  # fmt: skip
        start = op.random_vectors(1, seed, "rademacher")[0]
        capacity = _capacity(basis_size, k, 1 + smallest, slq_steps, op.dim)
        run = _extreme_lanczos(op, ends, tol, max_iter, seed, start, capacity, reporter, slq_steps)
        return SpectrumResult(run.result("largest", op), run.result("smallest", op) if smallest else None,
                              run.slq, op.n_hvp)  # fmt: skip


def _capacity(basis_size: int | None, k: int, n_ends: int, slq_steps: int, dim: int) -> int:
    """Lanczos basis size: default max(n_ends·(2k + 20), 40, slq_steps); at least n_ends·(k + 2) and
    slq_steps unless it covers the whole space."""
    if basis_size is None:
        return max(n_ends * (2 * k + 20), 40, slq_steps)
    needed = max(n_ends * (k + 2), slq_steps)
    if basis_size < needed and basis_size < dim:
        raise ValueError(f"basis_size: must be at least {needed} (got {basis_size})")
    return basis_size


@dataclass
class _LanczosRun:
    lanczos: _Lanczos
    wanted: dict[str, torch.Tensor]  # "largest" / "smallest" -> Ritz indices (ascending θ order)
    converged: bool
    slq: tuple[list[float], list[float]] | None

    def result(self, which: str, op: HessianOperator) -> EigenResult:
        theta, s, residual = self.lanczos.ritz()
        wanted = self.wanted[which]
        vectors = self.lanczos.ritz_vectors(s[:, wanted])
        values = theta[wanted].tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        return EigenResult(
            values=[values[i] for i in order],
            vectors=vectors[order],
            residuals=[float(residual[wanted][i]) for i in order],
            n_hvp=op.n_hvp,
            mode=op.mode,
            which=which,
            converged=self.converged,
            backend="samlab",
            param_names=list(op.names),
        )


def _extreme_lanczos(op: HessianOperator, ends: tuple[int, int], tol: float, max_iter: int, seed: int,
                     start: torch.Tensor, capacity: int, reporter: Reporter, slq_steps: int = 0) -> _LanczosRun:
    """Thick-restart Lanczos on H until the `ends` = (k largest, k smallest) Ritz pairs converge; the
    quadrature rule (Ritz values, squared first components) after the first `slq_steps` steps is kept."""
    gen = torch.Generator().manual_seed(int(seed))
    lanczos = _Lanczos(op.matvec, start, capacity)
    distinct = min(op.dim, sum(ends))
    slq = None
    while True:
        lanczos.extend()
        theta, s, residual = lanczos.ritz()
        wanted = _wanted(lanczos.m, ends)
        converged = lanczos.m >= distinct and all(
            _ritz_converged(theta, residual, index, tol, lanczos.eps) for index in wanted.values())
        if slq_steps and slq is None and (lanczos.m == min(slq_steps, op.dim) or lanczos.broke_down()):
            slq = (theta.tolist(), (s[0] ** 2).tolist())  # before any restart: a plain run from `start`
        reporter.progress(op.n_hvp, max_iter, f"Lanczos: {op.n_hvp} Hessian-vector products")
        if (converged and (slq is not None or not slq_steps)) or op.n_hvp >= max_iter or reporter.should_stop():
            break
        if lanczos.broke_down():
            if lanczos.m >= op.dim:
                converged = True
                break
            lanczos.restart_with_random(gen)
        if lanczos.m == lanczos.capacity:
            lanczos.restart(_kept(lanczos.m, ends, lanczos.capacity))
    return _LanczosRun(lanczos, wanted, bool(converged), slq)


def _wanted(m: int, ends: tuple[int, int]) -> dict[str, torch.Tensor]:
    top, bottom = ends
    wanted = {}
    if top:
        wanted["largest"] = torch.arange(m - 1, max(m - 1 - top, -1), -1)
    if bottom:
        wanted["smallest"] = torch.arange(0, min(bottom, m))
    return wanted


def _kept(m: int, ends: tuple[int, int], capacity: int) -> torch.Tensor:
    """Thick restart: at each wanted end keep k + half the rest of that end's share of the basis."""
    n_ends = sum(1 for k in ends if k)
    share, limit = capacity // n_ends, (m - 1) // n_ends
    top, bottom = (min(k + (share - k) // 2, limit) if k else 0 for k in ends)
    return torch.cat([torch.arange(0, bottom), torch.arange(m - 1, m - 1 - top, -1)])


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
    threads: int | None = None,
    tol: float = 1e-3,
    blocks: dict[str, Sequence[str]] | None = None,
    reporter: Reporter | None = None,
) -> TraceResult:
    """tr(H) from `n_samples` Hessian-vector products, with a standard error.

    Hutchinson: tr(H) ≈ (1/n) Σ zᵢᵀ H zᵢ, zᵢ Rademacher; stderr = sample std / √n.
    "exact": Σᵢ eᵢᵀ H eᵢ over the coordinate vectors (dim products, n_samples unused), stderr 0; for
    small parameter selections (fewer parameters than a stochastic budget would spend).
    Hutch++ (Meyer et al. 2021), budget n = 2s + g: S Rademacher [dim × s], Q = orth(H S);
    tr(H) ≈ tr(Qᵀ H Q) + (1/g) Σⱼ gⱼᵀ (I − QQᵀ) H (I − QQᵀ) gⱼ. Given Q the first term is exact and
    the second an unbiased Hutchinson estimate of tr((I − QQᵀ) H (I − QQᵀ)), so stderr is the
    sample std of those g terms / √g (the deflated remainder's spread; it vanishes when Q captures
    the whole range of H). The sketches go through vmapped batches of HVPs.
    `blocks` ({name: parameter names}, disjoint): the trace of each diagonal block H_bb too, from the
    same products. With P_b the projector on the block's coordinates, tr(H_bb) = tr(P_b H) =
    tr(Qᵀ P_b H Q) + tr((I − QQᵀ) P_b H (I − QQᵀ)) (cyclicity, I − QQᵀ idempotent): the first term is
    exact from the sketch's products, the second the mean of gⱼ,bᵀ (H gⱼ)_b over the deflated probes,
    unbiased (E[ggᵀ] = I) with its own sample stderr, which includes the coupling of the block to the
    other coordinates (Hutchinson: z_bᵀ (H z)_b likewise). The block estimates sum to the total one.
    backend="pyhessian": PyHessian's `hessian.trace(maxIter=n_samples, tol=tol)` (Hutchinson that
    stops early once the running mean changes by less than tol relative).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method: must be one of {', '.join(TRACE_METHODS)} (got {method!r})")
    min_samples = {"hutch++": 6, "hutchinson": 2, "exact": 1}[method]
    if not isinstance(n_samples, int) or n_samples < min_samples:
        raise ValueError(f"n_samples: must be an integer >= {min_samples} for {method} (got {n_samples!r})")
    _check_backend(backend)
    blocks = dict(blocks or {})
    if backend == "pyhessian":
        if blocks:
            raise ValueError("blocks: the pyhessian backend estimates the whole trace only")
        samples, n_hvp = pyhessian_trace(model, loss_fn, data, n_samples, tol, seed, params, mode)
        if len(samples) > 1:
            means, stderrs = _means_and_stderrs(torch.tensor(samples, dtype=torch.float64)[:, None])
            mean, stderr = float(means[0]), stderrs[0]
        else:
            mean, stderr = samples[0], float("nan")
        return TraceResult(mean, stderr, n_hvp, "eval", "hutchinson", "pyhessian", samples)
    reporter = reporter or Reporter()
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl, threads=threads) as op:
        index = _block_index(op, blocks)
        if method == "exact":
            totals, stderrs, drawn = _exact_trace(op, index, len(blocks)).tolist(), [0.0] * (1 + len(blocks)), []
        else:
            if method == "hutchinson":
                probes = op.random_vectors(n_samples, seed, "rademacher")
                exact, samples = torch.zeros(1 + len(blocks)), _forms(probes, op.matmat(probes), index, len(blocks))
            else:
                exact, samples = _hutch_plus_plus(op, n_samples, seed, reporter, index, len(blocks))
            means, stderrs = _means_and_stderrs(samples)
            totals, drawn = (exact + means).tolist(), samples[:, 0].tolist()
        reporter.progress(n_samples, n_samples, "trace")
        return TraceResult(totals[0], stderrs[0], op.n_hvp, mode, method, "samlab", drawn,
                           {name: (totals[1 + i], stderrs[1 + i]) for i, name in enumerate(blocks)})  # fmt: skip


def _hutch_plus_plus(op: HessianOperator, n_samples: int, seed: int, reporter: Reporter, index, n_blocks: int):
    s = n_samples // 3
    g = n_samples - 2 * s
    sketch = op.matmat(op.random_vectors(s, seed, "rademacher"))
    reporter.progress(s, n_samples, "trace: range sketch")
    q = torch.linalg.qr(sketch.T.double(), mode="reduced").Q.T.to(op.dtype)  # [≤s, dim]
    probes = op.random_vectors(g, seed + 1, "rademacher")
    probes = probes - (probes @ q.T) @ q
    products = op.matmat(torch.cat([q, probes]))
    exact = _forms(q, products[: len(q)], index, n_blocks).sum(dim=0)
    return exact, _forms(probes, products[len(q) :], index, n_blocks)


def _exact_trace(op: HessianOperator, index, n_blocks: int, chunk: int = 64) -> torch.Tensor:
    """Σᵢ eᵢᵀ H eᵢ over the coordinate vectors (dim products), with the block sums."""
    total = torch.zeros(1 + n_blocks, dtype=torch.float64)
    for first in range(0, op.dim, chunk):
        rows = torch.arange(first, min(first + chunk, op.dim))
        basis = torch.zeros(len(rows), op.dim, device=op.device, dtype=op.dtype)
        basis[torch.arange(len(rows)), rows.to(op.device)] = 1
        total += _forms(basis, op.matmat(basis), index, n_blocks).sum(dim=0)
    return total


def _forms(vectors: torch.Tensor, products: torch.Tensor, index: torch.Tensor | None, n_blocks: int) -> torch.Tensor:
    """Per row: vᵀ(H v) in column 0, then its sum over each block's coordinates (v_bᵀ (H v)_b)."""
    terms = vectors.double() * products.double()
    columns = [terms.sum(dim=1, keepdim=True)]
    if index is not None:
        parts = torch.zeros(len(terms), n_blocks + 1, dtype=terms.dtype, device=terms.device)
        columns.append(parts.index_add_(1, index, terms)[:, :n_blocks])  # the last column: outside every block
    return torch.cat(columns, dim=1).cpu()


def _block_index(op: HessianOperator, blocks: dict[str, Sequence[str]]) -> torch.Tensor | None:
    """The block number of each flat coordinate (len(blocks) for coordinates outside every block)."""
    if not blocks:
        return None
    owner: dict[str, int] = {}
    for number, (name, names) in enumerate(blocks.items()):
        for param in names:
            if param not in op.names:
                raise ValueError(f"blocks: {param!r} (block {name!r}) is not among the selected parameters")
            if param in owner:
                raise ValueError(f"blocks: {param!r} is in more than one block")
            owner[param] = number
    pieces = [torch.full((n,), owner.get(param, len(blocks)), dtype=torch.long) for param, n in zip(op.names, op.numels)]
    return torch.cat(pieces).to(op.device)


def _means_and_stderrs(samples: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Column means, and standard errors = sample std / √n (unbiased variance)."""
    return samples.mean(dim=0), (samples.std(dim=0, unbiased=True) / math.sqrt(len(samples))).tolist()


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
    threads: int | None = None,
    first_runs: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    reporter: Reporter | None = None,
) -> DensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature with Gaussian broadening.

    Each run starts Lanczos (full reorthogonalization) from a normalized Rademacher vector v and
    takes `n_steps` steps (fewer if the Krylov space becomes invariant); the Ritz values θⱼ of T with
    weights wⱼ = (first component of T's j-th eigenvector)² form a Gauss quadrature rule for the
    spectral measure seen from v: Σ wⱼ g(θⱼ) ≈ vᵀ g(H) v, an unbiased estimate of tr(g(H)) / dim.
    density(t) = (1/n_runs) Σ_runs Σⱼ wⱼ N(t; θⱼ, σ²); `sigma` defaults to 1% of the Ritz range, the
    default grid spans the Ritz values ± 6σ with `grid` points (or pass the grid itself).
    `first_runs`: (Ritz values, weights) of runs already made from this seed's first start vectors
    (e.g. `extreme_eigenvalues(..., slq_steps=n_steps).slq_run`); only the remaining runs are computed.
    """
    for name, value in (("n_runs", n_runs), ("n_steps", n_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be a positive integer (got {value!r})")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma: must be > 0 (got {sigma!r})")
    if len(first_runs) > n_runs:
        raise ValueError(f"first_runs: at most n_runs = {n_runs} runs (got {len(first_runs)})")
    reporter = reporter or Reporter()
    nodes = [[float(x) for x in xs] for xs, _ in first_runs]
    weights = [[float(w) for w in ws] for _, ws in first_runs]
    with HessianOperator(model, loss_fn, data, params=params, mode=mode, impl=impl, threads=threads) as op:
        starts = op.random_vectors(n_runs, seed, "rademacher") / math.sqrt(op.dim)
        for run, start in enumerate(starts):
            if run < len(first_runs):
                continue
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
    "SpectrumResult",
    "TraceResult",
    "extreme_eigenvalues",
    "hessian_trace",
    "hvp",
    "lambda_max_metric",
    "layer_groups",
    "spectral_density",
    "top_eigenvalues",
]

