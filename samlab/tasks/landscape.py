"""Background task "landscape": surfaces (1-D, 2-D, interpolation) or flatness of one or more checkpoints.

Each finished chunk of grid points is saved to the task's workdir (one file per surface, named by the
request's cache key) and published through `reporter.result`, so a page can draw the partial surface;
with `resume` the saved points are not computed again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from samlab.checkpoints import (
    Trained,
    file_digest,
    list_snapshots,
    load_trained,
    snapshot_epoch,
    snapshot_weights,
)
from samlab.devices import resolve_device
from samlab.landscape import (
    IGNORES,
    NORMS,
    Params,
    Surface,
    flatness,
    interpolation_direction,
    model_params,
    model_state,
    pca_directions,
    project_trajectory,
    random_directions,
    surface_1d,
    surface_2d,
)
from samlab.reporting import Reporter
from samlab.tasks.protocol import PartReporter, batches, seeded_subset
from samlab.tensors import MODES
from samlab.validation import check_bool, check_choice, check_device_name, check_int, check_known_fields

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


def cache_key(checkpoint_digest: str | Sequence[str], directions: dict, grid: dict, data: dict, mode: str) -> str:
    """Stable key of a landscape request: sha256 of the canonical JSON of its inputs."""
    canonical = json.dumps(
        {"checkpoints": checkpoint_digest, "directions": directions, "grid": grid, "data": data, "mode": mode},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def save_surface(surface: Surface, path: Path) -> None:
    """Atomic write (temporary file + rename), so a kill mid-write leaves the last good state."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        arrays = {f"axis{i}": a for i, a in enumerate(surface.axes)}
        np.savez(fh, loss=surface.loss, accuracy=surface.accuracy, done=surface.done, **arrays)
    os.replace(tmp, path)


def load_surface(path: Path) -> Surface:
    with np.load(Path(path)) as z:
        n_axes = sum(1 for key in z.files if key.startswith("axis"))
        axes = tuple(z[f"axis{i}"] for i in range(n_axes))
        return Surface(axes, z["loss"], z["accuracy"], z["done"])


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill in a landscape request (ValueError naming the field).

    {"checkpoints": [paths], "kind": "1d"|"2d"|"interpolation"|"flatness", "grid": {...},
     "directions": "random"|"pca", "seed", "norm", "ignore", "data": "train"|"test", "n_samples",
     "mode": "eval"|"train", "device", "batch_size", "max_memory_mb", "trajectory": bool,
     "radii": [...], "n_directions"}; "digests" (sha256 of each checkpoint) is filled in. Several checkpoints
    get the same directions seed and grid, each filter-normalized to its own weights; "interpolation" takes
    exactly two and evaluates train and test loss along (1 − α) θ_a + α θ_b.
    """
    check_known_fields(params, {*TASK_DEFAULTS, "checkpoints", "grid", "digests"})
    p = {**TASK_DEFAULTS, **params}
    check_choice("kind", p["kind"], KINDS)
    check_choice("directions", p["directions"], DIRECTION_KINDS)
    check_choice("norm", p["norm"], NORMS)
    check_choice("ignore", p["ignore"], IGNORES)
    check_choice("data", p["data"], SPLITS)
    check_choice("mode", p["mode"], MODES)
    check_int("seed", p["seed"], 0, 2**31 - 1)
    check_int("batch_size", p["batch_size"], 1, 1_000_000)
    check_int("n_directions", p["n_directions"], 1, 64)
    if p["n_samples"] is not None:
        check_int("n_samples", p["n_samples"], 1, 100_000_000)
    if not isinstance(p["max_memory_mb"], (int, float)) or not p["max_memory_mb"] > 0:
        raise ValueError(f"max_memory_mb: must be > 0 (got {p['max_memory_mb']!r})")
    check_bool("trajectory", p["trajectory"])
    check_device_name(p["device"])
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
        check_int(f"grid.{n}", grid[n], 2, 1001)
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
    """Background task "landscape" (see the module docstring)."""
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

    def __init__(self, p, runs: list[Trained], reporter: Reporter, workdir: Path, key: str, resume: bool) -> None:
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
            previous = load_surface(state_path) if self.resume and state_path.is_file() else None
            trained = plan["trained"]
            evaluate = surface_2d if len(plan["axes"]) == 2 else surface_1d
            args = (*plan["directions"], *plan["axes"])
            size = int(np.prod([len(a) for a in plan["axes"]]))
            surface = evaluate(
                trained.model, trained.loss_fn, _task_batches(trained, plan["split"], p), *args,
                center=plan["center"], mode=p["mode"], task=trained.data.task, max_memory_mb=p["max_memory_mb"],
                reporter=PartReporter(self.reporter, offset, size, total), resume_from=previous,
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

    def _directions(self, path: str, trained: Trained, k: int, entry: dict[str, Any]) -> list[Params]:
        p = self.p
        if p["directions"] == "pca":
            snapshots = [snapshot_weights(s, trained.model) for s in list_snapshots(Path(path).parent)]
            directions, explained = pca_directions([*snapshots, model_params(trained.model)], k=k)
            entry["explained_variance"] = explained.tolist()
            return directions
        return random_directions(trained.model, k, norm=p["norm"], ignore=p["ignore"], seed=p["seed"])

    def _update(self, plan: dict[str, Any], surface: Surface, state_path: Path, force: bool = False) -> None:
        save_surface(surface, state_path)
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


def _run_header(path: str, trained: Trained) -> dict[str, Any]:
    return {"checkpoint": path, "label": trained.config.label(), "epoch": trained.epoch, "step": trained.step}


def _axis(grid: dict[str, Any], axis: str) -> np.ndarray:
    return np.linspace(grid[f"{axis}min"], grid[f"{axis}max"], grid[f"n{axis}"])


def _task_batches(trained: Trained, split: str, p: dict[str, Any]) -> list[tuple]:
    """The requested split, a seeded subset of `n_samples` when smaller, cut into `batch_size` batches."""
    data = trained.data
    x, y = (data.x_train, data.y_train) if split == "train" else (data.x_test, data.y_test)
    x, y = seeded_subset(x, y, p["n_samples"], p["seed"])
    return batches(x, y, p["batch_size"])


def _trajectory(path: str, model: nn.Module, d1: Params, d2: Params) -> dict[str, Any]:
    """The run's saved snapshots projected on the plane of (d1, d2) centred at the final weights."""
    files = list_snapshots(Path(path).parent)
    snapshots = [snapshot_weights(s, model) for s in files]
    if not snapshots:
        return {"x": [], "y": [], "epochs": []}
    xs, ys = project_trajectory(snapshots, model_params(model), d1, d2)
    return {"x": xs.tolist(), "y": ys.tolist(), "epochs": [snapshot_epoch(s) for s in files]}
