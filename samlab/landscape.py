"""Loss landscapes (Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets",
NeurIPS 2018): filter-normalized random directions, 1-D and 2-D slices, interpolation between two
solutions, PCA directions of a trajectory and its projection, and a flatness readout.

A point in parameter space and a direction are both `Params`: a dict name -> tensor keyed like
`dict(model.named_parameters())`. A direction may also carry floating-point buffers (BatchNorm
running statistics), which then move along with the parameters: `interpolation_direction` between
two models does so, so that an interpolation reproduces both endpoints in eval mode.

Surfaces are evaluated in chunks of grid points at once: the parameters of every point of a chunk are
stacked along a leading axis and `torch.func.vmap` runs `torch.func.functional_call` over them, so one
batched forward pass replaces one model copy per point. Everything runs under `no_grad` on the model's
device; the model passed in is never modified (its parameters, buffers and train/eval flag are the
same afterwards). The loss function is a *per-sample* loss (`samlab.losses.per_sample_loss`), so the
same forward pass gives the mean loss and the accuracy (`samlab.losses.correct`) of every point.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from samlab.losses import PerSampleLoss, correct
from samlab.reporting import Reporter

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
Data = Batch | Iterable[Batch]

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
MODES = ("eval", "train")
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
    _check_int("k", k, 1, 64)
    _check_choice("norm", norm, NORMS)
    _check_choice("ignore", ignore, IGNORES)
    _check_int("seed", seed, 0, 2**63 - 1)
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
    from samlab.hessian import top_eigenvalues

    _check_int("k", k, 1, 64)
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
    _check_int("k", k, 1, 64)
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

    def save(self, path: Path) -> None:
        """Atomic write (temporary file + rename), so a kill mid-write leaves the last good state."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            arrays = {f"axis{i}": a for i, a in enumerate(self.axes)}
            np.savez(fh, loss=self.loss, accuracy=self.accuracy, done=self.done, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Surface:
        with np.load(Path(path)) as z:
            n_axes = sum(1 for key in z.files if key.startswith("axis"))
            axes = tuple(z[f"axis{i}"] for i in range(n_axes))
            return cls(axes, z["loss"], z["accuracy"], z["done"])


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
    statistics. Points are evaluated in vmapped chunks sized to `max_memory_mb`; after each chunk the
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

    Same contract as `surface_1d`: per-sample `loss_fn`, vmapped chunks under a memory budget,
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
    todo = np.flatnonzero(~done)
    for start in range(0, len(todo), chunk):
        if reporter.should_stop():
            break
        index = todo[start : start + chunk]
        loss[index], accuracy[index] = evaluator(coordinates[index])
        done[index] = True
        reporter.progress(int(done.sum()), done.size, f"landscape: {int(done.sum())}/{done.size} grid points")
        if on_update is not None:
            on_update(surface)
    return surface


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

    `vectorize` (default: on accelerators only) maps the chunk's points through one vmapped pass. On a
    CPU the points of a chunk go one after another through the same functional call instead: vmap turns
    each convolution into a grouped one, which CPU kernels run several times slower than a plain
    convolution over the same data (measured 3.4× on the digits CNN, benchmarks/landscape_vs_loss_landscapes.py).
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
        vectorize: bool | None = None,
    ) -> None:
        _check_choice("mode", mode, MODES)
        self.model, self.loss_fn, self.mode = model, loss_fn, mode
        self.device = _model_device(model)
        self.vectorize = self.device.type != "cpu" if vectorize is None else bool(vectorize)
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
        loss_sum = torch.zeros(len(coords), dtype=torch.float64, device=self.device)
        correct_sum = torch.zeros_like(loss_sum)
        evaluate = self._vmapped_sums if self.vectorize else self._sequential_sums
        with torch.no_grad(), _training_flag(self.model, self.mode == "train"):
            for x, y in self.batches:
                losses, hits = evaluate(points, x, y)
                loss_sum += losses.double()
                correct_sum += hits.double()
        return (loss_sum / self.n_samples).cpu().numpy(), (correct_sum / self.n_samples).cpu().numpy()

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

    def _sequential_sums(self, points: Params, x: torch.Tensor, y: torch.Tensor):
        count = len(next(iter(points.values()))) if points else 1
        sums = [self._point_sums({n: t[i] for n, t in points.items()}, self.shared, x, y) for i in range(count)]
        return torch.stack([s[0] for s in sums]), torch.stack([s[1] for s in sums])

    def _point_sums(self, point: Params, shared: Params, x: torch.Tensor, y: torch.Tensor):
        outputs = functional_call(self.model, (point, shared), (x,))
        return self.loss_fn(outputs, y).sum(), correct(outputs, y, self.task).sum()

    def chunk_size(self, max_memory_mb: float) -> int:
        """Points per vmapped call so that stacked parameters plus activations fit the budget."""
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
            with torch.no_grad(), _training_flag(self.model, False):
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


