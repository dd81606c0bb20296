"""Model registry: MLP, small CNN, CIFAR ResNet-18, WideResNet-16-k and the diagonal linear network.

All models are written for `torch.func.functional_call` + `vmap`: no in-place operations, no
Python control flow that depends on tensor values. Models with BatchNorm in train mode update
running statistics in place, so vmapped per-micro-batch calls need GroupNorm (`norm="gn"`) or
eval mode; the optimizers fall back to a loop for them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samlab.config import MODELS, NORMS, ModelConfig

MODEL_INFO: dict[str, dict[str, Any]] = {
    "mlp": {
        "description": "flatten → `depth` hidden layers of `width` units with ReLU → linear",
        "inputs": "any",
        "datasets": ("digits", "gaussian-mixture", "teacher-student", "mnist", "fashion-mnist"),
        "fields": ("width", "depth"),
    },
    "cnn": {
        "description": "conv(width)-norm-ReLU-maxpool-conv(2·width)-norm-ReLU-avgpool(2×2)-linear, for small images",
        "inputs": "image",
        "datasets": ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100"),
        "fields": ("width", "norm"),
    },
    "resnet18": {
        "description": "ResNet-18, CIFAR variant (3×3 stem, no max-pool, stages [2, 2, 2, 2]); width 64 is standard",
        "inputs": "image",
        "datasets": ("cifar10", "cifar100", "mnist", "fashion-mnist"),
        "fields": ("width", "norm"),
    },
    "wrn16": {
        "description": "WideResNet-16-k (pre-activation blocks, widths 16, 16k, 32k, 64k), k = widen",
        "inputs": "image",
        "datasets": ("cifar10", "cifar100"),
        "fields": ("widen", "norm"),
    },
    "diag-linear": {
        "description": "diagonal linear network f(x) = <u⊙u − v⊙v, x>, u = v = init_scale·1 at init",
        "inputs": "vector",
        "datasets": ("sparse-regression",),
        "fields": ("init_scale",),
    },
    "relu-net": {
        "description": "two-layer ReLU network f(x) = Σ_j a_j relu(<w_j, x>), no biases, small initial weights",
        "inputs": "vector",
        "datasets": ("relu-teacher",),
        "fields": ("width", "init_scale"),
    },
}

WRN_BASE_WIDTH = 16  # WideResNet's fixed first-stage width (Zagoruyko & Komodakis 2016)
_GN_MAX_GROUPS = 32  # GroupNorm's standard group count (Wu & He 2018), reduced for thin layers
_GN_MIN_GROUP_SIZE = 2  # one channel per group would be InstanceNorm, which zeroes 1×1 feature maps


def build_model(
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    seed: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build `cfg.name` for inputs of per-sample shape `input_shape` and `num_outputs` outputs.

    With `seed`, the initial weights depend on it alone (the global RNG is left untouched).
    """
    _check(cfg, tuple(input_shape), num_outputs)
    if seed is None:
        model = _construct(cfg, tuple(input_shape), num_outputs)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _construct(cfg, tuple(input_shape), num_outputs)
    return model.to(device)


def _check(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> None:
    if cfg.name not in MODELS:
        raise ValueError(f"model.name: must be one of {', '.join(MODELS)} (got {cfg.name!r})")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs: must be a positive integer (got {num_outputs!r})")
    if not input_shape or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"input_shape: must be a tuple of positive integers (got {input_shape!r})")
    if cfg.width < 1:
        raise ValueError(f"model.width: must be a positive integer (got {cfg.width!r})")
    if cfg.norm not in NORMS:
        raise ValueError(f"model.norm: must be one of {', '.join(NORMS)} (got {cfg.norm!r})")
    if MODEL_INFO[cfg.name]["inputs"] == "image" and len(input_shape) != 3:
        raise ValueError(f"model.name: {cfg.name!r} needs image inputs (C, H, W), got input_shape {input_shape}")
    if cfg.name == "mlp" and cfg.depth < 1:
        raise ValueError(f"model.depth: must be an integer >= 1 (got {cfg.depth!r})")
    if cfg.name == "wrn16" and cfg.widen < 1:
        raise ValueError(f"model.widen: must be an integer >= 1 (got {cfg.widen!r})")
    if cfg.name in ("diag-linear", "relu-net"):
        if len(input_shape) != 1 or num_outputs != 1:
            raise ValueError(
                f"model.name: {cfg.name!r} is a scalar regressor on vector inputs "
                f"(got input_shape {input_shape}, num_outputs {num_outputs})"
            )
        if not cfg.init_scale > 0:
            raise ValueError(f"model.init_scale: must be > 0 (got {cfg.init_scale!r})")


