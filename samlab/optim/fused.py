"""m-SAM with all k micro-batches in one pass of the model ("fused"): per-micro-batch weights.

m-SAM needs, for the k disjoint micro-batches B_j of a batch, g_j = grad L_{B_j}(w) and
h_j = grad L_{B_j}(w + eps_j). When samples interact only inside their own micro-batch (every
layer acts on each sample alone, BatchNorm normalises with micro-batch statistics), both are the
gradients of ONE scalar: with a copy W_j of the weights for each micro-batch,

    S(W_1, ..., W_k) = Σ_j L_{B_j}(W_j),   grad_{W_j} S = grad L_{B_j}(W_j).

So one forward of the whole batch in which the samples of B_j see the weights W_j, and one
backward, give all k per-micro-batch gradients: at W_j = w (first pass, g_j) and at
W_j = w + eps_j (second pass, h_j). The layers with weights run their k micro-batches as one
batched product: a linear layer as `bmm` ([k, m, in] × [k, in, out]), a convolution as one grouped
convolution (groups = k), BatchNorm with per-micro-batch statistics, GroupNorm/LayerNorm with
per-micro-batch affine parameters. The number of multiply-adds equals one forward of the batch,
and there is one kernel per layer instead of k.

The module's forward methods are swapped for the duration of a pass (restored afterwards, also on
error); modules with weights must be of a supported type or define
`micro_batched_forward(x, params, k)` (params: the module's own tensors, each with a leading
dimension k).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = dict[str, torch.Tensor]

# Parameter-free torch modules that act on each sample alone; any other module class from torch.nn
# that is not a supported layer makes a model ineligible for the automatic choice of this path.
PER_SAMPLE_MODULES = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)


# -- the batched layers ----------------------------------------------------------------------------
def _group(x: torch.Tensor, k: int) -> torch.Tensor:
    """[b, ...] -> [k, b/k, ...]: micro-batch j is x.chunk(k)[j]."""
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


def _linear(module: nn.Linear, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    xs = x.reshape(k, -1, x.shape[-1])
    weight_t = p["weight"].transpose(1, 2)
    out = torch.bmm(xs, weight_t) if p.get("bias") is None else torch.baddbmm(p["bias"].unsqueeze(1), xs, weight_t)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _conv2d(module: nn.Conv2d, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    if module.padding_mode != "zeros":
        raise ValueError(f"impl: the fused path supports zero-padded convolutions only (got {module.padding_mode!r})")
    b, c, h, w = x.shape
    m = b // k
    # micro-batch j's channels become group j of one grouped convolution over m "samples"
    grouped = x.reshape(k, m, c, h, w).transpose(0, 1).reshape(m, k * c, h, w)
    weight = p["weight"].reshape(-1, *p["weight"].shape[2:])
    bias = None if p.get("bias") is None else p["bias"].reshape(-1)
    out = F.conv2d(grouped, weight, bias, module.stride, module.padding, module.dilation, k * module.groups)
    out = out.reshape(m, k, module.out_channels, *out.shape[2:]).transpose(0, 1)
    return out.reshape(b, module.out_channels, *out.shape[3:])


def _affine(normed: torch.Tensor, p: Params, k: int, feature_shape: Sequence[int]) -> torch.Tensor:
    """normed * weight_j + bias_j with per-micro-batch [k, *feature_shape] parameters.

    `normed` is [k, m, *feature_shape, rest]; the parameters broadcast over m and rest.
    """
    if p.get("weight") is None:
        return normed
    extra = normed.dim() - 2 - len(feature_shape)
    view = (k, 1, *feature_shape, *([1] * extra))
    out = normed * p["weight"].reshape(view)
    return out if p.get("bias") is None else out + p["bias"].reshape(view)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, p: Params, k: int,
                *, update: bool) -> torch.Tensor:
    """BatchNorm with the statistics of each micro-batch (train mode) or the running ones (eval).

    In train mode with `update`, the running statistics move as the mean of k copies each updated
    by one micro-batch would (the convention of the loop and vmap paths).
    """
    channels = x.shape[1]
    xs = x.reshape(k, x.shape[0] // k, channels, -1)
    batch_stats = module.training or module.running_mean is None
    if batch_stats:
        if xs.shape[1] * xs.shape[3] < 2:
            raise ValueError(f"m: BatchNorm in train mode needs more than one value per channel in a "
                             f"micro-batch (got input {list(x.shape)} split into {k})")
        var, mean = torch.var_mean(xs, dim=(1, 3), correction=0, keepdim=True)
        if update and module.training and module.track_running_stats:
            _update_running_stats(module, mean, var, xs.shape[1] * xs.shape[3])
    else:
        mean = module.running_mean.reshape(1, 1, channels, 1)
        var = module.running_var.reshape(1, 1, channels, 1)
    normed = (xs - mean) * torch.rsqrt(var + module.eps)
    return _affine(normed, p, k, (channels,)).reshape(x.shape)


def _update_running_stats(module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """The mean over micro-batches of BatchNorm's running-statistics update (as nn.BatchNorm does it)."""
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        factor = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
        batch_mean = mean.detach().reshape(mean.shape[0], -1).mean(0)
        batch_var = (var.detach() * (count / (count - 1))).reshape(var.shape[0], -1).mean(0)
        module.running_mean.mul_(1 - factor).add_(batch_mean.to(module.running_mean.dtype), alpha=factor)
        module.running_var.mul_(1 - factor).add_(batch_var.to(module.running_var.dtype), alpha=factor)


