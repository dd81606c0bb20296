"""RW-SAM, Reweighted SAM (Luo, Harandi, Phung, Le, "Unveiling m-Sharpness Through the Structure of
Stochastic Gradient Noise", arXiv 2509.18001, NeurIPS 2025): the ascent gradient, the per-sample scores.

What samlab implements (one optimizer step on a batch B of b samples, per-sample losses f_i):

    s_i  ≈ ‖∇f_i(w)‖                              per-sample scores, raw (not normalised by the batch mean)
    p    = softmax(λ s)                           weights over the batch, Σ_i p_i = 1
    g_p  = ∇ Σ_i p_i f_i(w)                       the reweighted ascent gradient
    ε    = ρ g_p / ‖g_p‖                          one perturbation for the whole batch
    descent gradient = ∇L_B(w + ε), L_B = (1/b) Σ_i f_i   (uniform weights: the weights enter the ascent only)

λ = 0 gives p_i = 1/b, g_p = ∇L_B(w): plain SAM. Large λ perturbs towards the samples whose gradients
are largest, which is what the small micro-batches of m-SAM do (the ascent of a micro-batch of one is
the single sample's own gradient), at the cost of one extra forward pass instead of k = b/m passes.

Scores (estimator="fd"): s_i = |f_i(w + δz) − f_i(w)| / δ for one Rademacher vector z (independent ±1
entries over all trainable parameters), one extra forward and no backward. As δ → 0, s_i → |⟨∇f_i, z⟩|,
with E_z⟨∇f_i, z⟩² = ‖∇f_i‖²: s_i² is unbiased for ‖∇f_i‖², and s_i itself lies in expectation between
‖∇f_i‖/√2 and ‖∇f_i‖ (Khintchine–Szarek). estimator="exact" computes ‖∇f_i‖ by torch.func.

How this was checked against the paper. The stored copies of the paper that samlab's authors could
read (arXiv HTML v1 and v5) give the abstract and Section 1 only; Section 5 (the RW-SAM algorithm),
its equations, the appendix with λ values and the reference code (github.com/RitianLuo/RW-SAM) were
not readable. So these points rest on the abstract and on the figures quoted in samlab's references,
not on the algorithm's own text:
- "sharpness-weighted sampling ... while remaining parallelizable" (abstract): the weights favour
  samples of large gradient norm and the perturbation stays one batch-wide ε, as above.
- overhead ≈ 1/6 over SAM and Table 6's tr V at convergence (SGD 572.4, SAM 198.4, RW-SAM 177.8).
Not verified against Section 5: whether the scores are normalised (e.g. by their batch mean) before
the softmax, whether the weights also enter the descent gradient, the probe distribution and δ, and
the λ the paper recommends. samlab keeps raw scores and reweights the ascent only, and documents
that choice here; its default λ (`DEFAULT_LAM`) was chosen by a measured λ × ρ search on samlab's
own lesson preset (benchmarks/msharp_search.py), not taken from the paper, and is never 0.
Raw scores make λ scale-dependent: λ s_i is what matters, so λ must be read against the score scale
(the `score_mean` metric RW-SAM reports every step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from samlab.optim.functional import forward, per_sample_grad_norms, scratch_buffers
from samlab.tensors import PerSampleLoss as LossFn

DEFAULT_LAM = 0.01  # chosen on the digits-cnn-msharp lesson preset; see the module docstring


def reweighting(scores: torch.Tensor, lam: float) -> torch.Tensor:
    """p = softmax(λ s): RW-SAM's weights over the batch from the per-sample scores s (shape [b])."""
    return torch.softmax(lam * scores, dim=0)


def reweighted_ascent(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, names: Sequence[str],
                      params: Sequence[torch.Tensor], losses: torch.Tensor, *, lam: float, estimator: str,
                      delta: float, generator: torch.Generator | None):
    """(g_p, extra metrics): g_p = ∇ Σ_i p_i f_i(w) with p = softmax(λ s), s_i ≈ ‖∇f_i(w)‖.

    `losses` are the per-sample losses of the unperturbed forward (kept in the graph). One backward, as
    in the paper's cost account (SAM plus one forward): ∇L_B(w) itself is not computed.
    """
    if estimator == "fd":
        scores = finite_difference_scores(model, loss_fn, x, y, names, params, losses, delta, generator)
    else:
        scores = exact_scores(model, loss_fn, x, y, names)
    weights = reweighting(scores, lam)
    ascent = list(torch.autograd.grad(losses @ weights, params, allow_unused=True, materialize_grads=True))
    entropy = -(weights * weights.clamp_min(torch.finfo(weights.dtype).tiny).log()).sum()
    return ascent, {"score_mean": scores.mean(), "weight_entropy": entropy, "max_weight": weights.max()}


def finite_difference_scores(model, loss_fn, x, y, names, params, losses, delta: float,
                             generator: torch.Generator | None) -> torch.Tensor:
    """s_i = |f_i(w + delta z) − f_i(w)| / delta, z Rademacher: one extra forward, no backward."""
    with torch.no_grad():
        shifted = {name: p + delta * rademacher_like(p, generator) for name, p in zip(names, params, strict=True)}
        shifted_losses = loss_fn(forward(model, x, shifted, buffers=scratch_buffers(model)), y)
        return (shifted_losses - losses.detach()).abs() / delta


def exact_scores(model, loss_fn, x, y, names) -> torch.Tensor:
    try:
        return per_sample_grad_norms(model, loss_fn, x, y, names)
    except RuntimeError as err:
        raise ValueError(
            f"estimator: 'exact' needs a model torch.func can differentiate per sample ({err}); use estimator='fd'"
        ) from err


def rademacher_like(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Independent ±1 entries with probability 1/2 each, drawn from `generator`."""
    return torch.empty_like(p).bernoulli_(0.5, generator=generator).mul_(2.0).sub_(1.0)