def _construct(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if cfg.name == "mlp":
        return MLP(math.prod(input_shape), cfg.width, cfg.depth, num_outputs)
    if cfg.name == "cnn":
        return SmallCNN(input_shape[0], cfg.width, num_outputs, cfg.norm)
    if cfg.name == "resnet18":
        return ResNet18(input_shape[0], cfg.width, num_outputs, cfg.norm)
    if cfg.name == "wrn16":
        return WideResNet16(input_shape[0], cfg.widen, num_outputs, cfg.norm)
    if cfg.name == "relu-net":
        return TwoLayerReLU(input_shape[0], cfg.width, cfg.init_scale)
    return DiagonalLinear(input_shape[0], cfg.init_scale)


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, no normalisation ("none": identity), or GroupNorm with 32 groups (standard widths, >= 64 channels), fewer for thin
    layers so that every group has at least two channels: gcd(channels, min(32, channels // 2))."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    if norm == "gn":
        groups = math.gcd(channels, min(_GN_MAX_GROUPS, channels // _GN_MIN_GROUP_SIZE))
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"model.norm: must be one of {', '.join(NORMS)} (got {norm!r})")


# -- models ----------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, in_features: int, width: int, depth: int, num_outputs: int) -> None:
        super().__init__()
        sizes = [in_features] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer in self.hidden:
            h = F.relu(layer(h))
        return self.head(h)


class SmallCNN(nn.Module):
    """Two 3×3 conv layers with a max-pool between and a 2×2 average pool before the head.

    The adaptive pool makes the head size independent of the image size (8×8 up to 32×32).
    """

    def __init__(self, in_channels: int, width: int, num_outputs: int, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.norm1 = norm_layer(norm, width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, 2 * width)
        self.head = nn.Linear(2 * width * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = max_pool_2x2(F.relu(self.norm1(self.conv1(x))))
        h = F.relu(self.norm2(self.conv2(h)))
        return self.head(average_pool_to_2x2(h).flatten(1))


class _MaxPool2x2(torch.autograd.Function):
    """F.max_pool2d(h, 2) of an NCHW tensor computed on a channels-last copy; the gradient goes back through
    torch's own NCHW max-pool backward with the same indices (flat positions within each map, whatever the
    memory layout), so everything else stays NCHW. Works under torch.func (vmap, jvp) and double backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, indices = F.max_pool2d(_channels_last(h), 2, return_indices=True)
        return out.contiguous(), indices.contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _indices_grad: None) -> torch.Tensor:
        h, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, h, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> tuple[torch.Tensor, None]:
        (indices,) = ctx.saved_tensors
        return tangent.flatten(2).gather(2, indices.flatten(2)).view(indices.shape), None


def _channels_last(h: torch.Tensor) -> torch.Tensor:
    """h [N, C, H, W] with channels-last strides (a copy); by permutes, which torch.func.vmap also takes."""
    return h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def average_pool_to_2x2(h: torch.Tensor) -> torch.Tensor:
    """F.adaptive_avg_pool2d(h, 2); as the equal plain average pool where the map's sides are even (forward
    and backward on one CPU thread: [128, 32, 4, 4] 353 → 255 µs, [128, 32, 16, 16] 689 → 578 µs)."""
    height, width = h.shape[-2:]
    if height % 2 or width % 2:
        return F.adaptive_avg_pool2d(h, 2)
    return F.avg_pool2d(h, (height // 2, width // 2))


# From this many elements on, a CPU max-pool runs channels-last (`_MaxPool2x2`). Measured forward + backward on
# one thread of an AMD EPYC: [32, 16, 8, 8] (32k) 68 µs NCHW against 85 channels-last, [64, 16, 8, 8] (65k)
# 249 against 120, [128, 16, 8, 8] 580 against 197, [8, 16, 32, 32] 544 against 223, [128, 16, 32, 32] 9464
# against 3654; below it the copies and the Python of the autograd function cost more than they save. With
# two threads (wall clock) [64, 16, 8, 8] is the crossover (79 against 102 µs) and [128, 16, 8, 8] 258
# against 150, [128, 16, 32, 32] 5090 against 2608.
CHANNELS_LAST_POOL_FROM = 1 << 16


def max_pool_2x2(h: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(h, 2); on a CPU, for large enough inputs, computed on a channels-last copy: torch's CPU
    max-pool of an NCHW tensor is ≈ 10x slower than of a channels-last one where the maps are small
    ([128, 16, 8, 8]: 522 against 49 µs forward), a fifth of the digits CNN's step."""
    if h.device.type != "cpu" or h.numel() < CHANNELS_LAST_POOL_FROM:
        return F.max_pool2d(h, 2)
    return _MaxPool2x2.apply(h)[0]


class BasicBlock(nn.Module):
    """ResNet basic block: conv3×3-norm-ReLU-conv3×3-norm, plus identity or 1×1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(norm, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm_layer(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (He et al. 2016, CIFAR variant): 3×3 stem, no max-pool,
    stages of 2 basic blocks with widths w, 2w, 4w, 8w and strides 1, 2, 2, 2."""

    def __init__(self, in_channels: int, width: int, num_outputs: int, norm: str = "bn") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_norm = norm_layer(norm, width)
        blocks, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [BasicBlock(channels, out, stride, norm), BasicBlock(out, out, 1, norm)]
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_outputs)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem_norm(self.stem(x)))
        h = self.blocks(h)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class PreActBlock(nn.Module):
    """WideResNet block: norm-ReLU-conv3×3-norm-ReLU-conv3×3; a 1×1 projection of the activated
    input replaces the identity when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.norm1 = norm_layer(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm_layer(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.projection = None
        if stride != 1 or in_channels != out_channels:
            self.projection = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(x))
        h = self.conv1(activated)
        h = self.conv2(F.relu(self.norm2(h)))
        shortcut = x if self.projection is None else self.projection(activated)
        return h + shortcut


class WideResNet16(nn.Module):
    """WRN-16-k (Zagoruyko & Komodakis 2016): 3×3 stem of 16 channels, three groups of 2
    pre-activation blocks with widths 16k, 32k, 64k and strides 1, 2, 2, final norm-ReLU-pool-linear."""

    def __init__(self, in_channels: int, widen: int, num_outputs: int, norm: str = "bn") -> None:
        super().__init__()
        blocks_per_group = (16 - 4) // 6
        self.stem = nn.Conv2d(in_channels, WRN_BASE_WIDTH, 3, padding=1, bias=False)
        blocks, channels = [], WRN_BASE_WIDTH
        for group, stride in enumerate((1, 2, 2)):
            out = WRN_BASE_WIDTH * widen * 2**group
            for i in range(blocks_per_group):
                blocks.append(PreActBlock(channels, out, stride if i == 0 else 1, norm))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = norm_layer(norm, channels)
        self.head = nn.Linear(channels, num_outputs)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        h = F.relu(self.final_norm(h))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class DiagonalLinear(nn.Module):
    """Diagonal linear network f(x) = <u⊙u − v⊙v, x> (Woodworth et al. 2020; used for SAM by
    Andriushchenko & Flammarion 2022), initialised at u = v = alpha·1 so that w = 0.

    The output has shape [b]: one scalar prediction per sample.
    """

    def __init__(self, in_features: int, init_scale: float) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.full((in_features,), float(init_scale)))
        self.v = nn.Parameter(torch.full((in_features,), float(init_scale)))

    def effective_weights(self) -> torch.Tensor:
        return self.u * self.u - self.v * self.v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.effective_weights()

    def micro_batched_forward(self, xs: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward of k micro-batches xs [k, m, d] at once, micro-batch j with u_j, v_j =
        params["u"][j], params["v"][j] (fused m-SAM, `samlab.optim.fused`); returns [k, m]."""
        weights = params["u"] * params["u"] - params["v"] * params["v"]  # [k, d]
        # one dot product per row rather than a batched matrix-vector product (unsqueeze, bmm, squeeze):
        # fewer ops forward and backward, ≈ 3 % of an m-SAM step at k = 16-64 on a CPU
        return torch.linalg.vecdot(xs.flatten(2), weights.unsqueeze(1))


class TwoLayerReLU(nn.Module):
    """f(x) = Σ_j a_j relu(<w_j, x>), no biases: the student of the relu-teacher set.

    Initialised small, w_j ~ N(0, init_scale² / d · I) and a_j ~ N(0, init_scale² / width), so that
    training starts near the origin, where the implicit bias of the optimizer decides which of the many
    interpolating networks is found (the regime of the diagonal linear network). Output shape [b].
    """

    def __init__(self, in_features: int, width: int, init_scale: float) -> None:
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(width, in_features) * (init_scale / in_features**0.5))
        self.out = nn.Parameter(torch.randn(width) * (init_scale / width**0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.hidden.T) @ self.out

    def micro_batched_forward(self, xs: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The forward of k micro-batches xs [k, m, d] at once, micro-batch j with hidden_j, out_j =
        params["hidden"][j], params["out"][j] (fused m-SAM, `samlab.optim.fused`); returns [k, m]."""
        hidden = torch.relu(torch.bmm(xs.flatten(2), params["hidden"].transpose(1, 2)))  # [k, m, width]
        # a product and a sum rather than a batched matrix-vector product: 16-20 % less time for the
        # forward and backward at width 40 and k = 16-64 on a CPU (per-matrix overhead of bmm)
        return (hidden * params["out"].unsqueeze(1)).sum(2)


def _kaiming_init(model: nn.Module) -> None:
    """He-normal conv weights (fan-out, ReLU) as in the reference ResNet/WRN code; norms at (1, 0)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