@contextlib.contextmanager
def _training_flag(model: nn.Module, training: bool):
    """Set train/eval for the duration and restore every module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


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
# cache key
# ---------------------------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(checkpoint_digest: str | Sequence[str], directions: dict, grid: dict, data: dict, mode: str) -> str:
    """Stable key of a landscape request: sha256 of the canonical JSON of its inputs."""
    canonical = json.dumps(
        {"checkpoints": checkpoint_digest, "directions": directions, "grid": grid, "data": data, "mode": mode},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# background task "landscape"
# ---------------------------------------------------------------------------------------------

KINDS = ("1d", "2d", "interpolation", "flatness")
DIRECTION_KINDS = ("random", "pca")
SPLITS = ("train", "test")
DEFAULT_GRIDS: dict[str, dict[str, Any]] = {
    "1d": {"min": -1.0, "max": 1.0, "n": 41},
    "interpolation": {"min": -0.5, "max": 1.5, "n": 41},
    "2d": {"xmin": -1.0, "xmax": 1.0, "nx": 41, "ymin": -1.0, "ymax": 1.0, "ny": 41},
}
TASK_DEFAULTS: dict[str, Any] = {
    "kind": "2d",
    "directions": "random",
    "seed": 0,
    "norm": "filter",
    "ignore": "biasbn",
    "data": "train",
    "n_samples": 2048,
    "mode": "eval",
    "device": "auto",
    "batch_size": 512,
    "max_memory_mb": 1024.0,
    "trajectory": False,
    "radii": [0.05, 0.1, 0.2, 0.5],
    "n_directions": 4,
}
PUBLISH_EVERY_S = 1.0


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill in a landscape request (ValueError naming the field).

    {"checkpoints": [paths], "kind": "1d"|"2d"|"interpolation"|"flatness", "grid": {...},
     "directions": "random"|"pca", "seed", "norm", "ignore", "data": "train"|"test", "n_samples",
     "mode": "eval"|"train", "device", "batch_size", "max_memory_mb", "trajectory": bool,
     "radii": [...], "n_directions"}; "digests" (sha256 of each checkpoint) is filled in. Several checkpoints get the same directions seed and grid,
    each filter-normalized to its own weights; "interpolation" takes exactly two and evaluates
    train and test loss along (1 − α) θ_a + α θ_b.
    """
    if not isinstance(params, dict):
        raise ValueError("params: expected a mapping")
    known = {*TASK_DEFAULTS, "checkpoints", "grid", "digests"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown field; known: {sorted(known)}")
    p = {**TASK_DEFAULTS, **params}
    _check_choice("kind", p["kind"], KINDS)
    _check_choice("directions", p["directions"], DIRECTION_KINDS)
    _check_choice("norm", p["norm"], NORMS)
    _check_choice("ignore", p["ignore"], IGNORES)
    _check_choice("data", p["data"], SPLITS)
    _check_choice("mode", p["mode"], MODES)
    _check_int("seed", p["seed"], 0, 2**31 - 1)
    _check_int("batch_size", p["batch_size"], 1, 1_000_000)
    _check_int("n_directions", p["n_directions"], 1, 64)
    if p["n_samples"] is not None:
        _check_int("n_samples", p["n_samples"], 1, 100_000_000)
    if not isinstance(p["max_memory_mb"], (int, float)) or not p["max_memory_mb"] > 0:
        raise ValueError(f"max_memory_mb: must be > 0 (got {p['max_memory_mb']!r})")
    if not isinstance(p["trajectory"], bool):
        raise ValueError(f"trajectory: must be true or false (got {p['trajectory']!r})")
    if not isinstance(p["device"], str):
        raise ValueError(f"device: must be a device name such as 'auto', 'cpu', 'cuda' (got {p['device']!r})")
    p["checkpoints"] = _checked_checkpoints(p.get("checkpoints"), p["kind"])
    # the contents, not just the paths, so a checkpoint trained further is a new request
    p["digests"] = [file_digest(c) for c in p["checkpoints"]]
    if p["kind"] == "flatness":
        p["radii"] = [float(r) for r in p["radii"]] if isinstance(p["radii"], list) else p["radii"]
        if not isinstance(p["radii"], list) or not p["radii"] or any(not r > 0 for r in p["radii"]):
            raise ValueError(f"radii: need a non-empty list of radii > 0 (got {params.get('radii')!r})")
        p["grid"] = None
    else:
        p["grid"] = _checked_grid(p.get("grid"), p["kind"])
    return p


def _checked_checkpoints(paths: Any, kind: str) -> list[str]:
    if not isinstance(paths, list) or not paths or not all(isinstance(x, str) for x in paths):
        raise ValueError("checkpoints: need a non-empty list of checkpoint paths")
    if kind == "interpolation" and len(paths) != 2:
        raise ValueError(f"checkpoints: interpolation needs exactly two checkpoints (got {len(paths)})")
    if len(paths) > 8:
        raise ValueError(f"checkpoints: at most 8 runs side by side (got {len(paths)})")
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"checkpoints: no file at {path}")
    return [str(Path(x)) for x in paths]


