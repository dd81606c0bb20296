"""Linear stability of SGD at a minimum: coherence, the divergence condition, and exact checks.

Dexter, Ocejo, Keerthi, Gupta, Acharya, Khanna, "A Precise Characterization of SGD Stability Using
Loss Surface Geometry", ICLR 2024. Near a minimum the per-sample losses are quadratics
f_i(w) = ½ wᵀ H_i w with PSD per-sample Hessians H_i, H = (1/n) Σ_i H_i. SGD with Bernoulli
sampling (each sample joins the batch independently with probability B/n, the batch sum divided by
the expected batch size B) steps

    w ← (I − η Ĥ) w,    Ĥ = (1/B) Σ_i z_i H_i,    z_i ~ Bernoulli(B/n) independent.

Second moment. With p = B/n, E[z_i z_j] = p² (i ≠ j) and p (i = j), so
E[Ĥ M Ĥ] = (p²/B²) Σ_{i,j} H_i M H_j + ((p − p²)/B²) Σ_i H_i M H_i = H M H + (1/(nB) − 1/n²) Σ_i H_i M H_i
(because p n / B = 1 and (p − p²)/B² = 1/(nB) − 1/n²). Hence M = E[w wᵀ] evolves by the linear map

    T(M) = (I − η H) M (I − η H) + η² c Σ_i H_i M H_i,    c = 1/(nB) − 1/n²,

which is the constant stated in DESIGN.md. T is self-adjoint for ⟨X, Y⟩ = tr(XᵀY) and maps PSD
matrices to PSD matrices, so its spectral radius is its largest eigenvalue and is attained at a PSD
M (Perron–Frobenius for cone-preserving maps). ρ(T) > 1 means E‖w‖² grows geometrically: the exact
linear-stability boundary on small problems.

Coherence. S_ij = sqrt(tr(H_i H_j)), σ = λ_max(S) / max_i λ_max(H_i), 1 ≤ σ ≤ n. The theorem: SGD is
linearly unstable (the second moment diverges) if λ_max(H) ≥ (σ/η) (n/B − 1)^(−1/2). It is a
sufficient condition only. At B = n the right-hand side is +∞ and the condition never holds:
full-batch GD (c = 0, T(M) = (I − ηH) M (I − ηH)) is stable exactly when η < 2/λ_max(H), see
`gd_stable`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jvp, vmap

from samlab.reporting import Reporter
from samlab.tensors import PerSampleLoss
from samlab.validation import check_int, check_non_empty_list, check_positive

HessianInput = torch.Tensor | Sequence[torch.Tensor]

PSD_RTOL = 1e-8  # (float64; 100·eps for coarser dtypes) asymmetry or eigenvalues below −PSD_RTOL·scale refused
RANK_RTOL = 1e-10  # eigenvalues below RANK_RTOL·(largest eigenvalue) count as zero
EXACT_HESSIAN_BUDGET = 50_000_000  # n·p² entries for dense per-sample Hessians of a model
ETA_SCALES = ("absolute", "gd_limit")  # model check: η as given, or as multiples of 2/λ_max(H)


# -- validation ------------------------------------------------------------------------------------
def check_batch(name: str, value: float, n: int) -> float:
    b = check_positive(name, value)
    if b > n:
        raise ValueError(f"{name}: the expected batch size must lie in (0, n] = (0, {n}] (got {value!r})")
    return b


def check_sigma(value: float, n: int) -> float:
    s = check_positive("sigma", value)
    if not 1.0 - 1e-9 <= s <= n + 1e-9:
        raise ValueError(f"sigma: the coherence lies in [1, n] = [1, {n}] (got {value!r})")
    return s


def check_repeats(params: dict[str, Any]) -> dict[str, Any]:
    """The settings of repeated SGD runs (repeats, steps, seed, blowup), checked and normalised."""
    out = dict(params)
    for name in ("repeats", "steps"):
        check_int(name, out[name], 1)
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise ValueError(f"seed: must be an integer (got {out['seed']!r})")
    out["blowup"] = check_positive("blowup", out["blowup"])
    if out["blowup"] <= 1:
        raise ValueError(f"blowup: must be > 1 (got {out['blowup']!r})")
    return out


def check_grid(params: dict[str, Any]) -> dict[str, Any]:
    """The settings of the (B, σ) grid (eta, Bs, sigmas, n, lam_max and those of `check_repeats`)."""
    out = check_repeats(params)
    out["n"] = check_int("n", out["n"], 2)
    out["eta"], out["lam_max"] = check_positive("eta", out["eta"]), check_positive("lam_max", out["lam_max"])
    out["Bs"] = [check_batch("Bs", b, out["n"]) for b in check_non_empty_list("Bs", out["Bs"])]
    out["sigmas"] = [check_sigma(s, out["n"]) for s in check_non_empty_list("sigmas", out["sigmas"])]
    return out


# -- coherence -------------------------------------------------------------------------------------
def _hessian_stack(hessians: HessianInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a list or [n, d, d] stack of symmetric PSD matrices.

    Returns the float64 stack and its per-sample eigendecomposition (ascending eigenvalues [n, d],
    eigenvectors [n, d, d]).
    """
    stack = torch.stack(list(hessians)) if not isinstance(hessians, torch.Tensor) else hessians
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2] or stack.shape[0] < 1:
        raise ValueError(f"hessians: expected n ≥ 1 square matrices [n, d, d], got shape {list(stack.shape)}")
    if not stack.is_floating_point():
        raise ValueError(f"hessians: must be floating point (got {stack.dtype})")
    # float32 Hessians from autograd are symmetric and PSD only up to rounding
    rtol = max(PSD_RTOL, 100 * torch.finfo(stack.dtype).eps)
    stack = stack.detach().to(dtype=torch.float64)
    if not torch.isfinite(stack).all():
        raise ValueError("hessians: contain NaN or infinite entries")
    scale = stack.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    if (stack - stack.transpose(1, 2)).abs().amax() > rtol * scale:
        raise ValueError("hessians: every per-sample Hessian must be symmetric")
    stack = 0.5 * (stack + stack.transpose(1, 2))
    eigs, vectors = torch.linalg.eigh(stack)
    if eigs.amin() < -rtol * eigs.amax().clamp_min(0) - 1e-300:
        raise ValueError(
            f"hessians: must be positive semi-definite (smallest eigenvalue {eigs.amin().item():.3g}); "
            "project onto the PSD cone first (coherence_of_model does and reports how much it removed)"
        )
    return stack, eigs, vectors


