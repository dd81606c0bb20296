"""The two-layer ReLU student on the relu-teacher set, trained for many configurations at once.

f(x) = Σ_j a_j relu(<w_j, x>) (`samlab.models.TwoLayerReLU`), per-sample loss f_i = ½ (f(x_i) − y_i)²,
full-batch steps with a constant learning rate (momentum 0, no weight decay), as the trainer runs the
`relu-msharp` preset. Every configuration (method, m, ρ, seed) is one slice of a leading axis, and each
step is a few batched tensor operations with closed-form gradients:

    ∂f_i/∂a_j = relu(<w_j, x_i>),   ∂f_i/∂w_j = a_j 1[<w_j, x_i> > 0] x_i.

Methods: "sgd" (gradient descent), "sam" (one perturbation from the whole batch; m = n), "msam"
(k = n/m disjoint micro-batches, eps_j from micro-batch j's own gradient, descent the mean of the k
perturbed micro-batch gradients), "rwsam" (RW-SAM with exact scores, `samlab.optim.reweighted`: the
ascent gradient Σ_i p_i ∇f_i with p = softmax(λ ‖∇f_i‖), one perturbation, uniform descent; the
per-sample norms are closed-form, ‖∇f_i‖² = r_i² (‖relu(W x_i)‖² + ‖a ⊙ 1[W x_i > 0]‖² ‖x_i‖²)). Perturbations are "normalized" (eps = ρ g/‖g‖, SAM) or
"unnormalized" (eps = ρ g, USAM). Micro-batches are cut from one seeded permutation per step drawn
exactly as `samlab.data.iterate_batches` draws it for the trainer, and the initial weights are
`build_model`'s for the seed, so a configuration here follows the trainer's run of the same config up
to float rounding (tested). It exists because it is ~100× faster than one trainer run per
configuration on a CPU: a whole ρ × m × seed grid trains in seconds, which is what the m-sharpness
search (benchmarks/msharp_search.py) and the lesson's live step need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from samlab.config import ModelConfig
from samlab.data import Dataset
from samlab.models import build_model

STUDENT_METHODS = ("sgd", "sam", "msam", "rwsam")
RULES = ("normalized", "unnormalized")


@dataclass(frozen=True)
class StudentRun:
    method: str
    m: int  # samples per perturbation (the batch size n for sgd, sam and rwsam)
    rho: float
    seed: int
    lam: float = 0.0  # rwsam: p = softmax(lam * s) with exact scores s_i = ‖∇f_i‖


def train_students(data: Dataset, runs: Sequence[StudentRun], *, width: int, init_scale: float, lr: float,
                   steps: int, rule: str = "normalized", dtype: torch.dtype = torch.float32) -> list[dict[str, float]]:
    """Train every run on the full train set of `data` (regression, vector inputs) for `steps` steps.

    Returns one dict per run, in order: test_loss, train_loss (mean ½ residual² at the end) and the
    gradient-noise figures at the end of training (`student_noise`: trace_v, full_grad_norm).
    """
    _check(data, runs, width, init_scale, lr, steps, rule)
    x, y = data.x_train.to(dtype), data.y_train.to(dtype)
    n = x.shape[0]
    results: list[dict[str, float] | None] = [None] * len(runs)
    for m in sorted({run.m for run in runs}):
        index = [i for i, run in enumerate(runs) if run.m == m]
        group = [runs[i] for i in index]
        hidden, out = _initial_weights(group, x.shape[1], width, init_scale, dtype)
        rho = torch.tensor([r.rho if r.method != "sgd" else 0.0 for r in group], dtype=dtype)
        lam = torch.tensor([r.lam if r.method == "rwsam" else 0.0 for r in group], dtype=dtype)
        gens = {seed: torch.Generator().manual_seed(seed) for seed in {r.seed for r in group}}
        for _ in range(steps):
            perms = {seed: torch.randperm(n, generator=g) for seed, g in gens.items()}
            order = torch.stack([perms[r.seed] for r in group])  # [C, n]
            g_hidden, g_out = _descent(hidden, out, x[order], y[order], m, rho, rule, lam)
            hidden = hidden - lr * g_hidden
            out = out - lr * g_out
        for slot, i in enumerate(index):
            results[i] = _summary(hidden[slot], out[slot], data, dtype)
    return results  # type: ignore[return-value]


def predict(hidden: torch.Tensor, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(x) for weights hidden [..., h, d], out [..., h] and inputs x [..., b, d] -> [..., b]."""
    return (torch.relu(x @ hidden.transpose(-1, -2)) * out.unsqueeze(-2)).sum(-1)


def per_sample_gradients(hidden: torch.Tensor, out: torch.Tensor, x: torch.Tensor,
                         y: torch.Tensor) -> torch.Tensor:
    """[b, P] per-sample gradients of ½ (f(x_i) − y_i)², parameters flattened as (hidden, out)."""
    pre = x @ hidden.T  # [b, h]
    residual = (torch.relu(pre) * out).sum(-1) - y  # [b]
    g_out = residual[:, None] * torch.relu(pre)
    g_hidden = (residual[:, None] * (pre > 0) * out)[:, :, None] * x[:, None, :]  # [b, h, d]
    return torch.cat([g_hidden.flatten(1), g_out], dim=1)


