"""Loss landscapes (Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018): filter-normalized random directions, 1-D and 2-D slices, interpolation between two
solutions, PCA directions of a trajectory and its projection, and a flatness readout.

A point in parameter space and a direction are both `Params`: a dict name -> tensor keyed like
`dict(model.named_parameters())`. A direction may also carry floating-point buffers (BatchNorm
running statistics), which then move along with the parameters: `interpolation_direction` between
two models does so, so that an interpolation reproduces both endpoints in eval mode.

Surfaces are evaluated in chunks of grid points at once: the parameters of every point of a chunk are
stacked along a leading axis and evaluated together (one vmapped or one multi-copy pass per data batch,
or point after point: `PointEvaluator`). Everything runs under `no_grad` on the model's
device; the model passed in is never modified (its parameters, buffers and train/eval flag are the
same afterwards). The loss function is a *per-sample* loss (`samlab.losses.per_sample_loss`), so the
same forward pass gives the mean loss and the accuracy (`samlab.losses.correct`) of every point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from samlab.hessian import top_eigenvalues
from samlab.losses import correct
from samlab.optim.fused import copies_forward, per_sample_model, unsupported_modules
from samlab.reporting import Reporter
from samlab.tensors import MODES, Batch, Data, Params, PerSampleLoss, model_mode
from samlab.validation import check_choice, check_int

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_EPS = 1e-10  # Li et al. add it to the direction's norm before dividing

# ---------------------------------------------------------------------------------------------
# points and directions as dicts of tensors
# ---------------------------------------------------------------------------------------------


def model_params(model: nn.Module) -> Params:
    """A detached copy of the model's parameters (a point in parameter space)."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def model_state(model: nn.Module) -> Params:
    """A detached copy of the parameters and floating-point buffers (Li et al.'s "states")."""
    state = model_params(model)
    state.update({name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()})
    return state


