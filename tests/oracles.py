"""Textbook SAM and m-SAM on a module with BatchNorm: deep copies perturbed in place, no torch.func.

The oracle for samlab.optim on networks with batch statistics. Each (micro-)batch goes through its own
deep copy of the model in train mode: one backward pass gives g, the copy's weights are moved in place
to w + rho g/‖g‖, a second forward (normalised with the batch's statistics at the perturbed weights) and
backward give the descent gradient. It shares no code with samlab.optim.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # per-sample losses


def sam_by_copy(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, rho: float,
                ascent: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(grad L_B(w + rho d/‖d‖), the buffers after the unperturbed forward); d = g, or `ascent` when given."""
    net = copy.deepcopy(model).train()
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.autograd.grad(loss_fn(net(x), y).mean(), params)
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}  # before the perturbed pass
    direction = g if ascent is None else ascent
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in direction))
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(rho * d / norm)
    return list(torch.autograd.grad(loss_fn(net(x), y).mean(), params)), buffers


def first_pass_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """grad L_B(w) of a deep copy in train mode (batch statistics)."""
    net = copy.deepcopy(model).train()
    return list(torch.autograd.grad(loss_fn(net(x), y).mean(), [p for p in net.parameters() if p.requires_grad]))


def msam_by_copies(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, rho: float,
                   m: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(1/k) Σ_j SAM gradient of micro-batch j on its own copy, and the copies' buffers averaged (float64)."""
    parts = [sam_by_copy(model, loss_fn, x[j:j + m], y[j:j + m], rho) for j in range(0, len(x), m)]
    grads = [torch.stack(gs).mean(0) for gs in zip(*(p[0] for p in parts))]
    buffers = {name: torch.stack([p[1][name].double() for p in parts]).mean(0) for name in parts[0][1]}
    return grads, buffers