def _descent(hidden, out, xs, ys, m: int, rho: torch.Tensor, rule: str, lam: torch.Tensor):
    """The mean over micro-batches of the perturbed micro-batch gradients, for every configuration.

    hidden [C, h, d], out [C, h], xs [C, n, d], ys [C, n]; micro-batch j is rows j·m..(j+1)·m − 1.
    `lam` [C]: RW-SAM's λ (0: uniform weights in the ascent).
    """
    c, n, d = xs.shape
    k = n // m
    xb, yb = xs.reshape(c, k, m, d), ys.reshape(c, k, m)
    weights = None
    if bool((lam != 0).any()):
        weights = torch.softmax(lam[:, None, None] * _sample_grad_norms(hidden[:, None], out[:, None], xb, yb), -1)
    g_hidden, g_out = _block_gradients(hidden[:, None], out[:, None], xb, yb, weights)  # [C, k, h, d], [C, k, h]
    if rule == "normalized":
        norm = (g_hidden.pow(2).sum((-1, -2)) + g_out.pow(2).sum(-1)).sqrt()  # [C, k]
        scale = rho[:, None] / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    else:
        scale = rho[:, None].expand(c, k)
    p_hidden = hidden[:, None] + scale[..., None, None] * g_hidden
    p_out = out[:, None] + scale[..., None] * g_out
    h_hidden, h_out = _block_gradients(p_hidden, p_out, xb, yb)
    return h_hidden.mean(1), h_out.mean(1)


def _block_gradients(hidden, out, xb, yb, weights=None):
    """Σ_i p_i ∇f_i over each block (p_i = 1/m unless `weights` [C, k, m] are given):
    hidden [C, k, h, d], out [C, k, h], xb [C, k, m, d], yb [C, k, m]."""
    pre, act, residual = _forward(hidden, out, xb, yb)
    p = torch.full_like(residual, 1.0 / xb.shape[2]) if weights is None else weights
    g_out = ((p * residual)[..., None] * act).sum(2)
    coef = (p * residual)[..., None] * (pre > 0) * out[:, :, None, :]  # [C, k, m, h]
    g_hidden = coef.transpose(-1, -2) @ xb  # [C, k, h, d]
    return g_hidden, g_out


def _sample_grad_norms(hidden, out, xb, yb):
    """‖∇f_i‖ for every sample of every block, [C, k, m], in closed form."""
    pre, act, residual = _forward(hidden, out, xb, yb)
    gate = ((pre > 0) * out[:, :, None, :]).pow(2).sum(-1)  # ‖a ⊙ 1[Wx > 0]‖²
    return residual.abs() * (act.pow(2).sum(-1) + gate * xb.pow(2).sum(-1)).sqrt()


def _forward(hidden, out, xb, yb):
    pre = xb @ hidden.transpose(-1, -2)  # [C, k, m, h]
    act = torch.relu(pre)
    return pre, act, (act * out[:, :, None, :]).sum(-1) - yb


def _initial_weights(group: Sequence[StudentRun], d: int, width: int, init_scale: float, dtype):
    hidden, out = [], []
    cfg = ModelConfig(name="relu-net", width=width, init_scale=init_scale)
    for run in group:
        model = build_model(cfg, (d,), 1, seed=run.seed)
        hidden.append(model.hidden.detach().to(dtype))
        out.append(model.out.detach().to(dtype))
    return torch.stack(hidden), torch.stack(out)


def _summary(hidden, out, data: Dataset, dtype) -> dict[str, float]:
    x, y = data.x_train.to(dtype), data.y_train.to(dtype)
    xt, yt = data.x_test.to(dtype), data.y_test.to(dtype)
    grads = per_sample_gradients(hidden, out, x, y)
    mean = grads.mean(0)
    return {
        "test_loss": float((0.5 * (predict(hidden, out, xt) - yt) ** 2).mean()),
        "train_loss": float((0.5 * (predict(hidden, out, x) - y) ** 2).mean()),
        "trace_v": float((grads - mean).pow(2).sum(1).mean()),
        "full_grad_norm": float(mean.norm()),
    }


def _check(data: Dataset, runs: Sequence[StudentRun], width: int, init_scale: float, lr: float, steps: int,
           rule: str) -> None:
    if data.task != "regression" or len(data.input_shape) != 1:
        raise ValueError(f"data: the student trains on a regression set with vector inputs (got {data.name!r})")
    n = data.x_train.shape[0]
    if rule not in RULES:
        raise ValueError(f"rule: must be one of {', '.join(RULES)} (got {rule!r})")
    for name, value in (("width", width), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1 (got {value!r})")
    for name, value in (("init_scale", init_scale), ("lr", lr)):
        if not value > 0:
            raise ValueError(f"{name}: must be > 0 (got {value!r})")
    if not runs:
        raise ValueError("runs: needs at least one run")
    for run in runs:
        if run.method not in STUDENT_METHODS:
            raise ValueError(f"runs: method must be one of {', '.join(STUDENT_METHODS)} (got {run.method!r})")
        if run.method == "rwsam" and not run.lam >= 0:
            raise ValueError(f"runs: λ must be >= 0 (got {run.lam!r})")
        if run.method != "msam" and run.m != n:
            raise ValueError(f"runs: {run.method} perturbs with the whole batch, so m = n = {n} (got m={run.m})")
        if not (isinstance(run.m, int) and 1 <= run.m <= n and n % run.m == 0):
            raise ValueError(f"runs: m must divide the {n} train samples (got m={run.m!r})")
        if not run.rho >= 0:
            raise ValueError(f"runs: ρ must be >= 0 (got {run.rho!r})")