def flatten(params: Params) -> torch.Tensor:
    """All tensors of a Params dict concatenated into one vector, in the dict's order."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """The inverse of `flatten`: split a vector into tensors shaped like `like`."""
    total = sum(t.numel() for t in like.values())
    if vector.numel() != total:
        raise ValueError(f"vector: has {vector.numel()} elements, the parameters have {total}")
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start : start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


def dot(a: Params, b: Params) -> float:
    """Inner product over the names the two dicts share (float64 accumulation)."""
    return float(sum((a[n].double() * b[n].double()).sum() for n in a if n in b))


def _as_state(point: nn.Module | Params) -> Params:
    return model_state(point) if isinstance(point, nn.Module) else {n: t.detach() for n, t in point.items()}


# ---------------------------------------------------------------------------------------------
# directions
# ---------------------------------------------------------------------------------------------


def random_directions(
    model: nn.Module, k: int = 2, *, norm: str = "filter", ignore: str = "biasbn", seed: int = 0
) -> list[Params]:
    """k Gaussian directions over the model's parameters, normalized as in Li et al. 2018.

    norm="filter": every filter d_i (slice along dim 0 of a conv or linear weight) is rescaled to
    d_i * ‖w_i‖ / (‖d_i‖ + 1e-10), the norm of the matching filter of the weights.
    norm="layer": the whole tensor is rescaled to the weight tensor's norm. norm="none": raw N(0, 1).
    ignore="biasbn" zeroes biases and normalization-layer parameters (every 1-D parameter and every
    parameter of a BatchNorm/GroupNorm/LayerNorm/InstanceNorm module); ignore="none" keeps them, a 1-D
    tensor then being normalized as a single filter. The Gaussian draws come from a CPU generator
    seeded with `seed`, so models of the same architecture get the same raw directions on any device.
    """
    check_int("k", k, 1, 64)
    check_choice("norm", norm, NORMS)
    check_choice("ignore", ignore, IGNORES)
    check_int("seed", seed, 0, 2**63 - 1)
    weights = dict(model.named_parameters())
    ignored = _ignored_names(model) if ignore == "biasbn" else set()
    if len(ignored) == len(weights):
        raise ValueError("ignore: 'biasbn' would zero every parameter of this model (all are 1-D); use 'none'")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    directions = []
    for _ in range(k):
        direction = {}
        for name, w in weights.items():
            raw = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
            direction[name] = torch.zeros_like(raw) if name in ignored else _normalize(raw, w.detach(), norm)
        directions.append(direction)
    return directions


def _ignored_names(model: nn.Module) -> set[str]:
    """Biases and normalization-layer parameters: 1-D parameters and all parameters of norm layers."""
    names = {name for name, p in model.named_parameters() if p.dim() <= 1}
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
    return names


def _normalize(direction: torch.Tensor, weight: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "none":
        return direction
    if norm == "layer" or direction.dim() <= 1:
        return direction * (weight.norm() / (direction.norm() + _EPS))
    d = direction.reshape(direction.shape[0], -1)
    w = weight.reshape(weight.shape[0], -1)
    scale = w.norm(dim=1, keepdim=True) / (d.norm(dim=1, keepdim=True) + _EPS)
    return (d * scale).reshape(direction.shape)


def interpolation_direction(params_a: nn.Module | Params, params_b: nn.Module | Params) -> Params:
    """b − a over the names both share (parameters, and floating buffers when given modules)."""
    a, b = _as_state(params_a), _as_state(params_b)
    if set(a) != set(b):
        raise ValueError(f"params_b: names differ from params_a ({sorted(set(a) ^ set(b))[:5]} ...)")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ValueError(f"params_b: {name} has shape {tuple(b[name].shape)}, expected {tuple(a[name].shape)}")
    return {name: (b[name].to(a[name].device) - a[name]).clone() for name in a}


def hessian_directions(
    model: nn.Module, loss_fn: PerSampleLoss, data: Data, k: int = 2, **hessian_kwargs: Any
) -> list[Params]:
    """The top-k Hessian eigenvectors (unit norm) of the mean loss, as directions.

    Uses `samlab.hessian.top_eigenvalues` (Lanczos on Hessian-vector products; extra keyword arguments
    go to it) on the mean of the per-sample loss; its flat eigenvectors over all parameters are split
    back into the model's parameter shapes.
    """
    check_int("k", k, 1, 64)
    result = top_eigenvalues(model, loss_fn, data, k=k, **hessian_kwargs)
    like = {name: p.detach() for name, p in model.named_parameters()}
    return [unflatten(torch.as_tensor(v).to(next(iter(like.values())).device), like) for v in result.vectors]


def pca_directions(
    trajectory_checkpoints: Sequence[nn.Module | Params], k: int = 2
) -> tuple[list[Params], np.ndarray]:
    """Top-k principal directions of the trajectory's offsets from its final point (Li et al. 2018, §7).

    The rows θ_t − θ_T (t < T) are centered and decomposed by SVD, as scikit-learn's PCA does in the
    paper's code; returns unit-norm directions and the fraction of variance each explains.
    """
    check_int("k", k, 1, 64)
    if len(trajectory_checkpoints) < k + 2:
        raise ValueError(
            f"trajectory_checkpoints: need at least k + 2 = {k + 2} checkpoints for {k} principal "
            f"directions of centered offsets (got {len(trajectory_checkpoints)})"
        )
    points = [_parameters_only(c) for c in trajectory_checkpoints]
    final = points[-1]
    offsets = torch.stack([flatten(p).double() - flatten(final).double() for p in points[:-1]])
    offsets = offsets - offsets.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(offsets, full_matrices=False)
    variance = singular**2
    explained = (variance / variance.sum()).cpu().numpy()
    return [unflatten(vh[i], final) for i in range(k)], explained[:k]


def _parameters_only(point: nn.Module | Params) -> Params:
    return model_params(point) if isinstance(point, nn.Module) else {n: t.detach() for n, t in point.items()}


def project_trajectory(
    checkpoints: Sequence[nn.Module | Params], center: nn.Module | Params, d1: Params, d2: Params
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x_t, y_t) of each checkpoint in the plane center + x d1 + y d2.

    Least squares: (x, y) solves the 2×2 normal equations G [x, y]ᵀ = [⟨d1, θ−c⟩, ⟨d2, θ−c⟩]ᵀ with
    G the Gram matrix of (d1, d2), so non-orthogonal directions are handled exactly.
    """
    c = _as_state(center)
    names = [n for n in d1 if n in d2]
    gram = np.array([[dot(d1, d1), dot(d1, d2)], [dot(d1, d2), dot(d2, d2)]])
    if abs(np.linalg.det(gram)) <= 1e-12 * max(gram[0, 0] * gram[1, 1], 1e-300):
        raise ValueError("d2: the two directions are (nearly) parallel; the projection is not defined")
    xs, ys = [], []
    for checkpoint in checkpoints:
        theta = _as_state(checkpoint)
        offset = {n: theta[n].to(c[n].device) - c[n] for n in names}
        rhs = np.array([dot(d1, offset), dot(d2, offset)])
        x, y = np.linalg.solve(gram, rhs)
        xs.append(x)
        ys.append(y)
    return np.array(xs), np.array(ys)


