"""Perturbation rules of the SAM family: eps = rho * direction(g, w).

Each rule maps a gradient g (a list of tensors, one per parameter) and the weights w to the
ascent direction d, and the perturbation is eps = rho * d. Every method of samlab goes through
these functions: `sharpness_gradient` (also under `torch.func.vmap`, one rule call per
micro-batch) and the `SAM` optimizer class.

- normalized (SAM, Foret et al. 2021; n-SAM, m-SAM, the ghost-BatchNorm control, RW-SAM): d = g / ‖g‖
- adaptive (ASAM, Kwon et al. 2021): d = T² g / ‖T g‖, T = |w| + eta_a elementwise
- unnormalized (USAM, Andriushchenko & Flammarion 2022): d = g

‖·‖ is the Euclidean norm over all parameters together. A zero gradient gives d = 0 (the norm
is clamped to the smallest positive float, so 0 / tiny = 0): no perturbation, no NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from samlab.tensors import Tensors

Rule = Callable[[Tensors, Tensors, Sequence[float]], list[torch.Tensor]]


def global_norm(tensors: Tensors) -> torch.Tensor:
    """‖(t_1, ..., t_n)‖_2: the Euclidean norm of all tensors taken as one vector."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _safe_scale(norm: torch.Tensor) -> torch.Tensor:
    """1 / ‖v‖, finite when ‖v‖ = 0 (v is then zero and v / ‖v‖ is taken as 0)."""
    return 1.0 / norm.clamp_min(torch.finfo(norm.dtype).tiny)


def normalized_direction(grads: Tensors, weights: Tensors, etas: Sequence[float]) -> list[torch.Tensor]:
    """SAM: d = g / ‖g‖ (Foret et al., ICLR 2021). `weights` and `etas` are unused."""
    scale = _safe_scale(global_norm(grads))
    return [g * scale for g in grads]


def adaptive_direction(grads: Tensors, weights: Tensors, etas: Sequence[float]) -> list[torch.Tensor]:
    """ASAM: d = T² g / ‖T g‖ with T = |w| + eta_a elementwise (Kwon et al., ICML 2021).

    `etas` holds eta_a for each parameter tensor (the optimizer class allows one per param group).
    """
    scaled = [(w.abs() + eta) for w, eta in zip(weights, etas, strict=True)]
    t_g = [t * g for t, g in zip(scaled, grads, strict=True)]
    scale = _safe_scale(global_norm(t_g))
    return [t * tg * scale for t, tg in zip(scaled, t_g, strict=True)]


def unnormalized_direction(grads: Tensors, weights: Tensors, etas: Sequence[float]) -> list[torch.Tensor]:
    """USAM: d = g, so eps = rho * g (Andriushchenko & Flammarion, ICML 2022)."""
    return list(grads)


RULES: dict[str, Rule] = {
    "normalized": normalized_direction,
    "adaptive": adaptive_direction,
    "unnormalized": unnormalized_direction,
}

# Which rule each method of `samlab.config.METHODS` perturbs with (sgd does not perturb).
METHOD_RULES: dict[str, str | None] = {
    "sgd": None,
    "sam": "normalized",
    "asam": "adaptive",
    "usam": "unnormalized",
    "nsam": "normalized",
    "msam": "normalized",
    "ghostbn": "normalized",
    "rwsam": "normalized",
}


def perturbation(rule: str, grads: Tensors, weights: Tensors, rho: float | Sequence[float],
                 etas: Sequence[float]) -> list[torch.Tensor]:
    """eps = rho * direction(g, w); `rho` is one float or one per tensor (per param group)."""
    direction = RULES[rule](grads, weights, etas)
    if isinstance(rho, (int, float)):
        return [d * rho for d in direction]
    return [d * r for d, r in zip(direction, rho, strict=True)]