def coherence_from_traces(trace_products: torch.Tensor, per_sample_top: torch.Tensor) -> float:
    """σ = λ_max(S) / max_i λ_max(H_i) from T_ij = tr(H_i H_j) and λ_max(H_i) (negative T clipped to 0)."""
    s = trace_products.to(torch.float64).clamp_min(0).sqrt()
    s = 0.5 * (s + s.T)
    top = per_sample_top.to(torch.float64).amax()
    if top <= 0:
        raise ValueError("hessians: all per-sample Hessians are zero; the coherence is undefined")
    return float(torch.linalg.eigvalsh(s)[-1] / top)


def coherence(hessians: HessianInput) -> float:
    """Coherence σ = λ_max(S) / max_i λ_max(H_i), S_ij = sqrt(tr(H_i H_j)) (Dexter et al., ICLR 2024).

    `hessians`: n dense PSD per-sample Hessians (list or [n, d, d]). σ = 1 when the H_i are rank one
    along mutually orthogonal directions, σ = n when they are all equal.
    """
    stack, eigs, _ = _hessian_stack(hessians)
    flat = stack.reshape(stack.shape[0], -1)
    # tr(H_i H_j) = Σ_kl (H_i)_kl (H_j)_kl for symmetric matrices: one Gram matrix.
    return coherence_from_traces(flat @ flat.T, eigs[:, -1])


# -- the theorem and its inverse forms -------------------------------------------------------------
def predicts_divergence(lam_max: float, sigma: float, eta: float, B: float, n: int) -> bool:
    """True exactly when λ_max(H) ≥ (σ/η)(n/B − 1)^(−1/2), the sufficient condition for divergence.

    At B = n (full batch) the right-hand side is +∞ and the answer is False: the theorem says nothing
    about GD, whose exact condition is `gd_stable`.
    """
    n = check_int("n", n, 1)
    lam, eta, sigma, B = check_positive("lam_max", lam_max), check_positive("eta", eta), check_sigma(sigma, n), check_batch("B", B, n)
    if n <= B:
        return False
    return lam >= (sigma / eta) / math.sqrt(n / B - 1.0)


def divergence_lr(lam_max: float, sigma: float, B: float, n: int) -> float:
    """η at and above which the theorem guarantees divergence: σ / (λ_max sqrt(n/B − 1)); +∞ at B = n."""
    n = check_int("n", n, 1)
    lam, sigma, B = check_positive("lam_max", lam_max), check_sigma(sigma, n), check_batch("B", B, n)
    if n <= B:
        return math.inf
    return sigma / (lam * math.sqrt(n / B - 1.0))


def divergence_batch_size(lam_max: float, sigma: float, eta: float, n: int) -> float:
    """Expected batch size at and below which divergence is guaranteed: n / (1 + (σ/(η λ_max))²).

    Always < n: the sufficient condition never covers full-batch GD.
    """
    n = check_int("n", n, 1)
    lam, eta, sigma = check_positive("lam_max", lam_max), check_positive("eta", eta), check_sigma(sigma, n)
    return n / (1.0 + (sigma / (eta * lam)) ** 2)


def gd_stable(lam_max: float, eta: float) -> bool:
    """Full-batch GD on a quadratic with top curvature λ_max is stable iff η < 2/λ_max."""
    return check_positive("eta", eta) < 2.0 / check_positive("lam_max", lam_max)


# -- per-sample Hessians as factors ----------------------------------------------------------------
@dataclass
class _Factored:
    """H_i = F_iᵀ F_i with F: [n, r, d] (original coordinates) and the range of H in its eigenbasis.

    `reduced`: [n, r, k] factors in the orthonormal eigenbasis `basis` [d, k] of H restricted to its
    range; `eigenvalues` [k] of H there. Directions in the common null space of all H_i never move
    under SGD, so the second-moment analysis lives on the range.
    """

    factors: torch.Tensor
    reduced: torch.Tensor
    basis: torch.Tensor
    eigenvalues: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.factors.shape[0])


