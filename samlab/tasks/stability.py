"""Background task "stability": the paper's (B, σ) grid, or the linear-stability check of a trained model.

The grid keeps its finished rows in the task's workdir, so a resumed task computes only the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from samlab.checkpoints import load_trained
from samlab.reporting import Reporter
from samlab.stability import (
    ETA_SCALES,
    check_batch,
    check_grid,
    check_repeats,
    model_stability_check,
    stability_grid,
)
from samlab.tasks.protocol import TaskState
from samlab.validation import check_choice, check_int, check_non_empty_list, check_positive

GRID_STATE = "stability_grid.json"
MODEL_STATE = "stability_model.json"
_GRID_DEFAULTS: dict[str, Any] = {
    "eta": 0.8, "Bs": list(range(1, 50)), "sigmas": list(range(1, 51)), "n": 100, "lam_max": 2.0,
    "repeats": 10, "steps": 1000, "seed": 0, "blowup": 1000.0,
}
_MODEL_DEFAULTS: dict[str, Any] = {
    "checkpoint": None, "etas": [0.1, 0.25, 0.5, 0.75, 1.0, 1.25], "eta_scale": "gd_limit",
    "Bs": [1, 2, 4, 8, 16, 32, 64], "n_samples": 128, "method": "matrix_free", "steps": 300, "repeats": 3,
    "seed": 0, "perturbation": 1e-3, "blowup": 1000.0,
}


def check_task(params: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill defaults of a "stability" task: mode "grid" (the paper's plane) or "model"."""
    mode = params.get("mode", "grid")
    if mode not in ("grid", "model"):
        raise ValueError(f"mode: must be 'grid' or 'model' (got {mode!r})")
    defaults = _GRID_DEFAULTS if mode == "grid" else _MODEL_DEFAULTS
    unknown = sorted(set(params) - set(defaults) - {"mode"})
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown parameter for a {mode} stability task (known: {sorted(defaults)})")
    out = {**defaults, **params, "mode": mode}
    if mode == "grid":
        return {**check_grid(out), "mode": mode}
    out = check_repeats(out)
    if not isinstance(out["checkpoint"], str) or not out["checkpoint"]:
        raise ValueError("checkpoint: the path of a trained model's checkpoint is required")
    out["n_samples"] = check_int("n_samples", out["n_samples"], 2)
    out["etas"] = [check_positive("etas", e) for e in check_non_empty_list("etas", out["etas"])]
    out["Bs"] = [check_batch("Bs", b, out["n_samples"]) for b in check_non_empty_list("Bs", out["Bs"])]
    out["perturbation"] = check_positive("perturbation", out["perturbation"])
    check_choice("eta_scale", out["eta_scale"], ETA_SCALES)
    check_choice("method", out["method"], ("exact", "matrix_free"))
    return out


def run_task(params: dict[str, Any], reporter: Reporter, workdir: Path, resume: bool) -> dict[str, Any] | None:
    """Background task "stability": the (B, σ) grid or a trained model's check, resumable from workdir."""
    params = check_task(params)
    if params["mode"] == "model":
        return _run_model_task(params, reporter, TaskState(workdir, MODEL_STATE, "stability", params))
    state = TaskState(workdir, GRID_STATE, "stability", params)
    saved = state.load(resume)
    rows: list[dict[str, Any]] = saved["rows"] if saved is not None else []
    if saved is not None:
        reporter.log(f"resumed the stability grid after {len(rows)} of {len(params['sigmas'])} rows")

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        state.save({"params": params, "rows": rows})
        reporter.result({"params": _grid_params(params), "rows": rows, "complete": False})

    result = stability_grid(**_grid_params(params), reporter=reporter, done=list(rows), on_row=keep)
    return result if result["complete"] else None


def _grid_params(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "mode"}


def _run_model_task(params: dict[str, Any], reporter: Reporter, state: TaskState) -> dict[str, Any]:
    trained = load_trained(params["checkpoint"], device="cpu")
    count = min(params["n_samples"], trained.data.n_train)
    x, y = trained.data.x_train[:count], trained.data.y_train[:count]
    for b in params["Bs"]:
        check_batch("Bs", b, count)
    result = model_stability_check(
        trained.model, trained.loss_fn, x, y, params["etas"], params["Bs"], steps=params["steps"],
        repeats=params["repeats"], seed=params["seed"], perturbation=params["perturbation"],
        blowup=params["blowup"], method=params["method"], eta_scale=params["eta_scale"], reporter=reporter,
    )
    state.save(result)
    return result
