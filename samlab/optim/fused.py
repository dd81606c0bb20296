"""m-SAM with all k micro-batches in one pass of the model ("fused"): per-micro-batch weights.

m-SAM needs, for the k disjoint micro-batches B_j of a batch, g_j = grad L_{B_j}(w) and
h_j = grad L_{B_j}(w + eps_j). When samples interact only inside their own micro-batch (every
layer acts on each sample alone, BatchNorm normalises with micro-batch statistics), both are the
gradients of ONE scalar: with a copy W_j of the weights for each micro-batch,

    S(W_1, ..., W_k) = Σ_j L_{B_j}(W_j),   grad_{W_j} S = grad L_{B_j}(W_j).

So one forward of the whole batch in which the samples of B_j see the weights W_j, and one
backward, give all k per-micro-batch gradients: at W_j = w (first pass, g_j) and at
W_j = w + eps_j (second pass, h_j). The layers with weights run their k micro-batches as one
batched product. A convolution runs as one grouped convolution (groups = k) of the k weights;
where the k weight copies are at least a quarter of the size of the layer's input, it runs instead as one
ordinary convolution in the first pass (all W_j = w), whose backward takes the k per-micro-batch
weight gradients from one grouped weight-gradient product, and in the second as the grouped
convolution whose backward gives the shared weight Σ_j h_j directly (`_MicroConv`,
`_PerturbedConv`): no k copies of w and no k weight gradients beyond the g_j themselves. The model's
input convolution (its input needs no gradient) with small patches runs in patch form instead: the
input's patches are gathered once per step, g_j is one batched product of micro-batch j's output
gradients with its patches, and the second pass multiplies each W_j with micro-batch j's patches
(`_PatchConv`, `_PatchPerturbedConv`), since grouped kernels with a few input channels per group are
slow. BatchNorm runs with per-micro-batch statistics in one call, GroupNorm as one call over k·G
groups with the k affine maps, LayerNorm with per-micro-batch affine parameters, and a linear layer
with its per-micro-batch gradients kept in factored form (`_LowRankLinear`).
The number of multiply-adds is that of one forward of the batch (plus m × m Gram matrices for the
linear layers), with one kernel per layer instead of k.

The module's forward methods are swapped for the duration of a pass (restored afterwards, also on
error); modules with weights must be of a supported type or define
`micro_batched_forward(xs, params)`: xs is the module's input as [k, m, ...] (xs[j] micro-batch j),
params holds the module's own tensors, each with a leading dimension k (params[...][j] the weights
micro-batch j sees), and it returns the output as [k, m, ...].
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from functools import partial

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
# Inside a fused pass the batch is interleaved: row i·k + j holds sample i of micro-batch j. Then an
# activation [b, C, ...] is, in memory, [m, k·C, ...]: micro-batch j's channels are group j of k
# channel groups, and grouped convolutions and BatchNorm read it without a copy.
def interleave(x: torch.Tensor, k: int) -> torch.Tensor:
    """Rows j·m + i (micro-batch j = x.chunk(k)[j]) -> rows i·k + j."""
    return x.reshape(k, x.shape[0] // k, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def micro_batches(x: torch.Tensor, k: int, interleaved: bool = True) -> torch.Tensor:
    """[b, ...] -> [k, m, ...] (a view): [j] is micro-batch j (interleaved or blocked order)."""
    if not interleaved:
        return x.reshape(k, x.shape[0] // k, *x.shape[1:])
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).transpose(0, 1)


def from_micro_batches(t: torch.Tensor, shape: Sequence[int], interleaved: bool = True) -> torch.Tensor:
    """[k, rows, ...] with the rows of micro-batch j -> the tensor of `shape` in the batch's order."""
    k = t.shape[0]
    if not interleaved:
        return t.reshape(shape)
    return t.reshape(k, shape[0] // k, *shape[1:]).transpose(0, 1).reshape(shape)


def _merge(t: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """[k, m, ...] -> [k·m, ...] in the batch's order."""
    if interleaved:
        t = t.transpose(0, 1)
    return t.reshape(-1, *t.shape[2:])


def _rows(x: torch.Tensor, k: int, interleaved: bool = True) -> torch.Tensor:
    """[k, rows, features]: the last-dimension vectors of each micro-batch."""
    return micro_batches(x, k, interleaved).reshape(k, -1, x.shape[-1])


def _conv2d(module: nn.Conv2d, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    _check_padding(module)
    b, c = x.shape[:2]
    weight = p["weight"].reshape(-1, *p["weight"].shape[2:])
    bias = None if p.get("bias") is None else p["bias"].reshape(-1)
    out = F.conv2d(x.reshape(b // k, k * c, *x.shape[2:]), weight, bias, module.stride, module.padding,
                   module.dilation, k * module.groups)
    return out.reshape(b, module.out_channels, *out.shape[2:])


class _MicroConv(torch.autograd.Function):
    """First pass of a convolution: every micro-batch sees the same weight w.

    The forward is one ordinary convolution with w = weights[0]; the backward gives the [k, ...] leaf
    `weights` its per-micro-batch weight gradients from one grouped weight-gradient product (the
    interleaved batch as k channel groups) and the input its gradient through w. No k copies of w.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, module: nn.Conv2d, k: int) -> torch.Tensor:
        x, weights = _as_autocast(x, weights)
        ctx.save_for_backward(x, weights)
        ctx.module, ctx.k = module, k
        return F.conv2d(x, weights[0], None, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weights = ctx.saved_tensors
        module, k = ctx.module, ctx.k
        return *_wanted(ctx, lambda: _conv_input_grad(module, x.shape, weights[0], grad_out, module.groups),
                        lambda: _conv_weight_grad(module, _grouped(x, k), (k * weights.shape[1], *weights.shape[2:]),
                                                  _grouped(grad_out, k), k).view(weights.shape)), None, None


class _PerturbedConv(torch.autograd.Function):
    """Second pass of a convolution: micro-batch j sees W_j = perturbed[j] (a constant), and the shared
    leaf w gets Σ_j dS/dW_j, which is the ordinary weight gradient of the whole batch: one grouped
    convolution forward, no k per-micro-batch weight gradients in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, perturbed: torch.Tensor, module: nn.Conv2d,
                k: int) -> torch.Tensor:
        x, perturbed = _as_autocast(x, perturbed)
        flat = perturbed.reshape(-1, *perturbed.shape[2:])
        ctx.save_for_backward(x, flat)
        ctx.module, ctx.k, ctx.weight_shape = module, k, weight.shape
        out = F.conv2d(_grouped(x, k), flat, None, module.stride, module.padding, module.dilation, k * module.groups)
        return out.view(x.shape[0], module.out_channels, *out.shape[2:])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, flat = ctx.saved_tensors
        module, k = ctx.module, ctx.k
        return *_wanted(ctx, lambda: _conv_input_grad(module, _grouped(x, k).shape, flat, _grouped(grad_out, k),
                                                      k * module.groups).view(x.shape),
                        lambda: _conv_weight_grad(module, x, ctx.weight_shape, grad_out, 1)), None, None, None


class _PatchConv(torch.autograd.Function):
    """First pass of an input convolution (its input needs no gradient): every micro-batch sees w.

    The forward is one ordinary convolution with w = weights[0]; the backward gives the [k, ...] leaf
    `weights` g_j = G_j P_jᵀ, one batched product of micro-batch j's output gradients G_j [C_out, m·L]
    and its input patches P_j [C_in·kh·kw, m·L] (`_input_patches`, L output positions per sample).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, patches: torch.Tensor, module: nn.Conv2d,
                k: int) -> torch.Tensor:
        x, weights, patches = _as_autocast(x, weights, patches)
        ctx.save_for_backward(patches)
        ctx.k, ctx.weight_shape = k, weights.shape
        return F.conv2d(x, weights[0], None, module.stride, module.padding, module.dilation, module.groups)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (patches,) = ctx.saved_tensors
        k, (b, channels) = ctx.k, grad_out.shape[:2]
        grads = grad_out.reshape(b // k, k, channels, -1).permute(1, 2, 0, 3).reshape(k, channels, -1)
        return None, torch.bmm(grads, patches.transpose(1, 2)).view(ctx.weight_shape), None, None, None


class _PatchPerturbedConv(torch.autograd.Function):
    """Second pass of an input convolution: micro-batch j sees W_j = perturbed[j] (a constant), out_j =
    W_j P_j as one batched product over the patches of the first pass; the shared leaf w gets the
    ordinary weight gradient of the whole batch, Σ_j dS/dW_j."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, perturbed: torch.Tensor, patches: torch.Tensor,
                module: nn.Conv2d, k: int) -> torch.Tensor:
        x, perturbed, patches = _as_autocast(x, perturbed, patches)
        ctx.save_for_backward(x)
        ctx.module, ctx.weight_shape = module, weight.shape
        b, channels = x.shape[0], perturbed.shape[1]
        out = torch.bmm(perturbed.reshape(k, channels, -1), patches)  # [k, C_out, m·L]
        height, width = _output_size(module, x)
        return out.view(k, channels, b // k, height, width).permute(2, 0, 1, 3, 4).reshape(b, channels, height, width)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return None, _conv_weight_grad(ctx.module, x, ctx.weight_shape, grad_out, 1), None, None, None, None


# An input convolution runs in patch form (`_PatchConv`, `_PatchPerturbedConv`) when a patch has at most
# this many entries (C_in·kh·kw: a 3×3 kernel on RGB images) and the patches at most PATCHES_MAX_ELEMENTS.
# oneDNN's grouped convolutions with a few input channels per group are slow on a CPU. Measured on an AMD
# EPYC core at batch 128, the layer's kernels in both passes (µs, k = 16 and 64): the digits CNN's 1→16 3×3
# on 8×8 416 → 290 and 416 → 296, WRN-16-1's 3→16 on 32×32 29 900 → 9 400 and 13 500 → 8 200, ResNet-18-8's
# 3→8 8 500 → 6 400 and 7 800 → 6 400; whole m-SAM steps (paired, one thread) 2–4 % shorter on the digits
# CNN (k = 4-64) and 1.4 % on WRN-16-1 (k = 16).
PATCH_MAX_SIZE = 27
PATCHES_MAX_ELEMENTS = 1 << 25


def _patch_form(module: nn.Conv2d, x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether the first pass runs `module` in patch form: an ungrouped, undilated convolution with integer
    padding whose input needs no gradient (so no input gradient is computed, and the second pass, which
    sees the same input, reuses the patches), a trainable weight and small patches."""
    size = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    if x.requires_grad or not weights.requires_grad or module.groups != 1 or tuple(module.dilation) != (1, 1):
        return False
    if isinstance(module.padding, str) or size > PATCH_MAX_SIZE:
        return False
    height, width = _output_size(module, x)
    return size * x.shape[0] * height * width <= PATCHES_MAX_ELEMENTS


def _output_size(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    return tuple((x.shape[2 + d] + 2 * module.padding[d] - module.kernel_size[d]) // module.stride[d] + 1
                 for d in (0, 1))


def _input_patches(module: nn.Conv2d, x: torch.Tensor, k: int) -> torch.Tensor:
    """The input patches of micro-batch j's samples, [k, C_in·kh·kw, m·L]: row (c, i, j) as the weight's
    layout, column (sample, output position); from strided views of the zero-padded input and one copy."""
    (ph, pw), (sh, sw), (kh, kw) = module.padding, module.stride, module.kernel_size
    b, channels = x.shape[:2]
    padded = F.pad(x.view(b // k, k, *x.shape[1:]), (pw, pw, ph, ph))
    windows = padded.unfold(3, kh, sh).unfold(4, kw, sw)  # [m, k, C_in, H_out, W_out, kh, kw]
    return windows.permute(1, 2, 5, 6, 0, 3, 4).reshape(k, channels * kh * kw, -1)


def _as_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in the dtype autocast gives a convolution here (bf16 / fp16 under mixed precision),
    so that the forward, the tensors saved for the backward and the gradients computed from them agree
    (autocast is off in a backward); autograd returns each gradient in its input's own dtype."""
    kind = tensors[0].device.type
    if not torch.is_autocast_enabled(kind):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) for t in tensors)


def _wanted(ctx, input_grad: Callable[[], torch.Tensor], weight_grad: Callable[[], torch.Tensor]) -> tuple:
    """(the input's gradient, the weight's), each computed only when autograd asks for it."""
    return (input_grad() if ctx.needs_input_grad[0] else None, weight_grad() if ctx.needs_input_grad[1] else None)


def _grouped(t: torch.Tensor, k: int) -> torch.Tensor:
    """The interleaved batch [b, C, ...] as [m, k·C, ...] (a view): micro-batch j is channel group j."""
    return t.reshape(t.shape[0] // k, k * t.shape[1], *t.shape[2:])


def _conv_input_grad(module: nn.Conv2d, shape, weight: torch.Tensor, grad_out: torch.Tensor,
                     groups: int) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        grad_out, weight.new_empty(1).expand(shape), weight, None, module.stride, module.padding,
        module.dilation, False, [0, 0], groups, (True, False, False))[0]


def _conv_weight_grad(module: nn.Conv2d, x: torch.Tensor, shape, grad_out: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        grad_out, x, x.new_empty(1).expand(shape), None, module.stride, module.padding, module.dilation,
        False, [0, 0], k * module.groups, (False, True, False))[1]


def _conv_bias(out: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """out + bias_j on micro-batch j's rows of the interleaved batch ([k, C] biases)."""
    if bias is None:
        return out
    return (out.view(out.shape[0] // k, k, *out.shape[1:]) + bias.view(1, k, -1, *([1] * (out.dim() - 2)))).view(out.shape)


# The first pass splits a convolution (`_conv2d_first`) where its k weight copies are at least this
# fraction of its input's size. Measured with benchmarks/step_cost.py-style paired steps on an AMD EPYC
# core (m-SAM / SAM at k = 16 and 64): a quarter against the whole input, 1.285 -> 1.253 and 1.268 ->
# 1.267 on the digits CNN with BatchNorm, 1.282 -> 1.249 / 1.337 -> 1.334 with GroupNorm, 1.013 -> 0.977
# / 1.074 -> 1.067 on ResNet-18 of width 8, 1.109 -> 1.087 / 1.217 -> 1.227 on WRN-16-1; an eighth was
# worse on the CNN at k = 64 (1.361).
SPLIT_FROM = 0.25


def _conv2d_first(module: nn.Conv2d, split: dict[nn.Module, tuple | None], x: torch.Tensor, p: Params,
                  k: int) -> torch.Tensor:
    """The first pass of a convolution. An input convolution with small patches runs in patch form
    (`_PatchConv`; recorded in `split` with its input and patches for the second pass). Else, where the k
    weight copies are at least SPLIT_FROM of the size of the layer's input, the shared-weight convolution
    (`_MicroConv`, recorded in `split` for the second pass); else the grouped convolution of k weight
    copies, whose one backward call over the (larger) activations costs less than the two of the split form."""
    _check_padding(module)
    if _patch_form(module, x, p["weight"]):
        patches = _input_patches(module, x, k)
        split[module] = (x, patches)
        return _conv_bias(_PatchConv.apply(x, p["weight"], patches, module, k), p.get("bias"), k)
    if k * p["weight"][0].numel() < SPLIT_FROM * x.numel():
        return _conv2d(module, x, p, k)
    split[module] = None
    return _conv_bias(_MicroConv.apply(x, p["weight"], module, k), p.get("bias"), k)


def _conv2d_second(module: nn.Conv2d, first: tuple | None, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    """p["weight"]: the shared weight (a leaf when trainable); p["perturbed"]: the [k, ...] W_j, or absent
    when the weight is frozen (every micro-batch then sees the shared weight). Only for the convolutions
    the first pass ran split, whose padding it checked; `first`: the patch form's (input, patches) there."""
    if "perturbed" not in p:
        out = F.conv2d(x, p["weight"], None, module.stride, module.padding, module.dilation, module.groups)
    elif first is None:
        out = _PerturbedConv.apply(x, p["weight"], p["perturbed"], module, k)
    else:
        seen, patches = first  # the same input as in the first pass unless the model changed it in between
        patches = patches if x is seen else _input_patches(module, x, k)
        out = _PatchPerturbedConv.apply(x, p["weight"], p["perturbed"], patches, module, k)
    return _conv_bias(out, p.get("bias"), k)


def _check_padding(module: nn.Conv2d) -> None:
    if module.padding_mode != "zeros":
        raise ValueError(f"impl: the fused path supports zero-padded convolutions only (got {module.padding_mode!r})")


def _affine(normed: torch.Tensor, p: Params, k: int, view: Sequence[int]) -> torch.Tensor:
    """normed * weight_j + bias_j for per-micro-batch [k, ...] parameters reshaped to `view`."""
    if p.get("weight") is None:
        return normed
    out = normed * p["weight"].reshape(view)
    return out if p.get("bias") is None else out + p["bias"].reshape(view)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, p: Params, k: int,
                *, update: bool) -> torch.Tensor:
    """BatchNorm with the statistics of each micro-batch (train mode) or the running ones (eval).

    The k·C channel groups of the interleaved batch go through one BatchNorm call over m samples,
    so one fused kernel computes all k·C statistics. In train mode with `update`, the running
    statistics become the mean of k copies each updated by one micro-batch (the convention of the
    loop and vmap paths).
    """
    b, channels = x.shape[:2]
    grouped = x.reshape(b // k, k * channels, -1)
    batch_stats = module.training or module.running_mean is None
    if batch_stats and grouped.shape[0] * grouped.shape[2] < 2:
        raise ValueError(f"m: BatchNorm in train mode needs more than one value per channel in a "
                         f"micro-batch (got input {list(x.shape)} split into {k})")
    track = module.running_mean is not None and (not batch_stats or (update and module.training))
    mean, var = (_running(module, p, "running_mean", k), _running(module, p, "running_var", k)) if track else (None, None)
    momentum = 0.0
    if batch_stats and track:
        module.num_batches_tracked.add_(1)
        momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
    weight = None if p.get("weight") is None else p["weight"].reshape(-1)
    bias = None if p.get("bias") is None else p["bias"].reshape(-1)
    out = F.batch_norm(grouped, mean, var, weight, bias, batch_stats, momentum, module.eps)
    if batch_stats and track:
        with torch.no_grad():
            module.running_mean.copy_(mean.reshape(k, channels).mean(0))
            module.running_var.copy_(var.reshape(k, channels).mean(0))
    return out.reshape(x.shape)


def _running(module: nn.Module, p: Params, name: str, k: int) -> torch.Tensor:
    """The k·C running statistics: per-copy ones from `p` when given (`copies_forward`), else the module's k times."""
    return p[name].reshape(-1) if name in p else getattr(module, name).repeat(k)


def _linear(module: nn.Linear, x: torch.Tensor, p: Params, k: int, interleaved: bool) -> torch.Tensor:
    """A linear layer with its own weight (and bias) per micro-batch, p[...][j]: one batched product."""
    rows = micro_batches(x, k, interleaved)
    weight, bias = p["weight"].transpose(1, 2), p.get("bias")
    flat = rows.reshape(k, -1, rows.shape[-1])
    out = torch.bmm(flat, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), flat, weight)
    return _merge(out.reshape(*rows.shape[:-1], out.shape[-1]), interleaved)


def _group_norm(module: nn.GroupNorm, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    """GroupNorm of the interleaved batch read as [m, k·C, ...] with k·G groups: group j·G + g of row i
    is group g of sample i of micro-batch j, and channel j·C + c takes micro-batch j's affine
    parameters, so one fused call normalises every sample and applies the k affine maps."""
    weight = None if p.get("weight") is None else p["weight"].reshape(-1)
    bias = None if p.get("bias") is None else p["bias"].reshape(-1)
    out = F.group_norm(_grouped(x, k), k * module.num_groups, weight, bias, module.eps)
    return out.view(x.shape)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
    shape = tuple(module.normalized_shape)
    normed = F.layer_norm(x, shape, None, None, module.eps).reshape(x.shape[0] // k, k, -1, *shape)
    return _affine(normed, p, k, (1, k, 1, *shape)).reshape(x.shape)


LAYERS: dict[type, Callable[..., torch.Tensor]] = {
    nn.Conv2d: _conv2d,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
}


def _layer_forward(module: nn.Module, update: bool,
                   interleaved: bool = True) -> Callable[[torch.Tensor, Params, int], torch.Tensor] | None:
    """The batched forward of `module` on a batch in interleaved (or blocked) order, or None."""
    custom = getattr(module, "micro_batched_forward", None)
    if callable(custom):
        return lambda x, p, k: _merge(custom(micro_batches(x, k, interleaved), p), interleaved)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return lambda x, p, k: _batch_norm(module, x, p, k, update=update)
    layer = LAYERS.get(type(module))
    return None if layer is None else (lambda x, p, k: layer(module, x, p, k))


def _batchable(module: nn.Module) -> bool:
    return type(module) is nn.Linear or _layer_forward(module, False) is not None


def unsupported_modules(model: nn.Module) -> list[str]:
    """Names (types) of the modules with weights or buffers that the fused path cannot batch."""
    out = []
    for name, module in model.named_modules():
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if owns and not _batchable(module):
            out.append(f"{name or 'model'} ({type(module).__name__})")
    return out


_STRUCTURE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]] = weakref.WeakKeyDictionary()


def _remembered(model: nn.Module, key: object, compute: Callable[[], object]) -> object:
    """compute(), remembered for `model` while its modules stay the same (the same objects, of the
    same types): the module walks below cost more than a small model's step."""
    signature = tuple((id(m), type(m)) for m in model.modules())
    entry = _STRUCTURE.get(model)
    if entry is None or entry[0] != signature:
        entry = _STRUCTURE[model] = (signature, {})
    if key not in entry[1]:
        entry[1][key] = compute()
    return entry[1][key]


def per_sample_model(model: nn.Module) -> bool:
    """True when every module is a supported layer, a per-sample torch module or a samlab model.

    The fused path assumes samples interact only through BatchNorm statistics; this is the check
    that lets `impl="auto"` rely on it without running the model.
    """
    return _remembered(model, "per_sample", lambda: _per_sample_model(model))


def _per_sample_model(model: nn.Module) -> bool:
    for module in model.modules():
        if _batchable(module) or isinstance(module, PER_SAMPLE_MODULES):
            continue
        if type(module).__module__.startswith("samlab.models"):
            continue
        return False
    return not unsupported_modules(model)


class _LowRankLinear:
    """A linear layer's per-micro-batch gradients kept as factors, never as k weight matrices.

    With rows r of micro-batch j (samples, or samples × positions for inputs of more than two
    dimensions), inputs X_r and output gradients G_r, g_j = Σ_r G_r X_rᵀ (bias: Σ_r G_r). With
    X'_r = (X_r, 1) (the bias as a weight on a constant input 1), ‖g_j‖² = Σ_{r,s} (G_r·G_s)(X'_r·X'_s)
    and the perturbed layer of the second pass is (W + c_j g_j) x' = W x' + c_j Σ_r G_r (X'_r·x'):
    Gram matrices of the m rows of a micro-batch replace the k copies of W, which is what makes many
    small micro-batches cheap. Frozen tensors drop out of X' (a frozen weight leaves only the 1).
    """

    def __init__(self, module: nn.Linear, trainable: set[str], interleaved: bool) -> None:
        self.module, self.interleaved = module, interleaved
        self.weight, self.bias = "weight" in trainable, "bias" in trainable
        self.inputs = self.inputs_t = self.outputs = self.grads = self.one = None

    def _split(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """[k, rows, features]: the rows of each micro-batch."""
        return _rows(t, k, self.interleaved) if self.interleaved else t.reshape(k, -1, t.shape[-1])

    def _features(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """[k, rows, in]: the rows of each micro-batch (no features when the weight is frozen)."""
        rows = self._split(x, k)
        return rows if self.weight else rows[..., :0]

    def _grams(self, rows: torch.Tensor) -> torch.Tensor:
        """X'_r·x'_s for the rows of each micro-batch against the first pass's inputs: [k, rows, m]."""
        if self.bias:  # the constant input 1 of the bias
            return torch.baddbmm(self.one, rows, self.inputs_t)
        return torch.bmm(rows, self.inputs_t)

    def first(self, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
        self.inputs = self._features(x.detach(), k)
        self.inputs_t = self.inputs.transpose(1, 2)
        self.one = _one(x) if self.bias else None
        self.outputs = F.linear(x, p["weight"], p.get("bias"))
        return self.outputs

    def squared_norm_terms(self, grad_out: torch.Tensor, k: int, total: torch.Tensor | None) -> torch.Tensor:
        """(G_r·G_s)(X'_r·X'_s) for the rows of each micro-batch, [k, rows, rows], added to `total` (a
        sum of other layers' terms of the same shape) when given: ‖g_j‖² is the sum over r, s."""
        self.grads = self._split(grad_out, k)
        grams = torch.bmm(self.grads, self.grads.transpose(1, 2))
        return grams.mul_(self._grams(self.inputs)) if total is None else total.addcmul_(grams, self._grams(self.inputs))

    def perturb(self, scale: torch.Tensor) -> None:
        """Fix c_j for the second pass (c_j G_r, one tensor for the whole pass)."""
        self.grads = self.grads * scale.view(-1, 1, 1)

    def second(self, x: torch.Tensor, p: Params, k: int) -> torch.Tensor:
        out = F.linear(x, p["weight"], p.get("bias"))
        grams = self._grams(self._features(x, k))
        if not self.interleaved and out.dim() == 2:  # the rows of micro-batch j are a block of out
            return torch.baddbmm(out.view(k, -1, out.shape[-1]), grams, self.grads).view(out.shape)
        return out + from_micro_batches(torch.bmm(grams, self.grads), out.shape, self.interleaved)


_ONES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _one(x: torch.Tensor) -> torch.Tensor:
    """A scalar 1 of x's dtype and device (made once: one op fewer per layer and pass)."""
    key = (x.dtype, x.device)
    if key not in _ONES:
        _ONES[key] = torch.ones((), dtype=x.dtype, device=x.device)
    return _ONES[key]


def _bound(layer, params: Params, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: layer(x, params, k)


def _forward_with(model: nn.Module, forwards: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]],
                  x: torch.Tensor) -> torch.Tensor:
    """model(x) with each module in `forwards` running the given function as its forward (a plain
    function rather than a context manager: a generator-based one costs more than a small model's op)."""
    try:
        for module, fn in forwards.items():
            module.__dict__["forward"] = fn  # an instance attribute (nn.Module.__setattr__ adds nothing here)
        return model(x)
    finally:
        for module in forwards:
            module.__dict__.pop("forward", None)  # the class's forward shows through again


def _modules_with_tensors(model: nn.Module, buffers: bool = False) -> tuple[list[tuple[nn.Module, list[str]]], bool]:
    """((module, its parameter names (and floating buffer names with `buffers`)) for every module with
    tensors, whether the batch must be interleaved: only when some layer other than a linear one is batched)."""
    return _remembered(model, ("tensors", buffers), lambda: _find_modules(model, buffers))


def _find_modules(model: nn.Module, buffers: bool) -> tuple[list[tuple[nn.Module, list[str]]], bool]:
    found = []
    for prefix, module in model.named_modules():
        tensors = list(module.named_parameters(recurse=False))
        if buffers:
            tensors += [(name, b) for name, b in module.named_buffers(recurse=False) if b.is_floating_point()]
        own = [f"{prefix}.{name}" if prefix else name for name, _ in tensors]
        if not own and not any(True for _ in module.buffers(recurse=False)):
            continue
        if not _batchable(module):
            raise ValueError(f"impl: the fused path cannot batch {prefix or 'the model'} "
                             f"({type(module).__name__}); use impl='vmap' or 'loop'")
        found.append((module, own))
    # grouped convolutions and norm layers read micro-batches as channel groups of the interleaved batch
    interleaved = any(type(module) in LAYERS or isinstance(module, nn.modules.batchnorm._BatchNorm)
                      for module, _ in found)
    return found, interleaved


def copies_forward(model: nn.Module, tensors: Params, x: torch.Tensor, k: int) -> torch.Tensor:
    """The outputs of k copies of `model` on the same input x, in one pass: [k, n, ...], [j] copy j's.

    `tensors` maps every parameter and floating buffer name of the model to a [k, ...] tensor, [j] the
    value copy j uses (an expanded tensor for one shared by all). Under no_grad; BatchNorm uses the
    copies' running statistics in eval mode and each copy's batch statistics in train mode, and its
    running statistics are not updated. The model must pass `per_sample_model`.
    """
    found, interleaved = _modules_with_tensors(model, buffers=True)
    forwards = {}
    for module, own in found:
        layer = (partial(_linear, module, interleaved=interleaved) if type(module) is nn.Linear
                 else _layer_forward(module, False, interleaved))
        forwards[module] = _bound(layer, _own(own, tensors), k)
    n = x.shape[0]
    copies = x.unsqueeze(1 if interleaved else 0).expand(*((n, k) if interleaved else (k, n)), *x.shape[1:])
    out = _forward_with(model, forwards, copies.reshape(n * k, *x.shape[1:]))
    return micro_batches(out, k, interleaved)


def _layers(model: nn.Module, trainable: set[str],
            parameters: Params) -> tuple[list[tuple[nn.Module, list[str], object]], bool]:
    """((module, its parameter names, its _LowRankLinear or None) for every module with tensors,
    whether the batch must be interleaved (`_modules_with_tensors`))."""
    found, interleaved = _modules_with_tensors(model)
    if sum(len(own) for _, own in found) != len(parameters):  # a parameter was added or removed since
        _STRUCTURE.pop(model, None)
        found, interleaved = _modules_with_tensors(model)
    out = []
    for module, own in found:
        local = {name.rsplit(".", 1)[-1] for name in own if name in trainable}
        out.append((module, own, _LowRankLinear(module, local, interleaved) if type(module) is nn.Linear else None))
    return out, interleaved


def _conv_weight_name(own: list[str]) -> str:
    return next(name for name in own if name.rsplit(".", 1)[-1] == "weight")


def _own(names: list[str], tensors: Params) -> Params:
    return {name.rsplit(".", 1)[-1]: tensors[name] for name in names}


def micro_batch_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                          names: Sequence[str], k: int, *, rho: float) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """m-SAM's two passes over k micro-batches, each one forward and one backward of the batch.

    eps_j = rho * g_j / ‖g_j‖ (zero when g_j = 0, as the shared rule). Returns "gradient"
    (mean_j g_j per name), "descent" (mean_j h_j), "micro_norms" (‖g_j‖, [k]), "losses" and
    "perturbed_losses" ([k, m]). BatchNorm's running statistics move by the first pass only (the
    mean of the k micro-batch updates).
    """
    trainable = set(names)
    weights = {name: p.detach() for name, p in model.named_parameters()}
    layers, interleaved = _layers(model, trainable, weights)
    low_ranks = [lr for _, _, lr in layers if lr is not None]
    batched = [name for _, own, lr in layers if lr is None for name in own if name in trainable]
    linear = [name for _, own, lr in layers if lr is not None for name in own if name in trainable]
    shared = {name: weights[name].detach().requires_grad_() for name in linear}
    # first pass: W_j = w. Batched layers get k (expanded, not copied) views of each tensor; the trainable
    # ones are leaves, so autograd returns g_j stacked; low-rank linear layers run on the shared weights.
    expanded = {name: weights[name].expand(k, *weights[name].shape)
                for _, own, lr in layers if lr is None for name in own}
    for name in batched:
        expanded[name].requires_grad_()  # a view of the detached w: a leaf of its own
    # split: the convolutions that run as `_MicroConv` / `_PerturbedConv` (value None) or in patch form
    # (value: the input and patches of the first pass)
    forwards, split = {}, {}
    for module, own, low_rank in layers:
        if type(module) is nn.Conv2d:
            forwards[module] = _bound(partial(_conv2d_first, module, split), _own(own, expanded), k)
        elif low_rank is None:
            forwards[module] = _bound(_layer_forward(module, True, interleaved), _own(own, expanded), k)
        else:
            forwards[module] = _bound(low_rank.first, _own(own, {**weights, **shared}), k)
    if interleaved:
        x, y = interleave(x, k), interleave(y, k)
    losses = loss_fn(_forward_with(model, forwards, x), y)
    wanted = [expanded[n] for n in batched] + [shared[n] for n in linear] + [lr.outputs for lr in low_ranks]
    # the gradient of the batch mean: g_j / k in the per-micro-batch leaves and low-rank factors, so the
    # shared leaves hold mean_j g_j as they are; eps_j = rho g_j / ‖g_j‖ is the same for g_j / k
    grads = _grads(losses.mean(), wanted)
    micro = dict(zip(batched, grads[:len(batched)], strict=True))
    gradient = {name: g.sum(0) for name, g in micro.items()}
    gradient.update(zip(linear, grads[len(batched):len(batched) + len(linear)], strict=True))
    terms: dict[torch.Size, torch.Tensor] = {}  # the low-rank layers' terms, summed where their shapes agree
    for low_rank, grad_out in zip(low_ranks, grads[len(batched) + len(linear):], strict=True):
        shape = grad_out.shape[:-1]
        terms[shape] = low_rank.squared_norm_terms(grad_out, k, terms.get(shape))
    # ‖g_j‖ / k: the batched tensors' per-micro-batch norms, combined with the low-rank layers' terms
    norms = _row_norms(list(micro.values())) if micro else None
    if terms:
        squares = [t.sum((1, 2)) for t in terms.values()] + ([norms.square()] if micro else [])
        norms = (squares[0] if len(squares) == 1 else torch.stack(squares).sum(0)).sqrt()
    scale = torch.reciprocal(norms.clamp_min(torch.finfo(norms.dtype).tiny)).mul_(rho)  # as rho / …, without its wrapper
    # second pass: W_j = w + scale_j g_j; the gradient in the shared leaves is Σ_j h_j
    again = {name: weights[name].detach().requires_grad_() for name in names}
    second_params = dict(expanded)
    scales = {}  # scale viewed as [k, 1, ...] for each tensor rank
    convs = {module: _conv_weight_name(own) for module, own, _ in layers if module in split}
    conv_weights = set(convs.values())
    for name, g in micro.items():  # g_j is scaled in place (used no more)
        view = scales.setdefault(g.dim(), scale.view(k, *([1] * (g.dim() - 1))))
        # a split convolution's W_j is a constant of the second pass (written over g_j); elsewhere a
        # function of the leaf, w + c_j g_j broadcast over j
        second_params[name] = (g.mul_(view).add_(weights[name]) if name in conv_weights
                               else torch.add(again[name], g.mul_(view)))
    forwards = {}
    for module, own, low_rank in layers:
        if module in convs:
            params = _own(own, second_params)
            name = convs[module]
            if name in micro:
                params["weight"], params["perturbed"] = again[name], second_params[name]
            else:
                params["weight"] = weights[name]
            forwards[module] = _bound(partial(_conv2d_second, module, split[module]), params, k)
        elif low_rank is None:
            forwards[module] = _bound(_layer_forward(module, False, interleaved), _own(own, second_params), k)
        else:
            low_rank.perturb(scale)
            forwards[module] = _bound(low_rank.second, _own(own, {**weights, **again}), k)
    perturbed_losses = loss_fn(_forward_with(model, forwards, x), y)
    descent = _grads(perturbed_losses.mean(), [again[name] for name in names])
    return {"gradient": [gradient[name] for name in names], "descent": descent, "micro_norms": norms * k,
            "losses": micro_batches(losses.detach(), k, interleaved),
            "perturbed_losses": micro_batches(perturbed_losses.detach(), k, interleaved)}


def _row_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t[j] for t in tensors)‖ for each j of the leading dimension k: the norm of the per-tensor norms."""
    per_tensor = [torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t.abs()
                  for t in tensors]
    return per_tensor[0] if len(per_tensor) == 1 else torch.linalg.vector_norm(torch.stack(per_tensor, 1), dim=1)


def _grads(value: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, inputs, allow_unused=True, materialize_grads=True))
