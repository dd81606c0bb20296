"""Per-sample losses and accuracy for the two tasks samlab trains: classification and regression."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from samlab.tensors import PerSampleLoss


def cross_entropy_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def squared_error_per_sample(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.5 * (f(x) - y)^2 per sample (outputs of shape [b] or [b, 1])."""
    return 0.5 * (outputs.reshape(targets.shape) - targets) ** 2


def per_sample_loss(task: str) -> PerSampleLoss:
    """The per-sample loss (shape [b]) the optimizers take; the objective is its mean."""
    if task == "classification":
        return cross_entropy_per_sample
    if task == "regression":
        return squared_error_per_sample
    raise ValueError(f"task: must be 'classification' or 'regression' (got {task!r})")


def mean_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The mean loss (a scalar) the Hessian and landscape analyses take."""
    per_sample = per_sample_loss(task)
    return lambda outputs, targets: per_sample(outputs, targets).mean()


def correct(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Per-sample correctness as floats; regression has no accuracy and returns NaN."""
    if task == "classification":
        return (outputs.argmax(dim=-1) == targets).float()
    return torch.full(targets.shape[:1], float("nan"), device=targets.device)