def _factorize(hessians: HessianInput) -> _Factored:
    stack, evals, evecs = _hessian_stack(hessians)
    top = evals.amax().clamp_min(torch.finfo(torch.float64).tiny)
    keep = evals > RANK_RTOL * top
    rank = max(int(keep.sum(1).max()), 1)
    evals, evecs, keep = evals[:, -rank:], evecs[:, :, -rank:], keep[:, -rank:]
    factors = (evals.clamp_min(0).sqrt() * keep).unsqueeze(-1) * evecs.transpose(1, 2)  # [n, r, d]
    mean = stack.mean(0)
    h_evals, h_evecs = torch.linalg.eigh(mean)
    in_range = h_evals > RANK_RTOL * h_evals.amax().clamp_min(torch.finfo(torch.float64).tiny)
    basis = h_evecs[:, in_range]
    return _Factored(factors, factors @ basis, basis, h_evals[in_range])


def _sandwich_sum(reduced: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Σ_i H_i M H_i with H_i = F_iᵀ F_i: Σ_i F_iᵀ (F_i M F_iᵀ) F_i in O(n r k²)."""
    n, r, k = reduced.shape
    inner = reduced @ m @ reduced.transpose(1, 2)  # [n, r, r]
    return reduced.reshape(n * r, k).T @ (inner @ reduced).reshape(n * r, k)


def _noise_constant(n: int, B: float) -> float:
    return 1.0 / (n * B) - 1.0 / n**2


def _gd_factor(fac: _Factored, eta: float) -> torch.Tensor:
    """(I − ηH)·(I − ηH) is elementwise multiplication by g_kl = (1 − ηλ_k)(1 − ηλ_l) in H's eigenbasis."""
    contraction = 1.0 - eta * fac.eigenvalues
    return torch.outer(contraction, contraction)


def _top_eigenvalue(
    apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, *, tol: float, max_iter: int
) -> float:
    """Largest eigenvalue of a self-adjoint map on symmetric matrices (Frobenius inner product).

    Lanczos with full re-orthogonalisation; stops when the Ritz residual β_j |s_j| ≤ tol·|θ| or the
    Krylov space becomes invariant. Raises RuntimeError when `max_iter` is reached first.
    """
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    q = start / torch.linalg.norm(start)
    theta = 0.0
    for _ in range(max_iter):
        basis.append(q)
        v = apply(q)
        v = 0.5 * (v + v.T)
        alphas.append(float((q * v).sum()))
        stacked = torch.stack(basis)
        for _ in range(2):  # re-orthogonalise twice: keeps the Krylov basis orthonormal in float64
            v = v - torch.tensordot(torch.tensordot(stacked, v, dims=2), stacked, dims=1)
        beta = float(torch.linalg.norm(v))
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(tri)
        theta = float(ritz[-1])
        if beta * abs(float(vectors[-1, -1])) <= tol * max(abs(theta), 1e-300) or beta <= 1e-13 * max(
            abs(theta), 1e-300
        ):
            return theta
        betas.append(beta)
        q = v / beta
    raise RuntimeError(f"max_iter: Lanczos did not reach tol={tol} in {max_iter} iterations (last θ={theta:.6g})")


def second_moment_radius(
    hessians: HessianInput, eta: float, B: float, *, tol: float = 1e-10, max_iter: int = 500
) -> float:
    """Spectral radius of M ↦ (I − ηH) M (I − ηH) + η² (1/(nB) − 1/n²) Σ_i H_i M H_i (Dexter et al. 2024).

    The map is the exact recursion of E[w wᵀ] for SGD with Bernoulli sampling (derivation in the module
    docstring); > 1 means the second moment diverges. Matrix-free: Lanczos on symmetric matrices,
    restricted to the range of H (the common null space of the H_i is invariant and neutral, so it
    is left out), each product costing O(n r k²) for rank-r H_i and a k-dimensional range. The map is
    self-adjoint and PSD-preserving, so its largest eigenvalue is its spectral radius; Lanczos starts
    from the identity, which overlaps every PSD eigenvector.
    """
    fac = _factorize(hessians)
    eta, B = check_positive("eta", eta), check_batch("B", B, fac.n)
    check_positive("tol", tol)
    check_int("max_iter", max_iter, 1)
    gd = _gd_factor(fac, eta)
    weight = eta**2 * _noise_constant(fac.n, B)

    def apply(m: torch.Tensor) -> torch.Tensor:
        return gd * m + weight * _sandwich_sum(fac.reduced, m)

    start = torch.eye(fac.eigenvalues.numel(), dtype=torch.float64)
    return _top_eigenvalue(apply, start, tol=tol, max_iter=max_iter)


def exact_critical_batch_size(
    hessians: HessianInput, eta: float, *, tol: float = 1e-10, max_iter: int = 500
) -> float:
    """B* with ρ(T) > 1 exactly for expected batch sizes B < B* (+∞ when GD itself is not stable).

    Write T = A + c K, A(M) = (I − ηH) M (I − ηH), K(M) = η² Σ_i H_i M H_i, c = 1/(nB) − 1/n². Both
    are PSD-preserving, so ρ(T) grows with c, and when ρ(A) < 1 (η < 2/λ_max(H), H > 0 on its range),
    ρ(A + cK) > 1 ⟺ c > c* = 1 / λ_max((I − A)^(−1) K). In H's eigenbasis (I − A) is elementwise
    multiplication by 1 − (1 − ηλ_k)(1 − ηλ_l) > 0, so λ_max is that of the self-adjoint PSD map
    D^(−1/2) K D^(−1/2), found by Lanczos. Solving c(B) = c* gives B* = n / (n² c* + 1). One
    eigenvalue problem gives the whole boundary in B.
    """
    fac = _factorize(hessians)
    eta = check_positive("eta", eta)
    gd = _gd_factor(fac, eta)
    if float((1.0 - eta * fac.eigenvalues).abs().amax()) >= 1.0:
        return math.inf
    inv_sqrt = (1.0 - gd).rsqrt()

    def apply(m: torch.Tensor) -> torch.Tensor:
        return inv_sqrt * (eta**2 * _sandwich_sum(fac.reduced, inv_sqrt * m))

    start = torch.eye(fac.eigenvalues.numel(), dtype=torch.float64)
    mu = _top_eigenvalue(apply, start, tol=tol, max_iter=max_iter)
    return fac.n / (fac.n**2 / mu + 1.0)


# -- simulation ------------------------------------------------------------------------------------
@dataclass
class Simulation:
    """Norm trajectories of SGD on the quadratic: `norms` [repeats, steps + 1] (frozen after divergence)."""

    norms: torch.Tensor
    diverged: torch.Tensor  # [repeats] bool: ‖w‖ reached blowup·‖w₀‖ (or stopped being finite)
    divergence_step: torch.Tensor  # [repeats] int, −1 where it did not diverge

    @property
    def fraction_diverged(self) -> float:
        return float(self.diverged.double().mean())


def _simulate_rows(
    factors: torch.Tensor,
    step_sizes: torch.Tensor,
    probabilities: torch.Tensor,
    w0: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    blowup: float,
) -> Simulation:
    """Rows r run w ← w − step_r Σ_i z_ri H_i w with z_ri ~ Bernoulli(prob_r), all rows in one batch."""
    n, r, d = factors.shape
    flat = factors.reshape(n * r, d)
    w = w0.clone()
    start = torch.linalg.norm(w, dim=1)
    norms = torch.empty(w.shape[0], steps + 1, dtype=w.dtype)
    norms[:, 0] = start
    diverged = torch.zeros(w.shape[0], dtype=torch.bool)
    when = torch.full((w.shape[0],), -1, dtype=torch.long)
    for t in range(1, steps + 1):
        active = (~diverged).nonzero().squeeze(1)  # diverged rows are frozen and cost nothing
        if active.numel() == 0:
            norms[:, t:] = norms[:, t - 1 : t]
            break
        live = w[active]
        chosen = torch.rand(active.numel(), n, generator=generator, dtype=w.dtype) < probabilities[active, None]
        projections = (live @ flat.T).reshape(-1, n, r) * chosen.to(w.dtype)[:, :, None]  # z_i F_i w
        live = live - step_sizes[active, None] * (projections.reshape(-1, n * r) @ flat)  # Σ_i z_i F_iᵀ F_i w
        w[active] = live
        norms[:, t] = torch.linalg.norm(w, dim=1)
        norm = norms[active, t]
        newly = active[~torch.isfinite(norm) | (norm >= blowup * start[active])]
        when[newly] = t
        diverged[newly] = True
    return Simulation(norms, diverged, when)


def simulate_sgd_quadratic(
    hessians: HessianInput,
    eta: float,
    B: float,
    steps: int,
    seed: int,
    *,
    w0: torch.Tensor | None = None,
    repeats: int = 1,
    blowup: float = 1000.0,
) -> Simulation:
    """SGD on f_i(w) = ½ wᵀ H_i w with Bernoulli sampling of expected batch size B (Dexter et al. 2024).

    Each step draws z_i ~ Bernoulli(B/n) independently and sets w ← w − (η/B) Σ_i z_i H_i w (the batch
    sum divided by the expected batch size). `repeats` independent runs go through one batched
    product per step; w₀ defaults to a random unit vector per repeat (seeded). A run is diverged once
    ‖w‖ ≥ blowup·‖w₀‖ and is frozen from then on.
    """
    fac = _factorize(hessians)
    eta, B = check_positive("eta", eta), check_batch("B", B, fac.n)
    steps, repeats = check_int("steps", steps, 1), check_int("repeats", repeats, 1)
    blowup = check_positive("blowup", blowup)
    generator = torch.Generator().manual_seed(int(seed))
    d = fac.factors.shape[2]
    if w0 is None:
        start = torch.randn(repeats, d, generator=generator, dtype=torch.float64)
        start = start / torch.linalg.norm(start, dim=1, keepdim=True)
    else:
        start = w0.detach().to(torch.float64).reshape(-1, d).expand(repeats, d).clone()
        if start.shape[0] != repeats or torch.linalg.norm(start, dim=1).amin() == 0:
            raise ValueError(f"w0: must be one nonzero vector of length {d} (got shape {list(w0.shape)})")
    step = torch.full((repeats,), eta / B, dtype=torch.float64)
    prob = torch.full((repeats,), B / fac.n, dtype=torch.float64)
    return _simulate_rows(fac.factors, step, prob, start, steps, generator, blowup)


# -- the paper's synthetic problem -----------------------------------------------------------------
def paper_construction(
    n: int = 100, sigma: float = 1.0, lam_max: float = 2.0, dim: int | None = None, seed: int = 0
) -> torch.Tensor:
    """n rank-one PSD Hessians H_i = a_i a_iᵀ with λ_max(H) = lam_max and coherence exactly σ ∈ [1, n].

    Equiangular unit vectors: u_i = α e_i + γ 𝟙 in Rⁿ with α = sqrt(1 − c), γ = (sqrt(α² + n c) − α)/n
    have ‖u_i‖ = 1 and u_i·u_j = c for i ≠ j. With c = (σ − 1)/(n − 1) ∈ [0, 1], S_ij = s²|u_i·u_j| =
    s²((1 − c)δ_ij + c) has λ_max(S) = s²(1 + c(n − 1)) = s²σ and every λ_max(H_i) = s², so the
    coherence is σ for any real σ in [1, n] (non-divisors of n included). H = (s²/n) Σ u_i u_iᵀ shares
    the nonzero spectrum of (s²/n) UᵀU, whose top eigenvalue is s²σ/n; s² = n·lam_max/σ makes it
    lam_max. A seeded random isometry Rⁿ → R^dim (dim ≥ n) hides the coordinate axes.
    Returns [n, dim, dim] float64.
    """
    n = check_int("n", n, 2)
    sigma, lam_max = check_sigma(sigma, n), check_positive("lam_max", lam_max)
    dim = n if dim is None else check_int("dim", dim, 1)
    if dim < n:
        raise ValueError(f"dim: must be ≥ n = {n} (σ near 1 needs n nearly orthogonal directions; got {dim})")
    c = min(max((sigma - 1.0) / (n - 1), 0.0), 1.0)
    alpha = math.sqrt(1.0 - c)
    gamma = (math.sqrt(alpha**2 + n * c) - alpha) / n
    unit = alpha * torch.eye(n, dtype=torch.float64) + gamma * torch.ones(n, n, dtype=torch.float64)
    generator = torch.Generator().manual_seed(int(seed))
    isometry, _ = torch.linalg.qr(torch.randn(dim, n, generator=generator, dtype=torch.float64))
    vectors = math.sqrt(n * lam_max / sigma) * (unit @ isometry.T)  # row i is a_i
    return vectors[:, :, None] * vectors[:, None, :]


# -- the (B, σ) grid ---------------------------------------------------------------------------------
def _grid_row(
    j: int, sigma: float, eta: float, Bs: list[float], n: int, lam_max: float, repeats: int, steps: int,
    seed: int, blowup: float,
) -> dict[str, Any]:
    """One σ of the grid: theorem, exact boundary and simulation for every B (all B in one batch)."""
    hessians = paper_construction(n, sigma, lam_max, seed=seed)
    fac = _factorize(hessians)
    critical = exact_critical_batch_size(hessians, eta)
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + j)
    batch = torch.tensor(Bs, dtype=torch.float64).repeat_interleave(repeats)
    start = torch.randn(batch.numel(), fac.factors.shape[2], generator=generator, dtype=torch.float64)
    start = start / torch.linalg.norm(start, dim=1, keepdim=True)
    sim = _simulate_rows(fac.factors, eta / batch, batch / n, start, steps, generator, blowup)
    fraction = sim.diverged.double().reshape(len(Bs), repeats).mean(1).tolist()
    return {
        "sigma": sigma,
        "theorem_batch": divergence_batch_size(lam_max, sigma, eta, n),
        "exact_critical_batch": critical if math.isfinite(critical) else None,
        "predicted": [predicts_divergence(lam_max, sigma, eta, b, n) for b in Bs],
        "exact": [bool(b < critical) for b in Bs],
        "simulated_fraction": fraction,
        "simulated": [f > 0.5 for f in fraction],
    }