def _checked_grid(grid: Any, kind: str) -> dict[str, Any]:
    defaults = DEFAULT_GRIDS[kind]
    grid = {**defaults, **(grid or {})}
    unknown = set(grid) - set(defaults)
    if unknown:
        raise ValueError(f"grid.{sorted(unknown)[0]}: unknown field; known: {sorted(defaults)}")
    for axis in ("x", "y") if kind == "2d" else ("",):
        lo, hi, n = f"{axis}min", f"{axis}max", f"n{axis}"
        _check_int(f"grid.{n}", grid[n], 2, 1001)
        for key in (lo, hi):
            if not isinstance(grid[key], (int, float)) or isinstance(grid[key], bool) or not math.isfinite(grid[key]):
                raise ValueError(f"grid.{key}: must be a finite number (got {grid[key]!r})")
            grid[key] = float(grid[key])
        if not grid[lo] < grid[hi]:
            raise ValueError(f"grid.{lo}: must be below grid.{hi} (got {grid[lo]} and {grid[hi]})")
    return grid


def task_cache_key(params: dict[str, Any]) -> str:
    """The cache key of a (checked) request: checkpoint contents, directions, grid, data and mode."""
    p = check_task(params)
    directions = {k: p[k] for k in ("kind", "directions", "seed", "norm", "ignore", "trajectory")}
    if p["kind"] == "flatness":
        directions["n_directions"] = p["n_directions"]
    grid = p["grid"] if p["grid"] is not None else {"radii": p["radii"]}
    data = {"split": p["data"], "n_samples": p["n_samples"], "seed": p["seed"]}
    return cache_key(p["digests"], directions, grid, data, p["mode"])


def run_task(params: dict[str, Any], reporter: Reporter, workdir: Path, resume: bool) -> dict[str, Any]:
    """Background task "landscape": surfaces of one or more checkpoints, resumable from `workdir`.

    Each finished chunk of grid points is saved to `workdir` (one file per surface, named by the
    request's cache key) and published through `reporter.result` so a page can draw the partial
    surface; with `resume` the saved points are not computed again.
    """
    from samlab.devices import resolve_device
    from samlab.train import load_trained

    p = check_task(params)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = task_cache_key(p)
    device = resolve_device(p["device"])
    runs = [load_trained(path, device=device) for path in p["checkpoints"]]
    job = _LandscapeJob(p, runs, reporter, workdir, key, resume)
    return job.run()


