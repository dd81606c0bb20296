"""`sam_step`: one step of the `SAM` optimizer class over a batch, in chunks, with mixed precision.

This is the loop the README's "SAM in your own training loop" shows, written once: the training
engine runs it for gradient accumulation and fp16, and the tests check it against
`sharpness_gradient`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from samlab.optim.sam import SAM
from samlab.validation import check_number

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def sam_step(
    optimizer: SAM,
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    accumulate: int = 1,
    per_chunk: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    autocast: torch.dtype | None = None,
    clip_grad_norm: float | None = None,
) -> dict[str, float]:
    """One SAM step on the batch (x, y), processed in `accumulate` = k equal chunks B_1..B_k.

    `loss_fn(outputs, targets)` returns per-sample losses; L_B = mean over the batch.

    - per_chunk=False: SAM over the whole batch. The first pass accumulates
      g = (1/k) Σ_j grad L_{B_j}(w) = grad L_B(w) chunk by chunk, first_step perturbs once with it, and
      the second pass accumulates (1/k) Σ_j grad L_{B_j}(w + eps) at that same point. With no
      BatchNorm, or BatchNorm in eval mode, this is SAM on the batch in one piece; a train-mode
      BatchNorm normalises each chunk with that chunk's statistics, as every gradient accumulation
      does, and its running statistics see the k chunks of the first pass one after another.
    - per_chunk=True: one perturbation per chunk, eps_j from grad L_{B_j}(w), descent
      (1/k) Σ_j grad L_{B_j}(w + eps_j): m-SAM with m = b / k, i.e.
      `sharpness_gradient(method="msam", m=b // k)` (Behdin et al. 2023). Running statistics see
      the chunks' first passes one after another (sharpness_gradient averages k separate copies).

    Under DistributedDataParallel (the module given to the optimizer as `model`) the first pass and
    every second-pass chunk but the last run under `optimizer.no_sync()`; the last backward
    all-reduces the whole descent gradient. `autocast`: torch.bfloat16 or torch.float16 runs the
    forwards under torch.autocast on x's device; `scaler` (a torch.amp.GradScaler) scales the
    losses and goes to first_step / second_step; `clip_grad_norm` clips the descent gradient.

    Returns loss (mean loss at w), perturbed_loss (mean loss at the perturbed weights), grad_norm
    (‖grad L_B(w)‖; per_chunk: the mean over chunks of ‖grad L_{B_j}(w)‖) and skipped (1.0 when
    an overflow skipped the step, else 0.0).
    """
    _check(optimizer, x, y, accumulate, per_chunk, autocast)
    if clip_grad_norm is not None:
        check_number("clip_grad_norm", clip_grad_norm, lower=0.0, open_lower=True)
    k = accumulate
    chunks = list(zip(x.chunk(k), y.chunk(k), strict=True))

    def backward(xc: torch.Tensor, yc: torch.Tensor, weight: float) -> torch.Tensor:
        with _autocast(x.device, autocast):
            losses = loss_fn(model(xc), yc)
        loss = losses.float().mean() * weight
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return losses.detach().float()

    def second_pass(j: int, xc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        sync = contextlib.nullcontext() if j == k - 1 else optimizer.no_sync(model)
        with sync:
            return backward(xc, yc, 1.0 / k)

    optimizer.zero_grad(set_to_none=True)
    losses, perturbed, norms = [], [], []
    if per_chunk:
        for j, (xc, yc) in enumerate(chunks):
            with optimizer.no_sync(model):
                losses.append(backward(xc, yc, 1.0))
            norms.append(optimizer.first_step(zero_grad=True, scaler=scaler))
            perturbed.append(second_pass(j, xc, yc))
            if j < k - 1:
                optimizer.micro_step()
    else:
        with optimizer.no_sync(model):
            losses = [backward(xc, yc, 1.0 / k) for xc, yc in chunks]
        norms.append(optimizer.first_step(zero_grad=True, scaler=scaler))
        perturbed = [second_pass(j, xc, yc) for j, (xc, yc) in enumerate(chunks)]
    stepped = optimizer.second_step(zero_grad=True, scaler=scaler, clip_grad_norm=clip_grad_norm)
    values = torch.stack([torch.cat(losses).mean(), torch.cat(perturbed).mean(), torch.stack(norms).mean()])
    loss, perturbed_loss, grad_norm = values.double().tolist()
    return {"loss": loss, "perturbed_loss": perturbed_loss, "grad_norm": grad_norm, "skipped": float(not stepped)}


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check(optimizer, x, y, accumulate, per_chunk, autocast) -> None:
    if not isinstance(optimizer, SAM):
        raise ValueError(f"optimizer: must be a samlab.optim.SAM (got {type(optimizer).__name__})")
    if not isinstance(per_chunk, bool):
        raise ValueError(f"per_chunk: must be True or False (got {per_chunk!r})")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast: must be torch.bfloat16, torch.float16 or None (got {autocast!r})")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.dim() == 0 or len(x) != len(y):
        raise ValueError("y: x and y must be tensors with the same number of rows")
    batch = x.shape[0]
    ok = isinstance(accumulate, int) and not isinstance(accumulate, bool) and 1 <= accumulate <= batch
    if not ok or batch % accumulate:
        raise ValueError(f"accumulate: must be a whole number of chunks that divides the batch of {batch} "
                         f"(got {accumulate!r})")