# ---------------------------------------------------------------------------------------------
# surfaces
# ---------------------------------------------------------------------------------------------


@dataclass
class Surface:
    """Loss and accuracy on a grid: `loss[i]` (1-D) or `loss[i, j]` (2-D) is the point
    center + axes[0][i] d1 (+ axes[1][j] d2). Points not computed yet are NaN with `done` False."""

    axes: tuple[np.ndarray, ...]
    loss: np.ndarray
    accuracy: np.ndarray
    done: np.ndarray

    @classmethod
    def empty(cls, axes: Sequence[np.ndarray]) -> Surface:
        axes = tuple(np.asarray(a, dtype=np.float64) for a in axes)
        shape = tuple(len(a) for a in axes)
        return cls(axes, np.full(shape, np.nan), np.full(shape, np.nan), np.zeros(shape, dtype=bool))

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def coordinates(self) -> np.ndarray:
        """Grid points as rows of coordinates, in the row-major order of `loss`."""
        mesh = np.meshgrid(*self.axes, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: lists, with None where a point is not computed (or not defined)."""
        return {
            "axes": [a.tolist() for a in self.axes],
            "loss": _nan_to_none(self.loss),
            "accuracy": _nan_to_none(self.accuracy),
            "done_fraction": float(self.done.mean()),
        }


def _nan_to_none(array: np.ndarray) -> Any:
    return np.where(np.isnan(array), None, array).tolist()


def surface_1d(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    data: Data,
    direction: Params,
    alphas: Sequence[float] | np.ndarray,
    *,
    center: nn.Module | Params | None = None,
    mode: str = "eval",
    task: str | None = None,
    max_memory_mb: float = 1024.0,
    reporter: Reporter | None = None,
    resume_from: Surface | None = None,
    on_update: Callable[[Surface], None] | None = None,
) -> Surface:
    """Mean loss and accuracy at center + α d for each α (center defaults to the model's own state).

    `loss_fn` is per-sample (shape [b]); `data` is an (x, y) batch or an iterable of batches whose
    per-sample losses are averaged. mode="eval" uses BatchNorm running statistics, "train" batch
    statistics. Points are evaluated coarse to fine (every 4th, then every 2nd, then the rest:
    `grid_levels`) in chunks sized to `max_memory_mb`; after each chunk the
    reporter gets progress, `on_update` gets the partial surface, and `reporter.should_stop()` ends the
    computation early with a partial surface that `resume_from` continues.
    """
    return _surface(model, loss_fn, data, [direction], [alphas], center, mode, task, max_memory_mb,
                    reporter, resume_from, on_update)


def surface_2d(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    data: Data,
    d1: Params,
    d2: Params,
    xs: Sequence[float] | np.ndarray,
    ys: Sequence[float] | np.ndarray,
    *,
    center: nn.Module | Params | None = None,
    mode: str = "eval",
    task: str | None = None,
    max_memory_mb: float = 1024.0,
    reporter: Reporter | None = None,
    resume_from: Surface | None = None,
    on_update: Callable[[Surface], None] | None = None,
) -> Surface:
    """Mean loss and accuracy at center + x d1 + y d2 on the grid xs × ys (`loss[i, j]` at (xs[i], ys[j])).

    Same contract as `surface_1d`: per-sample `loss_fn`, chunks of points under a memory budget,
    progress and cancellation through `reporter`, resumable from a partial surface.
    """
    return _surface(model, loss_fn, data, [d1, d2], [xs, ys], center, mode, task, max_memory_mb,
                    reporter, resume_from, on_update)


def _surface(model, loss_fn, data, directions, axes, center, mode, task, max_memory_mb, reporter,
             resume_from, on_update) -> Surface:
    for name, axis in zip(("alphas",) if len(axes) == 1 else ("xs", "ys"), axes):
        _check_axis(name, axis)
    surface = Surface.empty(axes)
    if resume_from is not None:
        surface = _resumed(surface, resume_from)
    evaluator = PointEvaluator(model, loss_fn, data, directions, center=center, mode=mode, task=task)
    coordinates = surface.coordinates
    loss, accuracy, done = (a.reshape(-1) for a in (surface.loss, surface.accuracy, surface.done))
    chunk = evaluator.chunk_size(max_memory_mb)
    reporter = reporter or Reporter()
    levels = grid_levels(surface.loss.shape).reshape(-1)
    for level in range(COARSE_TO_FINE_LEVELS):  # coarse to fine; a chunk never spans two levels
        todo = np.flatnonzero(~done & (levels == level))
        for start in range(0, len(todo), chunk):
            if reporter.should_stop():
                return surface
            index = todo[start : start + chunk]
            loss[index], accuracy[index] = evaluator(coordinates[index])
            done[index] = True
            reporter.progress(int(done.sum()), done.size, f"landscape: {int(done.sum())}/{done.size} grid points")
            if on_update is not None:
                on_update(surface)
    return surface


COARSE_TO_FINE_LEVELS = 3


def grid_levels(shape: Sequence[int]) -> np.ndarray:
    """The pass in which each grid point is computed: 0, 1 or 2 (array of `shape`).

    Along an axis, index i is in pass 0 when i is a multiple of 4 or the last index, in pass 1 when it
    is even, else in pass 2; a point takes the latest pass of its indices. So pass 0 is every 4th
    point (on a 2-D grid every 4th row and column: about 1/16 of the points, the grid's corners
    included), passes 0-1 every 2nd, and pass 2 the rest: the surface's whole shape is known early
    and only refined later.
    """
    per_axis = []
    for n in shape:
        i = np.arange(n)
        per_axis.append(np.where((i % 4 == 0) | (i == n - 1), 0, np.where(i % 2 == 0, 1, 2)))
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.maximum.reduce(mesh) if len(mesh) > 1 else mesh[0]


def interpolate_missing(axes: Sequence[Sequence[float]], values: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values with the missing points (None or NaN) filled in, mask of the filled points).

    1-D: linear interpolation between the computed neighbours; 2-D: linear interpolation on the
    Delaunay triangulation of the computed points (nearest computed value outside their hull). With
    the coarse-to-fine order of the grid (`grid_levels`) the computed points always span the whole
    grid. Fewer than two computed points (three in 2-D) leave the missing ones NaN.
    """
    array = np.array(values, dtype=float)  # None -> nan
    missing = np.isnan(array)
    if not missing.any() or (~missing).sum() < array.ndim + 1:
        return array, missing & ~np.isnan(array)
    filled = array.copy()
    if array.ndim == 1:
        x = np.asarray(axes[0], dtype=float)
        filled[missing] = np.interp(x[missing], x[~missing], array[~missing])
        return filled, missing
    from scipy.interpolate import griddata  # only partial 2-D surfaces need it

    mesh = np.stack(np.meshgrid(*[np.asarray(a, dtype=float) for a in axes], indexing="ij"), axis=-1)
    known, wanted = mesh[~missing], mesh[missing]
    try:
        linear = griddata(known, array[~missing], wanted, method="linear")
    except (ValueError, RuntimeError):  # collinear computed points (e.g. one row): no triangulation (QhullError)
        linear = np.full(len(wanted), np.nan)
    nearest = griddata(known, array[~missing], wanted, method="nearest")
    filled[missing] = np.where(np.isnan(linear), nearest, linear)
    return filled, missing


def _resumed(fresh: Surface, previous: Surface) -> Surface:
    same_grid = len(previous.axes) == len(fresh.axes) and all(
        a.shape == b.shape and np.array_equal(a, b) for a, b in zip(previous.axes, fresh.axes)
    )
    if not same_grid:
        raise ValueError("resume_from: its grid differs from the requested grid")
    return Surface(fresh.axes, previous.loss.copy(), previous.accuracy.copy(), previous.done.copy())


class PointEvaluator:
    """Mean loss and accuracy at points center + Σ_k c_k d_k, a chunk of points per vmapped forward pass.

    The names moved by some direction (and, in train mode, every buffer, since BatchNorm updates its
    running statistics in place) are stacked along a leading point axis; the rest are shared.

    `impl` says how the points of a chunk are evaluated:

    - "vmap": one vmapped pass per data batch for all the chunk's points.
    - "copies": one pass per data batch in which point j's weights act on its own copy of the data
      (`samlab.optim.fused.copies_forward`: linear layers as batched products, convolutions as grouped
      ones, BatchNorm over P·C channels), then loss and accuracy of all points from the stacked logits.
      The per-point cost of dispatching the layers, the loss and the accuracy is paid once per chunk.
    - "sequential": points one after another; each point's tensors are copied into the model's own
      parameters and buffers and the model runs as it is (restored when the chunk is done, also on
      error), so a point costs one plain forward over the data.
    - "auto" (default): "vmap" on accelerators. On a CPU, "copies" for models of layers it batches
      without convolutions, else "sequential": grouped convolutions (from vmap or copies) run several
      times slower on CPU kernels than one plain convolution over the same data (3.4× on the digits CNN,
      benchmarks/landscape_vs_loss_landscapes.py), while a small model's forward is dominated by the
      per-point overhead that "copies" removes (benchmarks/landscape_point_cost.py).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerSampleLoss,
        data: Data,
        directions: Sequence[Params],
        *,
        center: nn.Module | Params | None = None,
        mode: str = "eval",
        task: str | None = None,
        impl: str = "auto",
    ) -> None:
        check_choice("mode", mode, MODES)
        check_choice("impl", impl, POINT_IMPLS)
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.device = _model_device(model)
        self.impl = _point_impl(model, self.device) if impl == "auto" else impl
        if self.impl == "copies" and not per_sample_model(model):
            found = ", ".join(unsupported_modules(model)) or "modules of unknown type"
            raise ValueError(f"impl: 'copies' cannot batch this model ({found}); use 'sequential' or 'vmap'")
        self.batches = _batches_on(data, self.device)
        self.task = task or _infer_task(self.batches[0][1])
        state = {n: p.detach() for n, p in model.named_parameters()}
        state.update({n: b.detach() for n, b in model.named_buffers()})
        if center is not None:
            state.update(_checked_overrides(_as_state(center), state, "center"))
        directions = [_checked_overrides(d, state, f"directions[{i}]") for i, d in enumerate(directions)]
        moved = {n for d in directions for n in d}
        if mode == "train":
            moved |= {n for n, _ in model.named_buffers()}
        self.shared = {n: t for n, t in state.items() if n not in moved}
        self.base = {n: t for n, t in state.items() if n in moved}
        # stacked[name]: [K, *shape], the K directions' components for that name (zeros if absent)
        self.stacked = {
            n: torch.stack([d[n] if n in d else torch.zeros_like(t) for d in directions])
            for n, t in self.base.items()
            if t.is_floating_point()
        }
        self.n_samples = sum(int(y.shape[0]) for _, y in self.batches)

    def __call__(self, coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coords = torch.as_tensor(np.asarray(coordinates), dtype=torch.float64, device=self.device)
        points = self._stacked_points(coords)
        with torch.no_grad(), model_mode(self.model, self.mode):
            if self.impl == "sequential":
                loss_sum, correct_sum = self._in_place_sums(points, len(coords))
            else:
                batch_sums = self._vmapped_sums if self.impl == "vmap" else self._copies_sums
                sums = [batch_sums(points, x, y) for x, y in self.batches]
                loss_sum = sum(losses.double() for losses, _ in sums)
                correct_sum = sum(hits.double() for _, hits in sums)
        return (loss_sum / self.n_samples).cpu().numpy(), (correct_sum / self.n_samples).cpu().numpy()

    def _in_place_sums(self, points: Params, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and hit sums of each point, its tensors copied into the model's own (restored after)."""
        own = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        originals = {n: t.detach().clone() for n, t in own.items()}
        sums = []  # per point and batch: (loss sum, hits)
        try:
            for name, value in self.shared.items():
                own[name].copy_(value)
            for i in range(count):
                for name, value in points.items():
                    own[name].copy_(value[i])
                for x, y in self.batches:
                    outputs = self.model(x)
                    sums += [self.loss_fn(outputs, y).sum(), correct(outputs, y, self.task).sum()]
        finally:
            for name, value in originals.items():
                own[name].copy_(value)
        totals = torch.stack([t.double() for t in sums]).reshape(count, len(self.batches), 2).sum(1)
        return totals[:, 0], totals[:, 1]

    def _stacked_points(self, coords: torch.Tensor) -> Params:
        points = {}
        for name, base in self.base.items():
            if name in self.stacked:
                d = self.stacked[name]
                offset = torch.tensordot(coords.to(d.dtype), d, dims=1)
                points[name] = base.unsqueeze(0) + offset
            else:  # integer buffers (num_batches_tracked) in train mode: a private copy per point
                points[name] = base.unsqueeze(0).expand(len(coords), *base.shape).clone()
        return points

    def _vmapped_sums(self, points: Params, x: torch.Tensor, y: torch.Tensor):
        batched = vmap(self._point_sums, in_dims=(0, None, None, None),
                       randomness="different" if self.mode == "train" else "error")
        return batched(points, self.shared, x, y)

    def _copies_sums(self, points: Params, x: torch.Tensor, y: torch.Tensor):
        """Loss and hit sums of each point over one batch, all points in one pass (`copies_forward`)."""
        count = len(next(iter(points.values())))
        tensors = {n: t.expand(count, *t.shape) for n, t in self.shared.items() if t.is_floating_point()}
        tensors.update({n: t for n, t in points.items() if t.is_floating_point()})
        outputs = copies_forward(self.model, tensors, x, count)
        outputs = outputs.reshape(count * x.shape[0], *outputs.shape[2:])
        targets = y.repeat(count, *([1] * (y.dim() - 1)))
        losses = self.loss_fn(outputs, targets).reshape(count, -1).sum(1)
        return losses, correct(outputs, targets, self.task).reshape(count, -1).sum(1)

    def _point_sums(self, point: Params, shared: Params, x: torch.Tensor, y: torch.Tensor):
        outputs = functional_call(self.model, (point, shared), (x,))
        return self.loss_fn(outputs, y).sum(), correct(outputs, y, self.task).sum()

    def chunk_size(self, max_memory_mb: float) -> int:
        """Points per call so that the stacked parameters plus the activations of every point of a pass fit the budget."""
        if not (isinstance(max_memory_mb, (int, float)) and max_memory_mb > 0):
            raise ValueError(f"max_memory_mb: must be > 0 (got {max_memory_mb!r})")
        per_point = self.point_bytes() + self.activation_bytes()
        return max(1, int(max_memory_mb * 2**20 // per_point))

    def point_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def activation_bytes(self) -> int:
        """Bytes of all module outputs for the largest data batch (an upper bound on a no_grad pass)."""
        largest = max(int(y.shape[0]) for _, y in self.batches)
        x = next(x for x, y in self.batches if int(y.shape[0]) == largest)
        total = [x[:1].numel() * x.element_size()]

        def count(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                total[0] += output.numel() * output.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(count) for m in leaves]
        state = {**{n: t.clone() for n, t in self.base.items()}, **self.shared}
        try:
            with torch.no_grad(), model_mode(self.model, "eval"):
                functional_call(self.model, state, (x[:1],))
        finally:
            for h in handles:
                h.remove()
        return total[0] * largest


def _checked_overrides(values: Params, state: Params, field: str) -> Params:
    out = {}
    for name, t in values.items():
        if name not in state:
            raise ValueError(f"{field}: {name!r} is not a parameter or buffer of the model")
        if tuple(t.shape) != tuple(state[name].shape):
            raise ValueError(f"{field}: {name} has shape {tuple(t.shape)}, expected {tuple(state[name].shape)}")
        if not state[name].is_floating_point():
            raise ValueError(f"{field}: {name} is an integer buffer and cannot be moved along a direction")
        out[name] = t.detach().to(state[name].device, state[name].dtype)
    return out


POINT_IMPLS = ("auto", "vmap", "copies", "sequential")


def _point_impl(model: nn.Module, device: torch.device) -> str:
    """impl="auto" of `PointEvaluator` (see there)."""
    if device.type != "cpu":
        return "vmap"
    if per_sample_model(model) and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "copies"
    return "sequential"


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    raise ValueError("model: has no parameters")


def _batches_on(data: Data, device: torch.device) -> list[Batch]:
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        batches = [data]
    else:
        batches = list(data)
    if not batches:
        raise ValueError("data: no batches")
    return [(x.to(device), y.to(device)) for x, y in batches]


def _infer_task(targets: torch.Tensor) -> str:
    return "regression" if targets.is_floating_point() else "classification"


# ---------------------------------------------------------------------------------------------
# flatness readout
# ---------------------------------------------------------------------------------------------


def flatness(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    data: Data,
    directions: Sequence[Params],
    radii: Sequence[float],
    *,
    mode: str = "eval",
    task: str | None = None,
    max_memory_mb: float = 1024.0,
) -> dict[str, Any]:
    """Loss increase L(θ ± r d_k) − L(θ) at each radius r, as mean and max over directions and signs.

    With filter-normalized d_k (Li et al. 2018), r is a step relative to each filter's own norm, so
    the readout compares minima of differently scaled networks.
    """
    radii = [float(r) for r in radii]
    if not radii or any(not math.isfinite(r) or r <= 0 for r in radii):
        raise ValueError(f"radii: need one or more finite radii > 0 (got {radii})")
    if not directions:
        raise ValueError("directions: need at least one direction")
    k = len(directions)
    rows = [np.zeros(k)]
    for r in radii:
        for i in range(k):
            for sign in (1.0, -1.0):
                row = np.zeros(k)
                row[i] = sign * r
                rows.append(row)
    evaluator = PointEvaluator(model, loss_fn, data, directions, mode=mode, task=task)
    coordinates = np.stack(rows)
    chunk = evaluator.chunk_size(max_memory_mb)
    losses = np.concatenate([evaluator(coordinates[s : s + chunk])[0] for s in range(0, len(rows), chunk)])
    base, increases = losses[0], (losses[1:] - losses[0]).reshape(len(radii), 2 * k)
    return {
        "radii": radii,
        "base_loss": float(base),
        "mean_increase": increases.mean(axis=1).tolist(),
        "max_increase": increases.max(axis=1).tolist(),
    }


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_axis(name: str, axis: Any) -> None:
    values = np.asarray(axis, dtype=np.float64) if not isinstance(axis, str) else np.array([])
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"{name}: must be a non-empty 1-D sequence of finite numbers")