def _group_norm(module: nn.GroupNorm, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    normed = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine(_group(normed, k).reshape(k, x.shape[0] // k, x.shape[1], -1), p, k,
                   (x.shape[1],)).reshape(x.shape)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    shape = tuple(module.normalized_shape)
    normed = F.layer_norm(x, shape, None, None, module.eps)
    grouped = normed.reshape(k, x.shape[0] // k, -1, *shape).movedim(2, -1)  # [k, m, *shape, rest]
    return _affine(grouped, p, k, shape).movedim(-1, 2).reshape(x.shape)


LAYERS: dict[type, Callable[..., torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
}


def _layer_forward(module: nn.Module, update: bool) -> Callable[[torch.Tensor, Params, int], torch.Tensor] | None:
    """The batched forward of `module`, or None when it has none."""
    custom = getattr(module, "micro_batched_forward", None)
    if callable(custom):
        return custom
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return lambda x, p, k: _batch_norm(module, x, p, k, update=update)
    layer = LAYERS.get(type(module))
    return None if layer is None else (lambda x, p, k: layer(module, x, p, k))


def unsupported_modules(model: nn.Module) -> list[str]:
    """Names (types) of the modules with weights or buffers that the fused path cannot batch."""
    out = []
    for name, module in model.named_modules():
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if owns and _layer_forward(module, False) is None:
            out.append(f"{name or 'model'} ({type(module).__name__})")
    return out


def per_sample_model(model: nn.Module) -> bool:
    """True when every module is a supported layer, a per-sample torch module or a samlab model.

    The fused path assumes samples interact only through BatchNorm statistics; this is the check
    that lets `impl="auto"` rely on it without running the model.
    """
    for module in model.modules():
        if _layer_forward(module, False) is not None or isinstance(module, PER_SAMPLE_MODULES):
            continue
        if type(module).__module__.startswith("samlab.models"):
            continue
        return False
    return not unsupported_modules(model)


def _bound(layer, params: Params, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: layer(x, params, k)


@contextmanager
def _batched_layers(model: nn.Module, params: Params, k: int, *, update: bool) -> Iterator[None]:
    """Within the block, each layer's forward reads its weights from `params` ([k, ...] per name)."""
    patched = []
    try:
        for prefix, module in model.named_modules():
            own = {name: params.get(f"{prefix}.{name}" if prefix else name) for name, _ in
                   module.named_parameters(recurse=False)}
            has_buffers = any(True for _ in module.buffers(recurse=False))
            if not own and not has_buffers:
                continue
            layer = _layer_forward(module, update)
            if layer is None:
                raise ValueError(f"impl: the fused path cannot batch {prefix or 'the model'} "
                                 f"({type(module).__name__}); use impl='vmap' or 'loop'")
            own = {name: t for name, t in own.items() if t is not None}
            module.forward = _bound(layer, own, k)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # the instance attribute; the class's forward shows through again


def micro_batch_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                          names: Sequence[str], k: int, *, rho: float) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """g_j, h_j = grad L_{B_j} at w and at w + eps_j for the k micro-batches, two passes of the model.

    eps_j = rho * g_j / ‖g_j‖ (zero when g_j = 0, as the shared rule). Returns "first" (g_j, [k, ...]
    per name), "second" (h_j), "losses" and "perturbed_losses" ([k, m]). BatchNorm's running
    statistics move by the first pass only (the mean of the k micro-batch updates).
    """
    weights = dict(model.named_parameters())
    shared = [weights[name].detach() for name in names]
    frozen = {name: p.detach().unsqueeze(0).expand(k, *p.shape) for name, p in weights.items() if name not in names}
    first, losses = _pass(model, loss_fn, x, y, names, [w.unsqueeze(0).expand(k, *w.shape) for w in shared],
                          frozen, k, update=True)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in first]).sum(0).sqrt()
    scale = rho / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    perturbed = [w + g * scale.reshape(k, *([1] * w.dim())) for w, g in zip(shared, first, strict=True)]
    second, perturbed_losses = _pass(model, loss_fn, x, y, names, perturbed, frozen, k, update=False)
    return {"first": first, "second": second, "losses": _group(losses, k),
            "perturbed_losses": _group(perturbed_losses, k), "micro_norms": norms}


def _pass(model, loss_fn, x, y, names, per_micro: list[torch.Tensor], frozen: Params, k: int, *, update: bool):
    """(per-micro-batch gradients [k, ...] per name, per-sample losses) with W_j = per_micro[.][j]."""
    leaves = [t.detach().requires_grad_() for t in per_micro]
    params = {**frozen, **dict(zip(names, leaves, strict=True))}
    with _batched_layers(model, params, k, update=update):
        losses = loss_fn(model(x), y)
    # S = Σ_j L_{B_j} = Σ_i f_i / m: its gradient in W_j is grad L_{B_j}(W_j)
    total = losses.sum() * (k / x.shape[0])
    grads = torch.autograd.grad(total, leaves, allow_unused=True, materialize_grads=True)
    return list(grads), losses.detach()
