"""Gradient-noise structure: per-sample gradients, tr V, E‖∇L_I‖ over micro-batches, RW-SAM weights.

The SDE account of m-sharpness (Luo, Harandi, Phung, Le, "Unveiling m-Sharpness Through the Structure
of Stochastic Gradient Noise", NeurIPS 2025) explains why SAM with smaller perturbation micro-batches
generalizes better through two measurable quantities of the per-sample gradients g_i = ∇f_i(w):

- V, the covariance of g_I for I drawn uniformly from the n samples: the drift of m-USAM carries the
  implicit regularizer (ρ / 2m) tr V, so smaller m penalises gradient noise more strongly;
- E‖∇L_I(w)‖ over micro-batches I of size m: the implicit regularizer of normalised m-SAM is
  ρ E‖∇L_I(w)‖, and it grows as m shrinks (averaging fewer noisy gradients leaves a longer vector).

Everything here is computed from exact per-sample gradients (`torch.func.vmap` of `grad`, chunked for
memory) in eval mode, so BatchNorm uses its running statistics and one sample's gradient does not
depend on the others. The model is left exactly as it was (parameters, buffers and training flag).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from samlab.tensors import PerSampleLoss, model_mode


# -- functional view of a module ----------------------------------------------------------------
def functional_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies-by-reference of the parameters and buffers, for `torch.func.functional_call`."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    return params, buffers


def flatten_per_sample(grads: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """A dict of [n, *shape] gradients → one [n, P] matrix, parameters in `names` order."""
    first = grads[names[0]]
    return torch.cat([grads[name].reshape(first.shape[0], -1) for name in names], dim=1)


# -- per-sample gradients -----------------------------------------------------------------------
def per_sample_grads(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk_size: int = 128,
) -> torch.Tensor:
    """The [n, P] matrix of per-sample gradients g_i = ∇_w f_i(w), by vmap(grad) over samples.

    Computed in eval mode (BatchNorm uses running statistics, so each g_i depends on sample i only),
    `chunk_size` samples at a time to bound memory. Columns follow `model.named_parameters()`.
    """
    _check_batch(x, y)
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be an integer >= 1 (got {chunk_size!r})")
    params, buffers = functional_state(model)
    names = list(params)

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    grads_of_samples = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    chunks = []
    with model_mode(model, "eval"):
        for start in range(0, len(x), chunk_size):
            chunk = grads_of_samples(params, x[start : start + chunk_size], y[start : start + chunk_size])
            chunks.append(flatten_per_sample(chunk, names))
    return torch.cat(chunks, dim=0)


def trace_covariance(grads: torch.Tensor) -> torch.Tensor:
    """tr V with V = (1/n) Σ_i (g_i − ḡ)(g_i − ḡ)ᵀ, from the [n, P] per-sample gradients.

    Why 1/n and not 1/(n−1): V is the covariance of the random gradient g_I with I uniform on the
    n given samples — the noise SGD actually draws from — so the n samples are the whole population,
    not a sample from it. (Measured on a random subset of size s of a larger train set, 1/(s−1) would
    be the unbiased estimate; the two differ by the factor s/(s−1), 0.2 % at s = 512.)
    """
    centred = grads - grads.mean(dim=0, keepdim=True)
    return centred.pow(2).sum(dim=1).mean()


def gradient_noise(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    chunk_size: int = 128,
) -> dict[str, Any]:
    """Gradient-noise summary on (x, y): tr V (1/n, see `trace_covariance`), ‖∇L(w)‖, per-sample norms.

    Returns n, trace_v, full_grad_norm = ‖(1/n) Σ g_i‖, mean_sample_grad_norm = (1/n) Σ ‖g_i‖ and
    sample_grad_norms (the list of ‖g_i‖, for a histogram).
    """
    return noise_summary(per_sample_grads(model, loss_fn, x, y, chunk_size=chunk_size), with_sample_norms=True)


def noise_metrics(
    model: nn.Module, loss_fn: PerSampleLoss, batch: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, float]:
    """Scalars logged during training every `config.noise_every` steps on a fixed probe batch (x, y):
    trace_v, full_grad_norm and mean_sample_grad_norm (see `gradient_noise`)."""
    x, y = batch
    summary = noise_summary(per_sample_grads(model, loss_fn, x, y))
    return {key: summary[key] for key in ("trace_v", "full_grad_norm", "mean_sample_grad_norm")}


def noise_summary(grads: torch.Tensor, *, with_sample_norms: bool = False) -> dict[str, Any]:
    """The `gradient_noise` summary of a [n, P] per-sample gradient matrix."""
    norms = grads.norm(dim=1)
    summary: dict[str, Any] = {
        "n": int(grads.shape[0]),
        "trace_v": float(trace_covariance(grads)),
        "full_grad_norm": float(grads.mean(dim=0).norm()),
        "mean_sample_grad_norm": float(norms.mean()),
    }
    if with_sample_norms:
        summary["sample_grad_norms"] = norms.tolist()
    return summary


# -- micro-batch gradient norms -----------------------------------------------------------------
def random_partitions(n: int, m: int, count: int, *, seed: int) -> torch.Tensor:
    """`count` random partitions of n//m disjoint micro-batches of size m: index tensor [count, n//m, m].

    Each partition is a seeded permutation cut into consecutive blocks; the n mod m samples left at
    the end of a permutation sit out of that partition (a different set each time).
    """
    _check_micro_batch(m, n)
    if count < 1:
        raise ValueError(f"partitions: must be an integer >= 1 (got {count!r})")
    gen = torch.Generator().manual_seed(seed)
    k = n // m
    perms = [torch.randperm(n, generator=gen)[: k * m] for _ in range(count)]
    return torch.stack(perms).view(count, k, m)


def expected_microbatch_grad_norm(
    grads: torch.Tensor, m: int, *, partitions: int = 8, seed: int = 0
) -> dict[str, float]:
    """E‖∇L_I(w)‖ over micro-batches I of size m, from per-sample gradients [n, P].

    ∇L_I = (1/m) Σ_{i∈I} g_i. The expectation is taken over exact disjoint partitions of the samples
    into n//m micro-batches (every micro-batch of every partition counts once), repeated over
    `partitions` seeded random partitions. Returns m, mean (the estimate), std_over_partitions (the
    spread of the per-partition means), mean_sq = E‖∇L_I‖², microbatches (per partition), partitions.
    """
    index = random_partitions(grads.shape[0], m, partitions, seed=seed).to(grads.device)
    micro = grads[index].mean(dim=2)  # [partitions, k, P]
    norms = micro.norm(dim=2)  # [partitions, k]
    per_partition = norms.mean(dim=1)
    return {
        "m": m,
        "mean": float(norms.mean()),
        "std_over_partitions": float(per_partition.std()) if partitions > 1 else 0.0,
        "mean_sq": float(norms.pow(2).mean()),
        "microbatches": int(index.shape[1]),
        "partitions": partitions,
    }


def predicted_microbatch_grad_norm(*, full_grad_norm: float, trace_v: float, m: int, n: int) -> dict[str, float]:
    """The prediction for E‖∇L_I‖ from ‖∇L‖ and tr V, for micro-batches I of m of the n samples drawn
    without replacement: E‖∇L_I‖² = ‖∇L‖² + ((n − m) / (m (n − 1))) tr V exactly (tr V with 1/n, as in
    `trace_covariance`; the finite-population correction of a sample mean). Returns mean_sq (that
    exact value) and mean = sqrt(mean_sq), which bounds E‖∇L_I‖ from above (Jensen's gap)."""
    _check_micro_batch(m, n)
    factor = (n - m) / (m * (n - 1)) if n > 1 else 0.0
    mean_sq = full_grad_norm**2 + factor * trace_v
    return {"m": m, "mean_sq": mean_sq, "mean": mean_sq**0.5}


def sde_regularizers(*, trace_v: float, expected_norm: float, rho: float, m: int, n: int) -> dict[str, float]:
    """The implicit regularizers of the SDE account (Luo et al. 2025) at micro-batch size m.

    - m-USAM (ε = ρ ∇L_I): ∇L_I(w + ρ∇L_I) ≈ ∇L_I + (ρ/2) ∇‖∇L_I‖², and E‖∇L_I‖² = ‖∇L‖² + tr V / m
      for I drawn with replacement, so the drift carries (ρ / 2m) tr V (`usam_noise`). Disjoint
      micro-batches (without replacement) shrink the variance by (n − m)/(n − 1)
      (`usam_noise_without_replacement`).
    - normalised m-SAM (ε = ρ ∇L_I / ‖∇L_I‖): ∇L_I(w + ε) ≈ ∇L_I + ρ ∇‖∇L_I‖, so the drift carries
      ρ E‖∇L_I‖ (`sam`).
    """
    _check_micro_batch(m, n)
    if not rho >= 0:
        raise ValueError(f"rho: must be >= 0 (got {rho!r})")
    usam_noise = rho / (2 * m) * trace_v
    correction = (n - m) / (n - 1) if n > 1 else 0.0
    return {
        "usam_noise": usam_noise,
        "usam_noise_without_replacement": usam_noise * correction,
        "sam": rho * expected_norm,
    }


def microbatch_noise_curve(
    grads: torch.Tensor, ms: Sequence[int], *, rho: float, partitions: int = 8, seed: int = 0
) -> list[dict[str, float]]:
    """For each m: E‖∇L_I‖ (see `expected_microbatch_grad_norm`), its prediction from ‖∇L‖ and tr V
    (`predicted_microbatch_grad_norm`: predicted, predicted_sq) and the SDE regularizers at radius ρ."""
    trace_v = float(trace_covariance(grads))
    full = float(grads.mean(dim=0).norm())
    n = int(grads.shape[0])
    rows = []
    for m in ms:
        row = expected_microbatch_grad_norm(grads, m, partitions=partitions, seed=seed)
        regs = sde_regularizers(trace_v=trace_v, expected_norm=row["mean"], rho=rho, m=m, n=n)
        pred = predicted_microbatch_grad_norm(full_grad_norm=full, trace_v=trace_v, m=m, n=n)
        rows.append(row | {"trace_v": trace_v, "full_grad_norm": full, "predicted": pred["mean"],
                           "predicted_sq": pred["mean_sq"]} | {f"reg_{k}": v for k, v in regs.items()})
    return rows


# -- RW-SAM weights ---------------------------------------------------------------------------------
def rwsam_weights(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    lam: float,
    *,
    estimator: str = "exact",
    delta: float = 1e-3,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """The RW-SAM weight distribution p = softmax(λ s) over the samples of (x, y) (Luo et al. 2025).

    s_i ≈ ‖∇f_i(w)‖ from `samlab.optim`'s own estimators (the ones RW-SAM trains with):
    estimator="exact" gives per-sample gradient norms by torch.func; estimator="fd" gives
    s_i = |f_i(w + δz) − f_i(w)| / δ for one Rademacher z from `generator` (one extra forward).
    Measured in eval mode. Returns lam, estimator, scores, weights (lists), max_weight, entropy
    (nats; log n is uniform) and effective_samples = 1 / Σ p_i².
    """
    from samlab.optim import sample_scores

    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        raise ValueError(f"lam: must be a number >= 0 (got {lam!r})")
    with model_mode(model, "eval"), torch.enable_grad():
        scores = sample_scores(model, loss_fn, x, y, estimator=estimator, delta=delta, generator=generator)
    weights = torch.softmax(lam * scores.detach(), dim=0)
    entropy = -(weights * weights.clamp_min(torch.finfo(weights.dtype).tiny).log()).sum()
    return {
        "lam": float(lam),
        "estimator": estimator,
        "scores": scores.detach().tolist(),
        "weights": weights.tolist(),
        "max_weight": float(weights.max()),
        "entropy": float(entropy),
        "effective_samples": float(1.0 / weights.pow(2).sum()),
    }


# -- validation -----------------------------------------------------------------------------------
def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) == 0:
        raise ValueError("x: needs at least one sample")
    if len(x) != len(y):
        raise ValueError(f"y: must have as many samples as x ({len(x)}), got {len(y)}")


def _check_micro_batch(m: int, n: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
        raise ValueError(f"m: must be an integer in [1, {n}] (the number of samples), got {m!r}")
