"""m-sharpness of a model, computed in parallel over micro-batches with torch.func.

Foret et al. (ICLR 2021, Sec. 4.1) define the m-sharpness of weights w on n samples as

    S_m(w) = (1/k) Σ_j [ max_{‖ε‖₂ ≤ ρ} L_{B_j}(w + ε) − L_{B_j}(w) ],

the mean over k = n // m disjoint micro-batches B_j of size m, each with its own worst-case
perturbation. m = n is the sharpness SAM minimises; m-SAM minimises S_m. Andriushchenko & Flammarion
(ICML 2022) show that S_m for small m correlates with generalization much better than for large m.

The inner maximum is approximated by K steps of normalised projected gradient ascent on the ball:
ε ← Π_ρ(ε + α ∇L_{B_j}(w + ε) / ‖∇L_{B_j}(w + ε)‖), ε₀ = 0, step α (default ρ). With K = 1 and α = ρ
this is the first-order SAM estimate ε = ρ g/‖g‖. The value kept for each micro-batch is the largest
loss seen over the K iterates, so more steps never lower the estimate.

All micro-batches are processed at once: `vmap` over micro-batches of `grad_and_value` of a
`functional_call` of the model with per-micro-batch perturbations. The model runs in eval mode
(BatchNorm with its running statistics) and is left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from samlab.noise import functional_state
from samlab.reporting import Reporter
from samlab.tensors import Params, PerSampleLoss, model_mode


def m_sharpness(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    m: int,
    rho: float,
    steps: int = 1,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> dict[str, Any]:
    """S_m(w) on (x, y): mean over disjoint micro-batches of size m of the worst-case loss increase.

    Micro-batches are consecutive blocks of (x, y), or of a random permutation of it when a
    `generator` is given; the n mod m samples left over sit out. `steps` = K ascent steps of size
    `step_size` (default ρ); `chunk_size` bounds how many micro-batches are vmapped at once.
    Returns m, rho, steps, sharpness (S_m), sharpness_std (over micro-batches), loss (mean
    L_{B_j}(w)), perturbed_loss (mean of the maxima), num_microbatches and per_microbatch (list).
    """
    n = len(x)
    _check_args(n, len(y), m, rho, steps, step_size)
    order = torch.randperm(n, generator=generator).to(x.device) if generator is not None else None
    index = torch.arange(n, device=x.device) if order is None else order
    k = n // m
    index = index[: k * m]
    xb = x[index].reshape(k, m, *x.shape[1:])
    yb = y[index].reshape(k, m, *y.shape[1:])
    with model_mode(model, "eval"):
        base, best = _ascend(model, loss_fn, xb, yb, rho, steps, rho if step_size is None else step_size, chunk_size)
    per_microbatch = best - base
    return {
        "m": m,
        "rho": rho,
        "steps": steps,
        "sharpness": float(per_microbatch.mean()),
        "sharpness_std": float(per_microbatch.std()) if k > 1 else 0.0,
        "loss": float(base.mean()),
        "perturbed_loss": float(best.mean()),
        "num_microbatches": k,
        "per_microbatch": per_microbatch.tolist(),
    }


def _ascend(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    xb: torch.Tensor,
    yb: torch.Tensor,
    rho: float,
    steps: int,
    step_size: float,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K steps of normalised projected ascent for every micro-batch at once → (L(w), max L(w + ε))."""
    params, buffers = functional_state(model)

    def microbatch_loss(eps: Params, xj: torch.Tensor, yj: torch.Tensor) -> torch.Tensor:
        shifted = {name: params[name] + eps[name] for name in params}
        return loss_fn(functional_call(model, (shifted, buffers), (xj,)), yj).mean()

    grad_and_loss = vmap(grad_and_value(microbatch_loss), chunk_size=chunk_size)
    loss_only = vmap(microbatch_loss, chunk_size=chunk_size)
    k = xb.shape[0]
    eps = {name: torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for name, p in params.items()}
    g, base = grad_and_loss(eps, xb, yb)
    best = torch.full_like(base, -torch.inf)
    for step in range(steps):
        if step > 0:
            g, value = grad_and_loss(eps, xb, yb)
            best = torch.maximum(best, value)
        eps = _project(_add_scaled(eps, g, step_size / (_norms(g) + 1e-12)), rho)
    best = torch.maximum(best, loss_only(eps, xb, yb))
    return base.detach(), best.detach()


def _norms(tree: Params) -> torch.Tensor:
    """Per-micro-batch Euclidean norm of a dict of [k, *shape] tensors → [k]."""
    return torch.sqrt(sum(t.reshape(t.shape[0], -1).pow(2).sum(dim=1) for t in tree.values()))


def _add_scaled(eps: Params, g: Params, scale: torch.Tensor) -> Params:
    return {name: eps[name] + _per_row(scale, g[name]) * g[name] for name in eps}


def _project(eps: Params, rho: float) -> Params:
    """Project each micro-batch's perturbation onto the ball ‖ε‖ ≤ ρ."""
    shrink = torch.clamp(rho / (_norms(eps) + 1e-12), max=1.0)
    return {name: _per_row(shrink, e) * e for name, e in eps.items()}


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def m_sharpness_curve(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ms: Sequence[int],
    rho: float,
    steps: int = 1,
    step_size: float | None = None,
    partitions: int = 1,
    seed: int = 0,
    reporter: Reporter | None = None,
    chunk_size: int | None = None,
) -> list[dict[str, Any]]:
    """S_m for each m in `ms`, averaged over `partitions` seeded random partitions into micro-batches.

    One row per m: m, rho, steps, sharpness (mean over partitions), sharpness_std_over_partitions,
    loss, perturbed_loss, num_microbatches, partitions. Stops early (returning the rows so far) when
    the reporter asks to.
    """
    reporter = reporter or Reporter()
    rows = []
    for done, m in enumerate(ms):
        if reporter.should_stop():
            break
        gen = torch.Generator().manual_seed(seed + 7919 * m)
        runs = [
            m_sharpness(model, loss_fn, x, y, m=m, rho=rho, steps=steps, step_size=step_size,
                        generator=gen, chunk_size=chunk_size)
            for _ in range(partitions)
        ]
        rows.append(_average_partitions(runs))
        reporter.progress(done + 1, len(ms), f"m-sharpness at m={m}")
    return rows


def _average_partitions(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = torch.tensor([r["sharpness"] for r in runs], dtype=torch.float64)
    first = runs[0]
    return {
        "m": first["m"],
        "rho": first["rho"],
        "steps": first["steps"],
        "sharpness": float(values.mean()),
        "sharpness_std_over_partitions": float(values.std()) if len(runs) > 1 else 0.0,
        "loss": sum(r["loss"] for r in runs) / len(runs),
        "perturbed_loss": sum(r["perturbed_loss"] for r in runs) / len(runs),
        "num_microbatches": first["num_microbatches"],
        "partitions": len(runs),
    }


# -- validation -----------------------------------------------------------------------------------
def _check_args(n: int, n_y: int, m: int, rho: float, steps: int, step_size: float | None) -> None:
    if n != n_y:
        raise ValueError(f"y: must have as many samples as x ({n}), got {n_y}")
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"m: must be an integer in [1, {n}] (the number of samples), got {m!r}")
    if not (isinstance(rho, (int, float)) and rho >= 0):
        raise ValueError(f"rho: must be a number >= 0 (got {rho!r})")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: must be an integer >= 1 (got {steps!r})")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size: must be > 0 (got {step_size!r})")
