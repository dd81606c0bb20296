"""PyHessian 0.1 (Yao, Gholami, Keutzer & Mahoney 2020) as a second backend, for cross-checks.

`samlab.hessian` calls these with `backend="pyhessian"`: power iteration with deflation for the top
eigenvalues and Hutchinson for the trace, run on our model and data exactly as PyHessian does it.
PyHessian's spectral density calls `torch.eig`, removed from torch, and is not used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from samlab.hessian_operator import as_batches, as_scalar_loss
from samlab.tensors import Data, LossFn, ParamSelection, model_mode


def pyhessian_eigenvalues(
    model: nn.Module, loss_fn: LossFn, data: Data, k: int, tol: float, max_iter: int, seed: int,
    params: ParamSelection, mode: str,
) -> tuple[list[float], torch.Tensor, int]:
    """PyHessian's `hessian.eigenvalues(maxIter, tol, top_n=k)`: (values, flat vectors [k, dim], HVPs)."""
    with _PyHessianRun(model, loss_fn, data, seed, params, mode) as run:
        values, vectors = run.hessian.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        n_hvp = run.hvp_count()
    flat = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vectors]).detach()
    return [float(v) for v in values], flat, n_hvp


def pyhessian_trace(
    model: nn.Module, loss_fn: LossFn, data: Data, n_samples: int, tol: float, seed: int,
    params: ParamSelection, mode: str,
) -> tuple[list[float], int]:
    """PyHessian's `hessian.trace(maxIter=n_samples, tol)`: the vᵀHv samples it drew, and HVPs."""
    with _PyHessianRun(model, loss_fn, data, seed, params, mode) as run:
        samples = run.hessian.trace(maxIter=n_samples, tol=tol)
        n_hvp = run.hvp_count()
    return [float(s) for s in samples], n_hvp


class _PyHessianRun:
    """PyHessian 0.1 on our model, seeded, leaving the model's modes, grads and the global RNG as found.

    PyHessian draws its vectors from the global torch RNG (seeded here inside a forked RNG state),
    always evaluates in eval mode, and covers every parameter that requires grad. It leaves graph-
    carrying `.grad`s behind; they are restored to what they were. HVPs are counted with a gradient
    hook on the first parameter (one firing per gradient pass: one per HVP for a single batch,
    two per batch and HVP for several).
    """

    def __init__(self, model, loss_fn, data, seed, params, mode) -> None:
        if params is not None:
            raise ValueError("params: the pyhessian backend covers all parameters (use backend='samlab')")
        if mode != "eval":
            raise ValueError("mode: the pyhessian backend evaluates in eval mode only")
        self.model, self.loss_fn, self.seed = model, loss_fn, seed
        first = next(p for p in model.parameters() if p.requires_grad)
        self.batches = as_batches(data, first.device, first.dtype)
        self.cuda = first.device.type == "cuda"
        self.first = first
        self.passes = 0

    def __enter__(self) -> _PyHessianRun:
        from pyhessian import hessian as PyHessian

        self._params = [p for p in self.model.parameters()]
        self._grads = [p.grad for p in self._params]
        self._mode = model_mode(self.model, "eval")
        self._mode.__enter__()
        devices = [self.first.device] if self.cuda else []
        self._rng = torch.random.fork_rng(devices=devices)
        self._rng.__enter__()
        torch.manual_seed(int(self.seed))
        self._default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.first.dtype)  # PyHessian draws its vectors in the default dtype
        self._hook = self.first.register_hook(self._count)

        def criterion(outputs, targets):
            return as_scalar_loss(self.loss_fn(outputs, targets))

        one = len(self.batches) == 1
        self._warnings = warnings.catch_warnings()  # its backward(create_graph=True) cycles end in __exit__
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        self.hessian = PyHessian(
            self.model, criterion, data=self.batches[0] if one else None,
            dataloader=None if one else self.batches, cuda=self.cuda,
        )  # fmt: skip
        self._setup_passes = self.passes
        return self

    def _count(self, grad: torch.Tensor) -> None:
        self.passes += 1

    def hvp_count(self) -> int:
        per_hvp = 1 if len(self.batches) == 1 else 2 * len(self.batches)
        return (self.passes - self._setup_passes) // per_hvp

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self.hessian = None
        for p, g in zip(self._params, self._grads):
            p.grad = g
        torch.set_default_dtype(self._default_dtype)
        self._rng.__exit__(None, None, None)
        self._mode.__exit__(None, None, None)
        self._warnings.__exit__(None, None, None)
