"""The torch.func side of the SAM family: side-effect-free forwards, vmapped m-SAM, per-sample norms.

Every pass here goes through `torch.func.functional_call`, so the module's own parameters are
never written to, and buffers (BatchNorm running statistics) are replaced by scratch copies
whenever a pass must leave them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from samlab.optim.perturbations import perturbation
from samlab.tensors import LossFn


def scratch_buffers(model: nn.Module, copies: int | None = None) -> dict[str, torch.Tensor]:
    """Copies of the module's buffers that a forward may update without touching the originals.

    With `copies=k` each buffer gets a leading dimension of size k (one copy per vmapped call).
    """
    if copies is None:
        return {name: buf.clone() for name, buf in model.named_buffers()}
    return {name: buf.unsqueeze(0).repeat(copies, *([1] * buf.dim())) for name, buf in model.named_buffers()}


def forward(model: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None,
            *, buffers: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """model(x) with `params` substituted for the module's own parameters.

    buffers=None: the module's own buffers are used (a train-mode BatchNorm updates them);
    a dict (e.g. `scratch_buffers(model)`): those tensors are used and updated instead.
    """
    overrides = dict(params) if params else {}
    if buffers is not None:
        overrides.update(buffers)
    if not overrides:
        return model(x)
    return functional_call(model, overrides, (x,))


def average_into_buffers(model: nn.Module, copies: dict[str, torch.Tensor]) -> None:
    """Set each buffer to the mean of its k updated copies (`copies[name]` has shape [k, ...]).

    Integer buffers (BatchNorm's num_batches_tracked) take the rounded mean, which is exact when
    every copy advanced alike.
    """
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in copies:
                continue
            if buf.is_floating_point():
                buf.copy_(copies[name].mean(0))
            else:
                buf.copy_(copies[name].double().mean(0).round())


def _micro_batch_loss(model: nn.Module, loss_fn: LossFn):
    """(params, buffers, x_j, y_j) -> (mean loss, per-sample losses) for torch.func.grad(has_aux=True)."""

    def loss(params, buffers, xj, yj):
        losses = loss_fn(functional_call(model, (params, buffers), (xj,)), yj)
        return losses.mean(), losses

    return loss


def micro_batch_gradients_vmap(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                               names: Sequence[str], k: int, *, rho: float) -> dict[str, torch.Tensor]:
    """m-SAM with all k micro-batches in parallel (Foret et al. 2021; Behdin et al. 2023).

    g_j = grad L_{B_j}(w) for the k disjoint micro-batches B_j = x.chunk(k)[j] in one vmapped grad
    call, eps_j = rho * g_j / ‖g_j‖ by the shared perturbation rule (vmapped), and
    h_j = grad L_{B_j}(w + eps_j) in a second vmapped grad call; the descent gradient is mean_j h_j.
    Each micro-batch runs the model on its own m samples, so BatchNorm in train mode normalises
    with micro-batch statistics exactly as a sequential loop does. The unperturbed pass of each
    micro-batch updates its own copy of the buffers; the module's buffers become their mean (as the
    data-parallel m-SAM of Foret et al. averages the replicas' BatchNorm moving averages). The
    perturbed pass runs on copies that are discarded.

    Returns "gradient" (mean_j g_j per name), "descent" (mean_j h_j), "micro_norms" (‖g_j‖, [k]),
    "losses" and "perturbed_losses" ([k, m]).
    """
    params = dict(model.named_parameters())
    weights = {name: params[name].detach() for name in names}
    xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
    ys = y.reshape(k, y.shape[0] // k, *y.shape[1:])
    stateful = model.training and any(True for _ in model.buffers())
    grad_fn = grad(_micro_batch_loss(model, loss_fn), has_aux=True)

    def run(weights_dim, weights, buffers):
        in_dims = (weights_dim, 0 if stateful else None, 0, 0)
        return vmap(grad_fn, in_dims=in_dims, randomness="different")(weights, buffers, xs, ys)

    own_buffers = dict(model.named_buffers())
    first_buffers = scratch_buffers(model, copies=k) if stateful else own_buffers
    first, losses = run(None, weights, first_buffers)
    ws = [weights[name] for name in names]
    etas = [0.0] * len(names)
    eps = vmap(lambda gs: perturbation("normalized", gs, ws, rho, etas))([first[name] for name in names])
    perturbed = {name: weights[name] + e for name, e in zip(names, eps, strict=True)}
    second, perturbed_losses = run(0, perturbed, scratch_buffers(model, copies=k) if stateful else own_buffers)
    if stateful:
        average_into_buffers(model, first_buffers)
    firsts = [first[name] for name in names]
    return {
        "gradient": [g.mean(0) for g in firsts],
        "descent": [second[name].mean(0) for name in names],
        "micro_norms": torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in firsts]).sum(0).sqrt(),
        "losses": losses,
        "perturbed_losses": perturbed_losses,
    }


def per_sample_grad_norms(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                          names: Sequence[str], *, chunk: int = 32) -> torch.Tensor:
    """‖grad_w f_i(w)‖ for every sample i of the batch (rows of the Jacobian of the loss vector).

    The losses come from one forward of the whole batch, so a model with BatchNorm in train mode
    differentiates through the batch statistics (the same function the finite-difference estimator
    probes). The Jacobian is pulled back `chunk` rows at a time (vmap over one-hot cotangents) so
    memory stays at chunk x (number of parameters).
    """
    params = dict(model.named_parameters())
    weights = {name: params[name].detach() for name in names}

    def batch_losses(w):
        # scratch buffers made inside the transformed function, which may then update them
        return loss_fn(functional_call(model, (w, scratch_buffers(model)), (x,)), y)

    losses, pullback = vjp(batch_losses, weights)
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    norms = []
    for rows in eye.split(chunk):
        (rows_grads,) = vmap(pullback)(rows)
        squared = sum(g.flatten(1).pow(2).sum(1) for g in rows_grads.values())
        norms.append(squared.sqrt())
    return torch.cat(norms)

