"""The tensor types samlab's functions share, and the one way to put a model in a mode for a block.

A loss maps (outputs, targets) to a tensor: per sample ([n], `PerSampleLoss`) or already reduced
(`LossFn`, a scalar or something `mean()` reduces). Parameters and directions are `Params`, keyed like
`dict(model.named_parameters())`. Data is one (inputs, targets) batch or an iterable of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Params = dict[str, torch.Tensor]
Tensors = Sequence[torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
Data = Batch | Iterable[Batch]
ParamSelection = Sequence[str] | Sequence[nn.Parameter] | None
MODES = ("eval", "train")


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Put `model` in eval or train mode for the block and restore every submodule's flags after.

    "train" uses batch statistics in BatchNorm without updating its running statistics (so measuring a
    model never changes it); "eval" uses the running statistics and no dropout.
    """
    if mode not in MODES:
        raise ValueError(f"mode: must be one of {', '.join(MODES)} (got {mode!r})")
    modules = list(model.modules())
    was_training = [m.training for m in modules]
    norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracked = [m.track_running_stats for m in norms]
    model.train(mode == "train")
    if mode == "train":
        for m in norms:
            m.track_running_stats = False  # batch statistics, and no in-place buffer updates
    try:
        yield model
    finally:
        for m, flag in zip(norms, tracked):
            m.track_running_stats = flag
        for m, flag in zip(modules, was_training):
            m.training = flag