class _LandscapeJob:
    """One landscape request: builds the surfaces in turn, saving and publishing as it goes."""

    def __init__(self, p, runs, reporter: Reporter, workdir: Path, key: str, resume: bool) -> None:
        self.p, self.runs, self.reporter, self.workdir, self.key, self.resume = p, runs, reporter, workdir, key, resume
        self.result: dict[str, Any] = {"kind": p["kind"], "key": key, "complete": False,
                                       "runs": [_run_header(path, t) for path, t in zip(p["checkpoints"], runs)]}
        self._published = 0.0

    def run(self) -> dict[str, Any]:
        kind = self.p["kind"]
        if kind == "flatness":
            self._flatness()
        else:
            self._surfaces()
        self.result["complete"] = all(r.get("done_fraction", 1.0) == 1.0 for r in self._surface_entries())
        self.reporter.result(self.result)
        return self.result

    def _surface_entries(self) -> list[dict[str, Any]]:
        if self.p["kind"] == "interpolation":
            return [self.result.get(split, {"done_fraction": 0.0}) for split in SPLITS]
        return self.result["runs"]

    # surfaces ---------------------------------------------------------------------------------
    def _surfaces(self) -> None:
        p = self.p
        plans = self._plans()
        total = sum(int(np.prod([len(a) for a in plan["axes"]])) for plan in plans)
        offset = 0
        for index, plan in enumerate(plans):
            if self.reporter.should_stop():
                break
            state_path = self.workdir / f"landscape-{self.key[:16]}-{index}.npz"
            previous = Surface.load(state_path) if self.resume and state_path.is_file() else None
            trained = plan["trained"]
            evaluate = surface_2d if len(plan["axes"]) == 2 else surface_1d
            args = (*plan["directions"], *plan["axes"])
            surface = evaluate(
                trained.model, trained.loss_fn, _task_batches(trained, plan["split"], p), *args,
                center=plan["center"], mode=p["mode"], task=trained.data.task, max_memory_mb=p["max_memory_mb"],
                reporter=_OffsetReporter(self.reporter, offset, total), resume_from=previous,
                on_update=lambda s, plan=plan, path=state_path: self._update(plan, s, path),
            )
            self._update(plan, surface, state_path, force=True)
            offset += surface.done.size

    def _plans(self) -> list[dict[str, Any]]:
        p = self.p
        if p["kind"] == "interpolation":
            a, b = self.runs
            direction = interpolation_direction(a.model, b.model)
            axes = [_axis(p["grid"], "")]
            self.result["alphas"] = axes[0].tolist()
            return [{"trained": a, "split": split, "directions": [direction], "axes": axes,
                     "center": model_state(a.model), "entry": self.result.setdefault(split, {})}
                    for split in SPLITS]
        axes = [_axis(p["grid"], "")] if p["kind"] == "1d" else [_axis(p["grid"], "x"), _axis(p["grid"], "y")]
        self.result["axes"] = [a.tolist() for a in axes]
        plans = []
        for path, trained, entry in zip(p["checkpoints"], self.runs, self.result["runs"]):
            directions = self._directions(path, trained, len(axes), entry)
            if p["trajectory"] and len(axes) == 2:
                entry["trajectory"] = _trajectory(path, trained.model, *directions)
            plans.append({"trained": trained, "split": p["data"], "directions": directions, "axes": axes,
                          "center": None, "entry": entry})
        return plans

    def _directions(self, path: str, trained, k: int, entry: dict[str, Any]) -> list[Params]:
        p = self.p
        if p["directions"] == "pca":
            from samlab.train import list_snapshots

            snapshots = [_snapshot_state(s, trained.model) for s in list_snapshots(Path(path).parent)]
            directions, explained = pca_directions([*snapshots, model_params(trained.model)], k=k)
            entry["explained_variance"] = explained.tolist()
            return directions
        return random_directions(trained.model, k, norm=p["norm"], ignore=p["ignore"], seed=p["seed"])

    def _update(self, plan: dict[str, Any], surface: Surface, state_path: Path, force: bool = False) -> None:
        surface.save(state_path)
        plan["entry"].update(surface.to_dict())
        plan["entry"].pop("axes", None)
        now = time.monotonic()
        if force or now - self._published >= PUBLISH_EVERY_S:
            self._published = now
            self.reporter.result(self.result)

    # flatness ---------------------------------------------------------------------------------
    def _flatness(self) -> None:
        p = self.p
        for i, (trained, entry) in enumerate(zip(self.runs, self.result["runs"])):
            if self.reporter.should_stop():
                break
            directions = random_directions(trained.model, p["n_directions"], norm=p["norm"], ignore=p["ignore"],
                                           seed=p["seed"])
            entry.update(flatness(trained.model, trained.loss_fn, _task_batches(trained, p["data"], p), directions,
                                  p["radii"], mode=p["mode"], task=trained.data.task,
                                  max_memory_mb=p["max_memory_mb"]))
            entry["done_fraction"] = 1.0
            self.reporter.progress(i + 1, len(self.runs), f"flatness: {i + 1}/{len(self.runs)} runs")
            self.reporter.result(self.result)
        for entry in self.result["runs"]:
            entry.setdefault("done_fraction", 0.0)


