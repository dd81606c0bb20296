"""`sharpness_gradient`: one optimizer step's descent gradient for every method of the SAM family.

Each method is the same two-pass step, w -> eps -> grad L(w + eps); methods differ only in the
ascent gradient the perturbation is built from (`_ascent_gradient`) and in the perturbation rule
(`samlab.optim.perturbations`). m-SAM repeats the step on disjoint micro-batches, one after
another (impl="loop"), all at once under torch.func.vmap (impl="vmap"), or all at once in one pass
of the model with per-micro-batch weights (impl="fused", `samlab.optim.fused`); impl="auto" picks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from samlab.config import ESTIMATORS, IMPLS, METHODS
from samlab.optim.functional import (
    average_into_buffers,
    forward,
    micro_batch_gradients_vmap,
    scratch_buffers,
)
from samlab.optim.fused import micro_batch_gradients, per_sample_model
from samlab.optim.perturbations import METHOD_RULES, global_norm, perturbation
from samlab.optim.reweighted import exact_scores, finite_difference_scores, reweighted_ascent
from samlab.tensors import LossFn
from samlab.validation import check_choice, check_number

AscentHook = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class _Spec:
    """The validated hyperparameters of one call."""

    method: str
    rho: float
    lam: float
    estimator: str
    delta: float
    adaptive_eta: float
    perturb_batch: tuple[torch.Tensor, torch.Tensor] | None
    generator: torch.Generator | None
    ascent_hook: AscentHook | None = None

    @property
    def rule(self) -> str | None:
        return METHOD_RULES[self.method]


@dataclass
class _Step:
    """What one perturbation step (on the whole batch or on one micro-batch) produced."""

    losses: torch.Tensor  # per-sample losses at w
    perturbed_losses: torch.Tensor  # per-sample losses at w + eps
    gradient: list[torch.Tensor]  # grad L(w) of the (micro-)batch
    descent: list[torch.Tensor]  # grad L(w + eps)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def sharpness_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str,
    rho: float,
    m: int | None = None,
    impl: str = "auto",
    lam: float = 0.0,
    estimator: str = "fd",
    delta: float = 1e-3,
    adaptive_eta: float = 0.01,
    perturb_batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    ascent_hook: AscentHook | None = None,
) -> dict[str, float]:
    """Set every trainable parameter's `.grad` to the descent gradient of `method`.

    `loss_fn(outputs, targets)` returns per-sample losses f_i (shape [b]); L_B = mean_i f_i.
    With g = grad L_B(w) and eps = rho * d (d from `samlab.optim.perturbations`):

    - sgd: grad L_B(w).
    - sam (Foret et al., ICLR 2021): eps = rho g / ‖g‖, descent grad L_B(w + eps).
    - asam (Kwon et al., ICML 2021): eps = rho T² g / ‖T g‖, T = |w| + adaptive_eta.
    - usam (Andriushchenko & Flammarion, ICML 2022): eps = rho g.
    - nsam: eps = rho g_n / ‖g_n‖, g_n = grad of the mean loss on `perturb_batch` (x_p, y_p),
      e.g. the full train set; descent grad L_B(w + eps).
    - msam (Foret et al. 2021; Behdin et al. 2023): B is split into k = b/m disjoint micro-batches
      B_j of m samples; eps_j = rho g_j / ‖g_j‖ with g_j = grad L_{B_j}(w); descent
      (1/k) Σ_j grad L_{B_j}(w + eps_j). m = b is SAM. impl="loop" runs the micro-batches one after
      another (any model); impl="vmap" runs all of them in two vmapped grad calls; impl="fused" runs
      all of them in two passes of the model in which micro-batch j sees its own weights (batched
      layers; models whose samples interact only through BatchNorm); impl="auto" (the default)
      takes "fused" where the model is built of layers it supports, else "vmap", else "loop".
    - ghostbn (the control for m-SAM's BatchNorm): the batch is run as k = b/m micro-batches of m
      samples, each normalised with its own BatchNorm statistics as in m-SAM, but with ONE
      perturbation for the whole batch: g = (1/k) Σ_j grad L_{B_j}(w), eps = rho g / ‖g‖, descent
      (1/k) Σ_j grad L_{B_j}(w + eps). It changes the normalisation as m-SAM does and the perturbation
      not at all, so ghostbn − sam measures the BatchNorm effect and msam − ghostbn the perturbation
      effect. m = b is SAM; without BatchNorm (or in eval mode) ghostbn is SAM for every m.
    - rwsam (Luo et al., NeurIPS 2025; `samlab.optim.reweighted`): p = softmax(lam * s),
      s_i ≈ ‖grad f_i(w)‖; eps = rho g_p / ‖g_p‖ with g_p = grad Σ_i p_i f_i(w); descent grad L_B(w + eps).
      estimator="fd": s_i = |f_i(w + delta z) − f_i(w)| / delta with a Rademacher z drawn from
      `generator` (one extra forward). Since E_z[⟨grad f_i, z⟩²] = ‖grad f_i‖², s_i² is unbiased
      for ‖grad f_i‖² up to O(delta); s_i itself estimates E_z|⟨grad f_i, z⟩|, which lies between
      ‖grad f_i‖/√2 and ‖grad f_i‖ (Khintchine–Szarek) and is ≈ sqrt(2/π) ‖grad f_i‖ when the
      gradient is spread over many coordinates. estimator="exact": per-sample gradient norms by
      torch.func. lam = 0 is SAM (the scores are then not computed).

    `ascent_hook(ascent) -> ascent`, when given, transforms the gradient the perturbation is built
    from before eps is computed (one perturbation per call: not with msam's k > 1 micro-batches).
    Data-parallel training passes an all-reduce mean here, so every rank perturbs with the gradient
    of the global batch (plain SAM over it) instead of its own shard's (m-SAM, m = per-rank batch).

    A zero ascent gradient gives eps = 0. The weights are never modified (perturbed passes run
    through torch.func.functional_call on perturbed copies). Buffers such as BatchNorm running
    statistics are updated by the unperturbed pass only; every other pass runs on discarded
    copies. So for every method but m-SAM they end as after one plain forward of x in the model's
    current mode. m-SAM with k > 1: each micro-batch's unperturbed pass updates its own copy and
    the buffers become the mean of the k copies (the data-parallel m-SAM of Foret et al. averages
    the replicas' BatchNorm moving averages the same way); m = b is again one plain forward.

    Returns floats: loss (mean unperturbed loss; for m-SAM the mean over micro-batches, each
    normalised with its own statistics), perturbed_loss (mean loss at the perturbed weights; equal
    to loss for sgd), grad_norm (‖grad L_B(w)‖; for m-SAM ‖mean_j g_j‖; for rwsam with lam > 0
    ‖g_p‖, so that RW-SAM costs SAM plus one forward), and per method: micro_grad_norm
    (msam: mean_j ‖g_j‖), perturb_grad_norm (nsam: ‖g_n‖), score_mean (mean s_i), weight_entropy
    and max_weight (of p; rwsam with lam > 0).
    """
    spec = _check_arguments(model, x, y, method=method, rho=rho, m=m, impl=impl, lam=lam, estimator=estimator,
                            delta=delta, adaptive_eta=adaptive_eta, perturb_batch=perturb_batch, generator=generator,
                            ascent_hook=ascent_hook)
    names, params = _trainable(model)
    k = x.shape[0] // m if method in ("msam", "ghostbn") else 1
    with torch.enable_grad():
        if method == "ghostbn" and k > 1:
            step = _ghost_batchnorm_step(model, loss_fn, x, y, names, params, k, spec)
        else:
            step = _micro_batches(model, loss_fn, x, y, names, params, k, spec, impl)
    return _finish(params, step, method)


# -- one perturbation step --------------------------------------------------------------------------
def _perturbation_step(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                       names: Sequence[str], params: Sequence[torch.Tensor], spec: _Spec,
                       *, buffers: dict[str, torch.Tensor] | None = None) -> _Step:
    """w -> ascent gradient -> eps -> grad L(w + eps) on one batch (or micro-batch).

    The unperturbed pass updates `buffers` (None: the module's own); every other pass runs on
    discarded copies.
    """
    losses = _per_sample(loss_fn(forward(model, x, buffers=buffers), y), x.shape[0])
    gradient, ascent, extras = _ascent_gradient(model, loss_fn, x, y, names, params, losses, spec)
    if spec.rule is None:
        return _Step(losses.detach(), losses.detach(), gradient, gradient, extras)
    if spec.ascent_hook is not None:
        ascent = spec.ascent_hook(ascent)
    weights = [p.detach() for p in params]
    eps = perturbation(spec.rule, ascent, weights, spec.rho, [spec.adaptive_eta] * len(weights))
    perturbed = {name: (w + e).requires_grad_() for name, w, e in zip(names, weights, eps, strict=True)}
    perturbed_losses = _per_sample(loss_fn(forward(model, x, perturbed, buffers=scratch_buffers(model)), y), x.shape[0])
    descent = _grad(perturbed_losses.mean(), list(perturbed.values()))
    return _Step(losses.detach(), perturbed_losses.detach(), gradient, descent, extras)


def _ascent_gradient(model, loss_fn, x, y, names, params, losses, spec: _Spec):
    """(grad L_B(w), the gradient the perturbation is built from, extra metrics) for `spec.method`."""
    if spec.method == "rwsam" and spec.lam != 0.0:
        ascent, extras = reweighted_ascent(model, loss_fn, x, y, names, params, losses, lam=spec.lam,
                                           estimator=spec.estimator, delta=spec.delta, generator=spec.generator)
        # grad L_B(w) is not computed (RW-SAM costs SAM plus one forward): grad_norm reports ‖g_p‖
        return ascent, ascent, extras
    gradient = _grad(losses.mean(), params)
    if spec.method == "nsam":
        x_p, y_p = spec.perturb_batch
        ascent = _grad(loss_fn(forward(model, x_p, buffers=scratch_buffers(model)), y_p).mean(), params)
        return gradient, ascent, {"perturb_grad_norm": global_norm(ascent)}
    return gradient, gradient, {}


def sample_scores(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, *,
                  estimator: str = "fd", delta: float = 1e-3,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """RW-SAM's per-sample scores s_i ≈ ‖grad f_i(w)‖ (Luo et al., NeurIPS 2025), shape [b].

    estimator="fd": s_i = |f_i(w + delta z) − f_i(w)| / delta, z with independent ±1 entries drawn
    from `generator` (one tensor per trainable parameter, in `named_parameters` order): two
    forwards, no backward. s_i → |⟨grad f_i, z⟩| as delta → 0, so E_z[s_i²] → ‖grad f_i‖² and
    E_z[s_i] → E_z|⟨grad f_i, z⟩| ∈ [‖grad f_i‖/√2, ‖grad f_i‖].
    estimator="exact": ‖grad f_i(w)‖ from the Jacobian of the per-sample losses (torch.func).
    Forwards run in the model's current mode; buffers are left unchanged.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    check_number("delta", delta, lower=0.0, open_lower=True)
    _batch_size(x, y, "x", "y")
    names, params = _trainable(model)
    if estimator == "exact":
        return exact_scores(model, loss_fn, x, y, names)
    with torch.no_grad():
        losses = _per_sample(loss_fn(forward(model, x, buffers=scratch_buffers(model)), y), x.shape[0])
    return finite_difference_scores(model, loss_fn, x, y, names, params, losses, delta, generator)


# -- micro-batches ----------------------------------------------------------------------------------
def _micro_batches(model, loss_fn, x, y, names, params, k: int, spec: _Spec, impl: str) -> _Step:
    """The step over k micro-batches by `impl`; "auto" falls back to the loop (for good) when vmap fails."""
    chosen = choose_impl(model) if impl == "auto" else impl
    if k == 1 or chosen == "loop":
        return _sequential_micro_batches(model, loss_fn, x, y, names, params, k, spec)
    try:
        return _parallel_micro_batches(model, loss_fn, x, y, names, k, spec, chosen)
    except ValueError:
        if impl != "auto" or chosen != "vmap":
            raise
        _VMAP_FAILED.add(model)
    return _sequential_micro_batches(model, loss_fn, x, y, names, params, k, spec)


def _sequential_micro_batches(model, loss_fn, x, y, names, params, k: int, spec: _Spec) -> _Step:
    """k = 1: the plain two-pass step; k > 1: the same step on each micro-batch in turn, averaged.

    Gradients are summed in place as the micro-batches go, so memory does not grow with k. Each
    micro-batch's unperturbed pass updates its own copy of the buffers; the module's buffers
    become their mean, as in the vmapped path.
    """
    if k == 1:
        return _perturbation_step(model, loss_fn, x, y, names, params, spec)
    losses, perturbed_losses, micro_norms, buffer_copies = [], [], [], []
    gradient_sum = descent_sum = None
    for xj, yj in zip(x.chunk(k), y.chunk(k), strict=True):
        buffer_copies.append(scratch_buffers(model))
        step = _perturbation_step(model, loss_fn, xj, yj, names, params, spec, buffers=buffer_copies[-1])
        losses.append(step.losses)
        perturbed_losses.append(step.perturbed_losses)
        micro_norms.append(global_norm(step.gradient))
        if gradient_sum is None:
            gradient_sum, descent_sum = step.gradient, step.descent
        else:
            torch._foreach_add_(gradient_sum, step.gradient)
            torch._foreach_add_(descent_sum, step.descent)
    if model.training:
        average_into_buffers(model, {name: torch.stack([c[name] for c in buffer_copies]) for name in buffer_copies[0]})
    return _Step(
        losses=torch.cat(losses),
        perturbed_losses=torch.cat(perturbed_losses),
        gradient=torch._foreach_div(gradient_sum, k),
        descent=torch._foreach_div(descent_sum, k),
        extras={"micro_grad_norm": torch.stack(micro_norms).mean()},
    )


def _ghost_batchnorm_step(model, loss_fn, x, y, names, params, k: int, spec: _Spec) -> _Step:
    """One perturbation for the batch, BatchNorm statistics per micro-batch (method ghostbn).

    Both passes run the k micro-batches through the model one by one, each on its own copy of the
    buffers (so in train mode each is normalised with its own statistics, exactly as in m-SAM); the
    unperturbed copies are averaged into the module's buffers as m-SAM does, the perturbed ones are
    discarded. The mean loss over the batch is the mean of the micro-batch losses, so its gradient is
    (1/k) Σ_j grad L_{B_j}.
    """
    copies = [scratch_buffers(model) for _ in range(k)]
    losses = _per_sample(loss_fn(ghost_forward(model, x, copies), y), x.shape[0])
    gradient = _grad(losses.mean(), params)
    ascent = spec.ascent_hook(gradient) if spec.ascent_hook is not None else gradient
    weights = [p.detach() for p in params]
    eps = perturbation("normalized", ascent, weights, spec.rho, [0.0] * len(weights))
    perturbed = {name: (w + e).requires_grad_() for name, w, e in zip(names, weights, eps, strict=True)}
    scratch = [scratch_buffers(model) for _ in range(k)]
    perturbed_losses = _per_sample(loss_fn(ghost_forward(model, x, scratch, perturbed), y), x.shape[0])
    descent = _grad(perturbed_losses.mean(), list(perturbed.values()))
    if model.training and copies[0]:
        average_into_buffers(model, {name: torch.stack([c[name] for c in copies]) for name in copies[0]})
    return _Step(losses.detach(), perturbed_losses.detach(), gradient, descent)


def ghost_forward(model: nn.Module, x: torch.Tensor, buffers: Sequence[dict[str, torch.Tensor]],
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """model(x) run as len(buffers) equal micro-batches, micro-batch j on `buffers[j]`, outputs concatenated."""
    chunks = x.chunk(len(buffers))
    return torch.cat([forward(model, xj, params, buffers=bj) for xj, bj in zip(chunks, buffers, strict=True)])


def choose_impl(model: nn.Module) -> str:
    """impl="auto": "fused" for models built of layers it batches (every built-in model), else "vmap"
    (or "loop" once vmap has failed on this model)."""
    if model in _VMAP_FAILED:
        return "loop"
    return "fused" if per_sample_model(model) else "vmap"


_VMAP_FAILED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
PARALLEL = {"vmap": micro_batch_gradients_vmap, "fused": micro_batch_gradients}


def _parallel_micro_batches(model, loss_fn, x, y, names, k: int, spec: _Spec, impl: str) -> _Step:
    """All k micro-batches at once (vmap or fused); folded into one _Step with mean gradients."""
    try:
        out = PARALLEL[impl](model, loss_fn, x, y, names, k, rho=spec.rho)
    except torch.OutOfMemoryError:
        raise  # k copies of the activations did not fit: not a model vmap cannot handle
    except RuntimeError as err:
        if impl == "fused":
            raise
        raise ValueError(f"impl: this model cannot run under torch.func.vmap ({err}); use impl='loop'") from err
    return _Step(
        losses=_per_sample(out["losses"].reshape(-1), x.shape[0]),
        perturbed_losses=out["perturbed_losses"].reshape(-1),
        gradient=out["gradient"],
        descent=out["descent"],
        extras={"micro_grad_norm": out["micro_norms"].mean()},
    )


# -- combining and reporting --------------------------------------------------------------------------
def _finish(params: Sequence[torch.Tensor], step: _Step, method: str) -> dict[str, float]:
    """Write .grad and turn the metrics into floats (one device sync)."""
    for p, g in zip(params, step.descent, strict=True):
        p.grad = g.detach()
    metrics = {
        "loss": step.losses.mean(),
        "perturbed_loss": step.perturbed_losses.mean(),
        "grad_norm": global_norm(step.gradient),
        **step.extras,
    }
    if method == "msam":
        metrics.setdefault("micro_grad_norm", metrics["grad_norm"])  # m = b: one micro-batch
    names = list(metrics)
    values = torch.stack([metrics[n].detach().to(torch.float64) for n in names]).tolist()
    return dict(zip(names, values, strict=True))


def _grad(value: torch.Tensor, inputs: Sequence[torch.Tensor], *, retain_graph: bool = False) -> list[torch.Tensor]:
    """d value / d inputs, zeros for inputs the value does not depend on."""
    return list(torch.autograd.grad(value, inputs, retain_graph=retain_graph, allow_unused=True,
                                    materialize_grads=True))


def _per_sample(losses: torch.Tensor, batch: int) -> torch.Tensor:
    if losses.shape != (batch,):
        raise ValueError(
            f"loss_fn: must return per-sample losses of shape [{batch}] (got shape {list(losses.shape)}); "
            "use reduction='none'"
        )
    return losses


def _trainable(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model: has no parameter with requires_grad=True")
    return [name for name, _ in named], [p for _, p in named]


# -- validation ------------------------------------------------------------------------------------
def _check_arguments(model, x, y, *, method, rho, m, impl, lam, estimator, delta, adaptive_eta, perturb_batch,
                     generator, ascent_hook=None) -> _Spec:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: must be a torch.nn.Module (got {type(model).__name__})")
    check_choice("method", method, METHODS)
    check_choice("impl", impl, IMPLS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_number("rho", rho, lower=0.0)
    check_number("lam", lam, lower=0.0)
    check_number("delta", delta, lower=0.0, open_lower=True)
    check_number("adaptive_eta", adaptive_eta, lower=0.0)
    batch = _batch_size(x, y, "x", "y")
    if method in ("msam", "ghostbn") and not _divides(m, batch):
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ValueError(f"m: {method} needs a micro-batch size m that divides the batch of {batch}, "
                         f"one of {divisors} (got {m!r})")
    if method == "nsam":
        if not isinstance(perturb_batch, (tuple, list)) or len(perturb_batch) != 2:
            raise ValueError("perturb_batch: nsam needs (x_p, y_p), the batch its perturbation is computed on")
        _batch_size(perturb_batch[0], perturb_batch[1], "perturb_batch[0]", "perturb_batch[1]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: must be a torch.Generator or None (got {type(generator).__name__})")
    if ascent_hook is not None and not callable(ascent_hook):
        raise ValueError(f"ascent_hook: must be a callable or None (got {type(ascent_hook).__name__})")
    if ascent_hook is not None and method == "msam" and m != batch:
        raise ValueError(f"ascent_hook: transforms a single perturbation; msam with m={m} < batch {batch} has "
                         f"{batch // m} (use m = batch, or no hook)")
    return _Spec(method, float(rho), float(lam), estimator, float(delta), float(adaptive_eta),
                 tuple(perturb_batch) if method == "nsam" else None, generator, ascent_hook)


def _divides(m, batch: int) -> bool:
    return isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= batch and batch % m == 0


def _batch_size(x, y, x_name: str, y_name: str) -> int:
    for name, value in ((x_name, x), (y_name, y)):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise ValueError(f"{name}: must be a tensor with a batch dimension")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{y_name}: must have as many rows as {x_name} (>= 1), got {y.shape[0]} and {x.shape[0]}")
    return x.shape[0]