def stability_grid(
    eta: float = 0.8,
    Bs: Sequence[float] = tuple(range(1, 50)),
    sigmas: Sequence[float] = tuple(range(1, 51)),
    *,
    n: int = 100,
    lam_max: float = 2.0,
    repeats: int = 10,
    steps: int = 1000,
    seed: int = 0,
    blowup: float = 1000.0,
    reporter: Reporter | None = None,
    done: Sequence[dict[str, Any]] = (),
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The paper's (B, σ) experiment: theorem vs exact second-moment boundary vs simulated divergence.

    For each σ, the construction `paper_construction(n, σ, lam_max)` is built; for each B the result
    holds the theorem's prediction, whether ρ(T) > 1 (B < `exact_critical_batch_size`, see there), and
    the fraction of `repeats` SGD runs whose ‖w‖ grew `blowup`× within `steps` (majority = diverged).
    Rows come one σ at a time (progress, `should_stop`, `on_row`); `done` holds rows already computed
    (resume). Returns {"params": ..., "rows": [...], "complete": bool}.
    """
    params = check_grid(
        {"eta": eta, "Bs": list(Bs), "sigmas": list(sigmas), "n": n, "lam_max": lam_max,
         "repeats": repeats, "steps": steps, "seed": seed, "blowup": blowup}
    )
    reporter = reporter or Reporter()
    rows = list(done)[: len(params["sigmas"])]
    for j in range(len(rows), len(params["sigmas"])):
        if reporter.should_stop():
            break
        sigma = params["sigmas"][j]
        reporter.progress(j, len(params["sigmas"]), f"σ = {sigma:g}")
        row = _grid_row(
            j, sigma, params["eta"], params["Bs"], params["n"], params["lam_max"], params["repeats"],
            params["steps"], params["seed"], params["blowup"],
        )
        rows.append(row)
        if on_row is not None:
            on_row(row)
    complete = len(rows) == len(params["sigmas"])
    if complete:
        reporter.progress(len(rows), len(params["sigmas"]), "done")
    return {"params": params, "rows": rows, "complete": complete}


# -- a trained model ---------------------------------------------------------------------------------
class _FlatModel:
    """A model's per-sample loss as a function of one flat parameter vector (eval mode, torch.func)."""

    def __init__(self, model: nn.Module, loss_fn: PerSampleLoss) -> None:
        self.model = model
        self.loss_fn = loss_fn
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.buffers = {k: b.detach() for k, b in model.named_buffers()}
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    @property
    def dim(self) -> int:
        return int(self.theta.numel())

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = torch.split(theta, self.numels)
        return {k: piece.reshape(shape) for k, piece, shape in zip(self.names, pieces, self.shapes)}

    def sample_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self._params(theta), **self.buffers}, (x.unsqueeze(0),))
        return self.loss_fn(out, y.unsqueeze(0)).sum()

    def weighted_loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, {**self._params(theta), **self.buffers}, (x,))
        return (self.loss_fn(out, y) * w).sum()

    def per_sample_hvp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H_i v_ik for each sample i and its vectors v_ik ([n, K, p] → [n, K, p]); forward-over-reverse."""
        theta = self.theta

        def one(xi: torch.Tensor, yi: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
            return jvp(lambda t: grad(self.sample_loss)(t, xi, yi), (theta,), (vi,))[1]

        return vmap(vmap(one, in_dims=(None, None, 0)))(x, y, v)


def _per_sample_hessians(flat: _FlatModel, x: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    dense = vmap(hessian(flat.sample_loss), in_dims=(None, 0, 0))
    return torch.cat([dense(flat.theta, xs, ys) for xs, ys in zip(x.split(chunk), y.split(chunk))])


def _psd_part(stack: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Projection of symmetric matrices onto the PSD cone, and max_i |λ_min(H_i)| / max_i λ_max(H_i)."""
    stack = 0.5 * (stack + stack.transpose(1, 2)).to(torch.float64)
    evals, evecs = torch.linalg.eigh(stack)
    top = float(evals.amax().clamp_min(torch.finfo(torch.float64).tiny))
    negative = float((-evals.amin()).clamp_min(0)) / top
    return (evecs * evals.clamp_min(0).unsqueeze(1)) @ evecs.transpose(1, 2), negative