class _OffsetReporter(Reporter):
    """Forwards to a reporter, shifting progress so several surfaces add up to one bar."""

    def __init__(self, inner: Reporter, offset: int, total: int) -> None:
        self.inner, self.offset, self.total = inner, offset, total

    def progress(self, done: float, total: float, message: str = "") -> None:
        self.inner.progress(self.offset + done, self.total, message)

    def log(self, message: str) -> None:
        self.inner.log(message)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def _run_header(path: str, trained) -> dict[str, Any]:
    return {"checkpoint": path, "label": trained.config.label(), "epoch": trained.epoch, "step": trained.step}


def _axis(grid: dict[str, Any], axis: str) -> np.ndarray:
    return np.linspace(grid[f"{axis}min"], grid[f"{axis}max"], grid[f"n{axis}"])


def _task_batches(trained, split: str, p: dict[str, Any]) -> list[Batch]:
    """The requested split, a seeded subset of `n_samples` when smaller, cut into `batch_size` batches."""
    data = trained.data
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    if p["n_samples"] is not None and p["n_samples"] < len(x):
        generator = torch.Generator().manual_seed(p["seed"])
        index = torch.randperm(len(x), generator=generator)[: p["n_samples"]].to(x.device)
        x, y = x[index], y[index]
    size = p["batch_size"]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _snapshot_state(path: Path, model: nn.Module) -> Params:
    payload = torch.load(path, map_location=_model_device(model), weights_only=True)
    names = {name for name, _ in model.named_parameters()}
    return {name: t for name, t in payload["model"].items() if name in names}


def _trajectory(path: str, model: nn.Module, d1: Params, d2: Params) -> dict[str, Any]:
    """The run's saved snapshots projected on the plane of (d1, d2) centred at the final weights."""
    from samlab.train import list_snapshots

    snapshots = [_snapshot_state(s, model) for s in list_snapshots(Path(path).parent)]
    if not snapshots:
        return {"x": [], "y": [], "epochs": []}
    xs, ys = project_trajectory(snapshots, model_params(model), d1, d2)
    epochs = [int(s.stem.split("_")[-1]) for s in list_snapshots(Path(path).parent)]
    return {"x": xs.tolist(), "y": ys.tolist(), "epochs": epochs}


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)} (got {value!r})")


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}: must be an integer in [{lo}, {hi}] (got {value!r})")


def _check_axis(name: str, axis: Any) -> None:
    values = np.asarray(axis, dtype=np.float64) if not isinstance(axis, str) else np.array([])
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"{name}: must be a non-empty 1-D sequence of finite numbers")