def _power_iteration(
    apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int, tol: float,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise power iteration on A_i + shift_i I (rows are independent problems).

    Returns the Rayleigh quotients of A_i (shift removed) and the final vectors.
    """
    shift = torch.zeros(start.shape[0], dtype=start.dtype) if shift is None else shift.to(start.dtype)
    v = start / torch.linalg.norm(start, dim=1, keepdim=True)
    previous = torch.full((v.shape[0],), math.inf, dtype=v.dtype)
    for _ in range(iters):
        av = apply(v) + shift[:, None] * v
        quotient = (v * av).sum(1)
        v = av / torch.linalg.norm(av, dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        if ((quotient - previous).abs() <= tol * quotient.abs()).all():
            break
        previous = quotient
    return quotient - shift, v


def _top_algebraic_eigenvalue(
    apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iters: int, tol: float
) -> torch.Tensor:
    """λ_max (not |λ|_max) of each row's symmetric operator: power iteration finds the dominant μ_i;
    where μ_i < 0 a second pass on A_i − μ_i I (spectrum shifted into [0, λ_max − μ_i]) finds λ_max."""
    dominant, vectors = _power_iteration(apply, start, iters, tol)
    negative = dominant < 0
    if not negative.any():
        return dominant
    shifted, _ = _power_iteration(apply, start, iters, tol, shift=(-dominant).clamp_min(0))
    return torch.where(negative, shifted, dominant)


def coherence_of_model(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "exact",
    probes: int = 64,
    power_iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
    chunk: int = 32,
) -> dict[str, Any]:
    """σ, λ_max(H) and max_i λ_max(H_i) of a model's per-sample losses at its current parameters.

    The model runs in eval mode (BatchNorm on running statistics); `loss_fn` is per-sample.
    method="exact": dense per-sample Hessians ∇²f_i from `torch.func.hessian` vmapped over samples
    (n·p² numbers, at most EXACT_HESSIAN_BUDGET), projected onto the PSD cone: the theorem assumes
    PSD H_i; at a minimum the negative curvature comes from residual terms and is small, and
    `negative_curvature` (max_i |λ_min(H_i)| / max_i λ_max(H_i)) reports how much was removed.
    method="matrix_free": with K shared Rademacher probes z_k (E[z zᵀ] = I),
    tr(H_i H_j) = E[(H_i z)·(H_j z)] ≈ (1/K) Σ_k (H_i z_k)·(H_j z_k) from per-sample Hessian-vector
    products (vmapped over samples): unbiased, with variance ≤ 2‖H_i H_j‖_F²/K per entry; S_ij takes
    the square root of the (clipped) estimate, which biases S down by O(variance). λ_max(H_i) comes
    from per-sample power iteration (vmapped HVPs) and λ_max(H) from power iteration with the mean
    HVP, shifted by the dominant eigenvalue where that is negative so that the largest (algebraic)
    eigenvalue is found; Rayleigh quotients approach λ_max from below, so σ is biased slightly up.
    This path does not project onto the PSD cone: away from a minimum (indefinite H_i) it measures
    tr(H_i H_j) of the full Hessians, and `sigma` may fall below 1. Memory n·K·p.
    """
    if method not in ("exact", "matrix_free"):
        raise ValueError(f"method: must be 'exact' or 'matrix_free' (got {method!r})")
    if x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"x, y: need the same number (≥ 1) of samples (got {x.shape[0]} and {y.shape[0]})")
    check_int("probes", probes, 1)
    check_int("power_iters", power_iters, 1)
    check_int("chunk", chunk, 1)
    was_training = model.training
    model.eval()
    try:
        flat = _FlatModel(model, loss_fn)
        if method == "exact":
            return _exact_coherence(flat, x, y, chunk)
        return _matrix_free_coherence(flat, x, y, probes, power_iters, tol, seed, chunk)
    finally:
        model.train(was_training)


def _exact_coherence(flat: _FlatModel, x: torch.Tensor, y: torch.Tensor, chunk: int) -> dict[str, Any]:
    n, p = x.shape[0], flat.dim
    if n * p * p > EXACT_HESSIAN_BUDGET:
        raise ValueError(
            f"method: dense per-sample Hessians need n·p² = {n}·{p}² > {EXACT_HESSIAN_BUDGET:,} numbers; "
            "use method='matrix_free' or fewer samples"
        )
    stack, negative = _psd_part(_per_sample_hessians(flat, x, y, chunk))
    flat_h = stack.reshape(n, -1)
    per_sample_top = torch.linalg.eigvalsh(stack)[:, -1]
    return {
        "method": "exact",
        "sigma": coherence_from_traces(flat_h @ flat_h.T, per_sample_top),
        "lam_max": float(torch.linalg.eigvalsh(stack.mean(0))[-1]),
        "max_sample_lam_max": float(per_sample_top.amax()),
        "negative_curvature": negative,
        "n": n,
        "params": p,
    }


def _matrix_free_coherence(
    flat: _FlatModel, x: torch.Tensor, y: torch.Tensor, probes: int, power_iters: int, tol: float, seed: int,
    chunk: int,
) -> dict[str, Any]:
    n, p = x.shape[0], flat.dim
    generator = torch.Generator().manual_seed(int(seed))
    dtype = flat.theta.dtype
    z = (torch.randint(0, 2, (probes, p), generator=generator) * 2 - 1).to(dtype)

    def chunked_hvp(v: torch.Tensor) -> torch.Tensor:  # v: [n, K, p], row i multiplied by H_i
        parts = [flat.per_sample_hvp(xs, ys, vs) for xs, ys, vs in zip(x.split(chunk), y.split(chunk), v.split(chunk))]
        return torch.cat(parts)

    responses = chunked_hvp(z.expand(n, probes, p)).to(torch.float64)  # H_i z_k: [n, K, p]
    flat_r = responses.reshape(n, -1)
    traces = flat_r @ flat_r.T / probes

    def each_sample(v: torch.Tensor) -> torch.Tensor:
        return chunked_hvp(v.unsqueeze(1)).squeeze(1)

    def mean_hvp(v: torch.Tensor) -> torch.Tensor:
        return each_sample(v.expand(n, p)).mean(0, keepdim=True)

    start = torch.randn(n, p, generator=generator, dtype=dtype)
    per_sample = _top_algebraic_eigenvalue(each_sample, start, power_iters, tol).to(torch.float64)
    mean_start = torch.randn(1, p, generator=generator, dtype=dtype)
    mean_top = _top_algebraic_eigenvalue(mean_hvp, mean_start, power_iters, tol)
    return {
        "method": "matrix_free",
        "sigma": coherence_from_traces(traces, per_sample),
        "lam_max": float(mean_top[0]),
        "max_sample_lam_max": float(per_sample.amax()),
        "negative_curvature": None,
        "n": n,
        "params": p,
        "probes": probes,
    }


def model_stability_check(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    etas: Sequence[float],
    Bs: Sequence[float],
    *,
    steps: int = 300,
    repeats: int = 3,
    seed: int = 0,
    perturbation: float = 1e-3,
    blowup: float = 1000.0,
    method: str = "exact",
    eta_scale: str = "absolute",
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """The theorem against real SGD at a trained model's minimum (on the n samples x, y).

    Computes σ and λ_max(H) (`coherence_of_model`), the theorem's divergence learning rate per B,
    σ/(λ_max sqrt(n/B − 1)), and the GD limit 2/λ_max; the largest η the analysis allows to be stable
    is the smaller of the two (both make the second moment diverge above them). Then restarts SGD
    with Bernoulli sampling (step −(η/B) Σ_i z_i ∇f_i) on the real loss from w* + perturbation·‖w*‖·u
    (u a random unit vector per run) on the (η, B) grid, `repeats` runs each, all runs vmapped; a
    run diverged when ‖w − w*‖ grows blowup× or the loss stops being finite. eta_scale="gd_limit"
    reads `etas` as multiples of 2/λ_max(H), which is only known once the curvature is measured.
    """
    reporter = reporter or Reporter()
    n = x.shape[0]
    etas = [check_positive("etas", e) for e in check_non_empty_list("etas", etas)]
    Bs = [check_batch("Bs", b, n) for b in check_non_empty_list("Bs", Bs)]
    steps, repeats = check_int("steps", steps, 1), check_int("repeats", repeats, 1)
    perturbation, blowup = check_positive("perturbation", perturbation), check_positive("blowup", blowup)
    reporter.progress(0, steps + 1, "coherence")
    curvature = coherence_of_model(model, loss_fn, x, y, method=method, seed=seed)
    reporter.result({"coherence": curvature, "complete": False})
    sigma = min(max(curvature["sigma"], 1.0), float(n))
    lam = check_positive("lam_max", curvature["lam_max"])
    gd_limit = 2.0 / lam
    if eta_scale not in ETA_SCALES:
        raise ValueError(f"eta_scale: must be one of {ETA_SCALES} (got {eta_scale!r})")
    if eta_scale == "gd_limit":
        etas = [e * gd_limit for e in etas]
    theorem_lr = [divergence_lr(lam, sigma, b, n) for b in Bs]
    observed = _restart_sgd(model, loss_fn, x, y, etas, Bs, steps, repeats, seed, perturbation, blowup, reporter)
    cells = []
    for a, eta in enumerate(etas):
        for b, batch in enumerate(Bs):
            fraction = float(observed[a, b])
            cells.append({
                "eta": eta,
                "B": batch,
                "theorem_diverges": predicts_divergence(lam, sigma, eta, batch, n),
                "predicted_diverges": eta >= min(theorem_lr[b], gd_limit),
                "observed_fraction": fraction,
                "observed_diverges": fraction > 0.5,
            })
    return {
        "coherence": curvature,
        "sigma_used": sigma,  # the measured σ clipped to [1, n], the theorem's range
        "n": n,
        "gd_lr_limit": gd_limit,
        "per_batch": [
            {"B": b, "theorem_lr": t if math.isfinite(t) else None, "max_stable_lr": min(t, gd_limit)}
            for b, t in zip(Bs, theorem_lr)
        ],
        "cells": cells,
        "false_alarms": sum(c["theorem_diverges"] and not c["observed_diverges"] for c in cells),
        "complete": True,
    }


def _restart_sgd(
    model: nn.Module, loss_fn: PerSampleLoss, x: torch.Tensor, y: torch.Tensor, etas: list[float], Bs: list[float],
    steps: int, repeats: int, seed: int, perturbation: float, blowup: float, reporter: Reporter,
) -> torch.Tensor:
    """Fraction of diverged runs per (η, B): every run is one row of a vmapped full-data weighted gradient."""
    was_training = model.training
    model.eval()
    try:
        flat = _FlatModel(model, loss_fn)
        n = x.shape[0]
        generator = torch.Generator().manual_seed(int(seed))
        grid_eta = torch.tensor(etas, dtype=flat.theta.dtype).repeat_interleave(len(Bs) * repeats)
        grid_b = torch.tensor(Bs, dtype=flat.theta.dtype).repeat_interleave(repeats).repeat(len(etas))
        direction = torch.randn(grid_eta.numel(), flat.dim, generator=generator, dtype=flat.theta.dtype)
        direction = direction / torch.linalg.norm(direction, dim=1, keepdim=True)
        offset0 = perturbation * float(torch.linalg.norm(flat.theta).clamp_min(1.0))
        theta = flat.theta + offset0 * direction
        batch_grad = vmap(grad(flat.weighted_loss), in_dims=(0, None, None, 0))
        diverged = torch.zeros(grid_eta.numel(), dtype=torch.bool)
        for t in range(steps):
            if reporter.should_stop():
                break
            chosen = (torch.rand(grid_eta.numel(), n, generator=generator) < (grid_b / n)[:, None]).to(theta.dtype)
            g = batch_grad(theta, x, y, chosen / grid_b[:, None])
            theta = torch.where(diverged[:, None], theta, theta - grid_eta[:, None] * g)
            distance = torch.linalg.norm(theta - flat.theta, dim=1)
            diverged |= ~torch.isfinite(distance) | (distance >= blowup * offset0)
            if t % 10 == 0:
                reporter.progress(t + 1, steps + 1, "restarted SGD")
        reporter.progress(steps + 1, steps + 1, "done")
        return diverged.double().reshape(len(etas), len(Bs), repeats).mean(2)
    finally:
        model.train(was_training)
